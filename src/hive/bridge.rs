//! `rbee hive bridge --socket PATH`: one connection to the hive's Unix socket, relayed to this
//! process's stdin and stdout. Where sshd refuses forwarding, the queen runs it in an exec
//! channel and speaks HTTP to the hive through it, one bridge per connection.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, IoContext, Result};

pub(crate) fn run(socket: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .doing("start the runtime")?;
    let result = runtime.block_on(relay(socket));
    // Reading stdin blocks a thread that no task can cancel: leave it behind, the process is
    // done.
    runtime.shutdown_background();
    result
}

async fn relay(socket: &Path) -> Result<()> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        Error::hive(format!(
            "cannot reach the hive at `{}`: {e}",
            socket.display()
        ))
    })?;
    let (mut from_hive, mut to_hive) = stream.into_split();
    let up = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_hive.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The queen sent all it will: the hive answers, then closes its end.
        let _ = to_hive.shutdown().await;
        std::future::pending::<()>().await;
    };
    // Each read is written and flushed at once: a streamed token must not wait in a buffer.
    let down = async {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_hive.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).await.is_err() || stdout.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    // The hive's end decides: once it has closed, the exchange is over.
    tokio::select! {
        () = down => {}
        () = up => {}
    }
    Ok(())
}
