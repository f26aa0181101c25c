//! `rbee hive serve`: the per-node daemon. It detaches from whoever started it, holds its
//! pidfile, logs to `hive.log`, serves on the Unix socket `hive.sock` in its directory (on a TCP
//! port instead when its node uses `transport = "http"`; `GET /metrics` alone on an optional
//! TCP port), and on SIGTERM, SIGINT or a signed `POST /v1/shutdown` stops its workers and exits.

pub(crate) mod args;
pub(crate) mod bridge;
pub(crate) mod download;
pub(crate) mod entry;
pub mod gguf;
pub(crate) mod key_routes;
pub(crate) mod keys;
pub(crate) mod logs;
pub mod memory;
pub(crate) mod metrics;
pub(crate) mod pidfile;
pub(crate) mod policy;
pub(crate) mod registry;
pub(crate) mod relay;
pub(crate) mod requests;
pub(crate) mod routes;
pub(crate) mod supervisor;
pub(crate) mod verify;
pub(crate) mod worker_proc;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};
use args::ServeArgs;
use pidfile::PidFile;
use registry::Registry;
use routes::Hive;

pub(crate) const PID_FILE: &str = "hive.pid";
/// How long a stopping hive lets requests in flight finish.
pub(crate) const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
pub(crate) const LOG_FILE: &str = "hive.log";
/// Connections the metrics port takes at most (within the descriptors kept free of the
/// hive's own connection cap).
const METRICS_CONNECTIONS: usize = 16;
/// How long the relays cut at the end of the drain may take to send their last event.
const RELAY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest a hive takes from the signal to its exit: the connections' cap, the last
/// record's wait, the runtime's end. The queen's stop waits longer before it kills.
pub(crate) const LONGEST_STOP: std::time::Duration = CONNECTIONS_CAP
    .saturating_add(crate::audit::NOTE_WAIT.saturating_sub(SHUTDOWN_WAIT))
    .saturating_add(SHUTDOWN_WAIT);
/// How long connections may stay open once the hive begins to stop: the drain, the relays'
/// end, the workers' stop and a second more.
const CONNECTIONS_CAP: std::time::Duration = DRAIN_GRACE
    .saturating_add(RELAY_GRACE)
    .saturating_add(worker_proc::STOP_GRACE)
    .saturating_add(std::time::Duration::from_secs(1));
/// What the runtime's threads get at the end: a record still waiting for a lock held by
/// another writer is left behind.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    detach();
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| Error::hive(format!("cannot create `{}`: {e}", args.dir.display())))?;
    let _ = std::fs::set_permissions(&args.dir, std::fs::Permissions::from_mode(0o700));
    let log = args.dir.join(LOG_FILE);
    init_file_logging(&log)?;
    let pid = PidFile::acquire(&args.dir.join(PID_FILE)).inspect_err(|e| tracing::error!("{e}"))?;
    let fd_limit = crate::server::bounded::raise_fd_limit();
    // One thread: the hive's work is light (blocking parts go to spawn_blocking), and each thread
    // a streamed token wakes takes a core from llama.cpp's spinning threads for a moment.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .doing("start the runtime")?;
    let result = runtime.block_on(run(args, &log, fd_limit));
    if let Err(e) = &result {
        tracing::error!("hive failed: {e}");
    }
    // A record still waiting for the audit log's lock (held by another writer past the stop's
    // wait) must not keep the stopped hive alive: the runtime's threads get a moment, then the
    // process ends with them.
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    drop(pid);
    tracing::info!("hive stopped");
    result
}

