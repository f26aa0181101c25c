//! Command-line types (clap derive). Raw values only; validation happens where they are used.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rbee",
    version,
    about = "Run LLM inference on your own machines",
    propagate_version = true
)]
pub(crate) struct Cli {
    /// nodes.toml to use (default: $RBEE_CONFIG, ./nodes.toml, $XDG_CONFIG_HOME/rbee/nodes.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// Print results as JSON on stdout (one object per line)
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Print nothing on stderr but errors
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Record the host key of a node seen for the first time (a changed key is always refused)
    #[arg(long, global = true)]
    pub(crate) accept_new_host_key: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Generate text on a node, streamed to stdout
    Infer(InferArgs),
    /// Run a JSON-lines file of prompts over the fleet, one result line per prompt
    Batch(BatchArgs),
    /// Serve the OpenAI-compatible API over the fleet, in the foreground; `serve key` manages
    /// its API keys
    Serve(ServeArgs),
    /// Start, stop and inspect the hive daemon on nodes
    Hive {
        #[command(subcommand)]
        command: HiveCommand,
    },
    /// Inspect and stop the llama.cpp workers on a node
    Worker {
        #[command(subcommand)]
        command: WorkerCommand,
    },
    /// The nodes of the configuration: list, check, trust, and the keys that may drive them
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Model files on nodes
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// The tamper-evident audit trail of this machine and of nodes
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the last lines of a node's hive log, or of a model's worker log (`-f` follows)
    Logs {
        /// The node (default: the first configured)
        node: Option<String>,
        /// A model's worker log instead of the hive's
        #[arg(long)]
        model: Option<String>,
        /// How many lines to print before following
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        lines: usize,
        /// Keep printing lines as the node writes them, until interrupted
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// This binary: version, target triple, variant and the llama.cpp backends compiled in
    Version,
    /// Print a shell completion script, e.g. `source <(rbee completions bash)`
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// What `rbee infer --format` constrains the output to.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Any JSON object
    Json,
}

/// The shells `rbee completions` writes scripts for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain (this machine's log, a node's, or all) and, for a node, that every
    /// record head this machine witnessed is in the node's log
    Verify {
        #[arg(long, conflicts_with = "all")]
        node: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// The last records of a log
    Tail {
        #[arg(long)]
        node: Option<String>,
        #[arg(short = 'n', default_value_t = 10)]
        n: usize,
    },
    /// Add an operator's note to this machine's audit log
    Note { message: String },
}

#[derive(Debug, Args)]
pub(crate) struct InferArgs {
    /// Node to run on (no failover), a comma-separated list or a `[groups]` name to choose
    /// from (default: any node serving the model)
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// Model to use (default: the first candidate node's first model)
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// The prompt; `-` reads it from stdin
    #[arg(long)]
    pub(crate) prompt: String,
    /// System prompt
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Stop before this text; repeat for several (the output ends before the first one)
    #[arg(long, value_name = "TEXT")]
    pub(crate) stop: Vec<String>,
    /// Constrain the output to JSON that validates against the JSON Schema in FILE
    #[arg(long, value_name = "FILE", conflicts_with = "format")]
    pub(crate) json_schema: Option<PathBuf>,
    /// Constrain the output to a format: `json` is any JSON object
    #[arg(long, value_enum)]
    pub(crate) format: Option<OutputFormat>,
    /// Send the prompt to the model as it is, without the chat template
    #[arg(long, conflicts_with = "system")]
    pub(crate) raw: bool,
    /// Stop after this many generated tokens
    #[arg(long, default_value_t = 512)]
    pub(crate) max_tokens: u32,
    /// Sampling temperature; 0 picks the most likely token every time
    #[arg(long, default_value_t = 0.8)]
    pub(crate) temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    /// Sampling seed (default: random)
    #[arg(long)]
    pub(crate) seed: Option<u32>,
    /// Budget of the whole invocation, e.g. `30s`, `1500ms` (default: the node's `timeout`)
    #[arg(long, value_parser = parse_budget_arg)]
    pub(crate) timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    /// Nodes to spread the work over: one, a comma-separated list or a `[groups]` name
    /// (default: every node serving the model)
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// Model to use (default: the first candidate node's first model)
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Append results to this file as they finish; a rerun skips the ids already in it
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// How many times an item whose node fails is tried again on another node
    #[arg(long, default_value_t = 2)]
    pub(crate) retries: u32,
    /// Budget of each item (each try starts over), e.g. `30s` (default: the node's `timeout`)
    #[arg(long, value_parser = parse_budget_arg)]
    pub(crate) timeout: Option<std::time::Duration>,
    /// JSON lines, one `{"id", "prompt", ...}` per line; `-` reads stdin
    pub(crate) input: PathBuf,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ServeArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub(crate) listen: std::net::SocketAddr,
    /// Requests per model that may wait for a slot; beyond them a request gets 429
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub(crate) max_queue: usize,
    /// How long requests in flight may take to finish after SIGTERM or SIGINT, e.g. `30s`;
    /// those still running then end with an error
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub(crate) drain: std::time::Duration,
    #[command(subcommand)]
    pub(crate) command: Option<ServeCommand>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServeCommand {
    /// API keys of `rbee serve`: only their SHA-256 is kept
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Make a new key named NAME and print it (the only time it is shown)
    Create { name: String },
    /// The keys by name and creation time (never the keys)
    List,
    /// Revoke the key named NAME: requests with it get 401 from then on
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum HiveCommand {
    #[command(flatten)]
    Fleet(HiveOp),
    /// Run the hive daemon in the foreground (started by `rbee` itself)
    #[command(hide = true)]
    Serve(crate::hive::args::ServeArgs),
    /// Relay stdin and stdout to the hive's socket (run by `rbee` over SSH where sshd refuses
    /// forwarding)
    #[command(hide = true)]
    Bridge {
        /// The hive's Unix socket
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

/// What the queen does to hives.
#[derive(Debug, Subcommand)]
pub(crate) enum HiveOp {
    /// Start the hive on nodes (running is success)
    Start {
        #[command(flatten)]
        sel: NodeSelection,
        /// Load each node's default model too, so that the first request finds it ready
        #[arg(long)]
        preload: bool,
    },
    /// Stop the hive on nodes, with its workers
    Stop {
        #[command(flatten)]
        sel: NodeSelection,
        /// How long to wait for each hive to go, e.g. `5s` (default: the node's `timeout`); a
        /// hive still draining then goes on stopping by itself
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<std::time::Duration>,
    },
    /// Show whether the hive runs on nodes, and its workers
    Status(NodeSelection),
    /// Put this rbee binary on nodes (only when it differs), their signing key, and their models
    /// that have a `source`
    Install(NodeSelection),
    /// Replace the signing key of nodes, without a moment where requests fail
    RotateKey(NodeSelection),
}

#[derive(Debug, Args)]
pub(crate) struct NodeSelection {
    /// Nodes to act on
    pub(crate) nodes: Vec<String>,
    /// Act on every configured node
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WorkerCommand {
    #[command(flatten)]
    Fleet(WorkerOp),
    /// Run one llama.cpp worker in the foreground (started by the hive)
    #[command(hide = true)]
    Serve(crate::worker::args::ServeArgs),
}

/// What the queen asks of a node's workers.
#[derive(Debug, Subcommand)]
pub(crate) enum WorkerOp {
    /// List the workers of a node's hive
    List {
        #[arg(long)]
        node: Option<String>,
    },
    /// Stop a node's worker for a model (its model is unloaded)
    Stop {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        model: String,
    },
    /// Restart a node's worker for a model, clearing a failed state and its circuit breaker
    Restart {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        model: String,
    },
    /// Cancel a request in flight on a node (its id, as `worker list` shows it): its client
    /// keeps the text generated so far and exits 130
    Cancel {
        #[arg(long)]
        node: Option<String>,
        #[arg(value_parser = parse_request_id)]
        request_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodesCommand {
    /// List the configured nodes and their models
    List,
    /// Check nodes: reachable, host key, authentication, platform, free disk, installed version
    Check(NodeSelection),
    /// Record the host key of nodes in their known_hosts file (after checking its fingerprint)
    Trust(NodeSelection),
    /// Enroll this machine's key on a node (first come on a fresh node, else it waits for
    /// approval), or with `--approve KEY_ID` approve another machine's waiting key
    Enroll {
        node: String,
        /// The key id (16 hex digits) another machine printed when it asked to be enrolled
        #[arg(long, value_name = "KEY_ID")]
        approve: Option<String>,
    },
    /// Revoke a controlling machine's key on a node, from the next request on
    Revoke {
        node: String,
        #[arg(value_name = "KEY_ID")]
        kid: String,
    },
    /// The keys a node accepts, and those waiting for approval
    Keys { node: String },
    /// Close the SSH connections kept for later invocations (`persist`), of all nodes when none
    /// is named
    Disconnect {
        /// Nodes whose connection to close
        nodes: Vec<String>,
    },
    /// Hold one node's SSH connection for later invocations (started by `rbee` itself)
    #[command(hide = true)]
    Hold,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ModelsCommand {
    /// The models a node serves, and whether their files are on it
    List {
        #[arg(long)]
        node: Option<String>,
    },
    /// Copy a model's `source` file to a node (resumes a partial copy, verifies the sha256)
    Push {
        #[arg(long)]
        node: String,
        model: String,
    },
    /// Load a model on a node now, so that requests find it ready (starts the hive if needed)
    Load {
        #[arg(long)]
        node: String,
        model: String,
    },
    /// Have a node download a model from its URL `source` (resumes a partial download,
    /// verifies the sha256)
    Pull {
        #[arg(long)]
        node: String,
        model: String,
    },
    /// Remove a model's file (and a partial copy) from a node; refused while a worker has it
    /// loaded or a transfer is under way
    Rm {
        #[arg(long)]
        node: String,
        model: String,
    },
    /// Print a ready `[models.NAME]` entry for a GGUF file or URL, with its SHA-256
    Hash {
        /// A file on this machine, or an http(s):// or hf://OWNER/REPO/FILE.gguf URL
        file: String,
    },
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
}

/// A budget: a duration more than zero, as a budget of nothing ends every request at once.
fn parse_budget_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_nonzero_duration(text)
}

/// A request id as rbee makes them (32 hex digits; letters, digits, `-` and `_` are let
/// through): it goes into the hive's URL, where `/`, `..`, `?` or a space would name another
/// path, or fail the signature of the one meant.
fn parse_request_id(text: &str) -> Result<String, String> {
    let fits = !text.is_empty()
        && text.len() <= 128
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        Ok(text.to_string())
    } else {
        Err(
            "not a request id: ids are hex digits, as `rbee worker list` and `infer --json`'s \
             `done` event show them"
                .to_string(),
        )
    }
}
