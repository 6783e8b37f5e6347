//! Routing a call to the replica that supervises (or ran) an agent: the
//! [`Elsewhere`] the agent runtime asks for agents it does not track.
//!
//! The owner is the agent's `runner_id`; the registry says where it is
//! reached and whether it still holds its lease. The call goes to that
//! address over mutual TLS, presenting this instance's certificate and
//! pinning the instance's own key: the replicas share one key, so each
//! recognises the others by it (`replicas::service` checks it on arrival).
//! A gRPC call, not a request carried by the database: a kill must return
//! the owner's answer, and a watch must carry output lines that only the
//! owner's process pipes see, as they come.
//!
//! One channel per owner is kept and reused; a failed call drops it, and
//! the next call dials again (the owner may have restarted elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use tonic::transport::Channel;

use crate::agents::convert::{agent_from_proto, event_from_proto, output_chunk_from_proto};
use crate::agents::elsewhere::{Elsewhere, EventStream};
use crate::agents::{AgentError, AgentRecord, OutputChunk, SequencedEvent, WatchFrom};
use crate::identity::IdentityManager;
use crate::proto::replica as pb;
use crate::proto::replica::replica_client::ReplicaClient;
use crate::store::{ReplicaRecord, Store};
use crate::tls::{ChannelTimeouts, ServerPin};

/// TCP connect plus TLS handshake to another replica: a replica that holds
/// its lease answers at once, so a short wait tells a stuck one apart.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of a forwarded kill, and of a forwarded watch's first answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Reaches the other replicas of this instance.
pub struct Router {
    store: Store,
    identity: Arc<IdentityManager>,
    /// Runner id to (address, channel).
    channels: Mutex<HashMap<String, (String, Channel)>>,
}

