//! The top-level error: what happened, typed by domain; the exit code each maps to (in one
//! place, `Error::kind`); and how it is shown to the user.

use std::path::Path;

pub use crate::config::ConfigError;
pub use crate::ssh::SshError;

/// Exit codes of the stable command-line contract (DESIGN.md, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Internal = 1,
    Usage = 2,
    Config = 3,
    Ssh = 4,
    Unauthenticated = 5,
    HiveUnavailable = 6,
    WorkerUnavailable = 7,
    InvalidRequest = 8,
    /// `rbee batch`: some items failed; the others are in the output.
    BatchFailed = 9,
    /// The node (or this machine) could not record the work in its audit trail, and so
    /// refused it.
    Audit = 10,
    Deadline = 124,
    Interrupted = 130,
}

impl ExitKind {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The wire name of an error class, shared by the hive, the worker and the CLI.
    pub(crate) fn wire_code(self) -> &'static str {
        match self {
            ExitKind::Internal => "internal",
            ExitKind::Usage => "usage",
            ExitKind::Config => "config",
            ExitKind::Ssh => "ssh",
            ExitKind::Unauthenticated => "unauthenticated",
            ExitKind::HiveUnavailable => "hive_unavailable",
            ExitKind::WorkerUnavailable => "worker_unavailable",
            ExitKind::InvalidRequest => "invalid_request",
            ExitKind::BatchFailed => "batch_failed",
            ExitKind::Audit => "audit_unavailable",
            ExitKind::Deadline => "deadline",
            ExitKind::Interrupted => "interrupted",
        }
    }

    const ALL: [ExitKind; 12] = [
        ExitKind::Internal,
        ExitKind::Usage,
        ExitKind::Config,
        ExitKind::Ssh,
        ExitKind::Unauthenticated,
        ExitKind::HiveUnavailable,
        ExitKind::WorkerUnavailable,
        ExitKind::InvalidRequest,
        ExitKind::BatchFailed,
        ExitKind::Audit,
        ExitKind::Deadline,
        ExitKind::Interrupted,
    ];

    /// The kind behind an exit code (for results gathered from several nodes).
    pub(crate) fn from_code(code: u8) -> ExitKind {
        ExitKind::ALL
            .into_iter()
            .find(|k| k.code() == code)
            .unwrap_or(ExitKind::Internal)
    }

    pub(crate) fn from_wire_code(code: &str) -> ExitKind {
        ExitKind::ALL
            .into_iter()
            .find(|k| k.wire_code() == code)
            .unwrap_or(ExitKind::Internal)
    }
}

/// An error that reaches the user. Each variant says what happened; `kind` gives its exit code.
/// Messages say what failed, where, and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Boxed: its host key variants carry both fingerprints and would make every `Result` large.
    #[error(transparent)]
    Ssh(Box<SshError>),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Deadline(#[from] DeadlineError),
    /// The request was refused as not signed by a key the peer holds, or a response did not
    /// verify.
    #[error("{0}")]
    Unauthenticated(String),
    /// The hive is not running, is stopping, or cannot be reached.
    #[error("{0}")]
    Hive(String),
    /// No worker can serve: the model failed to load, the breaker is open, the worker died.
    #[error("{0}")]
    Worker(String),
    /// The request itself is not acceptable (too long for the context, out of range).
    #[error("{0}")]
    Invalid(String),
    /// An audit record could not be appended; the work it would record is refused (fail
    /// closed) unless the node is `audit = "best-effort"`.
    #[error("{0}")]
    Audit(String),
    /// The hive does not serve the model a request names, or serves it with another spec than
    /// the request's digest: the queen sends the node's models (`PUT /v1/models`) and tries
    /// once more. Exit 3 when it reaches the user: the node's configuration is the cause.
    #[error("{0}")]
    ModelSpec(String),
    /// The model's file is not on the node: the queen fetches it when the model has a URL
    /// `source`, else tells how to put it there. Exit 7, as any model that cannot be loaded.
    #[error("{0}")]
    ModelMissing(String),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Internal(String),
    /// An error whose class is known only by its code: what a peer sent with a wire code this
    /// side has no variant for, or the summary of several nodes' results.
    #[error("{message}")]
    Classified { kind: ExitKind, message: String },
    /// Already reported to the user (per-node results were printed): only the exit code is left.
    #[error("")]
    Reported(ExitKind),
}

impl From<SshError> for Error {
    fn from(err: SshError) -> Error {
        Error::Ssh(Box::new(err))
    }
}

