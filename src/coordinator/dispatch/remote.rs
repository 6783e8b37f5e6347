//! `DispatchJob` to a federated peer: the job is created in the workspace of
//! the connection with the peer, the agent is started there by a signed
//! `agent.spawn` whose message id is derived from the job id (so a retry, or
//! a restart in the middle, re-sends the same signed bytes and the peer starts
//! at most one agent), and the job then follows the remote agent through a
//! signed `agent.watch` stream (polling with `agent.status` only while the
//! stream cannot be held), also across a restart.

use std::sync::Arc;
use std::time::Duration;

use super::followers::{Followers, Work};
use super::{DispatchRequest, Dispatched, SYSTEM_ACTOR, job_change_for};
use crate::agents::{AgentRecord, AgentState, Origin};
use crate::coordinator::CoordinatorError;
use crate::coordinator::jobs::Jobs;
use crate::coordinator::state::{JobChange, JobState};
use crate::federation::{Federation, FederationError};
use crate::proto::agent as agent_pb;
use crate::proto::federation as pb;
use crate::store::{CommandLogRecord, JobRecord, Store};

/// Longest wait between two polls while the peer cannot be reached.
const MAX_POLL_BACKOFF: Duration = Duration::from_secs(60);

/// What a remote dispatch needs besides the jobs: the federation that signs
/// and sends commands, the store holding the command log, and how often the
/// remote agent is polled.
#[derive(Clone)]
pub struct RemoteDispatch {
    /// Signs and sends the commands.
    pub federation: Arc<Federation>,
    /// The database (the command log keeps the signed spawn for retries).
    pub store: Store,
    /// Time between two polls of a remote agent while the peer answers.
    pub poll_interval: Duration,
    /// How long a signed spawn can still reach the peer's stored result (the
    /// longer of the message lifetime and the clock window): a spawn the peer
    /// has not answered in that time is given up.
    pub spawn_valid_for: Duration,
    /// The follow-up tasks of this process (see [`super::followers`]).
    pub followers: Followers,
}

impl RemoteDispatch {
    /// Dispatch through `federation`, keeping the signed spawns in `store`,
    /// with the configured poll interval and message lifetimes.
    pub fn new(
        federation: Arc<Federation>,
        store: Store,
        config: &crate::config::Config,
        followers: Followers,
    ) -> RemoteDispatch {
        RemoteDispatch {
            federation,
            store,
            poll_interval: config.coordinator.remote_agent_poll,
            spawn_valid_for: config
                .federation
                .message_lifetime
                .max(config.federation.clock_window),
            followers,
        }
    }
}

/// The message id of the signed `agent.spawn` for `job_id`: the same for
/// every attempt, so the peer never runs the spawn twice.
pub fn spawn_message_id(job_id: &str) -> String {
    format!("dispatch-{job_id}")
}

/// Creates the job in the workspace of the connection with the peer, starts
/// the agent on the peer and links them. Nothing is written when there is no
/// ACTIVE connection with the peer. When the peer refuses the spawn, the job
/// is FAILED with the peer's reason and the peer's code is returned; when the
/// peer cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED), that error is
/// returned, the job stays PENDING, and the same signed command is sent again
/// in the background ([`finish_spawn`]) and by a retry with the same
/// idempotency key.
pub async fn dispatch(
    jobs: &Jobs,
    peers: &RemoteDispatch,
    mut request: DispatchRequest,
    actor: &str,
) -> Result<Dispatched, CoordinatorError> {
    // A retry finds its job even if the connection has changed since.
    if !request.job.idempotency_key.is_empty()
        && let Some(existing) = peers
            .store
            .find_job_by_idempotency_key(&request.job.idempotency_key)
            .await?
    {
        return redispatch(jobs, peers, existing).await;
    }
    let peer = request.peer_instance_id.clone();
    let workspace = peers
        .federation
        .command_workspace(&peer, Some(&request.job.workspace))
        .await?;
    request.job.workspace.clone_from(&workspace);
    let (job, created) = jobs.create(request.job.clone(), actor).await?;
    if !created {
        return redispatch(jobs, peers, job).await;
    }
    let command = pb::command_payload::Command::AgentSpawn(pb::AgentSpawnCommand {
        spawn: Some(agent_pb::SpawnRequest {
            agent_type: request.agent_type,
            prompt: request.prompt,
            task_id: job.id.clone(),
            labels: request.job.labels.into_iter().collect(),
            timeout_seconds: None,
        }),
    });
    let job_id = job.id.clone();
    match start(jobs, peers, job, &peer, &workspace, command).await {
        Ok(dispatched) => Ok(Dispatched {
            created: true,
            ..dispatched
        }),
        Err(CoordinatorError::Federation(error)) if spawn_may_have_happened(&error) => {
            // This call's own follow-up, on whichever replica took it.
            peers.followers.start(
                Work::Spawn,
                &job_id,
                false,
                finish_spawn(jobs.clone(), peers.clone(), job_id.clone()),
            );
            Err(error.into())
        }
        Err(error) => Err(error),
    }
}

