//! nodes.toml -> validated `Config`: the nodes and models it holds and the lookups on them.
//! Finding and reading the file (or the embedded `local` node) is `source`; defaults and checks,
//! with errors that name the file, line and key, are `resolve`. Loading has no side effects.

mod error;
mod origin;
mod raw;
mod resolve;
mod source;

use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;

use crate::error::{Error, Result};

pub use error::ConfigError;
pub(crate) use origin::Origin;
pub(crate) use raw::{
    AuditPolicy, MAX_DURATION, Transport, parse_duration, parse_nonzero_duration,
};
pub(crate) use resolve::valid_name;
pub use source::Source;

pub(crate) const DEFAULT_MODEL: &str = "smollm2";
pub(crate) const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub(crate) const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub(crate) const DEFAULT_HIVE_PORT: u16 = 7835;
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
/// Health checks an idle worker may miss in a row before it is replaced: one miss is as likely
/// a busy machine as a dead worker.
pub(crate) const DEFAULT_HEALTH_MISSES: u32 = 3;
/// How long a model's load (verification and llama.cpp's load) may take on the node, however
/// soon the request that started it gives up.
pub(crate) const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long an SSH connection is kept for the next invocation after its last use.
pub(crate) const DEFAULT_PERSIST: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// llama.cpp's limit on sequences in one context.
pub(crate) const MAX_SLOTS: u32 = 256;
/// The slots a queen counts for a model whose slots are auto before its hive has told the
/// count it chose: the fixed default auto replaced (the hive queues what goes beyond it).
pub(crate) const AUTO_SLOTS_BEFORE_REPORT: u32 = 4;
/// Tokens of context per request: llama.cpp's largest trained contexts are 1M tokens, and each
/// slot's KV cache is sized from this, so a larger number is a typo.
pub(crate) const MAX_CONTEXT: u32 = 1 << 21;
pub(crate) const MAX_THREADS: u32 = 1024;
/// More layers than any model has; llama.cpp offloads what there is.
pub(crate) const MAX_GPU_LAYERS: u32 = 100_000;
/// Longest context per request when the user sets none: the training context can be far larger
/// than what a small machine wants to allocate for the KV cache.
pub(crate) const DEFAULT_MAX_CONTEXT: u32 = 4096;
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) source: Source,
    pub(crate) models: IndexMap<String, Model>,
    pub(crate) nodes: IndexMap<String, Node>,
    /// `[groups]`: names for sets of nodes.
    pub(crate) groups: IndexMap<String, Vec<String>>,
}

/// Where a request may run: its model and the nodes that serve it, in the order they are
/// preferred on a tie (the file's, or the order given).
#[derive(Debug)]
pub(crate) struct Route<'a> {
    pub(crate) model: &'a Model,
    pub(crate) nodes: Vec<&'a Node>,
    /// One node was named: it alone runs the request, with no failover.
    pub(crate) pinned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) host: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) port: u16,
    pub(crate) identity_file: Option<String>,
    /// `jump`: ProxyJump hops, `[user@]host[:port]` comma-separated, a node of nodes.toml
    /// already replaced by its own `user@host:port` (or `none`). Wins over ssh_config's.
    pub(crate) jump: Option<String>,
    /// As written in nodes.toml (node or `[defaults]`); none set means ssh_config's
    /// `UserKnownHostsFile`, else `~/.ssh/known_hosts`.
    pub(crate) known_hosts: Option<String>,
    /// As written: `~` means the node's home, so it is expanded on the node.
    pub(crate) remote_dir: String,
    /// The hive's TCP port, for `transport = "http"` only.
    pub(crate) hive_port: u16,
    /// A TCP port serving `GET /metrics` only, on all the node's interfaces.
    pub(crate) metrics_port: Option<u16>,
    pub(crate) transport: Transport,
    #[serde(with = "duration_ms")]
    pub(crate) timeout: Duration,
    #[serde(with = "duration_ms")]
    pub(crate) keep_alive: Duration,
    /// How far a request's timestamp may be from the node's clock.
    #[serde(with = "duration_ms")]
    pub(crate) clock_skew: Duration,
    /// Whether the node refuses work it cannot record (`required`) or serves it with a warning.
    pub(crate) audit: AuditPolicy,
    /// Missed health checks in a row before the hive replaces an idle worker.
    pub(crate) health_misses: u32,
    /// How long the SSH connection outlives its last use, held by a background process for the
    /// next invocations (zero: every invocation connects itself).
    #[serde(with = "duration_ms")]
    pub(crate) persist: Duration,
    pub(crate) models: Vec<String>,
    /// The fleet's `[restart]` policy, which this node's hive applies.
    #[serde(skip)]
    pub(crate) restart: RestartPolicy,
    /// This machine's copy of the node's signing key: the node's own file for a local node,
    /// else `keys/NODE.key` beside nodes.toml.
    pub(crate) key_file: PathBuf,
    /// The `[[binaries]]` variant this node runs, or `auto`.
    pub(crate) binary: String,
    /// The fleet's `[[binaries]]`, from which this node's binary is chosen.
    #[serde(skip)]
    pub(crate) binaries: Vec<Binary>,
}

