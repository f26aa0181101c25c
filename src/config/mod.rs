//! nodes.toml -> validated `Config`: lookup order, defaults, the embedded `local` node, and
//! errors that name the file, line and key. Loading has no side effects.

mod error;
mod raw;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::paths;

pub use error::ConfigError;
pub(crate) use raw::{MAX_DURATION, Transport, parse_duration};

pub(crate) const DEFAULT_MODEL: &str = "smollm2";
pub(crate) const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub(crate) const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub(crate) const DEFAULT_HIVE_PORT: u16 = 7835;
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// llama.cpp's limit on sequences in one context.
pub(crate) const MAX_SLOTS: u32 = 256;
/// Tokens of context per request: llama.cpp's largest trained contexts are 1M tokens, and each
/// slot's KV cache is sized from this, so a larger number is a typo.
pub(crate) const MAX_CONTEXT: u32 = 1 << 21;
pub(crate) const MAX_THREADS: u32 = 1024;
/// More layers than any model has; llama.cpp offloads what there is.
pub(crate) const MAX_GPU_LAYERS: u32 = 100_000;
/// Longest context per request when the user sets none: the training context can be far larger
/// than what a small machine wants to allocate for the KV cache.
pub(crate) const DEFAULT_MAX_CONTEXT: u32 = 4096;

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("<embedded default>"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) source: Source,
    pub(crate) models: IndexMap<String, Model>,
    pub(crate) nodes: IndexMap<String, Node>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) host: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) port: u16,
    pub(crate) identity_file: Option<String>,
    pub(crate) known_hosts: String,
    /// As written: `~` means the node's home, so it is expanded on the node.
    pub(crate) remote_dir: String,
    pub(crate) hive_port: u16,
    pub(crate) transport: Transport,
    #[serde(with = "duration_ms")]
    pub(crate) timeout: Duration,
    #[serde(with = "duration_ms")]
    pub(crate) keep_alive: Duration,
    /// How far a request's timestamp may be from the node's clock.
    #[serde(with = "duration_ms")]
    pub(crate) clock_skew: Duration,
    pub(crate) models: Vec<String>,
    /// The fleet's `[restart]` policy, which this node's hive applies.
    #[serde(skip)]
    pub(crate) restart: RestartPolicy,
    /// This machine's copy of the node's signing key: the node's own file for a local node,
    /// else `keys/NODE.key` beside nodes.toml.
    pub(crate) key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct Model {
    pub(crate) name: String,
    /// Node-side path, `~` expanded on the node.
    pub(crate) path: String,
    pub(crate) sha256: String,
    pub(crate) source: Option<String>,
    pub(crate) context: Option<u32>,
    pub(crate) slots: u32,
    pub(crate) gpu_layers: u32,
    pub(crate) threads: Option<u32>,
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
    /// Finds the configuration: `--config`, `$RBEE_CONFIG`, `./nodes.toml`,
    /// `$XDG_CONFIG_HOME/rbee/nodes.toml`, else the embedded default.
    pub(crate) fn discover(explicit: Option<&Path>) -> Result<Config> {
        if let Some(path) = explicit {
            return Config::load(path);
        }
        if let Some(path) = std::env::var_os("RBEE_CONFIG").filter(|p| !p.is_empty()) {
            return Config::load(Path::new(&path));
        }
        let cwd = Path::new("nodes.toml");
        if cwd.is_file() {
            return Config::load(cwd);
        }
        if let Some(path) = paths::user_config_file().filter(|p| p.is_file()) {
            return Config::load(&path);
        }
        Ok(Config::embedded())
    }

    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(ConfigError::Read {
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        Config::parse(&text, Source::File(path.to_path_buf()))
    }

    pub fn parse(text: &str, source: Source) -> Result<Config> {
        let located = |span: Option<Range<usize>>, message: &str| -> Error {
            Error::config(locate(&source, text, span, message))
        };
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| located(e.span(), e.message()))?;
        resolve(raw, source.clone(), &located)
    }

    /// One node `local` on this machine serving the default model.
    pub(crate) fn embedded() -> Config {
        let model = Model {
            name: DEFAULT_MODEL.to_string(),
            path: format!("~/.cache/rbee/models/{DEFAULT_MODEL_FILE}"),
            sha256: DEFAULT_MODEL_SHA256.to_string(),
            source: None,
            context: None,
            slots: 4,
            gpu_layers: 0,
            threads: None,
        };
        let node = Node {
            name: "local".to_string(),
            host: None,
            user: None,
            port: 22,
            identity_file: None,
            known_hosts: "~/.ssh/known_hosts".to_string(),
            remote_dir: paths::state_dir()
                .join("nodes/local")
                .to_string_lossy()
                .into_owned(),
            hive_port: DEFAULT_HIVE_PORT,
            transport: Transport::Local,
            timeout: DEFAULT_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            clock_skew: DEFAULT_CLOCK_SKEW,
            models: vec![DEFAULT_MODEL.to_string()],
            restart: RestartPolicy::default(),
            key_file: paths::state_dir().join("nodes/local/hive.key"),
        };
        Config {
            source: Source::Embedded,
            models: IndexMap::from([(model.name.clone(), model)]),
            nodes: IndexMap::from([(node.name.clone(), node)]),
        }
    }

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

fn resolve(
    raw: raw::RawConfig,
    source: Source,
    located: &dyn Fn(Option<Range<usize>>, &str) -> Error,
) -> Result<Config> {
    let defaults = raw.defaults;
    let restart = resolve_restart(&raw.restart);

    let mut models = IndexMap::new();
    for (name, spanned) in raw.models {
        let span = spanned.span();
        let m = spanned.into_inner();
        if !valid_name(&name) {
            return Err(located(Some(span), &bad_name("model", &name)));
        }
        if m.slots.is_some_and(|s| !(1..=MAX_SLOTS).contains(&s)) {
            return Err(located(
                Some(span),
                &format!("`slots` must be between 1 and {MAX_SLOTS}"),
            ));
        }
        if m.context.is_some_and(|c| !(1..=MAX_CONTEXT).contains(&c)) {
            return Err(located(
                Some(span),
                &format!("`context` must be between 1 and {MAX_CONTEXT} tokens"),
            ));
        }
        if m.threads.is_some_and(|t| !(1..=MAX_THREADS).contains(&t)) {
            return Err(located(
                Some(span),
                &format!("`threads` must be between 1 and {MAX_THREADS}"),
            ));
        }
        if m.gpu_layers.is_some_and(|l| l > MAX_GPU_LAYERS) {
            return Err(located(
                Some(span),
                &format!("`gpu_layers` must be at most {MAX_GPU_LAYERS}"),
            ));
        }
        models.insert(
            name.clone(),
            Model {
                name,
                path: m.path,
                sha256: m.sha256.0,
                source: m.source,
                context: m.context,
                slots: m.slots.unwrap_or(4),
                gpu_layers: m.gpu_layers.unwrap_or(0),
                threads: m.threads,
            },
        );
    }

    let keys_dir = match &source {
        Source::File(path) => path
            .parent()
            .map_or_else(|| PathBuf::from("keys"), |p| p.join("keys")),
        Source::Embedded => paths::user_config_file()
            .and_then(|f| f.parent().map(|p| p.join("keys")))
            .unwrap_or_else(|| paths::state_dir().join("keys")),
    };
    let mut nodes = IndexMap::new();
    for (name, spanned) in raw.nodes {
        let span = spanned.span();
        let n = spanned.into_inner();
        if !valid_name(&name) {
            return Err(located(Some(span), &bad_name("node", &name)));
        }
        let transport = n.transport.or(defaults.transport).unwrap_or(Transport::Ssh);
        let host = n.host.or_else(|| defaults.host.clone());
        if host.is_none() && transport != Transport::Local {
            return Err(located(
                Some(span),
                &format!(
                    "node `{name}` has no `host`; set `host = \"...\"` or `transport = \"local\"`"
                ),
            ));
        }
        let remote_dir = n
            .remote_dir
            .clone()
            .or_else(|| defaults.remote_dir.clone())
            .unwrap_or_else(|| "~/.rbee".to_string());
        let model_refs = n
            .models
            .or_else(|| defaults.models.clone())
            .unwrap_or_default();
        let mut served = Vec::new();
        for m in model_refs {
            if !models.contains_key(m.get_ref()) {
                let message = format!(
                    "node `{name}` serves unknown model `{}`; known models: {}",
                    m.get_ref(),
                    list(models.keys())
                );
                return Err(located(Some(m.span()), &message));
            }
            served.push(m.into_inner());
        }
        let key_name = format!("{name}.key");
        nodes.insert(
            name.clone(),
            Node {
                name,
                host,
                user: n.user.or_else(|| defaults.user.clone()),
                port: n.port.or(defaults.port).unwrap_or(22),
                identity_file: n.identity_file.or_else(|| defaults.identity_file.clone()),
                known_hosts: n
                    .known_hosts
                    .or_else(|| defaults.known_hosts.clone())
                    .unwrap_or_else(|| "~/.ssh/known_hosts".to_string()),
                hive_port: n
                    .hive_port
                    .or(defaults.hive_port)
                    .unwrap_or(DEFAULT_HIVE_PORT),
                transport,
                timeout: n
                    .timeout
                    .or(defaults.timeout)
                    .map_or(DEFAULT_TIMEOUT, |d| d.0),
                keep_alive: n
                    .keep_alive
                    .or(defaults.keep_alive)
                    .map_or(DEFAULT_KEEP_ALIVE, |d| d.0),
                clock_skew: n
                    .clock_skew
                    .or(defaults.clock_skew)
                    .map_or(DEFAULT_CLOCK_SKEW, |d| d.0),
                key_file: if transport == Transport::Local {
                    paths::expand_tilde(remote_dir.trim_end_matches('/')).join("hive.key")
                } else {
                    keys_dir.join(key_name)
                },
                remote_dir,
                models: served,
                restart,
            },
        );
    }
    if nodes.is_empty() {
        return Err(Error::config(format!(
            "{source}: no nodes defined; add a `[nodes.NAME]` table (see nodes.toml.example)"
        )));
    }
    Ok(Config {
        source,
        models,
        nodes,
    })
}

fn resolve_restart(r: &raw::RawRestart) -> RestartPolicy {
    let d = RestartPolicy::default();
    RestartPolicy {
        max_attempts: r.max_attempts.unwrap_or(d.max_attempts),
        backoff_initial: r.backoff_initial.map_or(d.backoff_initial, |x| x.0),
        backoff_max: r.backoff_max.map_or(d.backoff_max, |x| x.0),
        breaker_failures: r.breaker_failures.unwrap_or(d.breaker_failures),
        breaker_window: r.breaker_window.map_or(d.breaker_window, |x| x.0),
    }
}

/// Names travel into paths, URLs and remote commands, so they stay plain.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

fn bad_name(what: &str, name: &str) -> String {
    format!(
        "invalid {what} name `{name}`: use letters, digits, `-`, `_` and `.` (at most 64, not starting with `.`)"
    )
}

/// `FILE:LINE:COL: message`, then the offending line, so the key is in view.
fn locate(source: &Source, text: &str, span: Option<Range<usize>>, message: &str) -> String {
    let message = message.trim_end();
    let Some(span) = span else {
        return format!("{source}: {message}");
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    format!("{source}:{line}:{column}: {message}\n  {line} | {line_text}")
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
