//! The SSH connection's TCP socket, kept in quick-ack mode.

/// The connection's socket, acknowledging what the node sends at once. sshd leaves Nagle's
/// algorithm on for connections without a terminal: it holds a small packet back until the one
/// before is acknowledged, and Linux delays acknowledgements by up to 40 ms. That stalled the
/// direct-tcpip confirmation (after sshd's debug messages on login) and every streamed event
/// that followed another within 40 ms, the done event of a short generation included. Quick-ack
/// mode wears off by itself, so it is set again after every read.
pub(super) struct QuickAck(tokio::net::TcpStream);

impl QuickAck {
    pub(super) fn new(tcp: tokio::net::TcpStream) -> QuickAck {
        QuickAck(tcp)
    }

    fn rearm(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // Only a latency hint: a socket that refuses it still works.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.rearm();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
