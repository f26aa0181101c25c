//! rbee: LLM inference on your own machines from one command line. One binary is the CLI (an
//! ephemeral queen), the hive daemon on each node, and the llama.cpp worker processes.
//!
//! # Layout
//! - `audit`: the hash-chained audit log: writer, verify
//! - `auth`: request signing (HMAC-SHA256), key files
//! - `cli`: clap types (raw values only)
//! - `config`: nodes.toml -> validated `Config`, the embedded `local` node
//! - `error`: the top-level error and its exit code
//! - `output`: stdout/stderr discipline, tables and `--json`
//! - `progress`: bars and spinners on stderr, only for a person at a terminal
//! - `cmd`: one module per subcommand, and the runner for commands over several nodes
//! - `lifecycle`: a node's hive seen from the queen: probe, start, stop
//! - `client`: the queen's HTTP client for a hive
//! - `node`: a connection to a node: hive client, tunnel, SSH session
//! - `ssh`: russh sessions, known_hosts, `~/.ssh/config`, quoting
//! - `install`: the binary and model files on nodes
//! - `hive`: the hive daemon: pidfile, registry of workers, supervisor and restart policy,
//!   routes and relay, keys, metrics, model verification
//! - `worker`: the llama.cpp worker: the batcher and the HTTP server, on one thread
//! - `wire`: request bodies, stream events and status views shared by every hop
//! - `deadline`: the invocation's budget and how it travels
//! - `sse`: server-sent events reader
//! - `http`: errors as HTTP responses, SSE event helpers, the signature layer
//! - `paths`, `signals`: files and signals

pub mod audit;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
pub mod deadline;
pub mod error;
pub mod hive;
pub mod http;
pub mod install;
pub mod lifecycle;
pub mod node;
pub mod output;
pub mod paths;
pub mod progress;
pub mod signals;
pub mod sse;
pub mod ssh;
pub mod wire;
pub mod worker;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, HiveCommand, WorkerCommand};
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
        connect: node::ConnectOptions {
            accept_new_host_key: cli.accept_new_host_key,
        },
    };
    let result = match cli.command {
        // The daemons set up their own logging and runtime.
        Command::Hive {
            command: HiveCommand::Serve(args),
        } => hive::serve(args),
        Command::Worker {
            command: WorkerCommand::Serve(args),
        } => {
            init_stderr_logging(cli.verbose, "warn,rbee=info", true);
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            worker::serve(args)
        }
        command => {
            init_stderr_logging(cli.verbose, "warn", false);
            dispatch(&ctx, command)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if !err.message.is_empty() {
                eprintln!("rbee: {}", err.message);
            }
            ExitCode::from(err.code())
        }
    }
}

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
    if ctx.audit_note("config_changed", None, fields).is_some() {
        let _ = std::fs::write(&marker, &sha);
    }
}

fn dispatch(ctx: &Context, command: Command) -> Result<(), Error> {
    if !matches!(command, Command::Nodes { .. } | Command::Audit { .. }) {
        note_config(ctx);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        match command {
            Command::Infer(args) => cmd::infer::run(ctx, args).await,
            Command::Hive { command } => cmd::hive::run(ctx, command).await,
            Command::Worker { command } => cmd::worker::run(ctx, command).await,
            Command::Nodes { command } => cmd::nodes::run(ctx, command).await,
            Command::Models { command } => cmd::models::run(ctx, command).await,
            Command::Audit { command } => cmd::audit::run(ctx, command).await,
        }
    });
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
