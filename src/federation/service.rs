//! The `mosaic.federation.v1.Federation` gRPC handlers. Thin: proto in, domain
//! call, proto out. Authentication already happened in [`crate::auth`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::commands::RemoteWatch;
use super::convert::{current_key_message, instance_message, previous_key_message};
use super::paging::{decode_cursor, encode_cursor};
use super::state::{ConnectionState, OperatorAction};
use super::{ConnectRequest, ConnectionView};
use crate::agents::runtime::AgentRuntime;
use crate::auth::Caller;
use crate::clock::{now_ms, timestamp_from_ms};
use crate::identity::PublicKey;
use crate::proto::federation as pb;
use crate::ratelimit::RateLimiter;
use crate::store::{ConnectionEventRecord, ConnectionFilter};

/// Connections per page unless the caller asks for fewer.
const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most connections per page.
const MAX_PAGE_SIZE: u32 = 500;

/// Longest grace period an operator may ask for on rotation (30 days).
const MAX_ROTATION_GRACE: Duration = Duration::from_secs(crate::config::MAX_ROTATION_GRACE_SECS);

/// Handlers for the Federation service.
pub struct FederationService {
    federation: Arc<super::Federation>,
    agents: Arc<AgentRuntime>,
    rate_limiter: Arc<RateLimiter>,
    rotation: Rotation,
}

/// What key rotation needs beyond `Federation`: the grace period when the
/// operator names none, and where the new certificate is written.
pub struct Rotation {
    /// The configured default grace period (`rotation_grace`).
    pub default_grace: Duration,
    /// The instance certificate's file in the data dir.
    pub certificate_path: PathBuf,
}

impl FederationService {
    /// Handlers over peering, the local agents (which commands from peers
    /// reach), the rate limiter (a connection request's source group) and
    /// the rotation settings.
    pub fn new(
        federation: Arc<super::Federation>,
        agents: Arc<AgentRuntime>,
        rate_limiter: Arc<RateLimiter>,
        rotation: Rotation,
    ) -> Self {
        Self {
            federation,
            agents,
            rate_limiter,
            rotation,
        }
    }
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn get_instance(
        &self,
        _request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::GetInstanceResponse>, Status> {
        let identity = self.federation.identity();
        Ok(Response::new(pb::GetInstanceResponse {
            instance: Some(instance_message(&identity)),
        }))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let grace = match request.get_ref().grace_period_seconds {
            Some(seconds) => Duration::from_secs(u64::from(seconds)),
            None => self.rotation.default_grace,
        };
        if grace > MAX_ROTATION_GRACE {
            return Err(Status::invalid_argument(
                "grace_period_seconds must be at most 2592000 (30 days)",
            ));
        }
        let identity = self
            .federation
            .rotate_keys(grace, &self.rotation.certificate_path)
            .await?;
        let now = now_ms();
        let previous_key = identity.previous_keys(now).next().map(previous_key_message);
        Ok(Response::new(pb::RotateKeysResponse {
            current_key: Some(current_key_message(&identity)),
            previous_key,
        }))
    }

    async fn connect_peer(
        &self,
        request: Request<pb::ConnectPeerRequest>,
    ) -> Result<Response<pb::ConnectPeerResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .federation
            .connect_peer(ConnectRequest {
                url: request.url,
                workspace: request.workspace,
                expected_fingerprint: Some(request.expected_fingerprint)
                    .filter(|typed| !typed.is_empty()),
                granted_capabilities: request.granted_capabilities,
                requested_capabilities: request.requested_capabilities,
            })
            .await?;
        Ok(Response::new(pb::ConnectPeerResponse {
            connection: Some(connection_message(&view)),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let request = request.into_inner();
        let workspace = Some(request.workspace.clone()).filter(|workspace| !workspace.is_empty());
        let state = ConnectionState::from_proto(request.state());
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let filter_key = page_filter_key(workspace.as_deref(), state);
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_cursor(token, &filter_key)?),
        };
        let mut views = self
            .federation
            .list_connections(&ConnectionFilter {
                workspace,
                state,
                after,
                limit: i64::from(page_size) + 1,
            })
            .await?;
        let next_page_token = if views.len() > page_size as usize {
            views.truncate(page_size as usize);
            views
                .last()
                .map(|last| encode_cursor(last.record.created_at_ms, &last.record.id, &filter_key))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: views.iter().map(connection_message).collect(),
            next_page_token,
        }))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::GetConnectionResponse>, Status> {
        let (view, events) = self
            .federation
            .get_connection(&request.get_ref().connection_id)
            .await?;
        Ok(Response::new(pb::GetConnectionResponse {
            connection: Some(connection_message(&view)),
            events: events.iter().map(event_message).collect(),
        }))
    }

