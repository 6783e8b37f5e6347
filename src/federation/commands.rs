//! Signed commands from peers (the receiver side of ExecuteCommand): the
//! envelope checks in the order the Federation service documents, the
//! per-command capability, the origin scoping of agents, and the signed
//! CommandResultPayload reply that an identical retry gets again.

use super::FederationError;
use super::envelope::{self, Verified};
use super::peering::{Federation, no_connection, seen_message};
use super::state::ConnectionState;
use crate::agents::service::{agent_to_proto, spawn_spec};
use crate::agents::{AgentError, AgentFilter, AgentRecord, AgentRuntime, Origin};
use crate::identity::PublicKey;
use crate::proto::federation as pb;
use crate::store::WriteOutcome;

/// The capability a command needs on the connection, and its audit name.
pub fn command_capability(command: &pb::command_payload::Command) -> &'static str {
    match command {
        pb::command_payload::Command::AgentSpawn(_) => "agent.spawn",
        pb::command_payload::Command::AgentStatus(_) => "agent.status",
        pb::command_payload::Command::AgentKill(_) => "agent.kill",
        pb::command_payload::Command::AgentList(_) => "agent.list",
    }
}

impl Federation {
    /// ExecuteCommand from a peer whose TLS client key is `tls_key`. A refused
    /// message is an error (a gRPC status, nothing changed); a command that was
    /// accepted but failed is a signed reply carrying a CommandError.
    pub async fn receive_command(
        &self,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<pb::SignedEnvelope, FederationError> {
        let identity = self.identity.current();
        let now = self.now();
        // Step 3: well formed, with a known command type.
        let parsed = envelope::parse::<pb::CommandPayload>(sealed)?;
        let capability = parsed
            .unverified_payload()
            .command
            .as_ref()
            .map(command_capability)
            .ok_or_else(|| {
                FederationError::InvalidArgument(
                    "the command payload carries no known command type".into(),
                )
            })?;
        let header = parsed.header().clone();
        // Step 4.
        parsed.check_recipient(&identity.instance_id)?;
        // Step 5: ACTIVE in that workspace; SUSPENDED is FAILED_PRECONDITION.
        let connection = self
            .store
            .find_open_connection(&header.workspace, &header.sender_instance_id)
            .await?
            .ok_or_else(no_connection)?;
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
        let trusted = self.trusted_keys(&connection).await?;
        let key = parsed.check_key(&trusted, tls_key, now)?;
        parsed.check_time(now, self.window_ms())?;
        let verified = parsed.verify_signature(&key)?;
        // Step 10, serialised per message id so that concurrent identical
        // retries cannot both run the command (a spawn must happen once).
        let lock = self.delivery_lock(&format!(
            "command\u{0}{}\u{0}{}",
            header.sender_instance_id, header.message_id
        ));
        let _guard = lock.lock().await;
        if let Some(stored) = self.replayed(&verified).await? {
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
        if self.store.insert_seen_message(&seen).await? != WriteOutcome::Done(()) {
            return self
                .replay_after_race(&verified.header, &verified.digest)
                .await;
        }
        tracing::info!(
            peer.id = %header.sender_instance_id,
            workspace = %header.workspace,
            command = capability,
            "ran a command from a peer"
        );
        Ok(sealed_reply)
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
    /// The ACTIVE connection to `peer_instance_id`, in `workspace` when given;
    /// without a workspace there must be exactly one.
    async fn active_connection_to(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
    ) -> Result<crate::store::ConnectionRecord, FederationError> {
        let filter = crate::store::ConnectionFilter {
            workspace: workspace.map(str::to_owned),
            state: Some(ConnectionState::Active),
            after: None,
            limit: MAX_CONNECTIONS_SCANNED,
        };
        let mut matching: Vec<_> = self
            .store
            .list_connections(&filter)
            .await?
            .into_iter()
            .filter(|connection| connection.remote_instance_id == peer_instance_id)
            .collect();
        match matching.len() {
            0 => Err(FederationError::FailedPrecondition(
                "no ACTIVE connection with that peer (in that workspace)".into(),
            )),
            1 => Ok(matching.remove(0)),
            _ => Err(FederationError::InvalidArgument(
                "the peer is connected in several workspaces; name one with workspace".into(),
            )),
        }
    }

    /// Signs `command` for the peer, sends it within the call deadline, and
    /// returns the outcome of the peer's verified signed result. A CommandError
    /// becomes [`FederationError::Peer`] with the peer's code. Returns the
    /// command's message id with the outcome.
    pub async fn send_command(
        &self,
        peer_instance_id: &str,
        workspace: Option<&str>,
        command: pb::command_payload::Command,
    ) -> Result<(String, pb::command_result_payload::Outcome), FederationError> {
        if peer_instance_id.is_empty() {
            return Err(FederationError::InvalidArgument(
                "peer_instance_id is required".into(),
            ));
        }
        let connection = self
            .active_connection_to(
                peer_instance_id,
                workspace.filter(|named| !named.is_empty()),
            )
            .await?;
        let identity = self.identity.current();
        let routing = self.routing(
            &identity,
            &connection.remote_instance_id,
            &connection.workspace,
        );
        let header = envelope::new_header(&routing, identity.public_key().key_id());
        let message_id = header.message_id.clone();
        let payload = pb::CommandPayload {
            header: Some(header),
            command: Some(command),
        };
        let sealed = envelope::seal(&payload, identity.as_ref())?;
        let trusted = self.trusted_keys(&connection).await?;
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
            Some(outcome) => Ok((message_id, outcome)),
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
                "agent.list",
            ),
        ];
        for (command, capability) in cases {
            assert_eq!(command_capability(&command), capability);
        }
    }
}