/// A `[[binaries]]` entry, checked: a known variant, exactly one of `path` and `url`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Binary {
    pub(crate) target: String,
    pub(crate) variant: String,
    pub(crate) sha256: String,
    pub(crate) location: BinaryLocation,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BinaryLocation {
    /// A file on this machine, uploaded to the node.
    Path(PathBuf),
    /// Downloaded by the node itself.
    Url(String),
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Model {
    pub(crate) name: String,
    /// Node-side path, `~` expanded on the node.
    pub(crate) path: String,
    pub(crate) sha256: String,
    pub(crate) source: Option<String>,
    pub(crate) context: Option<u32>,
    /// Generations decoded together; none (`slots` left out or `"auto"`) lets the hive derive
    /// the count on the node from its memory and the model (`hive::memory::plan`). Left out of
    /// the spec's JSON when auto, so the digest of a spec with a number stays what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slots: Option<u32>,
    pub(crate) gpu_layers: GpuLayers,
    pub(crate) threads: Option<u32>,
    /// The bound of one load on the node; it outlives the request that started it.
    #[serde(with = "duration_ms", default = "default_load_timeout")]
    pub(crate) load_timeout: Duration,
    /// One KV cache shared by the slots (llama.cpp's unified cache) instead of a stream per
    /// slot: a batched generation may then differ from the same one alone. Left out of the
    /// spec's JSON when off, so the digest of every spec without it stays what it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) kv_unified: bool,
}

fn default_load_timeout() -> Duration {
    DEFAULT_LOAD_TIMEOUT
}

/// How many of a model's layers llama.cpp offloads: a number, `"all"`, or `"auto"` (the
/// default: all when the worker's binary has a GPU backend and the node a device for it, else
/// none). As JSON and TOML: the number, or the word.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum GpuLayers {
    #[default]
    Auto,
    All,
    Layers(u32),
}

impl GpuLayers {
    pub(crate) fn parse(text: &str) -> std::result::Result<GpuLayers, String> {
        match text {
            "auto" => Ok(GpuLayers::Auto),
            "all" => Ok(GpuLayers::All),
            n => match n.parse::<u32>() {
                Ok(n) if n <= MAX_GPU_LAYERS => Ok(GpuLayers::Layers(n)),
                _ => Err(format!(
                    "`gpu_layers` is `{text}`; use a number of layers (at most {MAX_GPU_LAYERS}), \
                     \"all\" or \"auto\""
                )),
            },
        }
    }

    /// The worker's `--gpu-layers` argument.
    pub(crate) fn arg(self) -> String {
        match self {
            GpuLayers::Auto => "auto".to_string(),
            GpuLayers::All => "all".to_string(),
            GpuLayers::Layers(n) => n.to_string(),
        }
    }

    /// The layers llama.cpp puts on a device for a model of `n_layer` repeating layers: at
    /// most those and the output layer, none without a device.
    pub(crate) fn offloaded(self, device: bool, n_layer: u32) -> u32 {
        if !device {
            return 0;
        }
        match self {
            GpuLayers::Auto | GpuLayers::All => n_layer + 1,
            GpuLayers::Layers(n) => n.min(n_layer + 1),
        }
    }
}

/// `slots` as nodes.toml writes it: a number, or `"auto"` (the same as leaving it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotsSetting(pub(crate) Option<u32>);

impl<'de> serde::Deserialize<'de> for SlotsSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(i64),
            Word(String),
        }
        match Written::deserialize(d)? {
            // Out of range reads as 0, which the range check refuses with the bounds.
            Written::Number(n) => Ok(SlotsSetting(Some(u32::try_from(n).unwrap_or(0)))),
            Written::Word(w) if w == "auto" => Ok(SlotsSetting(None)),
            Written::Word(w) => Err(serde::de::Error::custom(format!(
                "`slots` must be a number or \"auto\", not {w:?}"
            ))),
        }
    }
}

