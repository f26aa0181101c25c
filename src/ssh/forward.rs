//! Local ports forwarded to the node's loopback through direct-tcpip channels of a session.

use std::sync::Arc;

use russh::client;
use tokio::task::JoinHandle;

use crate::error::{IoContext, Result};
use crate::ssh::known_hosts::Checker;

/// A port on this machine's loopback whose connections reach `127.0.0.1:remote_port` on the
/// node through `handle`, and the task that accepts them.
pub(super) async fn listen(
    handle: Arc<client::Handle<Checker>>,
    node: String,
    remote_port: u16,
) -> Result<(u16, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .doing("listen on the loopback for a forward")?;
    let local_port = listener
        .local_addr()
        .doing("read the forward's local port")?
        .port();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, peer)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let handle = handle.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let open = handle.channel_open_direct_tcpip(
                    "127.0.0.1",
                    u32::from(remote_port),
                    "127.0.0.1",
                    u32::from(peer.port()),
                );
                let channel = open.await;
                match channel {
                    Ok(channel) => {
                        let mut stream = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                    }
                    Err(e) => {
                        tracing::debug!(node = %node, "tunnel to port {remote_port} refused: {e}");
                    }
                }
            });
        }
    });
    Ok((local_port, task))
}
