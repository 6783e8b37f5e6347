//! Reading coordinator jobs: one job by id or by idempotency key (on the
//! shared read connection when there is one), a job's history, the jobs to
//! follow again after a restart, and pages of jobs matching a filter.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{HistoryRow, JobCursor, JobFilter, JobHistoryRecord, JobRecord, JobRow, postgres};
use crate::coordinator::state::JobState;
use crate::store::schema::{job_history, job_labels, jobs};
use crate::store::{Store, StoreError};

/// The unique column a point read of a job matches.
#[derive(Clone, Copy, Debug)]
enum JobBy {
    Id,
    IdempotencyKey,
}

impl JobBy {
    /// The shared connection's statement for this read.
    fn sql(self) -> &'static str {
        match self {
            JobBy::Id => postgres::JOB_BY_ID,
            JobBy::IdempotencyKey => postgres::JOB_BY_IDEMPOTENCY_KEY,
        }
    }
}

impl Store {
    /// The job with this id, if any.
    pub async fn find_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.find_job_by(JobBy::Id, id).await
    }

    /// The job created with this idempotency key, if any.
    pub async fn find_job_by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.find_job_by(JobBy::IdempotencyKey, key).await
    }

    /// The job whose `by` column holds `value`: on the shared connection
    /// when there is one, else on a pooled one.
    async fn find_job_by(&self, by: JobBy, value: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = match self.shared_reads() {
            Some(reads) => postgres::read_job(reads, by.sql(), value).await?,
            // Boxed: the pool's future is kilobytes, and the shared read's
            // would otherwise carry it on every call.
            None => Box::pin(self.pooled_job_read(by, value)).await?,
        };
        row.map(JobRecord::try_from).transpose()
    }

    async fn pooled_job_read(&self, by: JobBy, value: &str) -> Result<Option<JobRow>, StoreError> {
        Ok(with_connection!(self, |conn| match by {
            JobBy::Id => jobs::table
                .filter(jobs::id.eq(value))
                .select(JobRow::as_select())
                .first(conn)
                .await
                .optional()?,
            JobBy::IdempotencyKey => jobs::table
                .filter(jobs::idempotency_key.eq(value))
                .select(JobRow::as_select())
                .first(conn)
                .await
                .optional()?,
        }))
    }

    /// The job's history entries with a sequence above `after_sequence`,
    /// oldest first (all of them for 0).
    pub async fn job_history(
        &self,
        job_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<JobHistoryRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            job_history::table
                .filter(job_history::job_id.eq(job_id))
                .filter(job_history::sequence.gt(after_sequence))
                .order(job_history::sequence.asc())
                .select(HistoryRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(JobHistoryRecord::try_from).collect()
    }

    /// The RUNNING jobs that follow an agent of this instance, for the
    /// coordinator to follow again after a restart.
    pub async fn running_jobs_with_local_agents(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            jobs::table
                .filter(jobs::state.eq(JobState::Running.as_str()))
                .filter(jobs::agent_id.ne(""))
                .filter(jobs::peer_instance_id.eq(""))
                .select(JobRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(JobRecord::try_from).collect()
    }

    /// The RUNNING jobs that follow an agent on a federated peer, for the
    /// coordinator to poll again after a restart.
    pub async fn running_jobs_with_remote_agents(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            jobs::table
                .filter(jobs::state.eq(JobState::Running.as_str()))
                .filter(jobs::agent_id.ne(""))
                .filter(jobs::peer_instance_id.ne(""))
                .select(JobRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(JobRecord::try_from).collect()
    }

    /// The PENDING jobs without agent created at or after `since_ms` (a
    /// remote dispatch interrupted before its spawn was answered).
    pub async fn pending_jobs_without_agent_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            jobs::table
                .filter(jobs::state.eq(JobState::Pending.as_str()))
                .filter(jobs::created_at_ms.ge(since_ms))
                .filter(jobs::agent_id.eq(""))
                .select(JobRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(JobRecord::try_from).collect()
    }

    /// Up to `limit` jobs matching `filter`, newest first, starting after
    /// `after`.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        after: Option<&JobCursor>,
        limit: i64,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            let mut query = jobs::table.select(JobRow::as_select()).into_boxed();
            if let Some(state) = filter.state {
                query = query.filter(jobs::state.eq(state.as_str()));
            }
            if let Some(job_type) = &filter.job_type {
                query = query.filter(jobs::job_type.eq(job_type));
            }
            if let Some(workspace) = &filter.workspace {
                query = query.filter(jobs::workspace.eq(workspace));
            }
            for (name, value) in &filter.labels {
                query = query.filter(
                    jobs::id.eq_any(
                        job_labels::table
                            .filter(job_labels::name.eq(name))
                            .filter(job_labels::value.eq(value))
                            .select(job_labels::job_id),
                    ),
                );
            }
            if let Some(cursor) = after {
                query = query.filter(
                    jobs::created_at_ms
                        .lt(cursor.created_at_ms)
                        .or(jobs::created_at_ms
                            .eq(cursor.created_at_ms)
                            .and(jobs::id.lt(&cursor.id))),
                );
            }
            query
                .order((jobs::created_at_ms.desc(), jobs::id.desc()))
                .limit(limit)
                .load(conn)
                .await?
        });
        rows.into_iter().map(JobRecord::try_from).collect()
    }
}