impl Serialize for GpuLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GpuLayers::Layers(n) => s.serialize_u32(*n),
            other => s.serialize_str(&other.arg()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u64),
            Word(String),
        }
        let text = match Written::deserialize(d)? {
            Written::Number(n) => n.to_string(),
            Written::Word(w) => w,
        };
        GpuLayers::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Model {
    /// The slots a queen counts for this model on a node whose hive has not told its own
    /// count: the configured number, or `AUTO_SLOTS_BEFORE_REPORT` when auto.
    pub(crate) fn slots_before_report(&self) -> u32 {
        self.slots.unwrap_or(AUTO_SLOTS_BEFORE_REPORT)
    }

    /// Where the model's file comes from, when it has a `source` (checked when loaded).
    pub(crate) fn origin(&self) -> Option<Origin> {
        self.source.as_deref().and_then(|s| Origin::parse(s).ok())
    }

    /// The URL the node downloads the model from, when its `source` is one; `HF_ENDPOINT`
    /// (this machine's) replaces Hugging Face's host.
    pub(crate) fn download_url(&self) -> Option<String> {
        let endpoint = std::env::var("HF_ENDPOINT").ok();
        self.origin()?.url(endpoint.as_deref())
    }
}

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct RestartPolicy {
    pub(crate) max_attempts: u32,
    #[serde(with = "duration_ms")]
    pub(crate) backoff_initial: Duration,
    #[serde(with = "duration_ms")]
    pub(crate) backoff_max: Duration,
    pub(crate) breaker_failures: u32,
    #[serde(with = "duration_ms")]
    pub(crate) breaker_window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_attempts: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            breaker_failures: 5,
            breaker_window: Duration::from_secs(300),
        }
    }
}

impl Config {
    /// The named node, or the first one in the file.
    pub(crate) fn node(&self, name: Option<&str>) -> Result<&Node> {
        match name {
            Some(name) => self.nodes.get(name).ok_or_else(|| {
                Error::Config(ConfigError::UnknownNode {
                    name: name.to_string(),
                    file: self.source.to_string(),
                    known: list(self.nodes.keys()),
                })
            }),
            None => {
                self.nodes.values().next().ok_or_else(|| {
                    Error::config(format!("no nodes are defined in {}", self.source))
                })
            }
        }
    }

    /// The named model if `node` serves it, or the node's first model.
    pub(crate) fn model(&self, node: &Node, name: Option<&str>) -> Result<&Model> {
        let name = match name {
            Some(name) => name,
            None => node.models.first().ok_or_else(|| {
                Error::config(format!(
                    "node `{}` serves no models; add `models = [...]` to it in {}",
                    node.name, self.source
                ))
            })?,
        };
        if !node.models.iter().any(|m| m == name) {
            return Err(Error::Config(ConfigError::NotServed {
                name: name.to_string(),
                node: node.name.clone(),
                serves: list(node.models.iter()),
            }));
        }
        self.models.get(name).ok_or_else(|| {
            Error::Config(ConfigError::UnknownModel {
                name: name.to_string(),
                known: list(self.models.keys()),
            })
        })
    }

    /// The nodes a request for `model` may run on. `selector` is `--node`: one node (pinned),
    /// a comma-separated list or a group (restricting the candidates), or none (every node
    /// serving the model). With no model, it is the default model of the first candidate node.
    pub(crate) fn route(&self, selector: Option<&str>, model: Option<&str>) -> Result<Route<'_>> {
        let (listed, pinned): (Vec<&Node>, bool) = match selector {
            None => (self.nodes.values().collect(), false),
            Some(s) if self.groups.contains_key(s) => (
                self.groups[s]
                    .iter()
                    .map(|n| self.node(Some(n)))
                    .collect::<Result<_>>()?,
                false,
            ),
            Some(s) if s.contains(',') => {
                let mut listed: Vec<&Node> = Vec::new();
                for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let node = self.node(Some(name))?;
                    // Named twice is one candidate, at its first place.
                    if !listed.iter().any(|n| n.name == node.name) {
                        listed.push(node);
                    }
                }
                (listed, false)
            }
            Some(s) => (vec![self.node(Some(s))?], true),
        };
        let first = listed
            .first()
            .copied()
            .ok_or_else(|| Error::config(format!("no nodes are defined in {}", self.source)))?;
        let model = match model {
            Some(name) if !pinned => self.models.get(name).ok_or_else(|| {
                Error::Config(ConfigError::UnknownModel {
                    name: name.to_string(),
                    known: list(self.models.keys()),
                })
            })?,
            // A pinned node must serve the model: the same check and message as before.
            _ => self.model(first, model)?,
        };
        let nodes: Vec<&Node> = listed
            .into_iter()
            .filter(|n| n.models.contains(&model.name))
            .collect();
        if nodes.is_empty() {
            return Err(Error::config(format!(
                "no node {}serves model `{}`; add it to a node's `models` in {}",
                selector.map_or(String::new(), |s| format!("in `{s}` ")),
                model.name,
                self.source
            )));
        }
        Ok(Route {
            model,
            nodes,
            pinned,
        })
    }

    /// Nodes named on the command line, or all of them.
    pub(crate) fn select_nodes(&self, names: &[String], all: bool) -> Result<Vec<&Node>> {
        if all || names.is_empty() {
            return Ok(self.nodes.values().collect());
        }
        names.iter().map(|n| self.node(Some(n))).collect()
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// Durations travel as whole milliseconds in JSON.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = u64::deserialize(d)?;
        let duration = Duration::from_millis(ms);
        if duration > super::MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "a duration of {ms} ms is over the 366 days any duration may be"
            )));
        }
        Ok(duration)
    }
}

#[cfg(test)]
mod tests;
