//! What can be wrong with a configuration, each naming the file (and line, column and key where
//! there is one) and what to do.

use std::path::PathBuf;

/// The largest nodes.toml read: a fleet of hundreds of nodes fits many times over.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file parses but says something invalid, or does not parse; the message is located.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config file `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A FIFO, a device or a directory: reading it could block or never end.
    #[error("config file `{}` is not a regular file ({kind}); point --config or RBEE_CONFIG at a nodes.toml", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("config file `{}` is over {} MiB ({size} bytes); a nodes.toml is far smaller", path.display(), MAX_CONFIG_BYTES >> 20)]
    TooLarge { path: PathBuf, size: u64 },
    #[error("unknown node `{name}` in {file}; known nodes: {known}")]
    UnknownNode {
        name: String,
        file: String,
        known: String,
    },
    #[error("unknown model `{name}` for node `{node}`; it serves: {serves}")]
    NotServed {
        name: String,
        node: String,
        serves: String,
    },
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    /// A node's directory too long to hold its Unix sockets: the kernel takes at most
    /// `max` bytes for a socket's path.
    #[error(
        "the socket path `{path}` would be {bytes} bytes, over the {max} bytes the \
         kernel allows for a Unix socket; choose a shorter `remote_dir` (at most {dir_max} bytes \
         once `~` is expanded)"
    )]
    SocketPathTooLong {
        path: String,
        bytes: usize,
        max: usize,
        dir_max: usize,
    },
}
