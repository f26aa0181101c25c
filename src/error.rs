//! The top-level error: which exit code it maps to and how it is shown to the user.

use std::fmt;

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
    Deadline = 124,
    Interrupted = 130,
}

impl ExitKind {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The wire name of an error class, shared by the hive, the worker and the CLI.
    pub fn wire_code(self) -> &'static str {
        match self {
            ExitKind::Internal => "internal",
            ExitKind::Usage => "usage",
            ExitKind::Config => "config",
            ExitKind::Ssh => "ssh",
            ExitKind::Unauthenticated => "unauthenticated",
            ExitKind::HiveUnavailable => "hive_unavailable",
            ExitKind::WorkerUnavailable => "worker_unavailable",
            ExitKind::InvalidRequest => "invalid_request",
            ExitKind::Deadline => "deadline",
            ExitKind::Interrupted => "interrupted",
        }
    }

    /// The kind behind an exit code (for results gathered from several nodes).
    pub fn from_code(code: u8) -> ExitKind {
        [
            ExitKind::Usage,
            ExitKind::Config,
            ExitKind::Ssh,
            ExitKind::Unauthenticated,
            ExitKind::HiveUnavailable,
            ExitKind::WorkerUnavailable,
            ExitKind::InvalidRequest,
            ExitKind::Deadline,
            ExitKind::Interrupted,
        ]
        .into_iter()
        .find(|k| k.code() == code)
        .unwrap_or(ExitKind::Internal)
    }

    pub fn from_wire_code(code: &str) -> ExitKind {
        match code {
            "usage" => ExitKind::Usage,
            "config" => ExitKind::Config,
            "ssh" => ExitKind::Ssh,
            "unauthenticated" => ExitKind::Unauthenticated,
            "hive_unavailable" => ExitKind::HiveUnavailable,
            "worker_unavailable" => ExitKind::WorkerUnavailable,
            "invalid_request" => ExitKind::InvalidRequest,
            "deadline" => ExitKind::Deadline,
            "interrupted" => ExitKind::Interrupted,
            _ => ExitKind::Internal,
        }
    }
}

/// An error that reaches the user: a class (exit code) and a message that says what failed,
/// where, and what to do next.
#[derive(Debug)]
pub struct Error {
    pub kind: ExitKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ExitKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Error {
        Error::new(ExitKind::Config, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ExitKind::Internal, message)
    }

    pub fn hive(message: impl Into<String>) -> Error {
        Error::new(ExitKind::HiveUnavailable, message)
    }

    pub fn worker(message: impl Into<String>) -> Error {
        Error::new(ExitKind::WorkerUnavailable, message)
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ExitKind::InvalidRequest, message)
    }

    pub fn deadline(message: impl Into<String>) -> Error {
        Error::new(ExitKind::Deadline, message)
    }

    pub fn code(&self) -> u8 {
        self.kind.code()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Error {
        Error::internal(err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