/// An earlier dispatch with the same idempotency key. A job that an earlier
/// call left PENDING after sending its spawn (the peer could not be reached,
/// or the daemon stopped) gets the same signed spawn again; any other job is
/// returned as it is.
async fn redispatch(
    jobs: &Jobs,
    peers: &RemoteDispatch,
    job: JobRecord,
) -> Result<Dispatched, CoordinatorError> {
    let unfinished = job.state == JobState::Pending && job.agent_id.is_empty();
    let sent = if unfinished {
        peers
            .store
            .find_outbound_command(&spawn_message_id(&job.id))
            .await?
    } else {
        None
    };
    let Some(sent) = sent else {
        let agent_id = job.agent_id.clone();
        return Ok(Dispatched {
            job,
            agent_id,
            created: false,
        });
    };
    let command = sent_command(&sent)?;
    let dispatched = start(
        jobs,
        peers,
        job,
        &sent.recipient_instance_id,
        &sent.workspace,
        command,
    )
    .await?;
    Ok(Dispatched {
        created: false,
        ..dispatched
    })
}

/// The command inside a logged outbound signed command.
fn sent_command(sent: &CommandLogRecord) -> Result<pb::command_payload::Command, CoordinatorError> {
    use prost::Message as _;
    sent.envelope
        .as_ref()
        .and_then(|envelope| pb::CommandPayload::decode(envelope.payload.as_slice()).ok())
        .and_then(|payload| payload.command)
        .ok_or_else(|| {
            CoordinatorError::Federation(FederationError::Internal(format!(
                "the logged command {} does not decode",
                sent.message_id
            )))
        })
}

/// Sends the spawn (under the job's message id), attaches the agent to the
/// job and starts following it.
async fn start(
    jobs: &Jobs,
    peers: &RemoteDispatch,
    job: JobRecord,
    peer: &str,
    workspace: &str,
    command: pb::command_payload::Command,
) -> Result<Dispatched, CoordinatorError> {
    let message_id = spawn_message_id(&job.id);
    let sent = peers
        .federation
        .send_command(peer, Some(workspace), command, Some(&message_id))
        .await;
    let agent = match sent {
        Ok((_, pb::command_result_payload::Outcome::Agent(agent))) => agent,
        Ok((_, _)) => {
            let error = FederationError::BadReply(
                "the peer answered agent.spawn with something other than an agent".into(),
            );
            fail_job(
                jobs,
                &job.id,
                format!("the agent could not be started on peer {peer}: {error}"),
            )
            .await;
            return Err(error.into());
        }
        Err(error) if spawn_may_have_happened(&error) => {
            tracing::warn!(job.id = %job.id, peer.id = %peer, %error, "the peer did not confirm the spawn; the job stays PENDING and the same signed spawn is sent again");
            return Err(error.into());
        }
        Err(error) => {
            fail_job(
                jobs,
                &job.id,
                format!("the agent could not be started on peer {peer}: {error}"),
            )
            .await;
            return Err(error.into());
        }
    };
    tracing::info!(job.id = %job.id, agent.id = %agent.agent_id, peer.id = %peer, "job dispatched to an agent on a peer");
    let attach = JobChange::AttachAgent {
        agent_id: agent.agent_id.clone(),
        peer_instance_id: peer.to_owned(),
    };
    let attached = match jobs.change(&job.id, attach, SYSTEM_ACTOR).await {
        Ok(attached) => attached,
        Err(error) => {
            // A concurrent retry attached the same agent first: that call
            // follows it.
            let current = jobs.get(&job.id).await?;
            if current.agent_id == agent.agent_id {
                return Ok(Dispatched {
                    job: current,
                    agent_id: agent.agent_id,
                    created: false,
                });
            }
            // The job was cancelled or failed in the meantime: the agent has
            // nothing to work for.
            stop_remote_agent(
                Arc::clone(&peers.federation),
                peer.to_owned(),
                workspace.to_owned(),
                agent.agent_id.clone(),
                "its job ended before it started".to_owned(),
            );
            return Err(error);
        }
    };
    // Polled from here if this replica follows the remote dispatches, else
    // by the one that does, from its next scan.
    follow_job(jobs, peers, attached.clone());
    Ok(Dispatched {
        job: attached,
        agent_id: agent.agent_id,
        created: true,
    })
}