async fn run(args: ServeArgs, log: &Path, fd_limit: u64) -> Result<()> {
    let listener = Listener::open(&args).await?;
    let metrics_listener = match args.metrics_port {
        Some(port) => Some(
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port))
                .await
                .map_err(|e| Error::hive(format!("cannot listen on 0.0.0.0:{port}: {e}")))?,
        ),
        None => None,
    };
    supervisor::kill_orphans(&args.dir);
    registry::remove_stale_sockets(&args.dir);
    let keys = Arc::new(keys::NodeKeys::open(&args.dir, args.clock_skew)?);
    let exe = std::env::current_exe().doing("find this rbee binary")?;
    let audit = crate::audit::Audit::new(
        args.dir.join(crate::audit::FILE),
        format!("hive:{}", args.node),
    )
    .with_policy(args.audit);
    let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let registry = Arc::new(Registry::new(
        args.node.clone(),
        exe,
        args.dir.clone(),
        log.to_path_buf(),
        args.keep_alive,
        args.restart_policy(),
        exits_tx,
        audit.clone(),
        shutdown.clone(),
    ));
    // The workers' key also sits beside the node key (0600), so the node's owner can talk to a
    // worker directly when debugging, as the hive does.
    registry
        .worker_key
        .save(&args.dir.join(keys::WORKER_KEY_FILE))?;
    let hive = Arc::new(Hive {
        node: args.node.clone(),
        dir: args.dir.clone(),
        started: Instant::now(),
        registry: registry.clone(),
        metrics: registry.metrics.clone(),
        shutdown,
        drained: CancellationToken::new(),
        requests: Arc::default(),
        keys: keys.clone(),
        audit: audit.clone(),
    });
    registry
        .notes
        .note(
            "hive_started",
            serde_json::json!({
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "port": args.port,
                "metrics_port": args.metrics_port,
                "keys": keys.verifier().fingerprints(),
                "audit": args.audit.name(),
            }),
        )
        .await;
    let cap = crate::server::bounded::connection_cap(fd_limit);
    tracing::info!(
        node = %args.node,
        listen = %listener.describe(),
        fd_limit,
        connections = cap,
        metrics_port = args.metrics_port,
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "hive listening"
    );

    let token = hive.shutdown.clone();
    tokio::spawn(async move {
        crate::signals::terminated().await;
        tracing::info!("termination signal received");
        token.cancel();
    });
    tokio::spawn(reaper(hive.clone()));
    tokio::spawn(supervisor::supervise(
        registry.clone(),
        hive.metrics.clone(),
        exits_rx,
    ));
    tokio::spawn(supervisor::liveness(
        registry.clone(),
        hive.metrics.clone(),
        args.health_misses,
        hive.shutdown.clone(),
    ));

    let stopping = hive.clone();
    let guard = Arc::new(
        crate::auth::layer::Guard::new(keys.verifier(), Some(audit.clone())).proving_answers(),
    );
    if let Some(metrics_listener) = metrics_listener {
        let app = routes::metrics_router(hive.clone());
        let stop = hive.shutdown.clone();
        tokio::spawn(async move {
            // A scraper needs a connection or two; the port is bounded like the hive's own.
            crate::server::bounded::serve(metrics_listener, app, METRICS_CONNECTIONS, async move {
                stop.cancelled().await;
            })
            .await;
        });
    }
    let app = routes::router(hive.clone(), guard);
    let drained = async move {
        stopping.shutdown.cancelled().await;
        // From here on requests are refused and queued ones answered (see
        // `Registry::stopping`); those in flight get the drain time to finish. Then the ones
        // left are ended with an error event, which drops their workers' streams, and the
        // workers are stopped. New connections are refused once this returns.
        let until = Instant::now() + DRAIN_GRACE;
        while stopping.registry.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        stopping.drained.cancel();
        let until = Instant::now() + RELAY_GRACE;
        while stopping.registry.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        stopping.registry.stop_all().await;
    };
    let server = async move {
        match listener {
            Listener::Unix(listener, _socket) => {
                crate::server::bounded::serve(listener, app, cap, drained).await;
            }
            Listener::Tcp(listener) => {
                crate::server::bounded::serve(listener, app, cap, drained).await;
            }
        }
    };
    // In-flight streams end once their workers stop; a client that lingers after that does not
    // keep the hive alive.
    let token = hive.shutdown.clone();
    tokio::select! {
        () = server => {}
        _ = async move { token.cancelled().await; tokio::time::sleep(CONNECTIONS_CAP).await } => {
            tracing::warn!("connections still open after the grace period; exiting anyway");
        }
    }
    hive.registry.stop_all().await;
    // The last record, after every one queued before it; a lock held past the wait loses
    // those still queued, and the log says so. The longest stop (the connections' cap above,
    // this wait and the runtime's: `LONGEST_STOP`) stays within the queen's stop wait.
    let wait = crate::audit::NOTE_WAIT.saturating_sub(SHUTDOWN_WAIT);
    let written = hive
        .registry
        .notes
        .wait_for(
            "hive_stopped",
            serde_json::json!({ "pid": std::process::id() }),
            wait,
        )
        .await;
    if !written {
        tracing::error!(
            "the audit log's lock was held for {} past the stop: the hive's records still \
             queued (at least `hive_stopped`) are lost",
            humantime::format_duration(wait)
        );
    }
    Ok(())
}

/// Where the hive serves: its Unix socket (removed again when the hive ends), or a TCP port.
enum Listener {
    Unix(tokio::net::UnixListener, SocketFile),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    async fn open(args: &ServeArgs) -> Result<Listener> {
        if let Some(port) = args.port {
            let listener = tokio::net::TcpListener::bind((args.listen, port))
                .await
                .map_err(|e| {
                    Error::hive(format!("cannot listen on {}:{port}: {e}", args.listen))
                })?;
            return Ok(Listener::Tcp(listener));
        }
        let path = args.dir.join(crate::paths::HIVE_SOCKET);
        let listener = crate::server::bind_unix(&path)?;
        listener
            .set_nonblocking(true)
            .doing("listen on the hive's socket")?;
        let listener =
            tokio::net::UnixListener::from_std(listener).doing("listen on the hive's socket")?;
        Ok(Listener::Unix(listener, SocketFile(path)))
    }

    fn describe(&self) -> String {
        match self {
            Listener::Unix(_, socket) => socket.0.display().to_string(),
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "tcp".to_string(), |a| a.to_string()),
        }
    }
}

/// The hive's socket file, removed when the hive stops serving: the pidfile lock makes this
/// hive the only one on its directory, so the file is ours to remove.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn reaper(hive: Arc<Hive>) {
    let every = (hive.registry.keep_alive / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        tokio::select! {
            biased;
            _ = hive.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => hive.registry.reap().await,
        }
    }
}

/// A daemon owns nothing of its starter's: its own session (no controlling terminal, no
/// SIGHUP when the starter's terminal closes) and no inherited file descriptors beyond the
/// standard three, which the starter points at /dev/null.
fn detach() {
    let _ = nix::unistd::setsid();
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        close_inherited(fd);
    }
}

#[allow(unsafe_code)]
fn close_inherited(fd: i32) {
    // SAFETY: called first thing in the daemon, before it opens any file: every descriptor
    // above 2 was inherited from the starter and no Rust object owns it. The one that
    // listed /proc/self/fd is already closed, so close() returns EBADF for it, harmlessly.
    unsafe {
        libc::close(fd);
    }
}

fn init_file_logging(path: &Path) -> Result<()> {
    let file = logs::RotatingLog::open(path)
        .map_err(|e| Error::hive(format!("cannot open log `{}`: {e}", path.display())))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}
