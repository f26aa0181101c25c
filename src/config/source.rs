//! Where the configuration comes from: the lookup order, a nodes.toml read and parsed (its
//! errors located at file, line and column), or the embedded `local` node.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::config::resolve::resolve;
use crate::config::{
    Config, ConfigError, DEFAULT_CLOCK_SKEW, DEFAULT_HIVE_PORT, DEFAULT_KEEP_ALIVE, DEFAULT_MODEL,
    DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, DEFAULT_TIMEOUT, Model, Node, RestartPolicy,
    Transport, raw,
};
use crate::error::{Error, Result};
use crate::paths;

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
            metrics_port: None,
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
