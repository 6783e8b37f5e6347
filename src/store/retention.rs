//! Pruning ended work past its retention, a batch at a time: ended jobs
//! (their history, labels and webhook deliveries go with them through the
//! foreign keys), webhook deliveries, and ended agents' records.
//!
//! Each call deletes about `limit` rows of its table (more only when several
//! share the batch's last millisecond) in one short statement and its own turn, so a large backlog never holds the database for long:
//! other queries take their turns between two batches. The caller
//! (`crate::retention`) loops until a batch comes back short.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{agent_status, agents, jobs, webhook_deliveries};
use super::{Store, StoreError};

impl Store {
    /// Deletes up to `limit` jobs that ended before `before_ms`, with their
    /// history, labels and webhook deliveries. Returns how many jobs.
    pub async fn prune_ended_jobs(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let deleted = with_connection!(self, |conn| {
            // As for deliveries below: the end time of the batch's last job.
            let last_of_batch: Option<Option<i64>> = jobs::table
                .select(jobs::ended_at_ms)
                .filter(jobs::ended_at_ms.lt(before_ms))
                .order(jobs::ended_at_ms)
                .offset(limit.saturating_sub(1).max(0))
                .first(conn)
                .await
                .optional()?;
            let up_to = batch_end(last_of_batch.flatten(), before_ms);
            diesel::delete(jobs::table.filter(jobs::ended_at_ms.lt(up_to)))
                .execute(conn)
                .await?
        });
        Ok(count(deleted))
    }

    /// Deletes up to `limit` webhook deliveries received before `before_ms`:
    /// a redelivery of one of them makes a new job. Returns how many.
    pub async fn prune_webhook_deliveries(
        &self,
        before_ms: i64,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let deleted = with_connection!(self, |conn| {
            // The newest reception time of the batch: the `limit`-th oldest
            // delivery, or every expired one when there are fewer. A few
            // more than `limit` go when several share that millisecond.
            let last_of_batch: Option<i64> = webhook_deliveries::table
                .select(webhook_deliveries::received_at_ms)
                .filter(webhook_deliveries::received_at_ms.lt(before_ms))
                .order(webhook_deliveries::received_at_ms)
                .offset(limit.saturating_sub(1).max(0))
                .first(conn)
                .await
                .optional()?;
            let up_to = batch_end(last_of_batch, before_ms);
            diesel::delete(
                webhook_deliveries::table.filter(webhook_deliveries::received_at_ms.lt(up_to)),
            )
            .execute(conn)
            .await?
        });
        Ok(count(deleted))
    }

    /// The ids of up to `limit` agents run by `runner_id` that ended before
    /// `before_ms`, oldest end first: what `delete_agents` may remove once
    /// their directories are gone.
    pub async fn ended_agents_before(
        &self,
        runner_id: &str,
        before_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ids = with_connection!(self, |conn| {
            agent_status::table
                .inner_join(agents::table)
                .select(agents::id)
                .filter(agent_status::ended_at_ms.lt(before_ms))
                .filter(agents::runner_id.eq(runner_id))
                .order(agent_status::ended_at_ms)
                .limit(limit)
                .load::<String>(conn)
                .await?
        });
        Ok(ids)
    }

    /// Those of the agents `ids` that ended before `before_ms`.
    pub async fn agents_ended_among(
        &self,
        ids: &[String],
        before_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ended = with_connection!(self, |conn| {
            agent_status::table
                .select(agent_status::agent_id)
                .filter(agent_status::agent_id.eq_any(ids))
                .filter(agent_status::ended_at_ms.lt(before_ms))
                .load::<String>(conn)
                .await?
        });
        Ok(ended)
    }

    /// Deletes the agents `ids` with their status, labels and events. Returns
    /// how many.
    pub async fn delete_agents(&self, ids: &[String]) -> Result<u64, StoreError> {
        let deleted = with_connection!(self, |conn| {
            diesel::delete(agents::table.filter(agents::id.eq_any(ids)))
                .execute(conn)
                .await?
        });
        Ok(count(deleted))
    }
}

/// Where a batch ends: just past the time of its last row, or at `before_ms`
/// when fewer rows than a batch have expired.
fn batch_end(last_of_batch: Option<i64>, before_ms: i64) -> i64 {
    last_of_batch.map_or(before_ms, |last| last.saturating_add(1).min(before_ms))
}

