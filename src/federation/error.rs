//! The federation error: what went wrong, in the kinds that map to gRPC codes
//! (the table is in `crate::error`).

use super::envelope::EnvelopeError;
use crate::store::StoreError;

/// Why a federation operation failed, by cause; `crate::error` says which
/// gRPC code each becomes (written beside each here). Messages are for the
/// caller and never contain keys, signatures or secrets.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The request or message is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// No connection with that id, or with that peer in that workspace
    /// (NOT_FOUND).
    #[error("{0}")]
    NoConnection(String),
    /// The connection (or request) is not in a state the operation applies
    /// to, or changed meanwhile (FAILED_PRECONDITION).
    #[error("{0}")]
    WrongState(String),
    /// The identity a peer presents cannot be taken: its key, fingerprint,
    /// ids or name; nothing was stored (FAILED_PRECONDITION).
    #[error("{0}")]
    UnacceptablePeer(String),
    /// The caller is known but may not do this: no open connection in that
    /// workspace, a capability not granted, a URL the dial policy refuses
    /// (PERMISSION_DENIED).
    #[error("{0}")]
    NotPermitted(String),
    /// The sender's identity is not proven: an unknown key, a bad
    /// signature, a stranger (UNAUTHENTICATED).
    #[error("{0}")]
    Unproven(String),
    /// The message id or request was already used (ALREADY_EXISTS).
    #[error("{0}")]
    Duplicate(String),
    /// A limit is reached: waiting requests, connections
    /// (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    LimitReached(String),
    /// The message is outside the clock window or past its expiry
    /// (DEADLINE_EXCEEDED).
    #[error("{0}")]
    Expired(String),
    /// The peer did not answer in time; what it did is unknown
    /// (DEADLINE_EXCEEDED).
    #[error("{0}")]
    PeerTimedOut(String),
    /// The peer cannot be reached, or the connection broke before its
    /// answer; what it did is unknown (UNAVAILABLE).
    #[error("{0}")]
    PeerUnreachable(String),
    /// An identical delivery of the command is still running here, and its
    /// reply is not stored yet (UNAVAILABLE; send again).
    #[error("{0}")]
    ReplyPending(String),
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
            EnvelopeError::Malformed(_) => Self::Invalid(message),
            EnvelopeError::WrongRecipient => Self::NotPermitted(message),
            EnvelopeError::UnknownKey
            | EnvelopeError::KeyIsNotTlsKey
            | EnvelopeError::BadSignature
            | EnvelopeError::Stranger => Self::Unproven(message),
            EnvelopeError::OutsideClockWindow { .. } | EnvelopeError::Expired => {
                Self::Expired(message)
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
