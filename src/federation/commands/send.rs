//! The sender's side of a signed command (the operator's `*RemoteAgent`
//! calls): choosing the ACTIVE connection, signing, sending, verifying the
//! signed reply, and retrying by message id with the same bytes.

use std::sync::Arc;

use super::{changes_state, command_type};
use crate::federation::Federation;
use crate::federation::FederationError;
use crate::federation::command_log::{
    check_message_id, describe_error, describe_outcome, request_digest,
};
use crate::federation::envelope::{self};
use crate::federation::peers::PeerEntry;
use crate::federation::state::ConnectionState;
use crate::identity::PublicKey;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogRecord, SignedCommand, WriteOutcome};

/// Most ACTIVE connections looked at when choosing the one to a peer.
const MAX_CONNECTIONS_SCANNED: i64 = 1000;

impl Federation {
    /// The ACTIVE connection to `peer_instance_id` with its keys, in
    /// `workspace` when given; without a workspace there must be exactly one.
    /// No open connection with the peer (there) is NOT_FOUND; only PENDING or
    /// SUSPENDED ones are FAILED_PRECONDITION. Served from the peer cache while
    /// it is fresh (see [`Federation::with_peer_cache`]).
    pub(super) async fn active_connection_to(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
    ) -> Result<Arc<PeerEntry>, FederationError> {
        let not_active = |connection: &crate::store::ConnectionRecord| {
            FederationError::WrongState(format!(
                "the connection with that peer in workspace {:?} is {}, not ACTIVE",
                connection.workspace,
                connection.state.as_str().to_uppercase()
            ))
        };
        let not_found = || {
            FederationError::NoConnection(
                "no connection with that peer (in that workspace); see ListConnections".into(),
            )
        };
        if let Some(workspace) = workspace {
            return match self.open_peer(workspace, peer_instance_id).await? {
                Some(peer) if peer.connection.state == ConnectionState::Active => Ok(peer),
                Some(peer) => Err(not_active(&peer.connection)),
                None => Err(not_found()),
            };
        }
        let ticket = match self.sole_peer(peer_instance_id) {
            Ok(peer) => return Ok(peer),
            Err(ticket) => ticket,
        };
        let with_peer = |state: ConnectionState| {
            let filter = crate::store::ConnectionFilter {
                workspace: None,
                state: Some(state),
                after: None,
                limit: MAX_CONNECTIONS_SCANNED,
            };
            async move {
                Ok::<_, FederationError>(
                    self.store
                        .list_connections(&filter)
                        .await?
                        .into_iter()
                        .filter(|connection| connection.remote_instance_id == peer_instance_id)
                        .collect::<Vec<_>>(),
                )
            }
        };
        let active = with_peer(ConnectionState::Active).await?;
        match active.as_slice() {
            [only] => {
                let peer = Arc::new(self.peer_entry(only.clone()).await?);
                self.remember_sole_peer(ticket, peer_instance_id, &peer);
                return Ok(peer);
            }
            [] => {}
            _ => {
                return Err(FederationError::Invalid(
                    "the peer is connected in several workspaces; name one with workspace".into(),
                ));
            }
        }
        for state in [ConnectionState::Suspended, ConnectionState::Pending] {
            if let Some(connection) = with_peer(state).await?.first() {
                return Err(not_active(connection));
            }
        }
        Err(not_found())
    }

    /// The workspace of the ACTIVE connection to `peer_instance_id` that
    /// [`Federation::send_command`] would use with `workspace`: the one named,
    /// or the only one. FAILED_PRECONDITION when there is none, INVALID_ARGUMENT
    /// when several match and none is named.
    pub async fn command_workspace(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
    ) -> Result<String, FederationError> {
        if peer_instance_id.is_empty() {
            return Err(FederationError::Invalid(
                "peer_instance_id is required".into(),
            ));
        }
        let peer = self
            .active_connection_to(
                peer_instance_id,
                workspace.filter(|named| !named.is_empty()),
            )
            .await?;
        Ok(peer.connection.workspace.clone())
    }

