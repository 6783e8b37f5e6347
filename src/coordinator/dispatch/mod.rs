//! `DispatchJob`: a job and a local agent started for it, linked so that the
//! job follows the agent's end state (COMPLETED when the agent completes,
//! FAILED when it fails, is killed or times out), also across a restart. A
//! dispatch to a peer is in [`remote`].

pub mod followers;
pub mod following;
pub mod remote;

use std::sync::Arc;

use futures::StreamExt as _;

use self::remote::RemoteDispatch;
use super::CoordinatorError;
use super::jobs::{Jobs, NewJob};
use super::state::JobChange;
use crate::agents::{
    AgentEvent, AgentRecord, AgentRuntime, AgentState, Origin, SequencedEvent, SpawnSpec, WatchFrom,
};
use crate::config::Config;
use crate::store::JobRecord;

/// Who the history names for changes the coordinator makes itself.
pub const SYSTEM_ACTOR: &str = "system";

/// Bytes of the agent's output tail kept in a completed job's result, so the
/// result stays far below the payload limit whatever the agent printed.
const RESULT_TAIL_BYTES: usize = 16 * 1024;

/// A dispatch as the caller asked for it.
#[derive(Clone, Debug, Default)]
pub struct DispatchRequest {
    /// The job to create (its idempotency key makes the dispatch idempotent).
    pub job: NewJob,
    /// A configured agent type.
    pub agent_type: String,
    /// The agent's prompt.
    pub prompt: String,
    /// A federated peer to run the agent on; empty for this instance.
    pub peer_instance_id: String,
}

/// What a dispatch produced.
#[derive(Clone, Debug)]
pub struct Dispatched {
    /// The job, RUNNING with the agent recorded (or already following its end).
    pub job: JobRecord,
    /// The agent started for it.
    pub agent_id: String,
    /// False when the idempotency key matched an earlier dispatch.
    pub created: bool,
}

/// Creates the job, starts the agent and links them. If the agent cannot be
/// started, the job is marked FAILED with the reason and the spawn's error is
/// returned.
pub async fn dispatch(
    jobs: &Jobs,
    agents: &Arc<AgentRuntime>,
    peers: &RemoteDispatch,
    config: &Config,
    request: DispatchRequest,
    actor: &str,
) -> Result<Dispatched, CoordinatorError> {
    if request.agent_type.trim().is_empty() {
        return Err(CoordinatorError::Invalid(
            "agent_type is required".to_owned(),
        ));
    }
    crate::agents::command::check_labels(&request.job.labels).map_err(CoordinatorError::Invalid)?;
    if !request.peer_instance_id.is_empty() {
        // The peer checks the agent type against its own configuration.
        return remote::dispatch(jobs, peers, request, actor).await;
    }
    // Refused before the job exists, so a typo leaves no failed job behind.
    if !config.agents.types.contains_key(&request.agent_type) {
        return Err(CoordinatorError::Invalid(format!(
            "unknown agent type {:?}; configure [agents.types.{}]",
            request.agent_type, request.agent_type
        )));
    }

    let (job, created) = jobs.create(request.job.clone(), actor).await?;
    if !created {
        let agent_id = job.agent_id.clone();
        return Ok(Dispatched {
            job,
            agent_id,
            created: false,
        });
    }
    let spec = SpawnSpec {
        agent_type: request.agent_type,
        prompt: request.prompt,
        task_id: job.id.clone(),
        labels: request.job.labels,
        timeout: None,
        origin: Origin::Local,
    };
    let agent = match agents.spawn(spec).await {
        Ok(agent) => agent,
        Err(error) => {
            let reason = format!("the agent could not be started: {error}");
            if let Err(marking) = jobs
                .change(&job.id, JobChange::Fail { error: reason }, SYSTEM_ACTOR)
                .await
            {
                tracing::warn!(job.id = %job.id, error = %marking, "could not mark the job failed");
            }
            return Err(CoordinatorError::Agent(error));
        }
    };
    tracing::info!(job.id = %job.id, agent.id = %agent.id, "job dispatched to a local agent");
    let attach = JobChange::AttachAgent {
        agent_id: agent.id.clone(),
        peer_instance_id: String::new(),
    };
    let job = match jobs.change(&job.id, attach, SYSTEM_ACTOR).await {
        Ok(job) => job,
        Err(error) => {
            // The job was cancelled or failed in the meantime: the agent has
            // nothing to work for.
            if let Err(kill) = agents
                .kill(&agent.id, "its job ended before it started")
                .await
            {
                tracing::warn!(agent.id = %agent.id, error = %kill, "could not stop the agent");
            }
            return Err(error);
        }
    };
    tokio::spawn(follow_agent(
        jobs.clone(),
        Arc::clone(agents),
        job.id.clone(),
        agent.id.clone(),
    ));
    Ok(Dispatched {
        job,
        agent_id: agent.id,
        created: true,
    })
}

