//! Peering rules both sides share: the limits on what a peer may send, the
//! checks of an operator's input, a connection's history event and its
//! situation, the replay record of a message, and the errors of a call to a
//! peer. The handshake and notices themselves are in `operator.rs` (what an
//! operator does) and `inbound.rs` (what a peer sends).

use crate::federation::FederationError;
use crate::federation::peer_client::{FirstContactError, PeerError};
use crate::federation::state::{Actor, ConnectionState, Situation};
use crate::identity::Identity;
use crate::proto::federation as pb;
use crate::store::{ConnectionEventRecord, ConnectionRecord, SeenMessage, StoredReply};

/// Longest grace a peer may claim for its rotated-out key (30 days).
pub(super) const MAX_PEER_KEY_GRACE_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Most capabilities in one list (each name is an identifier).
pub(super) const MAX_CAPABILITIES: usize = 32;
/// Longest reason text kept.
pub(super) const MAX_REASON_CHARS: usize = 1024;
/// Longest instance name accepted from a peer.
pub(super) const MAX_NAME_CHARS: usize = 128;

pub(super) fn stored_reply(
    seen: SeenMessage,
    digest: &[u8],
) -> Result<pb::SignedEnvelope, FederationError> {
    match seen.reply {
        Some(reply) if seen.payload_digest == digest => Ok(pb::SignedEnvelope {
            payload: reply.payload,
            signature: reply.signature,
            key_id: reply.key_id,
        }),
        _ => Err(FederationError::Duplicate(
            "this message id was already used for another message".into(),
        )),
    }
}

pub(super) fn seen_message(
    header: &pb::EnvelopeHeader,
    digest: Vec<u8>,
    reply: Option<&pb::SignedEnvelope>,
    now: i64,
) -> SeenMessage {
    SeenMessage {
        sender_instance_id: header.sender_instance_id.clone(),
        message_id: header.message_id.clone(),
        payload_digest: digest,
        reply: reply.map(|reply| StoredReply {
            payload: reply.payload.clone(),
            signature: reply.signature.clone(),
            key_id: reply.key_id.clone(),
        }),
        seen_at_ms: now,
    }
}

pub(super) fn situation(record: &ConnectionRecord) -> Situation {
    Situation {
        state: record.state,
        direction: record.direction,
        suspended_by: record.suspended_by,
    }
}

pub(super) fn event(
    connection_id: &str,
    from_state: Option<ConnectionState>,
    to_state: ConnectionState,
    actor: Actor,
    reason: &str,
    at_ms: i64,
) -> ConnectionEventRecord {
    ConnectionEventRecord {
        connection_id: connection_id.to_owned(),
        from_state,
        to_state,
        actor,
        reason: reason.to_owned(),
        at_ms,
    }
}

pub(super) fn no_connection() -> FederationError {
    FederationError::NotPermitted("no open connection with the sender in that workspace".into())
}

pub(super) fn already_open(workspace: &str) -> FederationError {
    FederationError::Duplicate(format!(
        "a pending, active or suspended connection with this peer in workspace {workspace:?} already exists"
    ))
}

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// A workspace name: an identifier (`crate::text::identifier`), as a
/// header's workspace must be.
pub fn check_workspace(workspace: &str) -> Result<(), FederationError> {
    crate::text::identifier::check("workspace", workspace).map_err(FederationError::Invalid)
}

pub(super) fn check_capability_list(
    field: &str,
    capabilities: &[String],
) -> Result<(), FederationError> {
    if capabilities.len() > MAX_CAPABILITIES
        || capabilities
            .iter()
            .any(|capability| !crate::text::identifier::is_identifier(capability))
    {
        return Err(FederationError::Invalid(format!(
            "{field}: at most {MAX_CAPABILITIES} capabilities, each {}",
            crate::text::identifier::RULE
        )));
    }
    Ok(())
}

pub(super) fn check_offered(
    identity: &Identity,
    granted: &[String],
) -> Result<(), FederationError> {
    if let Some(unknown) = granted
        .iter()
        .find(|grant| !identity.profile.capabilities.contains(grant))
    {
        return Err(FederationError::Invalid(format!(
            "{unknown:?} is not a capability this instance offers ({})",
            identity.profile.capabilities.join(", ")
        )));
    }
    Ok(())
}

pub(super) fn peer_error(error: PeerError) -> FederationError {
    match error {
        PeerError::InvalidUrl { .. } => FederationError::Invalid(error.to_string()),
        PeerError::Denied(message) => FederationError::NotPermitted(message),
        PeerError::Unreachable(message) => FederationError::PeerUnreachable(message),
    }
}

/// A failed call to a peer: transport failures and timeouts become UNAVAILABLE
/// and DEADLINE_EXCEEDED; a refusal by the peer keeps the peer's code.
pub(super) fn peer_status(status: tonic::Status) -> FederationError {
    match status.code() {
        tonic::Code::DeadlineExceeded => FederationError::PeerTimedOut(format!(
            "the peer did not answer in time: {}",
            status.message()
        )),
        // tonic reports a broken connection (including a TLS refusal on the
        // first call, STACK-NOTES trap 6) as UNKNOWN or CANCELLED.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            FederationError::PeerUnreachable(format!(
                "the peer cannot be reached: {}",
                status.message()
            ))
        }
        _ => FederationError::Peer(status),
    }
}

pub(super) fn first_contact_error(error: FirstContactError) -> FederationError {
    match error {
        FirstContactError::Peer(error) => peer_error(error),
        FirstContactError::Status(status) => peer_status(status),
        FirstContactError::NoInstance => {
            FederationError::UnacceptablePeer("the peer returned no identity".into())
        }
    }
}