fn count(rows: usize) -> u64 {
    u64::try_from(rows).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::agents::{AgentRecord, AgentState, Origin};
    use crate::coordinator::state::{JobState, creation_entry};
    use crate::store::testing::test_on_both_backends;
    use crate::store::{DeliveryOutcome, JobRecord};

    /// A job that ended (COMPLETED) at `ended_at_ms`, labelled.
    fn ended_job(id: &str, ended_at_ms: i64) -> JobRecord {
        let mut job = JobRecord::new_pending(id.to_owned(), "review".to_owned(), 500);
        job.state = JobState::Completed;
        job.labels = BTreeMap::from([("team".to_owned(), "blue".to_owned())]);
        job.ended_at_ms = Some(ended_at_ms);
        job
    }

    /// Delivery `d-0` of source `github`, making `job`, received at `at_ms`.
    async fn deliver_d0(store: &Store, job: &JobRecord, at_ms: i64) -> DeliveryOutcome {
        store
            .record_webhook_delivery(
                "github",
                "d-0",
                Some((job, &creation_entry(job, "webhook"))),
                at_ms,
            )
            .await
            .expect("delivery")
    }

    async fn ended_jobs_past_their_retention_go_with_their_history_and_deliveries(store: Store) {
        let outcome = deliver_d0(&store, &ended_job("old-0", 1_000), 900).await;
        assert_eq!(outcome, DeliveryOutcome::Recorded);
        let mut jobs = vec![
            ended_job("old-1", 1_001),
            ended_job("old-2", 1_002),
            ended_job("recent", 9_000),
        ];
        // Pending since long ago, never ended: kept whatever its age.
        jobs.push(JobRecord::new_pending(
            "waiting".to_owned(),
            "review".to_owned(),
            0,
        ));
        for job in &jobs {
            store
                .insert_job(job, &creation_entry(job, "tester"))
                .await
                .expect("insert");
        }

        // Batches of two, oldest end first, until a batch comes back short.
        assert_eq!(store.prune_ended_jobs(5_000, 2).await.expect("prune"), 2);
        assert!(store.find_job("old-0").await.expect("find").is_none());
        assert!(store.find_job("old-2").await.expect("find").is_some());
        assert_eq!(store.prune_ended_jobs(5_000, 2).await.expect("prune"), 1);
        assert_eq!(store.prune_ended_jobs(5_000, 2).await.expect("prune"), 0);

        for gone in ["old-0", "old-1", "old-2"] {
            assert!(
                store.find_job(gone).await.expect("find").is_none(),
                "{gone}"
            );
            assert!(
                store
                    .job_history(gone, 0)
                    .await
                    .expect("history")
                    .is_empty()
            );
        }
        for kept in ["recent", "waiting"] {
            let job = store.find_job(kept).await.expect("find").expect(kept);
            assert_eq!(store.job_history(kept, 0).await.expect("history").len(), 1);
            assert_eq!(job.id, kept);
        }
        // The pruned job's delivery went with it: a redelivery is new.
        let outcome = deliver_d0(&store, &ended_job("old-0-again", 9_500), 9_500).await;
        assert_eq!(outcome, DeliveryOutcome::Recorded);
    }

    async fn webhook_deliveries_are_forgotten_after_their_retention(store: Store) {
        for (delivery_id, received_at_ms) in [("d-1", 1_000), ("d-2", 2_000), ("d-3", 9_000)] {
            store
                .record_webhook_delivery("github", delivery_id, None, received_at_ms)
                .await
                .expect("delivery");
        }
        assert_eq!(
            store
                .prune_webhook_deliveries(5_000, 1)
                .await
                .expect("prune"),
            1
        );
        assert_eq!(
            store
                .prune_webhook_deliveries(5_000, 1)
                .await
                .expect("prune"),
            1
        );
        assert_eq!(
            store
                .prune_webhook_deliveries(5_000, 1)
                .await
                .expect("prune"),
            0
        );
        let redelivered = |delivery_id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .record_webhook_delivery("github", delivery_id, None, 9_900)
                    .await
                    .expect("redelivery")
            }
        };
        assert_eq!(redelivered("d-1").await, DeliveryOutcome::Recorded);
        assert_eq!(
            redelivered("d-3").await,
            DeliveryOutcome::Duplicate { job_id: None }
        );
    }

    fn agent(
        id: &str,
        runner_id: &str,
        state: AgentState,
        ended_at_ms: Option<i64>,
    ) -> AgentRecord {
        AgentRecord {
            id: id.to_owned(),
            agent_type: "sh".to_owned(),
            state,
            state_reason: String::new(),
            prompt: String::new(),
            task_id: String::new(),
            labels: BTreeMap::from([("team".to_owned(), "blue".to_owned())]),
            origin: Origin::Local,
            runner_id: runner_id.to_owned(),
            pid: None,
            exit_code: ended_at_ms.map(|_| 0),
            signal: None,
            output_tail: Vec::new(),
            output_bytes: 0,
            output_truncated: false,
            timeout_secs: 60,
            created_at_ms: 500,
            started_at_ms: Some(600),
            ended_at_ms,
            updated_at_ms: ended_at_ms.unwrap_or(600),
        }
    }

    async fn ended_agents_of_a_runner_are_listed_and_deleted(store: Store) {
        for record in [
            agent("a-old", "runner-a", AgentState::Completed, Some(1_000)),
            agent("a-older", "runner-a", AgentState::Failed, Some(900)),
            agent("a-recent", "runner-a", AgentState::Completed, Some(9_000)),
            agent("a-running", "runner-a", AgentState::Running, None),
            agent("b-old", "runner-b", AgentState::Completed, Some(1_000)),
        ] {
            store.insert_agent(&record).await.expect("insert");
        }
        let ids = store
            .ended_agents_before("runner-a", 5_000, 10)
            .await
            .expect("list");
        assert_eq!(ids, vec!["a-older".to_owned(), "a-old".to_owned()]);
        assert_eq!(
            store
                .ended_agents_before("runner-a", 5_000, 1)
                .await
                .expect("list"),
            vec!["a-older".to_owned()]
        );
        assert_eq!(store.delete_agents(&ids).await.expect("delete"), 2);
        for gone in ["a-old", "a-older"] {
            assert!(
                store.get_agent(gone).await.expect("get").is_none(),
                "{gone}"
            );
            assert!(
                store
                    .list_agent_transitions(gone)
                    .await
                    .expect("events")
                    .is_empty()
            );
        }
        for kept in ["a-recent", "a-running", "b-old"] {
            assert!(
                store.get_agent(kept).await.expect("get").is_some(),
                "{kept}"
            );
        }
    }

    test_on_both_backends!(
        ended_jobs_past_their_retention_go_with_their_history_and_deliveries,
        webhook_deliveries_are_forgotten_after_their_retention,
        ended_agents_of_a_runner_are_listed_and_deleted,
    );
}