/// Cancels a job and stops its agent, if it has one (best effort: the job is
/// CANCELLED whether or not the agent could be stopped). An agent on a peer
/// is asked to stop with a signed `agent.kill`, in the background.
pub async fn cancel(
    jobs: &Jobs,
    agents: &AgentRuntime,
    peers: &RemoteDispatch,
    job_id: &str,
    reason: String,
    actor: &str,
) -> Result<JobRecord, CoordinatorError> {
    let job = jobs
        .change(job_id, JobChange::Cancel { reason }, actor)
        .await?;
    if job.agent_id.is_empty() {
        return Ok(job);
    }
    if !job.peer_instance_id.is_empty() {
        remote::stop_remote_agent(
            Arc::clone(&peers.federation),
            job.peer_instance_id.clone(),
            job.workspace.clone(),
            job.agent_id.clone(),
            "its job was cancelled".to_owned(),
        );
    } else if let Err(error) = agents.kill(&job.agent_id, "its job was cancelled").await {
        tracing::warn!(job.id = %job.id, agent.id = %job.agent_id, %error, "could not stop the agent of a cancelled job");
    }
    Ok(job)
}

/// Follows the local agents of RUNNING jobs again, after a restart: each
/// job ends as its agent did (at once for an agent the restart settled).
/// Remote agents are followed by [`following`].
pub async fn resume_following(
    jobs: &Jobs,
    agents: &Arc<AgentRuntime>,
) -> Result<usize, CoordinatorError> {
    let running = jobs.running_jobs_with_local_agents().await?;
    let count = running.len();
    for job in running {
        tokio::spawn(follow_agent(
            jobs.clone(),
            Arc::clone(agents),
            job.id,
            job.agent_id,
        ));
    }
    if count > 0 {
        tracing::info!(jobs = count, "following the agents of running jobs again");
    }
    Ok(count)
}

/// Waits for the agent to end, then ends the job the same way. A job that
/// has already ended (cancelled, failed by a caller) is left as it is.
async fn follow_agent(jobs: Jobs, agents: Arc<AgentRuntime>, job_id: String, agent_id: String) {
    let mut events = match agents.watch(&agent_id, false, WatchFrom::Now).await {
        Ok(events) => events,
        Err(error) => {
            tracing::warn!(job.id = %job_id, agent.id = %agent_id, %error, "cannot follow the agent of a job");
            return;
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(SequencedEvent {
                event: AgentEvent::StateChanged { agent, .. },
                ..
            }) if agent.state.is_terminal() => {
                let change = job_change_for(&agent);
                match jobs.change(&job_id, change, SYSTEM_ACTOR).await {
                    Ok(job) => tracing::info!(
                        job.id = %job_id,
                        agent.id = %agent_id,
                        job.state = %job.state,
                        "job ended with its agent"
                    ),
                    Err(CoordinatorError::Transition(_)) => tracing::debug!(
                        job.id = %job_id,
                        "the job had already ended before its agent"
                    ),
                    Err(error) => tracing::warn!(
                        job.id = %job_id,
                        %error,
                        "could not end the job with its agent; it is followed again at the next start"
                    ),
                }
                return;
            }
            Ok(_) => {}
            // Interrupted (shutdown) or a store error: the next start resumes.
            Err(error) => {
                tracing::debug!(job.id = %job_id, %error, "stopped following the agent");
                return;
            }
        }
    }
}

