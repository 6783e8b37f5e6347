//! Nothing stranded: every replica looks, at each heartbeat, for replicas
//! whose lease ran out (no heartbeat for `replicas.lease_secs`) and takes
//! them over (marking one lost in its next epoch, one conditional update, so
//! exactly one replica does). The agents of a lost replica still shown
//! SPAWNING or RUNNING then become FAILED "runner lost", and their jobs end
//! with them; a settlement an error cut short is finished at a later round.
//! Peers see the same through `agent.status`, which reads the records.
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
/// out by `now_ms`, then settles the agents and jobs of every lost replica
/// that still shows some: the taker's, or a settlement an error cut short
/// (any replica may finish it; each agent's transition applies once).
pub async fn settle_expired(
    store: &Store,
    jobs: &Jobs,
    own_runner_id: &str,
    now_ms: i64,
) -> Result<Settled, StoreError> {
    let mut settled = Settled::default();
    for (runner_id, epoch) in store.expired_replicas(own_runner_id, now_ms).await? {
        if store.take_over_replica(&runner_id, epoch, now_ms).await? {
            tracing::warn!(runner.id = %runner_id, replica.epoch = epoch, "a replica stopped renewing its lease; settling its agents");
        }
    }
    for (replica, unfinished) in store.list_replicas().await? {
        if replica.state != "lost" || unfinished == 0 || replica.runner_id == own_runner_id {
            continue;
        }
        // Only the agents of the lost epoch: a replica that has just started
        // again on that data dir (a new epoch) may already run new ones.
        let failed = fail_agents(store, &replica.runner_id, replica.expires_at_ms, now_ms).await?;
        settled.agents += failed.len();
        settled.jobs += end_jobs(store, jobs, &failed).await?;
        settled.replicas.push(replica.runner_id);
    }
    Ok(settled)
}

/// Marks every unfinished agent of `runner_id` created by `lease_end_ms`
/// FAILED "runner lost".
async fn fail_agents(
    store: &Store,
    runner_id: &str,
    lease_end_ms: i64,
    now_ms: i64,
) -> Result<Vec<AgentRecord>, StoreError> {
    let mut failed = Vec::new();
    for agent in store.list_unfinished_agents(runner_id).await? {
        if agent.created_at_ms > lease_end_ms {
            continue;
        }
        let mut ended = agent.clone();
        ended.state = AgentState::Failed;
        ended.state_reason = format!(
            "runner lost: replica {runner_id} stopped renewing its lease while the agent ran; its process may still run on that replica's host"
        );
        ended.ended_at_ms = Some(now_ms);
        ended.updated_at_ms = now_ms;
        match store.record_agent_transition(agent.state, &ended).await {
            Ok(()) => failed.push(ended),
            // It ended on its own in the meantime, or another replica
            // settled it first.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Origin;
    use crate::coordinator::CoordinatorState;
    use crate::coordinator::jobs::NewJob;
    use crate::coordinator::settings::CoordinatorConfig;
    use crate::coordinator::state::{JobChange, JobState};
    use crate::store::NewReplica;
    use crate::store::testing::test_on_both_backends;

    fn running(id: &str, runner_id: &str, created_at_ms: i64) -> AgentRecord {
        AgentRecord {
            id: id.to_owned(),
            agent_type: "sh".to_owned(),
            state: AgentState::Running,
            state_reason: String::new(),
            prompt: String::new(),
            task_id: String::new(),
            labels: Default::default(),
            origin: Origin::Local,
            runner_id: runner_id.to_owned(),
            pid: Some(1),
            exit_code: None,
            signal: None,
            output_tail: Vec::new(),
            output_bytes: 0,
            output_truncated: false,
            timeout_secs: 60,
            created_at_ms,
            started_at_ms: Some(created_at_ms),
            ended_at_ms: None,
            updated_at_ms: created_at_ms,
        }
    }

    async fn register(store: &Store, runner_id: &str, now_ms: i64) {
        store
            .register_replica(&NewReplica {
                runner_id,
                address: "https://127.0.0.1:1",
                version: "test",
                now_ms,
                expires_at_ms: now_ms + 3_000,
            })
            .await
            .expect("register");
    }

    async fn state_of(store: &Store, id: &str) -> AgentState {
        store
            .get_agent(id)
            .await
            .expect("get")
            .expect("agent")
            .state
    }

    async fn a_lost_replicas_agents_and_jobs_are_settled_once_and_a_new_epochs_are_not(
        store: Store,
    ) {
        let jobs = Jobs::new(
            store.clone(),
            &CoordinatorState::default(),
            &CoordinatorConfig {
                max_payload_bytes: crate::config::DEFAULT_MAX_PAYLOAD_BYTES,
                remote_agent_poll: Duration::from_secs(2),
                webhooks: Default::default(),
            },
        );
        register(&store, "lost", 1_000).await;
        register(&store, "alive", 1_000).await;
        store
            .insert_agent(&running("a1", "lost", 1_500))
            .await
            .expect("insert");
        let (job, _) = jobs
            .create(
                NewJob {
                    job_type: "work".to_owned(),
                    ..NewJob::default()
                },
                "test",
            )
            .await
            .expect("create");
        let attach = JobChange::AttachAgent {
            agent_id: "a1".to_owned(),
            peer_instance_id: String::new(),
        };
        jobs.change(&job.id, attach, "test").await.expect("attach");

        // Within the lease nothing happens; after it, "alive" takes "lost"
        // over and settles its agent and the job.
        let settled = settle_expired(&store, &jobs, "alive", 3_999)
            .await
            .expect("settle");
        assert_eq!(settled, Settled::default());
        // ("alive" keeps beating.)
        store
            .heartbeat_replica("alive", 1, 3_999, 60_000)
            .await
            .expect("beat");
        let settled = settle_expired(&store, &jobs, "alive", 4_000)
            .await
            .expect("settle");
        assert_eq!((settled.agents, settled.jobs), (1, 1), "{settled:?}");
        assert_eq!(state_of(&store, "a1").await, AgentState::Failed);
        assert_eq!(
            jobs.get(&job.id).await.expect("job").state,
            JobState::Failed
        );

        // A settlement cut short is finished at a later round.
        store
            .insert_agent(&running("a2", "lost", 2_000))
            .await
            .expect("insert");
        let settled = settle_expired(&store, &jobs, "alive", 5_000)
            .await
            .expect("settle");
        assert_eq!(settled.agents, 1);
        assert_eq!(state_of(&store, "a2").await, AgentState::Failed);

        // Started again on its data dir: a new epoch's agents are its own.
        register(&store, "lost", 6_000).await;
        store
            .insert_agent(&running("a3", "lost", 6_500))
            .await
            .expect("insert");
        let settled = settle_expired(&store, &jobs, "alive", 7_000)
            .await
            .expect("settle");
        assert_eq!(settled, Settled::default());
        assert_eq!(state_of(&store, "a3").await, AgentState::Running);
    }

    test_on_both_backends!(
        a_lost_replicas_agents_and_jobs_are_settled_once_and_a_new_epochs_are_not
    );
}
