//! Ended work pruned on a schedule, once the retention `[storage]` sets for it
//! has passed: ended jobs (with their history, labels and webhook
//! deliveries), webhook deliveries, and the ended agents this daemon ran
//! (with their directories), and before them, those agents' directories
//! alone (their output and event journals).
//!
//! Each pruning deletes in batches of `BATCH` rows, each batch one short
//! statement in its own turn of the store, so a backlog of millions of rows
//! (a first start after raising the load, or after lowering a retention)
//! never holds the database for long. Agents are pruned by the replica that
//! ran them; jobs and webhook deliveries, which the replicas share, by the
//! holder of the lease `retention` (renewed at each pruning, taken over by
//! another replica three intervals after its holder stopped).

use std::sync::Arc;
use std::time::Duration;

use crate::agents::AgentRuntime;
use crate::store::{StorageSettings, Store, StoreError};

/// Rows deleted per statement.
pub const BATCH: i64 = 500;
/// The lease on pruning what the replicas share.
const LEASE: &str = "retention";

/// What one pruning removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Ended jobs (their history, labels and deliveries went with them).
    pub jobs: u64,
    /// Webhook deliveries past their own retention.
    pub webhook_deliveries: u64,
    /// Ended agents, records and directories.
    pub agents: u64,
    /// Directories of ended agents whose records are kept longer.
    pub agent_outputs: u64,
}

/// Prunes what `settings` says has expired at `now_ms`, batch by batch:
/// this daemon's ended agents, and, if `holder` takes or renews the lease
/// on them (for three prune intervals), the jobs and webhook deliveries.
pub async fn prune_once(
    store: &Store,
    agents: &AgentRuntime,
    settings: &StorageSettings,
    holder: &str,
    now_ms: i64,
) -> Result<Pruned, StoreError> {
    let mut pruned = Pruned::default();
    if let Some(before) = cutoff(now_ms, settings.agent_retention) {
        pruned.agents = in_batches(|| agents.prune_ended(before, BATCH)).await?;
    }
    if let Some(before) = cutoff(now_ms, settings.agent_output_retention) {
        pruned.agent_outputs = agents.prune_ended_output(before).await?;
    }
    let ttl_ms =
        i64::try_from(settings.prune_interval.as_millis().saturating_mul(3)).unwrap_or(i64::MAX);
    if store
        .take_lease(LEASE, holder, now_ms, ttl_ms)
        .await?
        .is_none()
    {
        return Ok(pruned);
    }
    if let Some(before) = cutoff(now_ms, settings.job_retention) {
        pruned.jobs = in_batches(|| store.prune_ended_jobs(before, BATCH)).await?;
    }
    if let Some(before) = cutoff(now_ms, settings.webhook_delivery_retention) {
        pruned.webhook_deliveries =
            in_batches(|| store.prune_webhook_deliveries(before, BATCH)).await?;
    }
    Ok(pruned)
}

/// Runs `prune_once` for `holder` every `settings.prune_interval` until the
/// returned task is aborted (the server aborts it when it stops).
pub fn spawn(
    store: Store,
    agents: Arc<AgentRuntime>,
    settings: StorageSettings,
    holder: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(settings.prune_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match prune_once(&store, &agents, &settings, &holder, crate::clock::now_ms()).await {
                Ok(pruned) if pruned != Pruned::default() => {
                    tracing::info!(
                        jobs = pruned.jobs,
                        webhook_deliveries = pruned.webhook_deliveries,
                        agents = pruned.agents,
                        agent_outputs = pruned.agent_outputs,
                        "pruned ended work past its retention"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not prune ended work"),
            }
        }
    })
}

/// The time before which rows have expired; `None` keeps them forever.
fn cutoff(now_ms: i64, retention: Option<Duration>) -> Option<i64> {
    let retention_ms = i64::try_from(retention?.as_millis()).unwrap_or(i64::MAX);
    Some(now_ms.saturating_sub(retention_ms))
}

