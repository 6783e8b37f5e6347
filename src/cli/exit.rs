//! Exit codes and error output: one table, used by every command.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | failure not covered below (internal error, bad local state) |
//! | 2 | usage: bad flags, arguments or configuration, including a master key that is missing, malformed or wrong (clap uses 2 as well) |
//! | 3 | not found |
//! | 4 | refused: unauthenticated, permission denied, invalid argument, precondition |
//! | 5 | unavailable: no daemon, database or peer answered in time |

use std::process::ExitCode;

use crate::identity::IdentityError;
use crate::identity::sealing::SealingError;

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
            print_line(&serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
        } else {
            // Names, reasons and states may come from peers and agents.
            print_line(&crate::text::escape_for_terminal(&text()));
        }
    }
}

/// A list as every list command prints it with `--json`: an object with the
/// items under their plural noun (the field name of the gRPC response, so
/// `agents`, `jobs`, `entries`, `connections`, ...) and `next_page_token`,
/// empty when there is no further page. One shape for all lists, paginated or
/// not, so a script reads `.<items>[0]` and `.next_page_token` the same way
/// everywhere; a list printed whole always has an empty token.
pub fn list_json(
    items_key: &str,
    items: Vec<serde_json::Value>,
    next_page_token: &str,
) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert(items_key.to_owned(), serde_json::Value::Array(items));
    object.insert(
        "next_page_token".to_owned(),
        serde_json::Value::String(next_page_token.to_owned()),
    );
    serde_json::Value::Object(object)
}

/// Writes `text` and a newline to stdout, like `println!` but without its
/// panic when the reader has gone (`mosaicd job list | head -1`): the process
/// then ends quietly with 0, since the reader took what it wanted. It exits
/// from here because printing is the last step of a command, and a command
/// that streams (`job watch`) has nothing left to do without a reader.
pub fn print_line(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(error) => {
            eprintln!("error: cannot write to stdout: {error}");
            std::process::exit(1);
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

/// Whether a failed call's status came from a server (which always sends
/// `content-type`) rather than from this client's transport (no connection,
/// a TLS failure, a timeout here), whose statuses carry no metadata.
fn answered_by_server(status: &tonic::Status) -> bool {
    status.metadata().get("content-type").is_some()
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

    /// Exit code 4.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            code: 4,
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

    /// The exit code of the table above for a gRPC status code.
    pub fn code_of(code: tonic::Code) -> u8 {
        use tonic::Code;
        match code {
            Code::NotFound => 3,
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::ResourceExhausted => 4,
            Code::Unavailable | Code::DeadlineExceeded => 5,
            _ => 1,
        }
    }

    /// Maps a gRPC status from the daemon, with `server` for the hint.
    pub fn from_status(status: &tonic::Status, server: &str) -> Self {
        use tonic::Code;
        let message = status.message();
        let message = match status.code() {
            Code::Unauthenticated => {
                format!("{message} (pass --api-key or set MOSAIC_API_KEY)")
            }
            // The daemon answered: what was unavailable is behind it (a
            // peer, the database), and it said which.
            Code::Unavailable | Code::DeadlineExceeded if answered_by_server(status) => {
                format!("the daemon at {server} is up, but: {message}")
            }
            Code::Unavailable | Code::DeadlineExceeded => format!(
                "no answer from the daemon at {server}: {message} — is `mosaicd serve` running?"
            ),
            Code::NotFound
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::Unimplemented => message.to_owned(),
            _ => format!("the daemon failed: {message}"),
        };
        Self {
            code: Self::code_of(status.code()),
            message,
        }
    }

    /// Maps a gRPC status of a command the daemon at `server` sent to a peer
    /// (a Federation `*RemoteAgent` call; `peer` names it for people,
    /// `peer_instance_id` for commands): the same codes as
    /// [`CliError::from_status`], with hints about the peer instead of the
    /// local daemon where the peer is the likelier cause.
    pub fn from_remote_status(
        status: &tonic::Status,
        server: &str,
        peer: &str,
        peer_instance_id: &str,
    ) -> Self {
        use tonic::Code;
        let message = status.message();
        // The daemon prefixes what the peer answered; anything else is the
        // daemon's own refusal (API key, connection state, input).
        let from_peer = message.starts_with("the peer ");
        let message = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => format!(
                "no answer from peer {peer}: {message} — check that it runs and that the daemon at {server} can reach it (`mosaicd peer list` shows REACHABLE)"
            ),
            Code::NotFound if from_peer => format!(
                "{message} — `mosaicd agent list --peer {peer_instance_id}` shows the agents this instance started there"
            ),
            Code::PermissionDenied if from_peer => format!(
                "{message} — the peer's operator grants capabilities when accepting the connection (`mosaicd peer accept ID --grant ...`)"
            ),
            Code::Unauthenticated if !from_peer => {
                format!(
                    "{message} (pass --api-key or set MOSAIC_API_KEY; peer commands need the admin scope)"
                )
            }
            Code::PermissionDenied if !from_peer => {
                format!("{message} (peer commands need an API key with the admin scope)")
            }
            Code::Internal | Code::Unknown | Code::DataLoss => {
                format!("the command to peer {peer} failed: {message}")
            }
            _ => message.to_owned(),
        };
        Self {
            code: Self::code_of(status.code()),
            message,
        }
    }
}

/// A master key that is missing, malformed, too open or not the one the
/// identity was sealed with is configuration, like a bad flag: exit code 2.
/// Reading the key file or the cipher failing is not.
fn sealing_code(error: &SealingError) -> u8 {
    match error {
        SealingError::MalformedMasterKey { .. }
        | SealingError::KeyFileTooOpen { .. }
        | SealingError::Missing { .. }
        | SealingError::WrongKey => 2,
        SealingError::Io { .. } | SealingError::Crypto => 1,
    }
}

/// The exit code of an identity error (its sources are hidden behind
/// `#[error(transparent)]`, so they are matched here rather than found in
/// an error chain).
fn identity_code(error: &IdentityError) -> u8 {
    match error {
        IdentityError::Sealing(sealing) => sealing_code(sealing),
        IdentityError::Store(crate::store::StoreError::Unavailable(_)) => 5,
        _ => 1,
    }
}

/// `message` about `error`, with what to do when the master key is not the
/// one the identity was sealed with.
fn sealing_message(error: &SealingError, message: String) -> String {
    match error {
        SealingError::WrongKey => format!(
            "{message}; MOSAIC_MASTER_KEY (or, when it is unset, master.key in the data dir) must be the key this database's identity was created with"
        ),
        _ => message,
    }
}

impl CliError {
    /// Maps an identity error with `message` (which may add context): master
    /// key trouble exits 2, an unreachable database 5, anything else 1.
    pub fn from_identity(error: &IdentityError, message: impl Into<String>) -> Self {
        let message = match error {
            IdentityError::Sealing(sealing) => sealing_message(sealing, message.into()),
            _ => message.into(),
        };
        Self {
            code: identity_code(error),
            message,
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        if error.downcast_ref::<crate::config::ConfigError>().is_some() {
            return Self::usage(format!("{error:#}"));
        }
        for cause in error.chain() {
            if let Some(identity) = cause.downcast_ref::<IdentityError>() {
                return Self::from_identity(identity, format!("{error:#}"));
            }
            if let Some(sealing) = cause.downcast_ref::<SealingError>() {
                return Self {
                    code: sealing_code(sealing),
                    message: sealing_message(sealing, format!("{error:#}")),
                };
            }
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
