//! rbee: LLM inference on your own machines from one command line. One binary is the CLI (an
//! ephemeral queen), the hive daemon on each node, and the llama.cpp worker processes.
//!
//! # Layout
//! - `audit`: the hash-chained audit log: writer (fail-closed policy, bounded records), verify
//! - `auth`: request signing (HMAC-SHA256): the key and its file, the verifier, the axum layer
//! - `cli`: clap types (raw values only)
//! - `config`: nodes.toml -> validated `Config`: where it comes from (the embedded `local` node
//!   last), how defaults resolve, the lookups on it
//! - `error`: the top-level error and its exit code
//! - `output`: stdout/stderr discipline, tables and `--json`
//! - `progress`: bars and spinners on stderr, only for a person at a terminal
//! - `cmd`: one module per subcommand, and the runner for commands over several nodes
//! - `queen`: what only the CLI side does: a connection to a node (hive client, tunnel, SSH
//!   session), a node's hive seen from the queen (probe, start, stop), installing the binary
//!   and model files, a model downloaded by the node followed to its end, this machine's side
//!   of the audit trail around a request
//! - `serve`: `rbee serve`, the OpenAI-compatible API over the fleet: API keys, admission,
//!   the OpenAI shapes
//! - `ssh`: russh sessions: known_hosts, authentication, forwards; `~/.ssh/config`, quoting;
//!   the holder that keeps a node's connection for later invocations (`mux`)
//! - `hive`: the hive daemon: pidfile, the table of workers and each model's entry, supervisor
//!   and restart policy, routes and relay, keys, metrics, model verification, model downloads
//! - `worker`: the llama.cpp worker: loading the weights, the prompt and its sampler, stop
//!   strings, the batcher and the HTTP server, on one thread
//! - `protocol`: request bodies, stream events and status views shared by every hop, and the
//!   server-sent events reader
//! - `deadline`: the invocation's budget and how it travels
//! - `server`: what the HTTP servers share: errors as HTTP responses, the listener; the
//!   hive's bounded serving loop (connection cap, head limits, idle timeout)
//! - `paths`, `signals`: files and signals
//! - `platform`: what this binary is: version, target triple, variant, llama.cpp backends

pub mod audit;
pub mod auth;
mod cli;
mod cmd;
pub mod config;
mod deadline;
pub mod error;
pub mod hive;
mod output;
mod paths;
mod platform;
mod progress;
pub mod protocol;
mod queen;
mod serve;
mod server;
mod signals;
mod ssh;
mod worker;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, HiveCommand, NodesCommand, WorkerCommand};
use cmd::Context;
use error::{Error, ExitKind};
use output::Output;

/// Runs one invocation and returns its exit code. Errors are printed here, once.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(ExitKind::Usage.code())
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let out = Output {
        json: cli.json,
        quiet: cli.quiet,
    };
    let ctx = Context {
        config_path: cli.config.clone(),
        out,
        progress: progress::Progress::new(out),
        connect: queen::node::ConnectOptions {
            accept_new_host_key: cli.accept_new_host_key,
        },
    };
    let verbose = cli.verbose;
    let result = match cli.command {
        // The daemons set up their own logging and runtime.
        Command::Hive {
            command: HiveCommand::Serve(args),
        } => hive::serve(args),
        Command::Hive {
            command: HiveCommand::Bridge { socket },
        } => hive::bridge::run(&socket),
        Command::Nodes {
            command: NodesCommand::Hold,
        } => ssh::mux::holder::run(),
        Command::Worker {
            command: WorkerCommand::Serve(args),
        } => {
            init_stderr_logging(verbose, "warn,rbee=info", true);
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            worker::serve(args)
        }
        Command::Infer(args) => queen(&ctx, verbose, true, cmd::infer::run(&ctx, args)),
        Command::Batch(args) => queen(&ctx, verbose, true, cmd::batch::run(&ctx, args)),
        // A long-lived queen with a runtime of its own; its log says what each request did.
        Command::Serve(args) => {
            init_stderr_logging(verbose, "warn,rbee=info", false);
            cmd::serve::run(&ctx, args)
        }
        Command::Hive {
            command: HiveCommand::Fleet(op),
        } => queen(&ctx, verbose, true, cmd::hive::run(&ctx, op)),
        Command::Worker {
            command: WorkerCommand::Fleet(op),
        } => queen(&ctx, verbose, true, cmd::worker::run(&ctx, op)),
        Command::Models { command } => queen(&ctx, verbose, true, cmd::models::run(&ctx, command)),
        Command::Nodes { command } => queen(&ctx, verbose, false, cmd::nodes::run(&ctx, command)),
        Command::Audit { command } => queen(&ctx, verbose, false, cmd::audit::run(&ctx, command)),
        Command::Logs {
            node,
            model,
            lines,
            follow,
        } => queen(
            &ctx,
            verbose,
            false,
            cmd::logs::run(&ctx, node.as_deref(), model.as_deref(), lines, follow),
        ),
        // Only prints a script: no runtime, nothing to record in the audit log.
        Command::Completions { shell } => cmd::completions::run(shell),
        Command::Version => cmd::version::run(&ctx),
    };
    // A result that could not be written (stdout on a full disk) is not a success.
    let result = result.and_then(|()| output::unwritten().map_or(Ok(()), Err));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if !matches!(err, Error::Reported(_)) {
                eprintln!("rbee: {err}");
            }
            ExitCode::from(err.code())
        }
    }
}

/// How long `config_changed` waits for this machine's audit lock held by another process.
const CONFIG_NOTE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Records `config_changed` when the nodes.toml in use differs from the one last recorded.
fn note_config(ctx: &Context) {
    let Ok(config) = ctx.config() else { return };
    let config::Source::File(path) = &config.source else {
        return;
    };
    let Ok(text) = std::fs::read(path) else {
        return;
    };
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&text));
    let marker = paths::state_dir().join("config.sha256");
    let previous = std::fs::read_to_string(&marker).unwrap_or_default();
    if previous.trim() == sha {
        return;
    }
    let fields = serde_json::json!({
        "path": path.display().to_string(),
        "sha256": sha,
        "previous": (!previous.trim().is_empty()).then(|| previous.trim().to_string()),
    });
    // Made before the command's budget starts, so its wait for the lock is short; one not
    // written is made by the next invocation, which finds the marker unchanged.
    if crate::queen::audit_note_waiting(CONFIG_NOTE_WAIT, "config_changed", None, fields).is_some()
    {
        let _ = std::fs::write(&marker, &sha);
    }
}

/// Runs one queen command on a single-threaded runtime. `note` records a changed nodes.toml
/// first (commands that only read the configuration or the audit trail leave that alone).
fn queen(
    ctx: &Context,
    verbose: u8,
    note: bool,
    work: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<(), Error> {
    init_stderr_logging(verbose, "warn", false);
    if note {
        note_config(ctx);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error::IoError::doing("start the runtime", e))?;
    let result = runtime.block_on(work);
    // The answer is out: exit now rather than wait on leftover blocking work (a file hash,
    // a stdin read) that no longer matters.
    runtime.shutdown_background();
    result
}

/// Logs on stderr; `with_target` names the module, which tells worker lines apart in hive.log.
fn init_stderr_logging(verbose: u8, quiet_default: &str, with_target: bool) {
    let default = match verbose {
        0 => quiet_default,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(with_target)
        .try_init();
}
