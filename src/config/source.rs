//! Where the configuration comes from: the lookup order, a nodes.toml read and parsed (its
//! errors located at file, line and column), or the embedded `local` node.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::config::error::MAX_CONFIG_BYTES;
use crate::config::resolve::resolve;
use crate::config::{
    Config, ConfigError, DEFAULT_CLOCK_SKEW, DEFAULT_HEALTH_MISSES, DEFAULT_HIVE_PORT,
    DEFAULT_KEEP_ALIVE, DEFAULT_MODEL, DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, DEFAULT_PERSIST,
    DEFAULT_TIMEOUT, Model, Node, RestartPolicy, Transport, raw,
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
        let bytes = read_bounded(path)?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let bad = e.utf8_error().valid_up_to();
                let byte = e.as_bytes().get(bad).copied().unwrap_or_default();
                // The valid prefix locates the first bad byte like any other error.
                let valid = String::from_utf8_lossy(&e.as_bytes()[..bad]).into_owned();
                let source = Source::File(path.to_path_buf());
                let message =
                    format!("byte 0x{byte:02x} is not valid UTF-8; nodes.toml must be UTF-8");
                return Err(Error::config(locate(
                    &source,
                    &valid,
                    Some(bad..bad),
                    &message,
                )));
            }
        };
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
            slots: None,
            gpu_layers: super::GpuLayers::Auto,
            threads: None,
            load_timeout: crate::config::DEFAULT_LOAD_TIMEOUT,
            kv_unified: false,
        };
        let node = Node {
            name: "local".to_string(),
            host: None,
            user: None,
            port: 22,
            identity_file: None,
            jump: None,
            known_hosts: None,
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
            audit: super::AuditPolicy::default(),
            health_misses: DEFAULT_HEALTH_MISSES,
            persist: DEFAULT_PERSIST,
            models: vec![DEFAULT_MODEL.to_string()],
            restart: RestartPolicy::default(),
            key_file: paths::state_dir().join("nodes/local/hive.key"),
            binary: "auto".to_string(),
            binaries: Vec::new(),
        };
        Config {
            source: Source::Embedded,
            models: IndexMap::from([(model.name.clone(), model)]),
            nodes: IndexMap::from([(node.name.clone(), node)]),
            groups: IndexMap::new(),
        }
    }
}

/// The bytes of a config file, which must be a regular file of at most `MAX_CONFIG_BYTES`. It is
/// opened without blocking, so a FIFO is refused instead of waiting for a writer, and read no
/// further than the bound, in case it grows while being read.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let unreadable = |e: std::io::Error| {
        Error::Config(ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a plain file"
        };
        return Err(Error::Config(ConfigError::NotAFile {
            path: path.to_path_buf(),
            kind,
        }));
    }
    let too_large = |size| {
        Error::Config(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size,
        })
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
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
