//! Signed commands from peers (the receiver side of ExecuteCommand): the
//! envelope checks in the order the Federation service documents, the
//! per-command capability, the origin scoping of agents, and the signed
//! CommandResultPayload reply that an identical retry gets again.

use std::sync::Arc;

use super::FederationError;
use super::audit::{check_message_id, describe_error, describe_outcome, request_digest};
use super::envelope::{self, Verified};
use super::peering::{Federation, PeerEntry, no_connection, seen_message};
use super::state::ConnectionState;
use crate::agents::service::{agent_to_proto, spawn_spec};
use crate::agents::{AgentError, AgentFilter, AgentRecord, AgentRuntime, Origin};
use crate::identity::PublicKey;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogRecord, SignedCommand, WriteOutcome};

/// The command's type name, as the command log shows it.
pub fn command_type(command: &pb::command_payload::Command) -> &'static str {
    match command {
        pb::command_payload::Command::AgentSpawn(_) => "agent.spawn",
        pb::command_payload::Command::AgentStatus(_) => "agent.status",
        pb::command_payload::Command::AgentKill(_) => "agent.kill",
        pb::command_payload::Command::AgentList(_) => "agent.list",
    }
}

/// Whether running the command changes anything (a spawn or a kill), so that a
/// retry must get the stored result without running it again. Reads may run
/// again: their replay is caught when the message id is recorded.
pub fn changes_state(command: &pb::command_payload::Command) -> bool {
    match command {
        pb::command_payload::Command::AgentSpawn(_)
        | pb::command_payload::Command::AgentKill(_) => true,
        pb::command_payload::Command::AgentStatus(_)
        | pb::command_payload::Command::AgentList(_) => false,
    }
}

/// The capability a command needs on the connection. Listing one's own
/// agents is a status read of several, so `agent.list` needs `agent.status`.
pub fn command_capability(command: &pb::command_payload::Command) -> &'static str {
    match command {
        pb::command_payload::Command::AgentSpawn(_) => "agent.spawn",
        pb::command_payload::Command::AgentStatus(_)
        | pb::command_payload::Command::AgentList(_) => "agent.status",
        pb::command_payload::Command::AgentKill(_) => "agent.kill",
    }
}

impl Federation {
    /// ExecuteCommand from a peer whose TLS client key is `tls_key`. A refused
    /// message is an error (a gRPC status, nothing changed); a command that was
    /// accepted but failed is a signed reply carrying a CommandError.
    ///
    /// Every command from a sender that its TLS key identifies (the key of the
    /// connection the header names) goes into the command log, accepted or
    /// refused; anything earlier (a wrong recipient, no such connection, a key
    /// that is not the connection's) is counted and traced but not logged, so
    /// that a stranger cannot fill the log.
    pub async fn receive_command(
        &self,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let mut audit = None;
        let result = self
            .receive_checked(agents, sealed, tls_key, &mut audit)
            .await;
        if let Err(error) = &result {
            let (outcome, detail) = describe_error(error);
            self.command_counters
                .count(CommandDirection::Inbound, &outcome);
            tracing::info!(%outcome, %detail, "refused a command from a peer");
            if let Some(template) = audit {
                let record = CommandLogRecord {
                    outcome,
                    detail,
                    ..template
                };
                if let Err(store_error) = self.store.insert_command_log(&record).await {
                    tracing::warn!(error = %store_error, "could not record a refused command");
                }
            }
        }
        result
    }

