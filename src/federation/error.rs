//! The federation error: what went wrong, in the kinds that map to gRPC codes
//! (the table is in `crate::error`).

use super::envelope::EnvelopeError;
use crate::store::StoreError;

/// Why a federation operation failed. Messages are for the caller and never
/// contain keys, signatures or secrets.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// Malformed input (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such connection (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The operation does not apply in the current state (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not allowed (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// Identity not proven (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// A duplicate (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// A limit is reached (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Too late (DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The peer cannot be reached (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// The peer refused; its status is passed on with its code.
    #[error("the peer refused: {}", .0.message())]
    Peer(tonic::Status),
    /// A command from a peer was accepted but failed here (its code), when
    /// it is answered by a stream and so has no signed result to carry it.
    #[error("{}", .0.message())]
    Command(tonic::Status),
    /// A watch of a remote agent could not go on (UNAVAILABLE): the status
    /// names the sequence to resume from.
    #[error("{message}; resume from sequence {resume_from}")]
    Interrupted {
        /// Why.
        message: String,
        /// The first sequence not delivered.
        resume_from: u64,
    },
    /// The peer's reply failed verification (INTERNAL, logged).
    #[error("the peer's reply failed verification: {0}")]
    BadReply(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The instance identity refused or failed (a rotation in CA mode, its
    /// store).
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Anything else (INTERNAL, logged).
    #[error("{0}")]
    Internal(String),
}

impl From<EnvelopeError> for FederationError {
    fn from(error: EnvelopeError) -> Self {
        let message = error.to_string();
        match error {
            EnvelopeError::Malformed(_) => Self::InvalidArgument(message),
            EnvelopeError::WrongRecipient => Self::PermissionDenied(message),
            EnvelopeError::UnknownKey
            | EnvelopeError::KeyIsNotTlsKey
            | EnvelopeError::BadSignature
            | EnvelopeError::Stranger => Self::Unauthenticated(message),
            EnvelopeError::OutsideClockWindow { .. } | EnvelopeError::Expired => {
                Self::DeadlineExceeded(message)
            }
        }
    }
}

impl From<crate::identity::KeyError> for FederationError {
    fn from(error: crate::identity::KeyError) -> Self {
        Self::Internal(format!("signing failed: {error}"))
    }
}

impl FederationError {
    /// The gRPC code this error becomes (`crate::error::federation_code`),
    /// without building the status (which logs internal failures).
    pub fn code(&self) -> tonic::Code {
        crate::error::federation_code(self)
    }
}