    /// Signs `command` for the peer, sends it within the call deadline, and
    /// returns the outcome of the peer's verified signed result. A CommandError
    /// becomes [`FederationError::Peer`] with the peer's code. Returns the
    /// command's message id with the outcome.
    ///
    /// `retry_id`: the operator's message id. The first use signs a new
    /// command under it and keeps the signed bytes in the command log; a later
    /// use with the same request re-sends exactly those bytes, so the peer
    /// answers with its stored result and never runs the command twice; a
    /// later use with another request is ALREADY_EXISTS. A retry reaches the
    /// peer's stored result only while the signed command is valid (its
    /// lifetime and the peer's clock window).
    ///
    /// Every command that is sent is in the command log with its outcome:
    /// spawns and kills are written before they leave (a crash mid-call
    /// leaves an entry without outcome, and the signed bytes to retry);
    /// status and list reads once they end, written behind the answer
    /// (`log_writers::SentLog`; the log listing waits for them).
    pub async fn send_command(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
        command: pb::command_payload::Command,
        retry_id: Option<&str>,
    ) -> Result<(String, pb::command_result_payload::Outcome), FederationError> {
        if peer_instance_id.is_empty() {
            return Err(FederationError::Invalid(
                "peer_instance_id is required".into(),
            ));
        }
        if let Some(retry_id) = retry_id {
            check_message_id(retry_id)?;
        }
        let peer = self
            .active_connection_to(
                peer_instance_id,
                workspace.filter(|named| !named.is_empty()),
            )
            .await?;
        let connection = &peer.connection;
        let kind = command_type(&command);
        let digest = request_digest(
            &connection.remote_instance_id,
            &connection.workspace,
            &command,
        );
        let write_first = changes_state(&command) || retry_id.is_some();
        let (record, sealed) = match self.previous_send(retry_id, &digest).await? {
            Some(previous) => previous,
            None => {
                let identity = self.identity.current();
                let routing = self.routing(
                    &identity,
                    &connection.remote_instance_id,
                    &connection.workspace,
                );
                let mut header = envelope::new_header(&routing, identity.public_key().key_id());
                if let Some(retry_id) = retry_id {
                    retry_id.clone_into(&mut header.message_id);
                }
                let record = CommandLogRecord {
                    id: uuid::Uuid::new_v4().to_string(),
                    direction: CommandDirection::Outbound,
                    message_id: header.message_id.clone(),
                    sender_instance_id: identity.instance_id.clone(),
                    recipient_instance_id: connection.remote_instance_id.clone(),
                    workspace: connection.workspace.clone(),
                    command_type: kind.to_owned(),
                    outcome: String::new(),
                    detail: String::new(),
                    issued_at_ms: routing.now_ms,
                    recorded_at_ms: routing.now_ms,
                    request_digest: Some(digest.clone()),
                    envelope: None,
                };
                let payload = pb::CommandPayload {
                    header: Some(header),
                    command: Some(command),
                };
                let sealed = envelope::seal(&payload, identity.as_ref())?;
                let record = CommandLogRecord {
                    envelope: write_first.then(|| SignedCommand {
                        payload: sealed.payload.clone(),
                        signature: sealed.signature.clone(),
                        key_id: sealed.key_id.clone(),
                    }),
                    ..record
                };
                if write_first
                    && self.store.insert_command_log(&record).await? != WriteOutcome::Done(())
                {
                    // A concurrent call with the same message id wrote first.
                    self.previous_send(retry_id, &digest)
                        .await?
                        .ok_or_else(|| {
                            FederationError::Duplicate("this message_id was already used".into())
                        })?
                } else {
                    (record, sealed)
                }
            }
        };
        let result = self
            .deliver_command(&peer, &record.message_id, sealed)
            .await;
        let (outcome, detail) = match &result {
            Ok(outcome) => describe_outcome(Some(outcome)),
            Err(error) => describe_error(error),
        };
        self.command_counters
            .count(CommandDirection::Outbound, &outcome);
        let written = if write_first {
            self.store
                .finish_command_log(&record.id, &outcome, &detail)
                .await
        } else {
            // A read's entry is written behind its answer, with the reads
            // that ended at about the same time.
            self.sent_log()
                .record(CommandLogRecord {
                    outcome,
                    detail,
                    recorded_at_ms: self.now(),
                    ..record.clone()
                })
                .await
        };
        if let Err(error) = written {
            tracing::warn!(%error, "could not record the outcome of a sent command");
        }
        result.map(|outcome| (record.message_id, outcome))
    }

    /// The logged command and its signed bytes for a retry of `retry_id`, if
    /// it was sent before; ALREADY_EXISTS if it was sent for another request.
    async fn previous_send(
        &self,
        retry_id: Option<&str>,
        digest: &[u8],
    ) -> Result<Option<(CommandLogRecord, pb::SignedEnvelope)>, FederationError> {
        let Some(retry_id) = retry_id else {
            return Ok(None);
        };
        let Some(previous) = self.store.find_outbound_command(retry_id).await? else {
            return Ok(None);
        };
        let sealed = match (&previous.request_digest, &previous.envelope) {
            (Some(previous_digest), Some(sent)) if previous_digest.as_slice() == digest => {
                pb::SignedEnvelope {
                    payload: sent.payload.clone(),
                    signature: sent.signature.clone(),
                    key_id: sent.key_id.clone(),
                }
            }
            _ => {
                return Err(FederationError::Duplicate(
                    "this message_id was already used for a different request".into(),
                ));
            }
        };
        Ok(Some((previous, sealed)))
    }

    /// Sends a signed command over `connection` and verifies the signed
    /// result.
    async fn deliver_command(
        &self,
        peer: &PeerEntry,
        message_id: &str,
        sealed: pb::SignedEnvelope,
    ) -> Result<pb::command_result_payload::Outcome, FederationError> {
        let identity = self.identity.current();
        let connection = &peer.connection;
        let trusted = peer.trusted_keys(self.now());
        let pins: Vec<PublicKey> = trusted.iter().map(|trusted| trusted.key.clone()).collect();
        let mut client = self
            .clients
            .pinned(&connection.remote_url, &pins)
            .await
            .map_err(crate::federation::peering::peer_error)?;
        let response = client
            .execute_command(self.clients.request(pb::ExecuteCommandRequest {
                envelope: Some(sealed),
            }))
            .await
            .map_err(crate::federation::peering::peer_status)?
            .into_inner();
        let verified = envelope::open_reply::<pb::CommandResultPayload>(
            response.envelope.as_ref(),
            &identity.instance_id,
            &connection.remote_instance_id,
            &connection.workspace,
            &trusted,
            self.now(),
        )
        .map_err(|error| FederationError::BadReply(error.to_string()))?;
        if verified.payload.command_message_id != message_id {
            return Err(FederationError::BadReply(
                "the result answers another command".into(),
            ));
        }
        match verified.payload.outcome {
            Some(pb::command_result_payload::Outcome::Error(error)) => Err(FederationError::Peer(
                tonic::Status::new(tonic::Code::from(error.code), error.message),
            )),
            Some(outcome) => Ok(outcome),
            None => Err(FederationError::BadReply(
                "the result carries no outcome".into(),
            )),
        }
    }
}