impl Error {
    /// The error of class `kind` (as it came from a peer or from several nodes), as the variant
    /// this side has for that class.
    pub(crate) fn of_kind(kind: ExitKind, message: impl Into<String>) -> Error {
        let message = message.into();
        match kind {
            ExitKind::Config => Error::Config(ConfigError::Invalid(message)),
            ExitKind::Unauthenticated => Error::Unauthenticated(message),
            ExitKind::HiveUnavailable => Error::Hive(message),
            ExitKind::WorkerUnavailable => Error::Worker(message),
            ExitKind::InvalidRequest => Error::Invalid(message),
            ExitKind::Audit => Error::Audit(message),
            ExitKind::Deadline => Error::Deadline(DeadlineError::During(message)),
            ExitKind::Internal => Error::Internal(message),
            ExitKind::Usage | ExitKind::Ssh | ExitKind::BatchFailed | ExitKind::Interrupted => {
                Error::Classified { kind, message }
            }
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::Config(ConfigError::Invalid(message.into()))
    }

    /// A usage error (exit 2): a file named on the command line that cannot be read, a bad
    /// argument clap could not tell.
    pub(crate) fn usage(message: impl Into<String>) -> Error {
        Error::Classified {
            kind: ExitKind::Usage,
            message: message.into(),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::Internal(message.into())
    }

    pub(crate) fn hive(message: impl Into<String>) -> Error {
        Error::Hive(message.into())
    }

    pub(crate) fn worker(message: impl Into<String>) -> Error {
        Error::Worker(message.into())
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }

    /// A hop ran out of budget and says what it was doing.
    pub(crate) fn deadline(message: impl Into<String>) -> Error {
        Error::Deadline(DeadlineError::During(message.into()))
    }

    /// Which class of the exit-code table this error belongs to: the one place that decides.
    pub fn kind(&self) -> ExitKind {
        match self {
            Error::Config(_) | Error::ModelSpec(_) => ExitKind::Config,
            Error::Ssh(_) => ExitKind::Ssh,
            Error::Io(_) | Error::Internal(_) => ExitKind::Internal,
            Error::Deadline(_) => ExitKind::Deadline,
            Error::Unauthenticated(_) => ExitKind::Unauthenticated,
            Error::Hive(_) => ExitKind::HiveUnavailable,
            Error::Worker(_) | Error::ModelMissing(_) => ExitKind::WorkerUnavailable,
            Error::Invalid(_) => ExitKind::InvalidRequest,
            Error::Audit(_) => ExitKind::Audit,
            Error::Interrupted => ExitKind::Interrupted,
            Error::Classified { kind, .. } | Error::Reported(kind) => *kind,
        }
    }

    pub fn code(&self) -> u8 {
        self.kind().code()
    }

    /// The wire code a peer sends for this error: its class's, except for the one error of a
    /// class that the queen acts on (a model spec it must send again, a model file to fetch).
    pub(crate) fn wire_code(&self) -> &'static str {
        match self {
            Error::ModelSpec(_) => MODEL_SPEC_MISMATCH,
            Error::ModelMissing(_) => MODEL_MISSING,
            other => other.kind().wire_code(),
        }
    }

    /// The error a peer's wire code and message stand for.
    pub(crate) fn from_wire(code: &str, message: String) -> Error {
        if code == MODEL_SPEC_MISMATCH {
            Error::ModelSpec(message)
        } else if code == MODEL_MISSING {
            Error::ModelMissing(message)
        } else {
            Error::of_kind(ExitKind::from_wire_code(code), message)
        }
    }
}

/// The wire code of `Error::ModelSpec`.
pub(crate) const MODEL_SPEC_MISMATCH: &str = "model_spec_mismatch";
/// The wire code of `Error::ModelMissing`.
pub(crate) const MODEL_MISSING: &str = "model_missing";

/// How the budget ran out.
#[derive(Debug, thiserror::Error)]
pub enum DeadlineError {
    /// The invocation's whole budget, with how it was spent.
    #[error("{0}")]
    Spent(String),
    /// A hop ran out and said what it was doing; the queen adds the breakdown.
    #[error("{0}")]
    During(String),
}

/// A failed file or socket operation, with what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {source}")]
pub struct IoError {
    what: String,
    #[source]
    source: std::io::Error,
}

impl IoError {
    /// `op` is a verb phrase ("read", "create the directory"); the path follows it.
    pub(crate) fn at(op: &str, path: &Path, source: std::io::Error) -> IoError {
        IoError {
            what: format!("{op} `{}`", path.display()),
            source,
        }
    }

    /// The kind of the failure underneath.
    pub(crate) fn kind(&self) -> std::io::ErrorKind {
        self.source.kind()
    }

    /// An operation on something that is not a path (a socket, the runtime).
    pub(crate) fn doing(what: impl Into<String>, source: std::io::Error) -> IoError {
        IoError {
            what: what.into(),
            source,
        }
    }
}

/// Adds what was being done to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, op: &str, path: &Path) -> Result<T, IoError>;
    fn doing(self, what: &str) -> Result<T, IoError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &str, path: &Path) -> Result<T, IoError> {
        self.map_err(|e| IoError::at(op, path, e))
    }

    fn doing(self, what: &str) -> Result<T, IoError> {
        self.map_err(|e| IoError::doing(what, e))
    }
}

/// The innermost cause of an error (a library's outer layers say only "request failed").
pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_and_exit_codes_round_trip() {
        for kind in ExitKind::ALL {
            assert_eq!(ExitKind::from_wire_code(kind.wire_code()), kind);
            assert_eq!(ExitKind::from_code(kind.code()), kind);
            assert_eq!(Error::of_kind(kind, "x").kind(), kind);
        }
        assert_eq!(ExitKind::from_wire_code("no such"), ExitKind::Internal);
        let spec = Error::ModelSpec("stale".into());
        let back = Error::from_wire(spec.wire_code(), spec.to_string());
        assert!(matches!(back, Error::ModelSpec(m) if m == "stale"));
        assert_eq!(spec.code(), 3);
    }

    #[test]
    fn an_io_error_names_its_path_and_operation() {
        let err: Result<(), IoError> = std::fs::read("/nonexistent/k.key")
            .map(|_| ())
            .at("read", Path::new("/nonexistent/k.key"));
        let text = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with("cannot read `/nonexistent/k.key`: "),
            "{text}"
        );
    }
}
