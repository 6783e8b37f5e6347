//! The receiver's side of a signed command (ExecuteCommand): the envelope
//! checks in the order the Federation service documents, the per-command
//! capability, the origin scoping of agents, running the command, and the
//! signed CommandResultPayload reply that an identical retry gets again.

use super::{changes_state, command_capability, command_type, is_streamed};
use crate::agents::convert::{agent_to_proto, output_chunk_to_proto, spawn_spec};
use crate::agents::{AgentError, AgentFilter, AgentRecord, AgentRuntime, Origin};
use crate::federation::Federation;
use crate::federation::FederationError;
use crate::federation::command_log::describe_outcome;
use crate::federation::envelope::{self, Verified};
use crate::federation::peering::{no_connection, seen_message, stored_reply};
use crate::federation::state::ConnectionState;
use crate::identity::PublicKey;
use crate::proto::agent as pb_agent;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogRecord, WriteOutcome};

/// How long a delivery waits for the reply of an identical one that claimed
/// the command first (a spawn takes milliseconds; a replica that died
/// between claim and reply never answers).
const WAIT_FOR_CLAIMED_REPLY: std::time::Duration = std::time::Duration::from_secs(10);
/// How often it looks.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(20);

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
        let mut log_entry = None;
        let result = self
            .receive_checked(agents, sealed, tls_key, &mut log_entry)
            .await;
        if let Err(error) = &result {
            self.log_refusal(error, log_entry).await;
        }
        result
    }

    async fn receive_checked(
        &self,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
        log_entry: &mut Option<CommandLogRecord>,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        let Admitted {
            verified,
            template,
            kind,
            mutating,
        } = self.admit(sealed, tls_key, false, log_entry, now).await?;
        let header = verified.header.clone();
        // Step 10, serialised per message id in this process, so that
        // identical retries arriving together wait here rather than in the
        // database.
        let lock = self.delivery_lock(&format!(
            "command\u{0}{}\u{0}{}",
            header.sender_instance_id, header.message_id
        ));
        let _guard = lock.lock().await;
        // A command that changes something is claimed in the database before
        // it runs, so that it runs once per instance: an identical delivery
        // to another replica finds the claim and waits for its reply. A read
        // runs at once: recording it below fails on a message id seen
        // before, and then the stored result (or ALREADY_EXISTS for other
        // bytes) is the answer all the same.
        if mutating && let Some(stored) = self.claim(&verified, now).await? {
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
        if mutating {
            // The claim is ours: its reply, then the log entry.
            self.store.answer_claimed_message(&seen).await?;
            if let Err(error) = self.store.insert_command_log(&record).await {
                tracing::warn!(%error, "could not record a command that ran");
            }
        } else if self.received_log().record(seen, record).await? != WriteOutcome::Done(()) {
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

    /// Steps 3 to 9 of the service's checks on a command: well formed with a
    /// known command type (one that `streamed` calls take, and only those),
    /// for this instance, from a caller whose TLS key is a key of the
    /// connection the header names (anyone else gets the one stranger's
    /// refusal), on an ACTIVE connection that grants its capability, signed
    /// in time by the key of the TLS connection. Sets `log_entry` once the
    /// sender is identified, so that a refusal after that is logged.
    pub(super) async fn admit(
        &self,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
        streamed: bool,
        log_entry: &mut Option<CommandLogRecord>,
        now: i64,
    ) -> Result<Admitted, FederationError> {
        let identity = self.identity.current();
        // Step 3: well formed, with a known command type.
        let parsed = envelope::parse::<pb::CommandPayload>(sealed)?;
        let command = parsed
            .unverified_payload()
            .command
            .as_ref()
            .ok_or_else(|| {
                FederationError::Invalid("the command payload carries no known command type".into())
            })?;
        let (kind, capability) = (command_type(command), command_capability(command));
        if is_streamed(command) != streamed {
            return Err(FederationError::Invalid(if streamed {
                format!("{kind} is answered by one result: send it with ExecuteCommand")
            } else {
                format!("{kind} is answered by a stream: send it with WatchCommand")
            }));
        }
        let mutating = changes_state(command);
        let header = parsed.header().clone();
        // Step 4.
        parsed.check_recipient(&identity.instance_id)?;
        // Step 5: the TLS key is a key of an open connection with the sender
        // in that workspace. Until it is, every refusal is the same one, so
        // that a stranger learns nothing about that connection.
        let peer = self
            .open_peer(&header.workspace, &header.sender_instance_id)
            .await?;
        let trusted = peer
            .as_ref()
            .map(|peer| peer.trusted_keys(now))
            .unwrap_or_default();
        envelope::identify_caller(&trusted, tls_key, now)?;
        let Some(peer) = peer else {
            return Err(envelope::EnvelopeError::Stranger.into());
        };
        // The sender is identified: from here on, refusals are logged.
        let template = inbound_record(&header, kind, parsed.issued_at_ms(), now);
        *log_entry = Some(template.clone());
        // Step 6: ACTIVE (SUSPENDED is FAILED_PRECONDITION), with the
        // capability granted.
        allows(&peer.connection, capability)?;
        // Steps 7 to 9.
        let key = parsed.check_key(&trusted, tls_key, now)?;
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&key)?;
        Ok(Admitted {
            verified,
            template,
            kind,
            mutating,
        })
    }

    /// Claims the message id of a command that changes state before it
    /// runs: `None` when the claim is this delivery's (run it), else the
    /// reply an earlier identical delivery stored, waited for while that one
    /// still runs (on this replica or another) for up to
    /// `WAIT_FOR_CLAIMED_REPLY`. Other bytes under the same message id are
    /// ALREADY_EXISTS.
    async fn claim(
        &self,
        verified: &Verified<pb::CommandPayload>,
        now: i64,
    ) -> Result<Option<pb::SignedEnvelope>, FederationError> {
        let header = &verified.header;
        let claim = seen_message(header, verified.digest.clone(), None, now);
        let waited = tokio::time::Instant::now();
        loop {
            if self.store.insert_seen_message(&claim).await? == WriteOutcome::Done(()) {
                return Ok(None);
            }
            let seen = self
                .store
                .find_seen_message(&header.sender_instance_id, &header.message_id)
                .await?;
            match seen {
                Some(seen) if seen.reply.is_some() || seen.payload_digest != verified.digest => {
                    return stored_reply(seen, &verified.digest).map(Some);
                }
                // Claimed, not answered yet; or pruned in between (claim again).
                Some(_) | None => {}
            }
            if waited.elapsed() >= WAIT_FOR_CLAIMED_REPLY {
                return Err(FederationError::ReplyPending(
                    "an identical delivery of this command is still running, or was interrupted; \
                     its reply is not stored yet"
                        .into(),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
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

/// A command that passed steps 3 to 9 (see [`Federation::admit`]).
pub(super) struct Admitted {
    /// The command, its signature verified.
    pub verified: Verified<pb::CommandPayload>,
    /// Its command-log entry, without the outcome.
    pub template: CommandLogRecord,
    /// Its command type.
    pub kind: &'static str,
    /// Whether it changes state ([`changes_state`]).
    pub mutating: bool,
}

/// Step 6, for an identified sender's open connection: ACTIVE (SUSPENDED is
/// FAILED_PRECONDITION, anything else PERMISSION_DENIED), and `capability`
/// granted on it (else PERMISSION_DENIED). Checked again during a stream.
pub(super) fn allows(
    connection: &crate::store::ConnectionRecord,
    capability: &str,
) -> Result<(), FederationError> {
    match connection.state {
        ConnectionState::Active => {}
        ConnectionState::Suspended => {
            return Err(FederationError::WrongState(
                "the connection with the sender in that workspace is suspended".into(),
            ));
        }
        _ => return Err(no_connection()),
    }
    if !connection
        .capabilities
        .granted
        .iter()
        .any(|granted| granted == capability)
    {
        return Err(FederationError::NotPermitted(format!(
            "capability {capability} is not granted to the sender on this connection"
        )));
    }
    Ok(())
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
                .map(|agent| Outcome::Agent(for_peer(&agent)))
        }
        Some(Command::AgentStatus(status)) => {
            own_agent(agents, &status.agent_id, sender, workspace)
                .await
                .map(|agent| Outcome::Agent(for_peer(&agent)))
        }
        Some(Command::AgentKill(kill)) => {
            match own_agent(agents, &kill.agent_id, sender, workspace).await {
                Ok(_) => agents
                    .kill(&kill.agent_id, &kill.reason)
                    .await
                    .map(|agent| Outcome::Agent(for_peer(&agent))),
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
                        agents: page.iter().map(for_peer).collect(),
                        next_page_token,
                    })
                })
        }
        Some(Command::AgentOutput(read)) => {
            match own_agent(agents, &read.agent_id, sender, workspace).await {
                Ok(_) => agents
                    .read_output(&read.agent_id, read.offset, read.max_bytes)
                    .await
                    .map(|chunk| Outcome::Output(output_chunk_to_proto(chunk))),
                Err(error) => Err(error),
            }
        }
        // Refused with INVALID_ARGUMENT before the signature check.
        Some(Command::AgentWatch(_)) | None => {
            Err(AgentError::Invalid("not a command with one result".into()))
        }
    };
    result.unwrap_or_else(|error| {
        let status = tonic::Status::from(error);
        Outcome::Error(pb::CommandError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        })
    })
}

/// An agent as a peer sees it: without the runner id, which names a replica
/// of this instance and is nothing a peer can use.
fn for_peer(agent: &AgentRecord) -> pb_agent::Agent {
    pb_agent::Agent {
        runner_id: String::new(),
        ..agent_to_proto(agent)
    }
}

/// The agent `agent_id` if `sender` spawned it through `workspace`. Any other
/// agent (local, another peer's, another workspace's, or none) is the same
/// NOT_FOUND, so a peer cannot learn which agents exist.
pub(super) async fn own_agent(
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