/// True for the failures after which the peer may have run the spawn without
/// our learning it (the call or its reply was lost): the job must not be
/// failed, since the same signed spawn sent again gets the peer's answer.
/// A refusal carried in the peer's signed result is final (the peer stores
/// it and answers it again to a retry).
fn spawn_may_have_happened(error: &FederationError) -> bool {
    matches!(
        error,
        FederationError::PeerUnreachable(_)
            | FederationError::PeerTimedOut(_)
            | FederationError::BadReply(_)
            | FederationError::Internal(_)
            | FederationError::Store(_)
    )
}

async fn fail_job(jobs: &Jobs, job_id: &str, error: String) {
    if let Err(marking) = jobs
        .change(job_id, JobChange::Fail { error }, SYSTEM_ACTOR)
        .await
    {
        tracing::warn!(job.id = %job_id, error = %marking, "could not mark the job failed");
    }
}

/// Asks the peer to stop an agent, in the background (best effort: a peer
/// that cannot be reached keeps it until it ends or times out).
pub fn stop_remote_agent(
    federation: Arc<Federation>,
    peer: String,
    workspace: String,
    agent_id: String,
    reason: String,
) {
    tokio::spawn(async move {
        let command = pb::command_payload::Command::AgentKill(pb::AgentKillCommand {
            agent_id: agent_id.clone(),
            reason,
        });
        if let Err(error) = federation
            .send_command(&peer, Some(&workspace), command, None)
            .await
        {
            tracing::warn!(agent.id = %agent_id, peer.id = %peer, %error, "could not stop an agent on a peer");
        }
    });
}

/// Sends the job's logged signed spawn again until the peer answers it (then
/// the job follows the agent, or is FAILED with the peer's refusal), backing
/// off while the peer cannot be reached. Stops when the job no longer waits
/// for its agent (a retried DispatchJob attached it, or it was cancelled),
/// and at shutdown (the next start resumes). Once the signed spawn can no
/// longer reach the peer, the job is FAILED.
async fn finish_spawn(jobs: Jobs, peers: RemoteDispatch, job_id: String) {
    let mut shutdown = jobs.shutdown_signal();
    let mut delay = peers.poll_interval;
    let message_id = spawn_message_id(&job_id);
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        delay = backoff(delay, peers.poll_interval);
        let job = match jobs.get(&job_id).await {
            Ok(job) => job,
            Err(CoordinatorError::NotFound(_)) => return,
            Err(error) => {
                tracing::debug!(job.id = %job_id, %error, "cannot read the job; trying again");
                continue;
            }
        };
        if job.state != JobState::Pending || !job.agent_id.is_empty() {
            return;
        }
        let sent = match peers.store.find_outbound_command(&message_id).await {
            Ok(Some(sent)) => sent,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(job.id = %job_id, %error, "cannot read the logged spawn; trying again");
                continue;
            }
        };
        let valid_ms = i64::try_from(peers.spawn_valid_for.as_millis()).unwrap_or(i64::MAX);
        if crate::clock::now_ms() > sent.issued_at_ms.saturating_add(valid_ms) {
            fail_job(
                &jobs,
                &job_id,
                format!(
                    "peer {} could not be reached to start the agent before the signed agent.spawn {message_id} expired",
                    sent.recipient_instance_id
                ),
            )
            .await;
            return;
        }
        let command = match sent_command(&sent) {
            Ok(command) => command,
            Err(error) => {
                fail_job(&jobs, &job_id, error.to_string()).await;
                return;
            }
        };
        match start(
            &jobs,
            &peers,
            job,
            &sent.recipient_instance_id,
            &sent.workspace,
            command,
        )
        .await
        {
            Err(CoordinatorError::Federation(error)) if spawn_may_have_happened(&error) => {}
            // Started and followed, or refused (the job is FAILED).
            _ => return,
        }
    }
}