    async fn accept_connection(
        &self,
        request: Request<pb::AcceptConnectionRequest>,
    ) -> Result<Response<pb::AcceptConnectionResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .federation
            .accept_connection(
                &request.connection_id,
                &request.granted_capabilities,
                super::operator::NewKeyForKnownInstance::from_flag(
                    request.accept_new_key_for_known_instance,
                ),
            )
            .await?;
        Ok(Response::new(pb::AcceptConnectionResponse {
            connection: Some(connection_message(&view)),
        }))
    }

    async fn reject_connection(
        &self,
        request: Request<pb::RejectConnectionRequest>,
    ) -> Result<Response<pb::RejectConnectionResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .operator_action(
                &request.connection_id,
                OperatorAction::Reject,
                &[],
                &request.reason,
            )
            .await?;
        Ok(Response::new(pb::RejectConnectionResponse {
            connection: Some(view),
        }))
    }

    async fn suspend_connection(
        &self,
        request: Request<pb::SuspendConnectionRequest>,
    ) -> Result<Response<pb::SuspendConnectionResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .operator_action(
                &request.connection_id,
                OperatorAction::Suspend,
                &[],
                &request.reason,
            )
            .await?;
        Ok(Response::new(pb::SuspendConnectionResponse {
            connection: Some(view),
        }))
    }

    async fn resume_connection(
        &self,
        request: Request<pb::ResumeConnectionRequest>,
    ) -> Result<Response<pb::ResumeConnectionResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .operator_action(&request.connection_id, OperatorAction::Resume, &[], "")
            .await?;
        Ok(Response::new(pb::ResumeConnectionResponse {
            connection: Some(view),
        }))
    }

    async fn disconnect_connection(
        &self,
        request: Request<pb::DisconnectConnectionRequest>,
    ) -> Result<Response<pb::DisconnectConnectionResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .operator_action(
                &request.connection_id,
                OperatorAction::Disconnect,
                &[],
                &request.reason,
            )
            .await?;
        Ok(Response::new(pb::DisconnectConnectionResponse {
            connection: Some(view),
        }))
    }

    async fn spawn_remote_agent(
        &self,
        request: Request<pb::SpawnRemoteAgentRequest>,
    ) -> Result<Response<pb::SpawnRemoteAgentResponse>, Status> {
        let request = request.into_inner();
        let command = pb::command_payload::Command::AgentSpawn(pb::AgentSpawnCommand {
            spawn: Some(request.spawn.unwrap_or_default()),
        });
        let retry_id = Some(request.message_id.as_str()).filter(|id| !id.is_empty());
        let (message_id, agent) = self
            .remote_agent(
                &request.peer_instance_id,
                &request.workspace,
                command,
                retry_id,
            )
            .await?;
        Ok(Response::new(pb::SpawnRemoteAgentResponse {
            agent: Some(agent),
            message_id,
        }))
    }

    async fn get_remote_agent(
        &self,
        request: Request<pb::GetRemoteAgentRequest>,
    ) -> Result<Response<pb::GetRemoteAgentResponse>, Status> {
        let request = request.into_inner();
        let command = pb::command_payload::Command::AgentStatus(pb::AgentStatusCommand {
            agent_id: request.agent_id,
        });
        let (_, agent) = self
            .remote_agent(&request.peer_instance_id, &request.workspace, command, None)
            .await?;
        Ok(Response::new(pb::GetRemoteAgentResponse {
            agent: Some(agent),
        }))
    }

    async fn read_remote_agent_output(
        &self,
        request: Request<pb::ReadRemoteAgentOutputRequest>,
    ) -> Result<Response<pb::ReadRemoteAgentOutputResponse>, Status> {
        let request = request.into_inner();
        if request.agent_id.is_empty() {
            return Err(Status::invalid_argument("agent_id is required"));
        }
        let command = pb::command_payload::Command::AgentOutput(pb::AgentOutputCommand {
            agent_id: request.agent_id,
            offset: request.offset,
            max_bytes: request.max_bytes,
        });
        let workspace = Some(request.workspace.as_str());
        let (_, outcome) = self
            .federation
            .send_command(&request.peer_instance_id, workspace, command, None)
            .await?;
        match outcome {
            pb::command_result_payload::Outcome::Output(output) => {
                Ok(Response::new(pb::ReadRemoteAgentOutputResponse {
                    output: Some(output),
                }))
            }
            _ => Err(Status::internal(
                "the peer answered agent.output with something other than output",
            )),
        }
    }

    type WatchRemoteAgentStream =
        futures::stream::BoxStream<'static, Result<pb::WatchRemoteAgentResponse, Status>>;

    async fn watch_remote_agent(
        &self,
        request: Request<pb::WatchRemoteAgentRequest>,
    ) -> Result<Response<Self::WatchRemoteAgentStream>, Status> {
        use futures::StreamExt as _;
        let request = request.into_inner();
        let events = self
            .federation
            .watch_remote(RemoteWatch {
                peer_instance_id: request.peer_instance_id,
                workspace: Some(request.workspace),
                agent_id: request.agent_id,
                include_output: request.include_output,
                from_sequence: request.from_sequence,
            })
            .await?;
        Ok(Response::new(
            events
                .map(|event| {
                    event
                        .map(|events| pb::WatchRemoteAgentResponse { events })
                        .map_err(Status::from)
                })
                .boxed(),
        ))
    }

    async fn kill_remote_agent(
        &self,
        request: Request<pb::KillRemoteAgentRequest>,
    ) -> Result<Response<pb::KillRemoteAgentResponse>, Status> {
        let request = request.into_inner();
        let command = pb::command_payload::Command::AgentKill(pb::AgentKillCommand {
            agent_id: request.agent_id,
            reason: request.reason,
        });
        let (_, agent) = self
            .remote_agent(&request.peer_instance_id, &request.workspace, command, None)
            .await?;
        Ok(Response::new(pb::KillRemoteAgentResponse {
            agent: Some(agent),
        }))
    }

    async fn list_remote_agents(
        &self,
        request: Request<pb::ListRemoteAgentsRequest>,
    ) -> Result<Response<pb::ListRemoteAgentsResponse>, Status> {
        let request = request.into_inner();
        let command = pb::command_payload::Command::AgentList(pb::AgentListCommand {
            page_size: request.page_size,
            page_token: request.page_token,
        });
        match self
            .federation
            .send_command(
                &request.peer_instance_id,
                Some(&request.workspace),
                command,
                None,
            )
            .await?
        {
            (_, pb::command_result_payload::Outcome::AgentList(list)) => {
                Ok(Response::new(pb::ListRemoteAgentsResponse {
                    agents: list.agents,
                    next_page_token: list.next_page_token,
                }))
            }
            _ => Err(Status::internal(
                "the peer answered a list with something else",
            )),
        }
    }

    async fn list_command_log(
        &self,
        request: Request<pb::ListCommandLogRequest>,
    ) -> Result<Response<pb::ListCommandLogResponse>, Status> {
        let (entries, next_page_token) =
            self.federation.list_command_log(request.get_ref()).await?;
        Ok(Response::new(pb::ListCommandLogResponse {
            entries,
            next_page_token,
        }))
    }

    async fn request_connection(
        &self,
        request: Request<pb::RequestConnectionRequest>,
    ) -> Result<Response<pb::RequestConnectionResponse>, Status> {
        let tls_key = peer_certificate_key(&request)?;
        let sealed = request.get_ref().envelope.as_ref();
        // Strangers learn nothing: the caller is identified first.
        let federation = &self.federation;
        federation.identify_request_caller(sealed, &tls_key).await?;
        let source = super::inbound::RequestSource::of(&self.rate_limiter, &request);
        let envelope = federation
            .receive_request(sealed, &tls_key, &source)
            .await?;
        Ok(Response::new(pb::RequestConnectionResponse {
            envelope: Some(envelope),
        }))
    }

    async fn notify_connection(
        &self,
        request: Request<pb::NotifyConnectionRequest>,
    ) -> Result<Response<pb::NotifyConnectionResponse>, Status> {
        let tls_key = peer_certificate_key(&request)?;
        let sealed = request.get_ref().envelope.as_ref();
        // Strangers learn nothing: the caller is identified first.
        let federation = &self.federation;
        federation.identify_notice_caller(sealed, &tls_key).await?;
        let envelope = federation.receive_notice(sealed, &tls_key).await?;
        Ok(Response::new(pb::NotifyConnectionResponse {
            envelope: Some(envelope),
        }))
    }

    async fn execute_command(
        &self,
        request: Request<pb::ExecuteCommandRequest>,
    ) -> Result<Response<pb::ExecuteCommandResponse>, Status> {
        let tls_key = peer_certificate_key(&request)?;
        let envelope = self
            .federation
            .receive_command(&self.agents, request.get_ref().envelope.as_ref(), &tls_key)
            .await?;
        Ok(Response::new(pb::ExecuteCommandResponse {
            envelope: Some(envelope),
        }))
    }

    type WatchCommandStream =
        futures::stream::BoxStream<'static, Result<pb::WatchCommandResponse, Status>>;

    async fn watch_command(
        &self,
        request: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        use futures::StreamExt as _;
        let tls_key = peer_certificate_key(&request)?;
        let batches = self
            .federation
            .receive_watch(&self.agents, request.get_ref().envelope.as_ref(), &tls_key)
            .await?;
        Ok(Response::new(
            batches
                .map(|batch| {
                    batch
                        .map(|envelope| pb::WatchCommandResponse {
                            envelope: Some(envelope),
                        })
                        .map_err(Status::from)
                })
                .boxed(),
        ))
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let tls_key = peer_certificate_key(&request)?;
        let sealed = request.get_ref().envelope.as_ref();
        // Strangers learn nothing: the caller is identified first.
        let federation = &self.federation;
        federation.identify_ping_caller(sealed, &tls_key).await?;
        let envelope = federation.receive_ping(sealed, &tls_key).await?;
        Ok(Response::new(pb::PingResponse {
            envelope: Some(envelope),
        }))
    }
}