impl Router {
    /// A router over the registry in `store`, presenting `identity`.
    pub fn new(store: Store, identity: Arc<IdentityManager>) -> Self {
        Self {
            store,
            identity,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The owner of `agent`, if it holds its lease, and a client to it.
    async fn owner(
        &self,
        agent: &AgentRecord,
    ) -> Result<(ReplicaRecord, ReplicaClient<Channel>), AgentError> {
        let replica = self
            .store
            .get_replica(&agent.runner_id)
            .await?
            .ok_or_else(|| AgentError::SupervisedElsewhere {
                agent_id: agent.id.clone(),
                runner_id: agent.runner_id.clone(),
            })?;
        if replica.state_at(crate::clock::now_ms()) != "serving" {
            return Err(AgentError::OwnerLost {
                agent_id: agent.id.clone(),
                runner_id: agent.runner_id.clone(),
            });
        }
        let channel = self.channel(&replica).await.map_err(|cause| {
            unavailable(
                agent,
                &replica,
                crate::federation::peer_client::error_chain(&cause),
            )
        })?;
        Ok((replica, ReplicaClient::new(channel)))
    }

    /// The cached channel to `replica`, or a new one.
    async fn channel(&self, replica: &ReplicaRecord) -> Result<Channel, crate::tls::TlsError> {
        if let Some((address, channel)) = self.lock().get(&replica.runner_id)
            && *address == replica.address
        {
            return Ok(channel.clone());
        }
        let current = self.identity.current();
        let now_ms = crate::clock::now_ms();
        let own_keys = std::iter::once(current.public_key().clone())
            .chain(
                current
                    .previous_keys(now_ms)
                    .map(|previous| previous.public_key.clone()),
            )
            .collect();
        let tls = crate::tls::mutual_client_config(
            ServerPin::AnyOf(own_keys),
            Arc::clone(&self.identity),
        )?;
        let channel = crate::tls::connect_channel(
            &replica.address,
            Some(Arc::new(tls)),
            ChannelTimeouts {
                connect: CONNECT_TIMEOUT,
                request: CALL_TIMEOUT,
            },
        )
        .await?;
        self.lock().insert(
            replica.runner_id.clone(),
            (replica.address.clone(), channel.clone()),
        );
        Ok(channel)
    }

    /// What a failed call to `replica` means for the caller; a call that
    /// did not reach it (or that it could not serve now) drops the channel.
    fn failed(
        &self,
        agent: &AgentRecord,
        replica: &ReplicaRecord,
        status: tonic::Status,
    ) -> AgentError {
        use tonic::Code;
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                self.lock().remove(&replica.runner_id);
                unavailable(agent, replica, status.message().to_owned())
            }
            _ => AgentError::Forwarded(status),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Channel)>> {
        self.channels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    async fn kill_there(
        &self,
        agent: &AgentRecord,
        reason: &str,
    ) -> Result<AgentRecord, AgentError> {
        let (replica, mut client) = self.owner(agent).await?;
        let answer = client
            .kill_agent(pb::KillAgentRequest {
                agent_id: agent.id.clone(),
                reason: reason.to_owned(),
            })
            .await
            .map_err(|status| self.failed(agent, &replica, status))?;
        answer
            .into_inner()
            .agent
            .map(agent_from_proto)
            .ok_or_else(|| unavailable(agent, &replica, "it answered without the agent".to_owned()))
    }

    async fn watch_there(
        &self,
        agent: &AgentRecord,
        include_output: bool,
        from: WatchFrom,
    ) -> Result<EventStream, AgentError> {
        let (replica, mut client) = self.owner(agent).await?;
        let from_sequence = match from {
            WatchFrom::Now => None,
            WatchFrom::Sequence(sequence) => Some(sequence),
        };
        let answer = client
            .watch_agent(pb::WatchAgentRequest {
                agent_id: agent.id.clone(),
                include_output,
                from_sequence,
            })
            .await
            .map_err(|status| self.failed(agent, &replica, status))?;
        let agent = agent.clone();
        let events = answer.into_inner().filter_map(move |message| {
            let event =
                match message {
                    Ok(message) => message.watch.and_then(|watch| {
                        let sequence = watch.sequence;
                        event_from_proto(watch.event)
                            .map(|event| Ok(SequencedEvent { sequence, event }))
                    }),
                    Err(status) if status.code() == tonic::Code::Unavailable => Some(Err(
                        unavailable(&agent, &replica, status.message().to_owned()),
                    )),
                    Err(status) => Some(Err(AgentError::Forwarded(status))),
                };
            std::future::ready(event)
        });
        Ok(events.boxed())
    }

    async fn read_output_there(
        &self,
        agent: &AgentRecord,
        offset: u64,
        max_bytes: u32,
    ) -> Result<OutputChunk, AgentError> {
        let (replica, mut client) = self.owner(agent).await?;
        let answer = client
            .read_agent_output(pb::ReadAgentOutputRequest {
                agent_id: agent.id.clone(),
                offset,
                max_bytes,
            })
            .await
            .map_err(|status| self.failed(agent, &replica, status))?;
        answer
            .into_inner()
            .output
            .map(output_chunk_from_proto)
            .ok_or_else(|| {
                unavailable(agent, &replica, "it answered without the output".to_owned())
            })
    }
}

fn unavailable(agent: &AgentRecord, replica: &ReplicaRecord, cause: String) -> AgentError {
    AgentError::OwnerUnavailable {
        agent_id: agent.id.clone(),
        runner_id: replica.runner_id.clone(),
        address: replica.address.clone(),
        cause,
    }
}

impl Elsewhere for Router {
    fn kill<'a>(
        &'a self,
        agent: &'a AgentRecord,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<AgentRecord, AgentError>> {
        Box::pin(self.kill_there(agent, reason))
    }

    fn watch<'a>(
        &'a self,
        agent: &'a AgentRecord,
        include_output: bool,
        from: WatchFrom,
    ) -> BoxFuture<'a, Result<EventStream, AgentError>> {
        Box::pin(self.watch_there(agent, include_output, from))
    }

    fn read_output<'a>(
        &'a self,
        agent: &'a AgentRecord,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'a, Result<OutputChunk, AgentError>> {
        Box::pin(self.read_output_there(agent, offset, max_bytes))
    }
}
