//! The `mosaic.agent.v1.AgentControl` gRPC handlers: a thin shell that turns
//! requests into [`AgentRuntime`] calls and records into protobuf messages.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{
    agent_to_proto, filter_from_proto, output_chunk_to_proto, spawn_spec, watch_from,
    watch_responses,
};
use super::model::Origin;
use super::runtime::AgentRuntime;
use crate::proto::agent as pb;

/// Handlers for the AgentControl service.
pub struct AgentControlService {
    runtime: Arc<AgentRuntime>,
}

impl AgentControlService {
    /// Handlers over the local agent runtime.
    pub fn new(runtime: Arc<AgentRuntime>) -> Self {
        Self { runtime }
    }
}

type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchAgentResponse, Status>>;

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
        let from = watch_from(request.from_sequence);
        let events = self
            .runtime
            .watch(agent_id, request.include_output, from)
            .await?;
        Ok(Response::new(watch_responses(events)))
    }

    async fn read_agent_output(
        &self,
        request: Request<pb::ReadAgentOutputRequest>,
    ) -> Result<Response<pb::ReadAgentOutputResponse>, Status> {
        let request = request.into_inner();
        let agent_id = required_id(&request.agent_id)?;
        let chunk = self
            .runtime
            .read_output(agent_id, request.offset, request.max_bytes)
            .await?;
        Ok(Response::new(output_chunk_to_proto(chunk)))
    }
}

fn required_id(agent_id: &str) -> Result<&str, Status> {
    if agent_id.is_empty() {
        return Err(Status::invalid_argument("agent_id is required"));
    }
    Ok(agent_id)
}