    async fn receive_checked(
        &self,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
        audit: &mut Option<CommandLogRecord>,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        // Step 3: well formed, with a known command type.
        let parsed = envelope::parse::<pb::CommandPayload>(sealed)?;
        let command = parsed
            .unverified_payload()
            .command
            .as_ref()
            .ok_or_else(|| {
                FederationError::InvalidArgument(
                    "the command payload carries no known command type".into(),
                )
            })?;
        let (kind, capability) = (command_type(command), command_capability(command));
        let mutating = changes_state(command);
        let header = parsed.header().clone();
        // Step 4.
        parsed.check_recipient(&identity.instance_id)?;
        // Step 5: ACTIVE in that workspace; SUSPENDED is FAILED_PRECONDITION.
        let peer = self
            .open_peer(&header.workspace, &header.sender_instance_id)
            .await?
            .ok_or_else(no_connection)?;
        let connection = &peer.connection;
        let template = inbound_record(&header, kind, parsed.issued_at_ms(), now);
        if connection.remote_public_key == tls_key.spki_der() {
            *audit = Some(template.clone());
        }
        match connection.state {
            ConnectionState::Active => {}
            ConnectionState::Suspended => {
                return Err(FederationError::FailedPrecondition(
                    "the connection with the sender in that workspace is suspended".into(),
                ));
            }
            _ => return Err(no_connection()),
        }
        // Step 6.
        if !connection
            .capabilities
            .granted
            .iter()
            .any(|granted| granted == capability)
        {
            return Err(FederationError::PermissionDenied(format!(
                "capability {capability} is not granted to the sender on this connection"
            )));
        }
        // Steps 7 to 9.
        let trusted = peer.trusted_keys(now);
        let key = parsed.check_key(&trusted, tls_key, now)?;
        // The TLS key is one the connection trusts: the sender is identified.
        *audit = Some(template.clone());
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&key)?;
        // Step 10, serialised per message id so that concurrent identical
        // retries cannot both run the command (a spawn must happen once).
        let lock = self.delivery_lock(&format!(
            "command\u{0}{}\u{0}{}",
            header.sender_instance_id, header.message_id
        ));
        let _guard = lock.lock().await;
        // A command that changes something is looked up first, so a retry
        // never runs it twice. A read runs at once: recording it below fails
        // on a message id seen before, and then the stored result (or
        // ALREADY_EXISTS for other bytes) is the answer all the same.
        if mutating && let Some(stored) = self.replayed(&verified).await? {
            self.record_replay(template, &stored).await;
            return Ok(stored);
        }
        let outcome = run_command(agents, &verified).await;
        let routing = self.routing(&identity, &header.sender_instance_id, &header.workspace);
        let reply = pb::CommandResultPayload {
            header: Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            )),
            command_message_id: header.message_id.clone(),
            outcome: Some(outcome),
        };
        let sealed_reply = envelope::seal(&reply, identity.as_ref())?;
        let seen = seen_message(
            &verified.header,
            verified.digest.clone(),
            Some(&sealed_reply),
            now,
        );
        let (outcome_name, detail) = describe_outcome(reply.outcome.as_ref());
        let record = CommandLogRecord {
            outcome: outcome_name.clone(),
            detail,
            ..template.clone()
        };
        if self.journal().record(seen, record).await? != WriteOutcome::Done(()) {
            let stored = self
                .replay_after_race(&verified.header, &verified.digest)
                .await?;
            self.record_replay(template, &stored).await;
            return Ok(stored);
        }
        self.command_counters
            .count(CommandDirection::Inbound, &outcome_name);
        tracing::info!(
            peer.id = %header.sender_instance_id,
            workspace = %header.workspace,
            command = kind,
            outcome = %outcome_name,
            "ran a command from a peer"
        );
        Ok(sealed_reply)
    }

    /// Logs an identical retry that got the stored result again.
    async fn record_replay(&self, template: CommandLogRecord, stored: &pb::SignedEnvelope) {
        use prost::Message as _;
        let (outcome, detail) = match pb::CommandResultPayload::decode(stored.payload.as_slice()) {
            Ok(result) => describe_outcome(result.outcome.as_ref()),
            Err(_) => (
                "INTERNAL".to_owned(),
                "the stored result does not decode".to_owned(),
            ),
        };
        self.command_counters
            .count(CommandDirection::Inbound, &outcome);
        let record = CommandLogRecord {
            outcome,
            detail: format!("identical retry, stored result returned: {detail}"),
            ..template
        };
        if let Err(error) = self.store.insert_command_log(&record).await {
            tracing::warn!(%error, "could not record a retried command");
        }
    }
}

/// A log entry for a received command, before its outcome is known.
fn inbound_record(
    header: &pb::EnvelopeHeader,
    kind: &str,
    issued_at_ms: i64,
    now: i64,
) -> CommandLogRecord {
    CommandLogRecord {
        id: uuid::Uuid::new_v4().to_string(),
        direction: CommandDirection::Inbound,
        message_id: header.message_id.clone(),
        sender_instance_id: header.sender_instance_id.clone(),
        recipient_instance_id: header.recipient_instance_id.clone(),
        workspace: header.workspace.clone(),
        command_type: kind.to_owned(),
        outcome: String::new(),
        detail: String::new(),
        issued_at_ms,
        recorded_at_ms: now,
        request_digest: None,
        envelope: None,
    }
}

