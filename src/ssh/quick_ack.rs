//! The SSH connection's TCP socket, kept in quick-ack mode.

/// The connection's socket, acknowledging what the node sends at once. sshd leaves Nagle's
/// algorithm on for connections without a terminal: it holds a small packet back until the one
/// before is acknowledged, and Linux delays acknowledgements by up to 40 ms. That stalled the
/// direct-tcpip confirmation (after sshd's debug messages on login) and every streamed event
/// that followed another within 40 ms, the done event of a short generation included. Quick-ack
/// mode wears off by itself, so it is set again after every read from the socket.
///
/// Reads are buffered: russh reads each packet's length, then its body, so unbuffered every
/// packet cost two reads and two re-arms, and an empty read to find the socket drained.
pub(super) struct QuickAck {
    tcp: tokio::net::TcpStream,
    buf: Box<[u8]>,
    /// What of `buf` is read from the socket and not yet taken.
    start: usize,
    end: usize,
}

/// About what one read of a busy connection brings (a few SSH packets).
const READ_BUFFER: usize = 16 * 1024;

impl QuickAck {
    pub(super) fn new(tcp: tokio::net::TcpStream) -> QuickAck {
        QuickAck {
            tcp,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn rearm(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // Only a latency hint: a socket that refuses it still works.
            let _ = socket2::SockRef::from(&self.tcp).set_tcp_quickack(true);
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
        if buf.remaining() == 0 {
            return std::task::Poll::Ready(Ok(()));
        }
        if this.start == this.end {
            let mut into = tokio::io::ReadBuf::new(&mut this.buf);
            std::task::ready!(std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut into))?;
            let read = into.filled().len();
            if read == 0 {
                // The end of the stream.
                return std::task::Poll::Ready(Ok(()));
            }
            this.rearm();
            this.start = 0;
            this.end = read;
        }
        let n = buf.remaining().min(this.end - this.start);
        buf.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, data)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