impl FederationService {
    /// Sends a command whose result is one agent.
    async fn remote_agent(
        &self,
        peer_instance_id: &str,
        workspace: &str,
        command: pb::command_payload::Command,
        retry_id: Option<&str>,
    ) -> Result<(String, crate::proto::agent::Agent), Status> {
        match self
            .federation
            .send_command(peer_instance_id, Some(workspace), command, retry_id)
            .await?
        {
            (message_id, pb::command_result_payload::Outcome::Agent(agent)) => {
                Ok((message_id, agent))
            }
            _ => Err(Status::internal(
                "the peer answered with something other than an agent",
            )),
        }
    }

    async fn operator_action(
        &self,
        connection_id: &str,
        action: OperatorAction,
        granted_capabilities: &[String],
        reason: &str,
    ) -> Result<pb::Connection, Status> {
        let view = self
            .federation
            .operator_action(connection_id, action, granted_capabilities, reason)
            .await?;
        Ok(connection_message(&view))
    }
}

/// The key of the verified TLS client certificate; the auth layer already refused
/// calls without one, so its absence here is refused again (fail closed).
fn peer_certificate_key<T>(request: &Request<T>) -> Result<PublicKey, Status> {
    Caller::of(request).peer_key().cloned().ok_or_else(|| {
        Status::unauthenticated(
            "this federation method needs a TLS client certificate of a connected peer",
        )
    })
}

