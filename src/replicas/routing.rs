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
//! One channel per owner is kept and reused, and its registry row is read
//! again at most once a second (`ROW_REUSED_FOR`) while calls succeed; a
//! failed call drops both, and the next call reads and dials again (the
//! owner may have restarted elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Deadline of a kill sent where the agent's id points (see
/// `Elsewhere::kill_tagged`): a replica that holds its lease answers a kill
/// in milliseconds.
const TAGGED_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a replica's registry row, read to find it, is used again
/// without reading it: a kill or watch through a non-owner then costs one
/// database read (the agent's) and the call. A call that fails reads the
/// row again to tell an owner that does not answer from one whose lease ran
/// out.
const ROW_REUSED_FOR: Duration = Duration::from_secs(1);

/// Reaches the other replicas of this instance.
pub struct Router {
    store: Store,
    identity: Arc<IdentityManager>,
    /// Runner id to its row as last read, when, and a channel to it.
    owners: Mutex<HashMap<String, Owner>>,
}

/// A replica as last read from the registry, and the channel to it.
#[derive(Clone)]
struct Owner {
    replica: ReplicaRecord,
    read_at: Instant,
    channel: Option<Channel>,
}

/// The owner a call goes to: its row, whether that row was just read, and
/// a client to it.
struct Reached {
    replica: ReplicaRecord,
    fresh: bool,
    client: ReplicaClient<Channel>,
}

