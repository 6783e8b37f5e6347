//! The `mosaic.agent.v1.AgentControl` gRPC handlers: a thin shell that turns
//! requests into [`AgentRuntime`] calls and records into protobuf messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tonic::{Request, Response, Status};

use super::model::{
    AgentEvent, AgentFilter, AgentRecord, AgentState, Origin, OriginKind, OutputStream, SpawnSpec,
};
use super::runtime::AgentRuntime;
use crate::clock::timestamp_from_ms;
use crate::proto::agent as pb;
use crate::server::Shared;

/// Handlers for the AgentControl service.
pub struct AgentControlService {
    runtime: Arc<AgentRuntime>,
}

impl AgentControlService {
    /// Handlers over the daemon's shared state.
    pub fn new(shared: Shared) -> Self {
        Self {
            runtime: shared.agents,
        }
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchAgentResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_control_server::AgentControl for AgentControlService {
    async fn spawn(
        &self,
        request: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnResponse>, Status> {
        let spec = spawn_spec(request.into_inner(), Origin::Local);
        let agent = self.runtime.spawn(spec).await?;
        Ok(Response::new(pb::SpawnResponse {
            agent: Some(agent_to_proto(&agent)),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let agent_id = required_id(&request.get_ref().agent_id)?;
        let agent = self.runtime.get(agent_id).await?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some(agent_to_proto(&agent)),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let filter = filter_from_proto(&request)?;
        let (agents, next_page_token) = self
            .runtime
            .list(&filter, request.page_size, &request.page_token)
            .await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn kill_agent(
        &self,
        request: Request<pb::KillAgentRequest>,
    ) -> Result<Response<pb::KillAgentResponse>, Status> {
        let request = request.into_inner();
        let agent_id = required_id(&request.agent_id)?;
        let agent = self.runtime.kill(agent_id, &request.reason).await?;
        Ok(Response::new(pb::KillAgentResponse {
            agent: Some(agent_to_proto(&agent)),
        }))
    }

    type WatchAgentStream = WatchStream;

    async fn watch_agent(
        &self,
        request: Request<pb::WatchAgentRequest>,
    ) -> Result<Response<Self::WatchAgentStream>, Status> {
        let request = request.into_inner();
        let agent_id = required_id(&request.agent_id)?;
        let events = self.runtime.watch(agent_id, request.include_output).await?;
        let responses = events.enumerate().map(|(index, event)| {
            let event = event.map_err(Status::from)?;
            Ok(pb::WatchAgentResponse {
                sequence: u64::try_from(index).unwrap_or(u64::MAX).saturating_add(1),
                event: Some(event_to_proto(event)),
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

fn required_id(agent_id: &str) -> Result<&str, Status> {
    if agent_id.is_empty() {
        return Err(Status::invalid_argument("agent_id is required"));
    }
    Ok(agent_id)
}

/// The domain spawn spec of a `SpawnRequest`, for `origin`. Also used by the
/// federation for `agent.spawn` commands.
pub fn spawn_spec(request: pb::SpawnRequest, origin: Origin) -> SpawnSpec {
    SpawnSpec {
        agent_type: request.agent_type,
        prompt: request.prompt,
        task_id: request.task_id,
        labels: request.labels.into_iter().collect(),
        timeout: request
            .timeout_seconds
            .map(|seconds| Duration::from_secs(u64::from(seconds))),
        origin,
    }
}

fn filter_from_proto(request: &pb::ListAgentsRequest) -> Result<AgentFilter, Status> {
    let state = match pb::AgentState::try_from(request.state) {
        Ok(pb::AgentState::Unspecified) => None,
        Ok(state) => Some(state_from_proto(state)),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown state {}",
                request.state
            )));
        }
    };
    let origin_kind = match pb::AgentOriginKind::try_from(request.origin_kind) {
        Ok(pb::AgentOriginKind::Unspecified) => None,
        Ok(pb::AgentOriginKind::Local) => Some(OriginKind::Local),
        Ok(pb::AgentOriginKind::Peer) => Some(OriginKind::Peer),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown origin_kind {}",
                request.origin_kind
            )));
        }
    };
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    Ok(AgentFilter {
        state,
        agent_type: non_empty(&request.agent_type),
        origin_kind,
        origin_instance_id: non_empty(&request.origin_instance_id),
        origin_workspace: None,
        labels: request
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    })
}

fn state_from_proto(state: pb::AgentState) -> AgentState {
    match state {
        pb::AgentState::Spawning | pb::AgentState::Unspecified => AgentState::Spawning,
        pb::AgentState::Running => AgentState::Running,
        pb::AgentState::Completed => AgentState::Completed,
        pb::AgentState::Failed => AgentState::Failed,
        pb::AgentState::Killed => AgentState::Killed,
        pb::AgentState::TimedOut => AgentState::TimedOut,
    }
}

/// The protobuf enum of a state.
pub fn state_to_proto(state: AgentState) -> pb::AgentState {
    match state {
        AgentState::Spawning => pb::AgentState::Spawning,
        AgentState::Running => pb::AgentState::Running,
        AgentState::Completed => pb::AgentState::Completed,
        AgentState::Failed => pb::AgentState::Failed,
        AgentState::Killed => pb::AgentState::Killed,
        AgentState::TimedOut => pb::AgentState::TimedOut,
    }
}

/// The protobuf message of an agent record. Also used by the federation.
pub fn agent_to_proto(agent: &AgentRecord) -> pb::Agent {
    let origin = match &agent.origin {
        Origin::Local => pb::AgentOrigin {
            kind: pb::AgentOriginKind::Local.into(),
            instance_id: String::new(),
            workspace: String::new(),
        },
        Origin::Peer {
            instance_id,
            workspace,
        } => pb::AgentOrigin {
            kind: pb::AgentOriginKind::Peer.into(),
            instance_id: instance_id.clone(),
            workspace: workspace.clone(),
        },
    };
    pb::Agent {
        agent_id: agent.id.clone(),
        agent_type: agent.agent_type.clone(),
        state: state_to_proto(agent.state).into(),
        state_reason: agent.state_reason.clone(),
        prompt: agent.prompt.clone(),
        task_id: agent.task_id.clone(),
        labels: agent
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        origin: Some(origin),
        pid: agent.pid,
        exit_code: agent.exit_code,
        signal: agent.signal,
        output_tail: agent.output_tail.clone(),
        output_bytes: agent.output_bytes,
        output_truncated: agent.output_truncated,
        timeout_seconds: agent.timeout_secs,
        created_at: Some(timestamp_from_ms(agent.created_at_ms)),
        started_at: agent.started_at_ms.map(timestamp_from_ms),
        ended_at: agent.ended_at_ms.map(timestamp_from_ms),
        updated_at: Some(timestamp_from_ms(agent.updated_at_ms)),
    }
}

fn event_to_proto(event: AgentEvent) -> pb::watch_agent_response::Event {
    match event {
        AgentEvent::StateChanged { from, agent } => {
            pb::watch_agent_response::Event::StateChange(pb::AgentStateChange {
                from_state: from
                    .map_or(pb::AgentState::Unspecified, state_to_proto)
                    .into(),
                to_state: state_to_proto(agent.state).into(),
                reason: agent.state_reason.clone(),
                at: Some(timestamp_from_ms(agent.updated_at_ms)),
                agent: Some(agent_to_proto(&agent)),
            })
        }
        AgentEvent::Output {
            stream,
            line,
            at_ms,
        } => pb::watch_agent_response::Event::OutputLine(pb::AgentOutputLine {
            stream: match stream {
                OutputStream::Stdout => pb::AgentOutputStream::Stdout,
                OutputStream::Stderr => pb::AgentOutputStream::Stderr,
            }
            .into(),
            line,
            at: Some(timestamp_from_ms(at_ms)),
        }),
    }
}
