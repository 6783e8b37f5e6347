//! The store's error type: what went wrong, in the terms a caller acts on.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::PoolError;

/// Why a store operation failed.
///
/// No message carries a password from the database URL: connection errors are
/// scrubbed where connections are made (see `pools.rs`), and every other
/// message is written here or comes from a query, which never sees the URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached: a refused or timed-out connection, a
    /// pool with no connection to hand out in time, or a connection that the
    /// server closed. Callers report it as gRPC `UNAVAILABLE`; retrying later
    /// may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The row the operation needs does not exist (NOT_FOUND).
    #[error("not found")]
    NotFound,
    /// The write would break a uniqueness rule, or found its row no longer
    /// as it expected: [`Conflict`] says which (ALREADY_EXISTS).
    #[error("conflict: {0}")]
    Conflict(Conflict),
    /// Any other failure of a query, including a stored value that cannot be
    /// decoded (INTERNAL, logged; so are the two below).
    #[error("database query failed")]
    Query(#[source] DieselError),
    /// The embedded migrations could not be applied.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The database URL names no backend the store supports.
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
}

/// Which rule a refused write broke. A write that knows which rule its
/// unique violation means says so (`mark` in the write); any other unique
/// violation stays [`Conflict::Unique`] with the database's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// A unique constraint refused the row (the database's words).
    #[error("{0}")]
    Unique(String),
    /// The sender's message id is already recorded.
    #[error("duplicate message id")]
    DuplicateMessage,
    /// Another open connection holds that peer in that workspace.
    #[error("open connection exists")]
    OpenConnectionExists,
    /// The instance row already exists (there is one per database).
    #[error("an instance already exists")]
    InstanceExists,
    /// A job with this id or idempotency key already exists.
    #[error("a job with this id or idempotency key already exists")]
    JobExists,
    /// The row is no longer in the state the write expected (which row, and
    /// what it no longer is).
    #[error("{0}")]
    StateChanged(String),
    /// Another daemon serves this SQLite database (what to do about it).
    #[error("{0}")]
    ServedElsewhere(String),
}

impl Conflict {
    /// `error` as this conflict when it is a unique violation: how a write
    /// that knows what its unique index means names it.
    pub fn mark(self, error: DieselError) -> StoreError {
        match StoreError::from(error) {
            StoreError::Conflict(Conflict::Unique(_)) => StoreError::Conflict(self),
            other => other,
        }
    }
}

/// The result of a write that a uniqueness rule or a concurrent change can stop.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome<T> {
    /// Written.
    Done(T),
    /// The message id was already recorded for this sender; nothing was written.
    DuplicateMessage,
    /// An open connection with this peer in this workspace exists; nothing was
    /// written.
    OpenConnectionExists,
    /// The connection is no longer in the expected state; nothing was written.
    StateChanged,
}

/// A write's result with the conflicts its caller handles as outcomes.
pub(super) fn outcome_of<T>(written: Result<T, StoreError>) -> Result<WriteOutcome<T>, StoreError> {
    match written {
        Ok(value) => Ok(WriteOutcome::Done(value)),
        Err(StoreError::Conflict(Conflict::DuplicateMessage)) => Ok(WriteOutcome::DuplicateMessage),
        Err(StoreError::Conflict(Conflict::OpenConnectionExists)) => {
            Ok(WriteOutcome::OpenConnectionExists)
        }
        Err(error) => Err(error),
    }
}

impl From<DieselError> for StoreError {
    fn from(error: DieselError) -> Self {
        match error {
            DieselError::NotFound => StoreError::NotFound,
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(Conflict::Unique(info.message().to_owned()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => {
                StoreError::Unavailable("the database closed the connection".to_owned())
            }
            // The PostgreSQL driver reports a cut or reset socket this way (it has no
            // SQLSTATE): the server went away, not the query.
            DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => {
                StoreError::Unavailable("the connection to the database was lost".to_owned())
            }
            other => StoreError::Query(other),
        }
    }
}

impl From<bb8::RunError<PoolError>> for StoreError {
    fn from(error: bb8::RunError<PoolError>) -> Self {
        match error {
            bb8::RunError::TimedOut => {
                StoreError::Unavailable("timed out waiting for a database connection".to_owned())
            }
            bb8::RunError::User(error) => StoreError::Unavailable(error.to_string()),
        }
    }
}

impl StoreError {
    /// A stored value that cannot be turned back into its Rust type, such as a
    /// JSON column that no longer parses.
    pub(super) fn undecodable(
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Query(DieselError::DeserializationError(error.into()))
    }

    /// A value that cannot be written in its stored form.
    pub(super) fn unencodable(
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Query(DieselError::SerializationError(error.into()))
    }
}
