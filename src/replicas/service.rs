//! The `mosaic.replica.v1.Replica` handlers: kills and watches routed here
//! by another replica of this instance, for the agents this one supervises.
//!
//! The caller must present a client certificate carrying this instance's
//! own key (current, or previous within its grace): only the replicas hold
//! it. A key rotated through another replica a moment ago is taken up by
//! re-reading the identity once before refusing.

use std::sync::Arc;

use futures::StreamExt as _;
use tonic::{Request, Response, Status};

use crate::agents::AgentRuntime;
use crate::agents::convert::{agent_to_proto, output_chunk_to_proto, watch_from, watch_responses};
use crate::auth::Caller;
use crate::identity::{IdentityManager, PublicKey};
use crate::proto::replica as pb;
use crate::proto::replica::replica_server::Replica;

/// Handlers for the Replica service.
pub struct ReplicaService {
    agents: Arc<AgentRuntime>,
    identity: Arc<IdentityManager>,
    /// When an unknown key last made this replica re-read the identity: at
    /// most once a second, so strangers cannot turn calls into reads.
    last_refresh: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ReplicaService {
    /// Handlers over this replica's runtime, admitting callers that hold
    /// `identity`'s key.
    pub fn new(agents: Arc<AgentRuntime>, identity: Arc<IdentityManager>) -> Self {
        Self {
            agents,
            identity,
            last_refresh: std::sync::Mutex::new(None),
        }
    }

    /// Refuses a caller that is not a replica of this instance.
    async fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(key) = Caller::of(request).peer_key().cloned() else {
            return Err(Status::unauthenticated(
                "Replica calls need a client certificate carrying this instance's key",
            ));
        };
        if self.is_own(&key) {
            return Ok(());
        }
        // Rotated through another replica a moment ago?
        if self.may_refresh() && self.identity.refresh().await.unwrap_or(false) && self.is_own(&key)
        {
            return Ok(());
        }
        Err(Status::permission_denied(
            "Replica calls are for the replicas of this instance, which hold its key",
        ))
    }

    fn may_refresh(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self
            .last_refresh
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if last.is_some_and(|last| now.duration_since(last) < std::time::Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }

    fn is_own(&self, key: &PublicKey) -> bool {
        let current = self.identity.current();
        current.public_key() == key
            || current
                .previous_keys(crate::clock::now_ms())
                .any(|previous| previous.public_key == *key)
    }
}

type WatchStream = futures::stream::BoxStream<'static, Result<pb::WatchAgentResponse, Status>>;

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn kill_agent(
        &self,
        request: Request<pb::KillAgentRequest>,
    ) -> Result<Response<pb::KillAgentResponse>, Status> {
        self.admit(&request).await?;
        let request = request.into_inner();
        let agent = self
            .agents
            .kill_here(&request.agent_id, &request.reason)
            .await?;
        Ok(Response::new(pb::KillAgentResponse {
            agent: Some(agent_to_proto(&agent)),
        }))
    }

    type WatchAgentStream = WatchStream;

    async fn watch_agent(
        &self,
        request: Request<pb::WatchAgentRequest>,
    ) -> Result<Response<Self::WatchAgentStream>, Status> {
        self.admit(&request).await?;
        let request = request.into_inner();
        let from = watch_from(request.from_sequence);
        let events = self
            .agents
            .watch_here(&request.agent_id, request.include_output, from)
            .await?;
        let relayed = watch_responses(events)
            .map(|message| message.map(|watch| pb::WatchAgentResponse { watch: Some(watch) }));
        Ok(Response::new(relayed.boxed()))
    }

    async fn read_agent_output(
        &self,
        request: Request<pb::ReadAgentOutputRequest>,
    ) -> Result<Response<pb::ReadAgentOutputResponse>, Status> {
        self.admit(&request).await?;
        let request = request.into_inner();
        let chunk = self
            .agents
            .read_output_here(&request.agent_id, request.offset, request.max_bytes)
            .await?;
        Ok(Response::new(pb::ReadAgentOutputResponse {
            output: Some(output_chunk_to_proto(chunk)),
        }))
    }
}