/// When this replica takes the following of remote dispatches over (at
/// start, or from a replica that stopped): the jobs that a dispatch left
/// PENDING after logging its signed spawn, recently enough for the spawn to
/// still reach the peer, get it sent again (see [`finish_spawn`]).
pub async fn resume_spawns(jobs: &Jobs, peers: &RemoteDispatch) -> Result<usize, CoordinatorError> {
    let valid_ms = i64::try_from(peers.spawn_valid_for.as_millis()).unwrap_or(i64::MAX);
    let since = crate::clock::now_ms().saturating_sub(valid_ms);
    let mut count = 0;
    for job in jobs.pending_jobs_without_agent_since(since).await? {
        if peers
            .store
            .find_outbound_command(&spawn_message_id(&job.id))
            .await?
            .is_some()
            && peers.followers.start(
                Work::Spawn,
                &job.id,
                true,
                finish_spawn(jobs.clone(), peers.clone(), job.id.clone()),
            )
        {
            count += 1;
        }
    }
    Ok(count)
}

/// Follows `job`'s remote agent until it ends, if this replica follows the
/// remote dispatches and does not follow it already. True if it started.
pub fn follow_job(jobs: &Jobs, peers: &RemoteDispatch, job: JobRecord) -> bool {
    let task = follow(
        jobs.clone(),
        peers.clone(),
        job.id.clone(),
        job.peer_instance_id,
        job.workspace,
        job.agent_id,
    );
    peers.followers.start(Work::Follow, &job.id, true, task)
}

/// Follows the remote agent until it has ended, then ends the job the same
/// way: through a signed `agent.watch` stream, whose end arrives as soon as
/// the agent ends (one command per stream, not one per poll). While the
/// stream cannot be held, one signed `agent.status` poll stands in for it
/// before the stream is tried again, the wait doubling up to
/// [`MAX_POLL_BACKOFF`]; the job stays RUNNING meanwhile. A peer that no
/// longer knows the agent fails the job. Stops when the job has ended
/// otherwise (cancelled, failed by a caller) and when the daemon shuts down
/// (the next start resumes).
async fn follow(
    jobs: Jobs,
    peers: RemoteDispatch,
    job_id: String,
    peer: String,
    workspace: String,
    agent_id: String,
) {
    let mut shutdown = jobs.shutdown_signal();
    let remote = RemoteAgent {
        peers: &peers,
        job_id: &job_id,
        peer: &peer,
        workspace: &workspace,
        agent_id: &agent_id,
    };
    let mut delay = Duration::ZERO;
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        match jobs.get(&job_id).await {
            Ok(job) if job.state.is_terminal() => return,
            Ok(_) => {}
            Err(CoordinatorError::NotFound(_)) => return,
            Err(error) => {
                tracing::debug!(job.id = %job_id, %error, "cannot read the job; trying again");
                delay = backoff(delay, peers.poll_interval);
                continue;
            }
        }
        let learned = tokio::select! {
            learned = remote.watch() => learned,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        let learned = match learned {
            Learned::Unknown(cause) => {
                // The stream could not be held: poll once in its place.
                tracing::debug!(job.id = %job_id, agent.id = %agent_id, peer.id = %peer, error = %cause, "cannot follow a remote agent's stream; polling it instead");
                remote.poll().await
            }
            learned => learned,
        };
        let change = match learned {
            Learned::Ended(change) => change,
            Learned::StillRunning => {
                failures = 0;
                delay = peers.poll_interval;
                continue;
            }
            Learned::Unknown(cause) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(job.id = %job_id, agent.id = %agent_id, peer.id = %peer, failures, error = %cause, "cannot get the state of a remote agent; the job stays RUNNING and is followed again");
                }
                delay = backoff(delay, peers.poll_interval);
                continue;
            }
        };
        match jobs.change(&job_id, change, SYSTEM_ACTOR).await {
            Ok(job) => {
                tracing::info!(job.id = %job_id, agent.id = %agent_id, peer.id = %peer, job.state = %job.state, "job ended with its remote agent");
                return;
            }
            Err(CoordinatorError::Transition(_)) => {
                tracing::debug!(job.id = %job_id, "the job had already ended before its remote agent");
                return;
            }
            Err(error) => {
                tracing::warn!(job.id = %job_id, %error, "could not end the job with its remote agent; trying again");
                delay = backoff(delay, peers.poll_interval);
            }
        }
    }
}

