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

/// The code each store error becomes.
pub fn store_code(error: &StoreError) -> Code {
    match error {
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::NotFound => Code::NotFound,
        StoreError::Conflict(_) => Code::AlreadyExists,
        _ => Code::Internal,
    }
}

/// The code each federation error becomes; `From<FederationError> for
/// Status` below builds the status with it (adding details, and logging
/// internal failures).
pub fn federation_code(error: &FederationError) -> Code {
    match error {
        FederationError::Invalid(_) => Code::InvalidArgument,
        FederationError::NoConnection(_) => Code::NotFound,
        FederationError::WrongState(_) | FederationError::UnacceptablePeer(_) => {
            Code::FailedPrecondition
        }
        FederationError::NotPermitted(_) => Code::PermissionDenied,
        FederationError::Unproven(_) => Code::Unauthenticated,
        FederationError::Duplicate(_) => Code::AlreadyExists,
        FederationError::Expired(_) | FederationError::PeerTimedOut(_) => Code::DeadlineExceeded,
        FederationError::LimitReached(_) => Code::ResourceExhausted,
        FederationError::PeerUnreachable(_)
        | FederationError::ReplyPending(_)
        | FederationError::Interrupted { .. } => Code::Unavailable,
        FederationError::Peer(status) => size_limit_code(status.code(), status.message()),
        FederationError::Command(status) => status.code(),
        FederationError::Store(store) => store_code(store),
        FederationError::Identity(IdentityError::Store(store)) => store_code(store),
        FederationError::Identity(IdentityError::RotationInCaMode) => Code::FailedPrecondition,
        FederationError::Identity(_)
        | FederationError::BadReply(_)
        | FederationError::Internal(_) => Code::Internal,
    }
}

impl From<FederationError> for Status {
    fn from(error: FederationError) -> Self {
        let code = federation_code(&error);
        let message = error.to_string();
        match error {
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
                <Status as tonic_types::StatusExt>::with_error_details(code, message, details)
            }
            FederationError::Store(store) => store.into(),
            FederationError::Identity(identity) => identity.into(),
            FederationError::BadReply(_) | FederationError::Internal(_) => {
                internal("federation", &error)
            }
            _ => Status::new(code, message),
        }
    }
}

/// How tonic's refusals of a message over a size limit begin: a request
/// over `server.max_message_bytes` here, or a request or reply over it on a
/// channel to a peer. tonic gives them OUT_OF_RANGE.
const TONIC_MESSAGE_TOO_LARGE: [&str; 2] = [
    "Error, decoded message length too large",
    "Error, encoded message length too large",
];

/// The code of a status with `code` and `message`, except that tonic's
/// refusal of a message over a size limit is RESOURCE_EXHAUSTED, the code
/// gRPC's status-code guide names for a message larger than the configured
/// limit (client or server side), instead of tonic's OUT_OF_RANGE, which the
/// guide keeps for a position past the end (an output offset, here).
pub fn size_limit_code(code: Code, message: &str) -> Code {
    let too_large = code == Code::OutOfRange
        && TONIC_MESSAGE_TOO_LARGE
            .iter()
            .any(|start| message.starts_with(start));
    if too_large {
        Code::ResourceExhausted
    } else {
        code
    }
}

/// A response with [`size_limit_code`] applied: tonic refuses an oversized
/// request before any handler runs, with a trailers-only response whose
/// `grpc-status` this rewrites (its message, which names the sizes, stays).
/// Mapped over every service's responses by the server.
pub fn size_limit_response<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = response.extensions().get::<Status>() else {
        return response;
    };
    let code = size_limit_code(status.code(), status.message());
    if code != status.code() {
        let rewritten = Status::new(code, status.message());
        response.headers_mut().insert(
            http::HeaderName::from_static("grpc-status"),
            http::HeaderValue::from(code as i32),
        );
        response.extensions_mut().insert(rewritten);
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_over_the_size_limit_is_resource_exhausted() {
        for message in [
            "Error, decoded message length too large: found 65546 bytes, the limit is: 16384 bytes",
            "Error, encoded message length too large: found 65546 bytes, the limit is: 16384 bytes",
        ] {
            assert_eq!(
                size_limit_code(Code::OutOfRange, message),
                Code::ResourceExhausted
            );
            let response =
                size_limit_response(Status::out_of_range(message).into_http::<tonic::body::Body>());
            assert_eq!(response.headers()["grpc-status"], "8");
            let status = response.extensions().get::<Status>().expect("status");
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(status.message(), message);
        }
        // An offset past the end stays OUT_OF_RANGE, and other codes stay.
        let past_end = "offset 10 is past the end of the output (5 bytes)";
        assert_eq!(
            size_limit_code(Code::OutOfRange, past_end),
            Code::OutOfRange
        );
        let response =
            size_limit_response(Status::out_of_range(past_end).into_http::<tonic::body::Body>());
        assert_eq!(response.headers()["grpc-status"], "11");
        assert_eq!(
            size_limit_code(
                Code::InvalidArgument,
                "Error, decoded message length too large"
            ),
            Code::InvalidArgument
        );
    }
}
