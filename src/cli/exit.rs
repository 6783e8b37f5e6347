//! Exit codes and error output: one table, used by every command.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | failure not covered below (internal error, bad local state) |
//! | 2 | usage: bad flags or arguments (clap uses 2 as well) |
//! | 3 | not found |
//! | 4 | refused: unauthenticated, permission denied, invalid argument, precondition |
//! | 5 | unavailable: no daemon, database or peer answered in time |

use std::process::ExitCode;

/// How a command prints data.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// JSON instead of text.
    pub json: bool,
}

impl Output {
    /// Prints `value` as pretty JSON, or `text()` for people.
    pub fn print(&self, value: &serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
            );
        } else {
            println!("{}", text());
        }
    }
}

/// A command's failure: what to tell the user, and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code from the table above.
    pub code: u8,
    /// A message that says what went wrong and what to do.
    pub message: String,
}

impl CliError {
    /// Exit code 1.
    pub fn failure(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    /// Exit code 2.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// Exit code 3.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: 3,
            message: message.into(),
        }
    }

    /// Exit code 5.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: 5,
            message: message.into(),
        }
    }

    /// The exit code as a process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }

    /// Maps a gRPC status from the daemon, with `server` for the hint.
    pub fn from_status(status: &tonic::Status, server: &str) -> Self {
        use tonic::Code;
        let message = status.message();
        match status.code() {
            Code::NotFound => Self::not_found(message),
            Code::Unauthenticated => Self {
                code: 4,
                message: format!("{message} (pass --api-key or set MOSAIC_API_KEY)"),
            },
            Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::ResourceExhausted => Self {
                code: 4,
                message: message.to_owned(),
            },
            Code::Unavailable | Code::DeadlineExceeded => Self::unavailable(format!(
                "no answer from the daemon at {server}: {message} — is `mosaicd serve` running?"
            )),
            Code::Unimplemented => Self::failure(message),
            _ => Self::failure(format!("the daemon failed: {message}")),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        if error.downcast_ref::<crate::config::ConfigError>().is_some() {
            return Self::usage(format!("{error:#}"));
        }
        if error.chain().any(|cause| {
            cause
                .downcast_ref::<crate::store::StoreError>()
                .is_some_and(|store| matches!(store, crate::store::StoreError::Unavailable(_)))
        }) {
            return Self::unavailable(format!("{error:#}"));
        }
        Self::failure(format!("{error:#}"))
    }
}
