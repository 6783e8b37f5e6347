//! The coordinator's two hot-path writes on SQLite, each run as one blocking
//! call on the connection's thread: `BEGIN IMMEDIATE`, the statements,
//! `COMMIT`. Through the asynchronous wrapper each statement would be a
//! separate hop to tokio's blocking pool.
//!
//! Synchronous diesel: the functions here take `diesel::SqliteConnection`.

use diesel::prelude::*;

use super::{JobGuard, JobRow, JobRows};
use crate::coordinator::state::{JobState, JobWrite};
use crate::store::schema::{job_history, job_labels, jobs};

/// Writes `rows` in one transaction: `false` when a job with the same id or
/// idempotency key exists, and nothing was written.
pub(super) fn insert_job(
    conn: &mut diesel::SqliteConnection,
    rows: &JobRows<'_>,
) -> QueryResult<bool> {
    conn.immediate_transaction(|conn| {
        let inserted = diesel::insert_into(jobs::table)
            .values(&rows.job)
            .on_conflict_do_nothing()
            .execute(conn)?;
        if inserted == 0 {
            return Ok(false);
        }
        if !rows.labels.is_empty() {
            diesel::insert_into(job_labels::table)
                .values(&rows.labels)
                .execute(conn)?;
        }
        diesel::insert_into(job_history::table)
            .values(&rows.creation)
            .execute(conn)?;
        Ok(true)
    })
}

/// A change and its guard, owned: the blocking call outlives the borrows of
/// `Store::write_job_change`.
pub(super) struct OwnedChange {
    job_id: String,
    from: JobState,
    version: Option<i64>,
    changes: JobWriteChangeset,
    message: String,
    actor: String,
    at_ms: i64,
}

impl OwnedChange {
    pub(super) fn of(guard: &JobGuard<'_>, write: &JobWrite) -> OwnedChange {
        OwnedChange {
            job_id: guard.job_id.to_owned(),
            from: guard.state,
            version: guard.version,
            changes: JobWriteChangeset {
                state: write.to_state.as_str(),
                updated_at_ms: write.at_ms,
                progress: write.progress.map(|progress| i32::from(progress.get())),
                progress_message: write.progress_message.clone(),
                result_json: write.result_json.clone(),
                error: write.error.clone(),
                agent_id: write.agent_id.clone(),
                peer_instance_id: write.peer_instance_id.clone(),
                started_at_ms: write.started_at_ms,
                ended_at_ms: write.ended_at_ms,
            },
            message: write.message.clone(),
            actor: write.actor.clone(),
            at_ms: write.at_ms,
        }
    }
}

/// The columns a change sets; `None` leaves a column as it is.
#[derive(AsChangeset)]
#[diesel(table_name = jobs)]
struct JobWriteChangeset {
    state: &'static str,
    updated_at_ms: i64,
    progress: Option<i32>,
    progress_message: Option<String>,
    result_json: Option<String>,
    error: Option<String>,
    agent_id: Option<String>,
    peer_instance_id: Option<String>,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
}

/// Writes `change` to the job its guard names, with its history entry, in
/// one transaction: the row as written, or `None` when no job matched the
/// guard.
pub(super) fn write_job_change(
    conn: &mut diesel::SqliteConnection,
    change: &OwnedChange,
) -> QueryResult<Option<JobRow>> {
    conn.immediate_transaction(|conn| {
        let target = jobs::table
            .filter(jobs::id.eq(&change.job_id))
            .filter(jobs::state.eq(change.from.as_str()));
        let set = (&change.changes, jobs::version.eq(jobs::version + 1));
        let row = match change.version {
            Some(version) => diesel::update(target.filter(jobs::version.eq(version)))
                .set(set)
                .returning(JobRow::as_returning())
                .get_result(conn)
                .optional()?,
            None => diesel::update(target)
                .set(set)
                .returning(JobRow::as_returning())
                .get_result(conn)
                .optional()?,
        };
        if let Some(row) = &row {
            diesel::insert_into(job_history::table)
                .values((
                    job_history::job_id.eq(&row.id),
                    job_history::sequence.eq(row.version),
                    job_history::from_state.eq(change.from.as_str()),
                    job_history::to_state.eq(&row.state),
                    job_history::progress.eq(row.progress),
                    job_history::message.eq(&change.message),
                    job_history::actor.eq(&change.actor),
                    job_history::at_ms.eq(change.at_ms),
                ))
                .execute(conn)?;
        }
        Ok(row)
    })
}