/// The job change that mirrors an ended agent.
pub fn job_change_for(agent: &AgentRecord) -> JobChange {
    match agent.state {
        AgentState::Completed => JobChange::Complete {
            result_json: agent_result_json(agent),
        },
        state => {
            let mut error = format!("agent {} ended {state}", agent.id);
            if let Some(code) = agent.exit_code {
                error.push_str(&format!(" (exit code {code})"));
            }
            if !agent.state_reason.is_empty() {
                error.push_str(&format!(": {}", agent.state_reason));
            }
            JobChange::Fail { error }
        }
    }
}

/// `{"agent_id", "exit_code", "output_tail"}`, the tail cut to its last
/// `RESULT_TAIL_BYTES`.
fn agent_result_json(agent: &AgentRecord) -> String {
    let mut kept = Vec::new();
    let mut bytes = 0;
    for line in agent.output_tail.iter().rev() {
        bytes += line.len() + 1;
        if bytes > RESULT_TAIL_BYTES {
            break;
        }
        kept.push(line.as_str());
    }
    kept.reverse();
    serde_json::json!({
        "agent_id": agent.id,
        "exit_code": agent.exit_code,
        "output_tail": kept,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(state: AgentState, exit_code: Option<i32>, tail: Vec<String>) -> AgentRecord {
        AgentRecord {
            id: "agent-1".to_owned(),
            agent_type: "sh".to_owned(),
            state,
            state_reason: String::new(),
            prompt: String::new(),
            task_id: "job-1".to_owned(),
            labels: Default::default(),
            origin: Origin::Local,
            runner_id: "runner".to_owned(),
            pid: None,
            exit_code,
            signal: None,
            output_tail: tail,
            output_bytes: 0,
            output_truncated: false,
            timeout_secs: 60,
            created_at_ms: 0,
            started_at_ms: None,
            ended_at_ms: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_completed_agent_completes_the_job_with_its_exit_code_and_tail() {
        let change = job_change_for(&agent(
            AgentState::Completed,
            Some(0),
            vec!["hello".to_owned()],
        ));
        let JobChange::Complete { result_json } = change else {
            panic!("expected Complete, got {change:?}");
        };
        let result: serde_json::Value = serde_json::from_str(&result_json).expect("json");
        assert_eq!(result["exit_code"], 0);
        assert_eq!(result["output_tail"], serde_json::json!(["hello"]));
    }

    #[test]
    fn every_other_end_fails_the_job_with_the_reason() {
        for state in [AgentState::Failed, AgentState::Killed, AgentState::TimedOut] {
            let mut ended = agent(state, Some(3), Vec::new());
            ended.state_reason = "why".to_owned();
            let JobChange::Fail { error } = job_change_for(&ended) else {
                panic!("expected Fail for {state}");
            };
            assert!(error.contains(state.as_str()), "{error}");
            assert!(
                error.contains("exit code 3") && error.contains("why"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_huge_tail_is_cut_to_its_end() {
        let tail: Vec<String> = (0..100)
            .map(|i| format!("{i:04}{}", "x".repeat(1000)))
            .collect();
        let result = agent_result_json(&agent(AgentState::Completed, Some(0), tail));
        assert!(result.len() < RESULT_TAIL_BYTES + 1024);
        assert!(result.contains("0099"));
        assert!(!result.contains("0000x"));
    }
}