/// A job's agent on a peer.
struct RemoteAgent<'a> {
    peers: &'a RemoteDispatch,
    job_id: &'a str,
    peer: &'a str,
    workspace: &'a str,
    agent_id: &'a str,
}

/// What following a remote agent for a while found out.
enum Learned {
    /// It has ended, or is gone: the job's change.
    Ended(JobChange),
    /// It still runs.
    StillRunning,
    /// Its state could not be had (why).
    Unknown(String),
}

impl RemoteAgent<'_> {
    /// Follows the agent's state changes (no output) from its current state
    /// until it ends or the stream cannot go on.
    async fn watch(&self) -> Learned {
        use futures::StreamExt as _;
        let watch = crate::federation::commands::RemoteWatch {
            peer_instance_id: self.peer.to_owned(),
            workspace: Some(self.workspace.to_owned()),
            agent_id: self.agent_id.to_owned(),
            include_output: false,
            from_sequence: None,
        };
        let mut events = match self.peers.federation.watch_remote(watch).await {
            Ok(events) => events,
            Err(error) => return self.failed(error),
        };
        while let Some(batch) = events.next().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => return self.failed(error),
            };
            for event in batch {
                if let Some(agent_pb::watch_agent_response::Event::StateChange(change)) =
                    event.event
                    && let Some(ended) = change.agent.as_ref().and_then(ended_agent)
                {
                    return Learned::Ended(remote_job_change(&ended, self.peer));
                }
            }
        }
        Learned::Unknown("the stream ended before the agent did".to_owned())
    }

    /// One signed `agent.status` of the agent.
    async fn poll(&self) -> Learned {
        let command = pb::command_payload::Command::AgentStatus(pb::AgentStatusCommand {
            agent_id: self.agent_id.to_owned(),
        });
        match self
            .peers
            .federation
            .send_command(self.peer, Some(self.workspace), command, None)
            .await
        {
            Ok((_, pb::command_result_payload::Outcome::Agent(agent))) => match ended_agent(&agent)
            {
                Some(ended) => Learned::Ended(remote_job_change(&ended, self.peer)),
                None => Learned::StillRunning,
            },
            Ok(_) => Learned::Unknown(
                "the peer answered agent.status with something other than an agent".to_owned(),
            ),
            Err(error) => self.failed(error),
        }
    }

    /// A failed watch or poll: NOT_FOUND from the peer fails the job (the
    /// agent is not known there any more); anything else may pass.
    fn failed(&self, error: FederationError) -> Learned {
        match error {
            FederationError::Peer(status) if status.code() == tonic::Code::NotFound => {
                Learned::Ended(JobChange::Fail {
                    error: format!(
                        "agent {} on peer {} is not known there any more: {}",
                        self.agent_id,
                        self.peer,
                        status.message()
                    ),
                })
            }
            other => {
                tracing::debug!(job.id = %self.job_id, error = %other, "following a remote agent failed");
                Learned::Unknown(other.to_string())
            }
        }
    }
}

/// The next wait after a failed poll: double, at least the poll interval, at
/// most [`MAX_POLL_BACKOFF`] (or the interval, when that is longer).
fn backoff(delay: Duration, interval: Duration) -> Duration {
    delay
        .saturating_mul(2)
        .max(interval)
        .min(MAX_POLL_BACKOFF.max(interval))
}