/// Runs a verified command for its sender; failures become a CommandError.
async fn run_command(
    agents: &AgentRuntime,
    verified: &Verified<pb::CommandPayload>,
) -> pb::command_result_payload::Outcome {
    use pb::command_payload::Command;
    use pb::command_result_payload::Outcome;
    let sender = &verified.header.sender_instance_id;
    let workspace = &verified.header.workspace;
    let result = match &verified.payload.command {
        Some(Command::AgentSpawn(spawn)) => {
            let request = spawn.spawn.clone().unwrap_or_default();
            let origin = Origin::Peer {
                instance_id: sender.clone(),
                workspace: workspace.clone(),
            };
            agents
                .spawn(spawn_spec(request, origin))
                .await
                .map(|agent| Outcome::Agent(agent_to_proto(&agent)))
        }
        Some(Command::AgentStatus(status)) => {
            own_agent(agents, &status.agent_id, sender, workspace)
                .await
                .map(|agent| Outcome::Agent(agent_to_proto(&agent)))
        }
        Some(Command::AgentKill(kill)) => {
            match own_agent(agents, &kill.agent_id, sender, workspace).await {
                Ok(_) => agents
                    .kill(&kill.agent_id, &kill.reason)
                    .await
                    .map(|agent| Outcome::Agent(agent_to_proto(&agent))),
                Err(error) => Err(error),
            }
        }
        Some(Command::AgentList(list)) => {
            let filter = AgentFilter {
                origin_kind: Some(crate::agents::model::OriginKind::Peer),
                origin_instance_id: Some(sender.clone()),
                origin_workspace: Some(workspace.clone()),
                ..AgentFilter::default()
            };
            agents
                .list(&filter, list.page_size, &list.page_token)
                .await
                .map(|(page, next_page_token)| {
                    Outcome::AgentList(pb::AgentList {
                        agents: page.iter().map(agent_to_proto).collect(),
                        next_page_token,
                    })
                })
        }
        // Refused with INVALID_ARGUMENT before the signature check.
        None => Err(AgentError::Invalid("no command type".into())),
    };
    result.unwrap_or_else(|error| {
        let status = tonic::Status::from(error);
        Outcome::Error(pb::CommandError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        })
    })
}

/// The agent `agent_id` if `sender` spawned it through `workspace`. Any other
/// agent (local, another peer's, another workspace's, or none) is the same
/// NOT_FOUND, so a peer cannot learn which agents exist.
async fn own_agent(
    agents: &AgentRuntime,
    agent_id: &str,
    sender: &str,
    workspace: &str,
) -> Result<AgentRecord, AgentError> {
    let agent = agents.get(agent_id).await?;
    match &agent.origin {
        Origin::Peer {
            instance_id,
            workspace: origin_workspace,
        } if instance_id == sender && origin_workspace == workspace => Ok(agent),
        _ => Err(AgentError::NotFound(agent_id.to_owned())),
    }
}

/// Most ACTIVE connections looked at when choosing the one to a peer.
const MAX_CONNECTIONS_SCANNED: i64 = 1000;

impl Federation {
    /// The ACTIVE connection to `peer_instance_id` with its keys, in
    /// `workspace` when given; without a workspace there must be exactly one.
    /// No open connection with the peer (there) is NOT_FOUND; only PENDING or
    /// SUSPENDED ones are FAILED_PRECONDITION. Served from the peer cache while
    /// it is fresh (see [`Federation::with_peer_cache`]).
    async fn active_connection_to(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
    ) -> Result<Arc<PeerEntry>, FederationError> {
        let not_active = |connection: &crate::store::ConnectionRecord| {
            FederationError::FailedPrecondition(format!(
                "the connection with that peer in workspace {:?} is {}, not ACTIVE",
                connection.workspace,
                connection.state.as_str().to_uppercase()
            ))
        };
        let not_found = || {
            FederationError::NotFound(
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
                return Err(FederationError::InvalidArgument(
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
            return Err(FederationError::InvalidArgument(
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
    /// (`journal::SentLog`; the log listing waits for them).
    pub async fn send_command(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
        command: pb::command_payload::Command,
        retry_id: Option<&str>,
    ) -> Result<(String, pb::command_result_payload::Outcome), FederationError> {
        if peer_instance_id.is_empty() {
            return Err(FederationError::InvalidArgument(
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
                            FederationError::AlreadyExists(
                                "this message_id was already used".into(),
                            )
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
                return Err(FederationError::AlreadyExists(
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
            .map_err(super::peering::peer_error)?;
        let response = client
            .execute_command(self.clients.request(pb::ExecuteCommandRequest {
                envelope: Some(sealed),
            }))
            .await
            .map_err(super::peering::peer_status)?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_type_needs_its_own_capability() {
        use pb::command_payload::Command;
        let cases = [
            (
                Command::AgentSpawn(pb::AgentSpawnCommand::default()),
                "agent.spawn",
            ),
            (
                Command::AgentStatus(pb::AgentStatusCommand::default()),
                "agent.status",
            ),
            (
                Command::AgentKill(pb::AgentKillCommand::default()),
                "agent.kill",
            ),
            (
                Command::AgentList(pb::AgentListCommand::default()),
                "agent.status",
            ),
        ];
        for (command, capability) in cases {
            assert_eq!(command_capability(&command), capability);
        }
        assert_eq!(
            command_type(&Command::AgentList(pb::AgentListCommand::default())),
            "agent.list"
        );
    }
}
