//! Nothing stranded: every replica looks, at each heartbeat, for replicas
//! whose lease ran out (no heartbeat for `replicas.lease_secs`), and the one
//! that takes such a replica over (marking it lost in its next epoch, one
//! conditional update, so exactly one replica does) settles its agents:
//! those still shown SPAWNING or RUNNING become FAILED "runner lost", and
//! their jobs end with them. Peers see the same through `agent.status`,
//! which reads the records.
//!
//! The lost replica's processes may still run on a host nobody can reach;
//! if the replica comes back, its heartbeat names the old epoch and is
//! refused, so it stops (see `server.rs`), and its restart stops every
//! process that carries its runner id. Its late writes change nothing: an
//! agent's transition applies only from the state it read, a job's end only
//! once.

use std::collections::HashMap;
use std::time::Duration;

use crate::agents::{AgentRecord, AgentState};
use crate::coordinator::dispatch::{SYSTEM_ACTOR, job_change_for};
use crate::coordinator::jobs::Jobs;
use crate::store::{Store, StoreError};

/// What one settlement did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// The replicas taken over, by runner id.
    pub replicas: Vec<String>,
    /// Their agents marked FAILED.
    pub agents: usize,
    /// The jobs that ended with them.
    pub jobs: usize,
}

/// Takes over every replica (other than `own_runner_id`) whose lease ran
/// out by `now_ms` and settles its agents and their jobs.
pub async fn settle_expired(
    store: &Store,
    jobs: &Jobs,
    own_runner_id: &str,
    now_ms: i64,
) -> Result<Settled, StoreError> {
    let mut settled = Settled::default();
    for (runner_id, epoch) in store.expired_replicas(own_runner_id, now_ms).await? {
        if !store.take_over_replica(&runner_id, epoch, now_ms).await? {
            // Another replica took it over first, or it came back.
            continue;
        }
        tracing::warn!(runner.id = %runner_id, replica.epoch = epoch, "a replica stopped renewing its lease; settling its agents");
        let failed = fail_agents(store, &runner_id, now_ms).await?;
        settled.agents += failed.len();
        settled.jobs += end_jobs(store, jobs, &failed).await?;
        settled.replicas.push(runner_id);
    }
    Ok(settled)
}

/// Marks every unfinished agent of `runner_id` FAILED "runner lost".
async fn fail_agents(
    store: &Store,
    runner_id: &str,
    now_ms: i64,
) -> Result<Vec<AgentRecord>, StoreError> {
    let mut failed = Vec::new();
    for agent in store.list_unfinished_agents(runner_id).await? {
        let mut ended = agent.clone();
        ended.state = AgentState::Failed;
        ended.state_reason = format!(
            "runner lost: replica {runner_id} stopped renewing its lease while the agent ran; its process may still run on that replica's host"
        );
        ended.ended_at_ms = Some(now_ms);
        ended.updated_at_ms = now_ms;
        match store.record_agent_transition(agent.state, &ended).await {
            Ok(()) => failed.push(ended),
            // It ended on its own in the meantime.
            Err(StoreError::Conflict(_)) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(failed)
}

/// Ends the RUNNING jobs that follow one of `failed`, as the agent did.
async fn end_jobs(store: &Store, jobs: &Jobs, failed: &[AgentRecord]) -> Result<usize, StoreError> {
    if failed.is_empty() {
        return Ok(0);
    }
    let by_id: HashMap<&str, &AgentRecord> = failed
        .iter()
        .map(|agent| (agent.id.as_str(), agent))
        .collect();
    let mut ended = 0;
    for job in store.running_jobs_with_local_agents().await? {
        let Some(agent) = by_id.get(job.agent_id.as_str()) else {
            continue;
        };
        match jobs
            .change(&job.id, job_change_for(agent), SYSTEM_ACTOR)
            .await
        {
            Ok(_) => ended += 1,
            Err(error) => {
                tracing::warn!(job.id = %job.id, %error, "could not end the job of a lost replica's agent");
            }
        }
    }
    Ok(ended)
}

/// Runs [`settle_expired`] every third of `lease` until the returned task
/// is aborted.
pub fn spawn(
    store: Store,
    jobs: Jobs,
    own_runner_id: String,
    lease: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(lease / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match settle_expired(&store, &jobs, &own_runner_id, crate::clock::now_ms()).await {
                Ok(settled) if !settled.replicas.is_empty() => tracing::warn!(
                    replicas = ?settled.replicas,
                    agents = settled.agents,
                    jobs = settled.jobs,
                    "settled the agents of lost replicas"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot look for lost replicas"),
            }
        }
    })
}