/// Calls `batch` until it deletes fewer than `BATCH` rows, yielding between
/// two calls. Returns the total.
async fn in_batches<F, Fut>(mut batch: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let deleted = batch().await?;
        total += deleted;
        if deleted < BATCH.unsigned_abs() {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::{AgentError, Origin, SpawnSpec};
    use crate::config::{AgentType, AgentsConfig};
    use crate::coordinator::state::{JobState, creation_entry};
    use crate::store::JobRecord;
    use crate::store::testing::test_on_both_backends;

    async fn ended_work_is_pruned_after_its_retention_and_kept_with_zero(store: Store) {
        let data_dir = tempfile::tempdir().expect("data dir");
        let mut config = AgentsConfig::default();
        config
            .types
            .insert("true".to_owned(), AgentType::new(&["true"]));
        let agents = AgentRuntime::new(store.clone(), config, data_dir.path()).expect("runtime");
        let agent = agents
            .spawn(SpawnSpec {
                agent_type: "true".to_owned(),
                prompt: String::new(),
                task_id: String::new(),
                labels: Default::default(),
                timeout: None,
                origin: Origin::Local,
            })
            .await
            .expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !agents
            .get(&agent.id)
            .await
            .expect("get")
            .state
            .is_terminal()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let agent_dir = data_dir.path().join("agents").join(&agent.id);
        assert!(agent_dir.is_dir());
        let mut job = JobRecord::new_pending("done".to_owned(), "review".to_owned(), 1_000);
        job.state = JobState::Completed;
        job.ended_at_ms = Some(crate::clock::now_ms());
        store
            .insert_job(&job, &creation_entry(&job, "tester"))
            .await
            .expect("insert");
        store
            .record_webhook_delivery("github", "d-1", None, crate::clock::now_ms())
            .await
            .expect("delivery");
        let later = crate::clock::now_ms() + 60_000;

        let forever = StorageSettings {
            job_retention: None,
            webhook_delivery_retention: None,
            agent_retention: None,
            agent_output_retention: None,
            ..StorageSettings::default()
        };
        let pruned = prune_once(&store, &agents, &forever, "a", later)
            .await
            .expect("prune");
        assert_eq!(pruned, Pruned::default());
        assert!(agent_dir.is_dir());

        let short = StorageSettings {
            job_retention: Some(Duration::from_secs(1)),
            webhook_delivery_retention: Some(Duration::from_secs(1)),
            agent_retention: Some(Duration::from_secs(1)),
            ..StorageSettings::default()
        };
        let pruned = prune_once(&store, &agents, &short, "a", later)
            .await
            .expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                jobs: 1,
                webhook_deliveries: 1,
                agents: 1,
                agent_outputs: 0,
            }
        );
        assert!(!agent_dir.exists(), "the agent's directory was left");
        assert!(matches!(
            agents.get(&agent.id).await,
            Err(AgentError::NotFound(_))
        ));
        assert!(store.find_job("done").await.expect("find").is_none());

        // Another replica prunes nothing shared while "a" holds the lease,
        // and takes it over once "a" has missed three prunings.
        job.id = "done-too".to_owned();
        store
            .insert_job(&job, &creation_entry(&job, "tester"))
            .await
            .expect("insert");
        let pruned = prune_once(&store, &agents, &short, "b", later + 1_000)
            .await
            .expect("prune");
        assert_eq!(
            pruned.jobs, 0,
            "pruned while another replica holds the lease"
        );
        let after_a = later + 3 * 60_000 + 1;
        let pruned = prune_once(&store, &agents, &short, "b", after_a)
            .await
            .expect("prune");
        assert_eq!(pruned.jobs, 1, "not taken over");
        agents.shutdown().await;
    }

    test_on_both_backends!(ended_work_is_pruned_after_its_retention_and_kept_with_zero);
}
