//! The hive's serving loop, bounded against whoever can reach its port: at most `cap`
//! connections (below the process's file descriptor limit, so the hive always has descriptors
//! left for its workers, their sockets, its log and audit files), request heads of at most
//! `MAX_HEAD_BYTES` and `MAX_HEADERS` headers read within `HEADER_READ_TIMEOUT`, and idle
//! connections closed after `IDLE_TIMEOUT`. When every connection is taken, the one idle for
//! longest (one that sent nothing, or finished its requests) is closed to make room, so a
//! crowd of idle connections cannot lock the node's owner out; only when all are busy is a new
//! one turned away.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::server::Peer;

/// Descriptors left to everything but connections: each worker's pipes and socket, the hive's
/// connections to its workers, the log, audit, nonce and pid files, the listeners.
const RESERVED_FDS: u64 = 256;
/// Connections at most, whatever the descriptor limit.
const MAX_CONNECTIONS: usize = 4096;
/// A request's head (request line and headers) must arrive whole within this time.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request under way for this long is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Headers a request may carry at most (the queen sends five).
pub(crate) const MAX_HEADERS: usize = 64;
/// The read buffer of a connection, and so the largest request head: a larger one is refused
/// (431) without being kept.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Raises this process's soft limit on open files to its hard limit (a crowd of connections
/// should meet the connection cap, not EMFILE); returns the limit in force.
pub(crate) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // An unlimited hard limit is still bounded by the kernel's nr_open (2^20 by default).
    let target = hard.min(1 << 20);
    if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    }
}

/// How many connections fit below a descriptor limit of `fd_limit`.
pub(crate) fn connection_cap(fd_limit: u64) -> usize {
    let room = fd_limit.saturating_sub(RESERVED_FDS);
    usize::try_from(room)
        .unwrap_or(MAX_CONNECTIONS)
        .clamp(16, MAX_CONNECTIONS)
}

/// A listener the loop accepts from: TCP (Nagle off) or a Unix socket.
pub(crate) trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_peer(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Peer)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&mut self) -> std::io::Result<(Self::Io, Peer)> {
        let (tcp, addr) = self.accept().await?;
        // A token event is one small write: with Nagle on, the next waits for a delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
        }
        Ok((tcp, Peer::of_tcp(&addr)))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&mut self) -> std::io::Result<(Self::Io, Peer)> {
        let (unix, _) = self.accept().await?;
        let peer = Peer::of_unix(&unix);
        Ok((unix, peer))
    }
}

/// One connection as the loop sees it.
struct Conn {
    /// Requests under way (their answers not yet sent to the end).
    busy: AtomicUsize,
    /// When it last started or finished a request (or was accepted).
    last: Mutex<Instant>,
    close: CancellationToken,
}

impl Conn {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.busy.load(Ordering::SeqCst) == 0)
            .then(|| *self.last.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Held while a request is under way on its connection: from its head to the end of its answer.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        conn.touch();
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for one more connection under `cap`: closes the connection idle for longest
    /// when all are taken. False when every one is busy.
    fn make_room(&self, cap: usize) -> bool {
        let mut conns = self.lock();
        if conns.len() < cap {
            return true;
        }
        let oldest = conns
            .iter()
            .filter_map(|(id, c)| c.idle_since().map(|at| (at, *id)))
            .min()
            .map(|(_, id)| id);
        match oldest.and_then(|id| conns.remove(&id)) {
            Some(victim) => {
                victim.close.cancel();
                true
            }
            None => false,
        }
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            close: CancellationToken::new(),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Serves `app` on `listener` with at most `cap` connections until `shutdown` completes; then
/// takes no new connection, lets those under way finish their requests, and returns.
pub(crate) async fn serve<L: Accept>(
    mut listener: L,
    app: axum::Router,
    cap: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let table = Arc::new(Table::default());
    let stop = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut turned_away: u64 = 0;
    loop {
        let (io, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept_peer() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: wait for some to be released, as axum does.
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !table.make_room(cap) {
            turned_away += 1;
            // Once per power of two: a flood does not flood the log too.
            if turned_away.is_power_of_two() {
                tracing::warn!(peer = %peer, "all {cap} connections are busy; turned away {turned_away} so far");
            }
            continue;
        }
        let (id, conn) = table.add();
        let table = table.clone();
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            connection(io, peer, app, conn, stop).await;
            table.lock().remove(&id);
        });
    }
    stop.cancel();
    while table.len() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connection<I>(
    io: I,
    peer: Peer,
    app: axum::Router,
    conn: Arc<Conn>,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let on = conn.clone();
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let app = app.clone();
            let busy = Busy::new(on.clone());
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer.clone()));
            async move {
                let response = tower::ServiceExt::oneshot(app, request.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|never: Infallible| match never {});
                // The request is under way until its answer's last byte is sent: a stream keeps its
                // connection busy, so it is never taken as idle.
                let (parts, body) = response.into_parts();
                let body =
                    axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
                        let _busy = &busy;
                        chunk
                    }));
                Ok::<_, Infallible>(axum::response::Response::from_parts(parts, body))
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES);
    let served = builder.serve_connection(TokioIo::new(io), service);
    let mut served = std::pin::pin!(served);
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    loop {
        tokio::select! {
            biased;
            () = conn.close.cancelled() => return,
            () = stop.cancelled() => {
                served.as_mut().graceful_shutdown();
                let _ = served.await;
                return;
            }
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                if conn.idle_since().is_some_and(|at| at.elapsed() >= IDLE_TIMEOUT) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_below_the_descriptor_limit() {
        assert_eq!(connection_cap(1024), 768);
        assert_eq!(connection_cap(100), 16);
        assert_eq!(connection_cap(u64::MAX), MAX_CONNECTIONS);
    }

    #[test]
    fn a_full_table_closes_the_connection_idle_for_longest_and_never_a_busy_one() {
        let table = Table::default();
        let (_, first) = table.add();
        let (_, second) = table.add();
        let busy = Busy::new(first.clone());
        assert!(table.make_room(2));
        assert!(second.close.is_cancelled(), "the idle one made room");
        assert!(!first.close.is_cancelled(), "a busy one is never closed");
        let (_, third) = table.add();
        let _also_busy = Busy::new(third);
        assert!(!table.make_room(2), "all busy: no room");
        drop(busy);
        assert!(table.make_room(2));
        assert!(first.close.is_cancelled());
    }
}