/// The remote agent as a record, if it has ended; `None` while it runs.
fn ended_agent(agent: &agent_pb::Agent) -> Option<AgentRecord> {
    let state = match agent.state() {
        agent_pb::AgentState::Completed => AgentState::Completed,
        agent_pb::AgentState::Failed => AgentState::Failed,
        agent_pb::AgentState::Killed => AgentState::Killed,
        agent_pb::AgentState::TimedOut => AgentState::TimedOut,
        agent_pb::AgentState::Unspecified
        | agent_pb::AgentState::Spawning
        | agent_pb::AgentState::Running => return None,
    };
    Some(AgentRecord {
        id: agent.agent_id.clone(),
        agent_type: agent.agent_type.clone(),
        state,
        state_reason: agent.state_reason.clone(),
        prompt: String::new(),
        task_id: agent.task_id.clone(),
        labels: Default::default(),
        origin: Origin::Local,
        runner_id: String::new(),
        pid: None,
        exit_code: agent.exit_code,
        signal: agent.signal,
        output_tail: agent.output_tail.clone(),
        output_bytes: agent.output_bytes,
        output_truncated: agent.output_truncated,
        timeout_secs: agent.timeout_seconds,
        created_at_ms: 0,
        started_at_ms: None,
        ended_at_ms: None,
        updated_at_ms: 0,
    })
}

/// The job change that mirrors an ended remote agent: as for a local agent,
/// with the peer named in the error.
fn remote_job_change(agent: &AgentRecord, peer: &str) -> JobChange {
    match job_change_for(agent) {
        JobChange::Fail { error } => JobChange::Fail {
            error: error.replacen(
                &format!("agent {}", agent.id),
                &format!("agent {} on peer {peer}", agent.id),
                1,
            ),
        },
        change => change,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(state: agent_pb::AgentState, exit_code: Option<i32>) -> agent_pb::Agent {
        agent_pb::Agent {
            agent_id: "agent-9".to_owned(),
            state: state.into(),
            state_reason: "why".to_owned(),
            exit_code,
            output_tail: vec!["out".to_owned()],
            ..agent_pb::Agent::default()
        }
    }

    #[test]
    fn a_running_remote_agent_changes_nothing() {
        for state in [
            agent_pb::AgentState::Unspecified,
            agent_pb::AgentState::Spawning,
            agent_pb::AgentState::Running,
        ] {
            assert!(ended_agent(&remote(state, None)).is_none(), "{state:?}");
        }
    }

    #[test]
    fn an_ended_remote_agent_ends_the_job_naming_the_peer() {
        let completed =
            ended_agent(&remote(agent_pb::AgentState::Completed, Some(0))).expect("ended");
        let JobChange::Complete { result_json } = remote_job_change(&completed, "peer-b") else {
            panic!("expected Complete");
        };
        let result: serde_json::Value = serde_json::from_str(&result_json).expect("json");
        assert_eq!(result["agent_id"], "agent-9");
        assert_eq!(result["exit_code"], 0);
        assert_eq!(result["output_tail"], serde_json::json!(["out"]));

        let failed = ended_agent(&remote(agent_pb::AgentState::Failed, Some(3))).expect("ended");
        let JobChange::Fail { error } = remote_job_change(&failed, "peer-b") else {
            panic!("expected Fail");
        };
        assert!(
            error.starts_with("agent agent-9 on peer peer-b ended FAILED (exit code 3)"),
            "{error}"
        );
    }

    #[test]
    fn the_spawn_message_id_is_a_valid_message_id_derived_from_the_job() {
        let job_id = uuid::Uuid::now_v7().to_string();
        let id = spawn_message_id(&job_id);
        assert_eq!(id, spawn_message_id(&job_id));
        assert!(id.len() <= 128);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        );
    }

    #[test]
    fn polls_back_off_to_a_ceiling() {
        let interval = Duration::from_secs(2);
        let mut delay = interval;
        for _ in 0..20 {
            delay = backoff(delay, interval);
        }
        assert_eq!(delay, MAX_POLL_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, interval), interval);
        let long = Duration::from_secs(600);
        assert_eq!(backoff(long, long), long);
    }

    #[test]
    fn only_lost_calls_leave_the_spawn_undecided() {
        assert!(spawn_may_have_happened(&FederationError::PeerUnreachable(
            "down".into()
        )));
        assert!(spawn_may_have_happened(&FederationError::PeerTimedOut(
            "slow".into()
        )));
        assert!(!spawn_may_have_happened(&FederationError::Peer(
            tonic::Status::invalid_argument("unknown agent type")
        )));
        assert!(!spawn_may_have_happened(&FederationError::WrongState(
            "no connection".into()
        )));
    }
}