impl Router {
    /// A router over the registry in `store`, presenting `identity`.
    pub fn new(store: Store, identity: Arc<IdentityManager>) -> Self {
        Self {
            store,
            identity,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// The owner of `agent`, if it holds its lease, and a client to it.
    async fn owner(&self, agent: &AgentRecord) -> Result<Reached, AgentError> {
        let known = self
            .lock()
            .get(&agent.runner_id)
            .filter(|owner| owner.read_at.elapsed() < ROW_REUSED_FOR)
            .cloned();
        let (replica, fresh, channel) = match known {
            Some(owner) => (owner.replica, false, owner.channel),
            None => (self.read_row(agent).await?, true, None),
        };
        if replica.state_at(crate::clock::now_ms()) != "serving" {
            return Err(AgentError::OwnerLost {
                agent_id: agent.id.clone(),
                runner_id: agent.runner_id.clone(),
            });
        }
        let channel = match channel {
            Some(channel) => channel,
            None => self
                .channel(&replica)
                .await
                .map_err(|cause| unavailable(agent, &replica, crate::text::error_chain(&cause)))?,
        };
        Ok(Reached {
            replica,
            fresh,
            client: ReplicaClient::new(channel),
        })
    }

    /// Reads the registry row of `agent`'s runner (and remembers it, keeping
    /// the channel to the same address).
    async fn read_row(&self, agent: &AgentRecord) -> Result<ReplicaRecord, AgentError> {
        let replica = self
            .store
            .get_replica(&agent.runner_id)
            .await?
            .ok_or_else(|| AgentError::SupervisedElsewhere {
                agent_id: agent.id.clone(),
                runner_id: agent.runner_id.clone(),
            })?;
        let mut owners = self.lock();
        let channel = owners
            .get(&replica.runner_id)
            .filter(|owner| owner.replica.address == replica.address)
            .and_then(|owner| owner.channel.clone());
        owners.insert(
            replica.runner_id.clone(),
            Owner {
                replica: replica.clone(),
                read_at: Instant::now(),
                channel,
            },
        );
        Ok(replica)
    }

    /// The cached channel to `replica`, or a new one.
    async fn channel(&self, replica: &ReplicaRecord) -> Result<Channel, crate::tls::TlsError> {
        if let Some(channel) = self
            .lock()
            .get(&replica.runner_id)
            .filter(|owner| owner.replica.address == replica.address)
            .and_then(|owner| owner.channel.clone())
        {
            return Ok(channel);
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
        if let Some(owner) = self.lock().get_mut(&replica.runner_id)
            && owner.replica.address == replica.address
        {
            owner.channel = Some(channel.clone());
        }
        Ok(channel)
    }

    /// What a failed call to `reached` means for the caller. A call that did
    /// not reach it (or that it could not serve now) drops the channel; when
    /// the row was not read for this call, it is read again, so that an
    /// owner whose lease ran out is told apart from one that does not answer.
    async fn failed(
        &self,
        agent: &AgentRecord,
        reached: &Reached,
        status: tonic::Status,
    ) -> AgentError {
        use tonic::Code;
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                self.lock().remove(&reached.replica.runner_id);
                if !reached.fresh
                    && let Ok(replica) = self.read_row(agent).await
                    && replica.state_at(crate::clock::now_ms()) != "serving"
                {
                    return AgentError::OwnerLost {
                        agent_id: agent.id.clone(),
                        runner_id: agent.runner_id.clone(),
                    };
                }
                unavailable(agent, &reached.replica, status.message().to_owned())
            }
            _ => AgentError::Forwarded(status),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owner>> {
        self.owners
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    async fn kill_there(
        &self,
        agent: &AgentRecord,
        reason: &str,
    ) -> Result<AgentRecord, AgentError> {
        let mut reached = self.owner(agent).await?;
        let request = pb::KillAgentRequest {
            agent_id: agent.id.clone(),
            reason: reason.to_owned(),
        };
        let answer = match reached.client.kill_agent(request).await {
            Ok(answer) => answer,
            Err(status) => return Err(self.failed(agent, &reached, status).await),
        };
        answer
            .into_inner()
            .agent
            .map(agent_from_proto)
            .ok_or_else(|| {
                unavailable(
                    agent,
                    &reached.replica,
                    "it answered without the agent".to_owned(),
                )
            })
    }

    /// A kill sent to the replica `runner_id` on `channel` because the
    /// agent's id carries its tag. It gets [`TAGGED_CALL_TIMEOUT`]: the
    /// caller falls back to looking the agent up, which has its own
    /// deadline, so a stuck replica costs little twice.
    async fn kill_at(
        &self,
        runner_id: String,
        channel: Channel,
        agent_id: &str,
        reason: &str,
    ) -> Result<AgentRecord, AgentError> {
        let mut request = tonic::Request::new(pb::KillAgentRequest {
            agent_id: agent_id.to_owned(),
            reason: reason.to_owned(),
        });
        request.set_timeout(TAGGED_CALL_TIMEOUT);
        match ReplicaClient::new(channel).kill_agent(request).await {
            Ok(answer) => answer
                .into_inner()
                .agent
                .map(agent_from_proto)
                .ok_or_else(|| {
                    AgentError::Forwarded(tonic::Status::unavailable(
                        "it answered without the agent",
                    ))
                }),
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) {
                    self.lock().remove(&runner_id);
                }
                Err(AgentError::Forwarded(status))
            }
        }
    }

    async fn watch_there(
        &self,
        agent: &AgentRecord,
        include_output: bool,
        from: WatchFrom,
    ) -> Result<EventStream, AgentError> {
        let mut reached = self.owner(agent).await?;
        let from_sequence = match from {
            WatchFrom::Now => None,
            WatchFrom::Sequence(sequence) => Some(sequence),
        };
        let request = pb::WatchAgentRequest {
            agent_id: agent.id.clone(),
            include_output,
            from_sequence,
        };
        let answer = match reached.client.watch_agent(request).await {
            Ok(answer) => answer,
            Err(status) => return Err(self.failed(agent, &reached, status).await),
        };
        let replica = reached.replica;
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
        let mut reached = self.owner(agent).await?;
        let request = pb::ReadAgentOutputRequest {
            agent_id: agent.id.clone(),
            offset,
            max_bytes,
        };
        let answer = match reached.client.read_agent_output(request).await {
            Ok(answer) => answer,
            Err(status) => return Err(self.failed(agent, &reached, status).await),
        };
        answer
            .into_inner()
            .output
            .map(output_chunk_from_proto)
            .ok_or_else(|| {
                unavailable(
                    agent,
                    &reached.replica,
                    "it answered without the output".to_owned(),
                )
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

    fn kill_tagged<'a>(
        &'a self,
        agent_id: &'a str,
        tag: [u8; 4],
        reason: &'a str,
    ) -> Option<BoxFuture<'a, Result<AgentRecord, AgentError>>> {
        let (runner_id, channel) = self.lock().values().find_map(|owner| {
            let channel = owner.channel.clone()?;
            (super::runner::runner_tag(&owner.replica.runner_id) == Some(tag))
                .then(|| (owner.replica.runner_id.clone(), channel))
        })?;
        Some(Box::pin(self.kill_at(runner_id, channel, agent_id, reason)))
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
