//! The `mosaic.agent.v1.AgentControl` gRPC handlers. The runtime itself lands with
//! its own issue; until then every RPC says so with UNIMPLEMENTED.

use std::pin::Pin;

use tonic::{Request, Response, Status};

use crate::error::not_yet;
use crate::proto::agent as pb;
use crate::server::Shared;

const AGENT_RUNTIME: &str = "the agent runtime";

/// Handlers for the AgentControl service.
pub struct AgentControlService {
    _shared: Shared,
}

impl AgentControlService {
    /// Handlers over the daemon's shared state.
    pub fn new(shared: Shared) -> Self {
        Self { _shared: shared }
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchAgentResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_control_server::AgentControl for AgentControlService {
    async fn spawn(
        &self,
        _request: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnResponse>, Status> {
        Err(not_yet(AGENT_RUNTIME))
    }

    async fn get_agent(
        &self,
        _request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        Err(not_yet(AGENT_RUNTIME))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Err(not_yet(AGENT_RUNTIME))
    }

    async fn kill_agent(
        &self,
        _request: Request<pb::KillAgentRequest>,
    ) -> Result<Response<pb::KillAgentResponse>, Status> {
        Err(not_yet(AGENT_RUNTIME))
    }

    type WatchAgentStream = WatchStream;

    async fn watch_agent(
        &self,
        _request: Request<pb::WatchAgentRequest>,
    ) -> Result<Response<Self::WatchAgentStream>, Status> {
        Err(not_yet(AGENT_RUNTIME))
    }
}
