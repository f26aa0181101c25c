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
pub struct Cli {
    /// nodes.toml to use (default: $RBEE_CONFIG, ./nodes.toml, $XDG_CONFIG_HOME/rbee/nodes.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print results as JSON on stdout (one object per line)
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing on stderr but errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Record the host key of a node seen for the first time (a changed key is always refused)
    #[arg(long, global = true)]
    pub accept_new_host_key: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text on a node, streamed to stdout
    Infer(InferArgs),
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
    /// The nodes of the configuration: list, check, trust
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
    /// Print a shell completion script, e.g. `source <(rbee completions bash)`
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// The shells `rbee completions` writes scripts for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
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
pub struct InferArgs {
    /// Node to run on (default: the first node of the configuration)
    #[arg(long)]
    pub node: Option<String>,
    /// Model to use (default: the node's first model)
    #[arg(long)]
    pub model: Option<String>,
    /// The prompt; `-` reads it from stdin
    #[arg(long)]
    pub prompt: String,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many generated tokens
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 picks the most likely token every time
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Sampling seed (default: random)
    #[arg(long)]
    pub seed: Option<u32>,
    /// Budget of the whole invocation, e.g. `30s`, `1500ms` (default: the node's `timeout`)
    #[arg(long, value_parser = parse_duration_arg)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum HiveCommand {
    /// Start the hive on nodes (running is success)
    Start(NodeSelection),
    /// Stop the hive on nodes, with its workers
    Stop(NodeSelection),
    /// Show whether the hive runs on nodes, and its workers
    Status(NodeSelection),
    /// Put this rbee binary on nodes (only when it differs), their signing key, and their models
    /// that have a `source`
    Install(NodeSelection),
    /// Replace the signing key of nodes, without a moment where requests fail
    RotateKey(NodeSelection),
    /// Run the hive daemon in the foreground (started by `rbee` itself)
    #[command(hide = true)]
    Serve(HiveServeArgs),
}

#[derive(Debug, Args)]
pub struct NodeSelection {
    /// Nodes to act on
    pub nodes: Vec<String>,
    /// Act on every configured node
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct HiveServeArgs {
    /// The node's rbee directory (pidfile, log, audit log)
    #[arg(long)]
    pub dir: PathBuf,
    /// Port to listen on
    #[arg(long)]
    pub port: u16,
    /// Address to listen on: the loopback (reached through SSH tunnels), or all interfaces for
    /// nodes with `transport = "http"`
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: std::net::IpAddr,
    /// Name of the node this hive serves
    #[arg(long, default_value = "local")]
    pub node: String,
    /// Idle time before a worker unloads its model
    #[arg(long, value_parser = parse_duration_arg, default_value = "5m")]
    pub keep_alive: std::time::Duration,
    /// How far a request's timestamp may be from this node's clock
    #[arg(long, value_parser = parse_duration_arg, default_value = "5m")]
    pub clock_skew: std::time::Duration,
    /// Restart policy: restarts in a row before giving up
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    #[arg(long, value_parser = parse_duration_arg, default_value = "1s")]
    pub backoff_initial: std::time::Duration,
    #[arg(long, value_parser = parse_duration_arg, default_value = "60s")]
    pub backoff_max: std::time::Duration,
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,
    #[arg(long, value_parser = parse_duration_arg, default_value = "5m")]
    pub breaker_window: std::time::Duration,
}

impl HiveServeArgs {
    pub fn restart_policy(&self) -> crate::config::RestartPolicy {
        crate::config::RestartPolicy {
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            breaker_failures: self.breaker_failures,
            breaker_window: self.breaker_window,
        }
    }
}

/// The arguments after `hive serve --dir DIR` that carry a node's settings to its hive.
pub fn hive_serve_args(node: &crate::config::Node) -> Vec<String> {
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    let p = &node.restart;
    let listen = if node.transport == crate::config::Transport::Http {
        "0.0.0.0"
    } else {
        "127.0.0.1"
    };
    vec![
        "--listen".to_string(),
        listen.to_string(),
        "--port".to_string(),
        node.hive_port.to_string(),
        "--node".to_string(),
        node.name.clone(),
        "--keep-alive".to_string(),
        ms(node.keep_alive),
        "--clock-skew".to_string(),
        ms(node.clock_skew),
        "--max-attempts".to_string(),
        p.max_attempts.to_string(),
        "--backoff-initial".to_string(),
        ms(p.backoff_initial),
        "--backoff-max".to_string(),
        ms(p.backoff_max),
        "--breaker-failures".to_string(),
        p.breaker_failures.to_string(),
        "--breaker-window".to_string(),
        ms(p.breaker_window),
    ]
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
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
    /// Run one llama.cpp worker in the foreground (started by the hive)
    #[command(hide = true)]
    Serve(WorkerServeArgs),
}

#[derive(Debug, Args)]
pub struct WorkerServeArgs {
    /// Model name, for logs and reports
    #[arg(long)]
    pub model: String,
    /// The GGUF file
    #[arg(long)]
    pub model_path: PathBuf,
    /// Context length per request in tokens (default: the model's training context, at most
    /// 4096)
    #[arg(long)]
    pub context: Option<u32>,
    /// Requests decoded together, each in its own KV sequence
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=crate::config::MAX_SLOTS as i64))]
    pub slots: u32,
    /// CPU threads (default: all cores)
    #[arg(long)]
    pub threads: Option<u32>,
    /// Layers to offload to the GPU
    #[arg(long, default_value_t = 0)]
    pub gpu_layers: u32,
    /// The hive directory this worker belongs to (ties it to its hive in `ps`)
    #[arg(long)]
    pub hive_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List the configured nodes and their models
    List,
    /// Check nodes: reachable, host key, authentication, platform, free disk, installed version
    Check(NodeSelection),
    /// Record the host key of nodes in their known_hosts file (after checking its fingerprint)
    Trust(NodeSelection),
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
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
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
}