/// A connection as the API shows it.
pub fn connection_message(view: &ConnectionView) -> pb::Connection {
    let record = &view.record;
    pb::Connection {
        connection_id: record.id.clone(),
        workspace: record.workspace.clone(),
        remote_instance_id: record.remote_instance_id.clone(),
        remote_name: record.remote_name.clone(),
        remote_url: record.remote_url.clone(),
        remote_public_key: record.remote_public_key.clone(),
        remote_fingerprint: record.remote_fingerprint.clone(),
        remote_capabilities: record.capabilities.remote.clone(),
        granted_capabilities: record.capabilities.granted.clone(),
        capabilities_granted_to_us: record.capabilities.granted_to_us.clone(),
        direction: record.direction.to_proto().into(),
        state: record.state.to_proto().into(),
        state_reason: record.state_reason.clone(),
        reachable: record.reachable,
        last_contact_at: record.last_contact_at_ms.map(timestamp_from_ms),
        pending_notices: view.pending_notices,
        created_at: Some(timestamp_from_ms(record.created_at_ms)),
        updated_at: Some(timestamp_from_ms(record.updated_at_ms)),
        requested_capabilities: record.capabilities.requested.clone(),
    }
}

fn event_message(event: &ConnectionEventRecord) -> pb::ConnectionEvent {
    pb::ConnectionEvent {
        from_state: event
            .from_state
            .map_or(pb::ConnectionState::Unspecified, ConnectionState::to_proto)
            .into(),
        to_state: event.to_state.to_proto().into(),
        actor: event.actor.as_str().to_owned(),
        reason: event.reason.clone(),
        at: Some(timestamp_from_ms(event.at_ms)),
    }
}

/// What a page token is bound to: the filters it was made for.
fn page_filter_key(workspace: Option<&str>, state: Option<ConnectionState>) -> String {
    format!(
        "{}\u{1f}{}",
        workspace.unwrap_or(""),
        state.map_or("", ConnectionState::as_str)
    )
}
