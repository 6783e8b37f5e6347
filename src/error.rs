//! The one table from error kinds to gRPC status codes.
//!
//! Each area has its own error type; this file says, once, which code each kind
//! becomes and what the caller reads. Internal failures become a generic
//! "internal error" to the caller and are logged here, once, with their cause.

use tonic::{Code, Status};

use crate::agents::AgentError;
use crate::auth::ApiKeyError;
use crate::coordinator::CoordinatorError;
use crate::federation::FederationError;
use crate::identity::IdentityError;
use crate::store::StoreError;

/// Logs an internal failure with its cause and returns the generic status.
pub fn internal(context: &str, error: &dyn std::error::Error) -> Status {
    tracing::error!(error = %error, context, "internal error");
    Status::internal("internal error")
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => {
                tracing::warn!(%error, "database unavailable");
                Status::unavailable("the database is unavailable; try again shortly")
            }
            StoreError::NotFound => Status::not_found("not found"),
            StoreError::Conflict(_) => Status::already_exists("already exists"),
            other => internal("store", &other),
        }
    }
}

impl From<IdentityError> for Status {
    fn from(error: IdentityError) -> Self {
        match error {
            IdentityError::Store(store) => store.into(),
            IdentityError::RotationInCaMode => Status::failed_precondition(error.to_string()),
            other => internal("identity", &other),
        }
    }
}

impl From<ApiKeyError> for Status {
    fn from(error: ApiKeyError) -> Self {
        match error {
            ApiKeyError::Invalid(message) => Status::invalid_argument(message),
            ApiKeyError::Store(store) => store.into(),
            other => internal("api keys", &other),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        coordinator_status(error)
    }
}

/// The status of a coordinator failure. Signature failures say what is wrong
/// with the signature, never anything about the secret.
fn coordinator_status(error: CoordinatorError) -> Status {
    match error {
        CoordinatorError::Invalid(message) => Status::invalid_argument(message),
        CoordinatorError::NotFound(_) => Status::not_found(error.to_string()),
        CoordinatorError::Transition(_) => Status::failed_precondition(error.to_string()),
        CoordinatorError::Contention => Status::aborted(error.to_string()),
        CoordinatorError::Signature(_) => Status::unauthenticated(error.to_string()),
        CoordinatorError::ShuttingDown => Status::unavailable(error.to_string()),
        CoordinatorError::Agent(agent) => agent.into(),
        CoordinatorError::Federation(federation) => federation.into(),
        CoordinatorError::Store(store) => store.into(),
    }
}

impl From<AgentError> for Status {
    fn from(error: AgentError) -> Self {
        match error {
            AgentError::Invalid(_) => Status::invalid_argument(error.to_string()),
            AgentError::NotFound(_) | AgentError::NotKept { .. } => {
                Status::not_found(error.to_string())
            }
            AgentError::PastEnd { .. } => Status::out_of_range(error.to_string()),
            AgentError::Unreadable { .. } => Status::internal(error.to_string()),
            AgentError::AtCapacity { .. } => Status::resource_exhausted(error.to_string()),
            AgentError::SupervisedElsewhere { .. } => {
                Status::failed_precondition(error.to_string())
            }
            AgentError::Interrupted
            | AgentError::ShuttingDown
            | AgentError::OwnerUnavailable { .. }
            | AgentError::OwnerLost { .. }
            | AgentError::NotSupervisedHere { .. } => Status::unavailable(error.to_string()),
            AgentError::Forwarded(status) => status,
            AgentError::Store(store) => store.into(),
        }
    }
}

impl From<FederationError> for Status {
    fn from(error: FederationError) -> Self {
        let message = error.to_string();
        match error {
            FederationError::InvalidArgument(_) => Status::invalid_argument(message),
            FederationError::NotFound(_) => Status::not_found(message),
            FederationError::FailedPrecondition(_) => Status::failed_precondition(message),
            FederationError::PermissionDenied(_) => Status::permission_denied(message),
            FederationError::Unauthenticated(_) => Status::unauthenticated(message),
            FederationError::AlreadyExists(_) => Status::already_exists(message),
            FederationError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            FederationError::ResourceExhausted(_) => Status::resource_exhausted(message),
            FederationError::Unavailable(_) => Status::unavailable(message),
            FederationError::Peer(status) => Status::new(status.code(), message),
            FederationError::Command(status) => status,
            FederationError::Interrupted { resume_from, .. } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.set_error_info(
                    crate::federation::REASON_WATCH_INTERRUPTED,
                    crate::ratelimit::response::ERROR_DOMAIN,
                    std::collections::HashMap::from([(
                        "resume_from_sequence".to_owned(),
                        resume_from.to_string(),
                    )]),
                );
                <Status as tonic_types::StatusExt>::with_error_details(
                    Code::Unavailable,
                    message,
                    details,
                )
            }
            FederationError::Store(store) => store.into(),
            FederationError::BadReply(_) | FederationError::Internal(_) => {
                internal("federation", &error)
            }
        }
    }
}

/// The canonical name of a gRPC code (`PERMISSION_DENIED`), as metrics and
/// the command log show it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
