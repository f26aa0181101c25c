//! `rbee worker serve`: one process per loaded model. It loads the model, prints a hello line on
//! stdout (ready, or why it failed), serves on the Unix socket its hive named, and exits when its
//! hive goes away (stdin closes) or on SIGTERM.

pub(crate) mod args;
pub(crate) mod engine;
pub(crate) mod prompt;
pub(crate) mod server;
pub(crate) mod stop;
pub(crate) mod utf8;
pub(crate) mod weights;

use std::io::{Read, Write};

use crate::error::{Error, IoContext, Result};
use crate::protocol::WorkerHello;
use args::ServeArgs;
use weights::{EngineOptions, Weights};

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    // The hive hands over the key it signs our requests with on stdin, never in argv or env.
    let key = read_key()?;
    let listener = crate::server::bind_unix(&args.socket)?;
    let options = EngineOptions {
        model_path: args.model_path.clone(),
        context: args.context,
        threads: args.threads,
        gpu_layers: args.gpu_layers,
        slots: args.slots,
        kv_unified: args.kv_unified,
    };
    // llama.cpp and HTTP share this thread; see `Batcher::serve`.
    let weights = Weights::load(&options).map_err(failed)?;
    let (batcher, engine, loaded) = weights.batcher(&options).map_err(failed)?;
    hello(&WorkerHello::Ready {
        n_ctx: loaded.n_ctx,
        load_ms: loaded.load_ms,
        offload: loaded.offload.clone(),
    });
    tracing::info!(model = %args.model, socket = %args.socket.display(), load_ms = loaded.load_ms, "worker ready");
    exit_when_stdin_closes();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .doing("start the runtime")?;
    runtime.block_on(async move {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
            .doing("listen on the worker's socket")?;
        let verifier = std::sync::Arc::new(crate::auth::layer::Guard::new(
            std::sync::Arc::new(crate::auth::Verifier::new(
                vec![key],
                crate::auth::DEFAULT_SKEW,
            )),
            None,
        ));
        let app = server::router(
            server::WorkerState {
                engine,
                model: args.model,
                n_ctx: loaded.n_ctx,
                slots: loaded.slots,
                offload: loaded.offload.clone(),
            },
            verifier,
        );
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<crate::server::Peer>(),
        )
        .with_graceful_shutdown(crate::signals::terminated());
        let server = tokio::spawn(async move { server.await });
        // Returns once the server, and with it every `Engine` handle, is gone.
        batcher.serve().await;
        server
            .await
            .map_err(|e| Error::internal(format!("worker server failed: {e}")))?
            .map_err(|e| Error::internal(format!("worker server failed: {e}")))
    })
}

/// Tells the hive why the model cannot be served.
fn failed(err: Error) -> Error {
    hello(&WorkerHello::Failed {
        message: err.to_string(),
    });
    err
}

/// The first line of stdin: the hex key this worker's requests are signed with.
fn read_key() -> Result<crate::auth::Key> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .doing("read the signing key from stdin")?;
    crate::auth::Key::from_hex(&line).ok_or_else(|| {
        Error::worker("the worker expects its signing key on the first line of stdin")
    })
}

fn hello(message: &WorkerHello) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(message) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The hive holds the write end of our stdin; when the hive dies, even by SIGKILL, the read
/// returns end-of-file and the worker leaves instead of lingering as an orphan.
fn exit_when_stdin_closes() {
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".to_string())
        .spawn(|| {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            tracing::info!("hive went away; worker exits");
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch stdin for the hive going away: {e}");
    }
}
