//! The coordinator's job writes on SQLite (a new job, a change, a webhook
//! delivery and its job), run inside the one
//! blocking call of `Store::write_jobs` on the connection's thread: `BEGIN
//! IMMEDIATE`, the statements of every write in the batch, `COMMIT`. Through
//! the asynchronous wrapper each statement would be a separate hop to tokio's
//! blocking pool.
//!
//! Synchronous diesel: the functions here take `diesel::SqliteConnection`.

use diesel::prelude::*;

use super::{
    DeliveryOutcome, DeliveryRows, JobGuard, JobRow, JobRows, JobWriteOp, Prepared, Written,
};
use crate::coordinator::state::JobWrite;
use crate::store::schema::{job_history, job_labels, jobs, webhook_deliveries};

/// Writes `op`, inside the caller's transaction (`Store::write_jobs`).
pub(super) fn write(
    conn: &mut diesel::SqliteConnection,
    op: &JobWriteOp,
    labels_json: Option<String>,
) -> QueryResult<Written> {
    match op.prepare(labels_json) {
        Prepared::Insert(rows) => insert_job(conn, &rows).map(Written::Inserted),
        Prepared::Change(guard, write) => {
            write_job_change(conn, &guard, write).map(|row| Written::Changed(row.map(Box::new)))
        }
        Prepared::Delivery(rows) => record_delivery(conn, &rows).map(Written::Delivered),
    }
}

/// Writes a webhook delivery and its job, unless the source's delivery id
/// is recorded already. The read and the inserts are one `BEGIN IMMEDIATE`
/// transaction (`Store::write_jobs`): no other writer comes between them.
fn record_delivery(
    conn: &mut diesel::SqliteConnection,
    rows: &DeliveryRows<'_>,
) -> QueryResult<DeliveryOutcome> {
    let delivery = &rows.delivery;
    let deduplicated = !delivery.delivery_id.is_empty();
    if deduplicated {
        let first = webhook_deliveries::table
            .filter(webhook_deliveries::source.eq(delivery.source))
            .filter(webhook_deliveries::delivery_id.eq(delivery.delivery_id))
            .select(webhook_deliveries::job_id)
            .first::<Option<String>>(conn)
            .optional()?;
        if let Some(job_id) = first {
            return Ok(DeliveryOutcome::Duplicate { job_id });
        }
    }
    // The job comes first: the delivery refers to it.
    if let Some(job) = &rows.job
        && !insert_job(conn, job)?
    {
        return Err(super::webhook_job_id_taken());
    }
    if deduplicated {
        diesel::insert_into(webhook_deliveries::table)
            .values(delivery)
            .execute(conn)?;
    }
    Ok(DeliveryOutcome::Recorded)
}

/// Writes `rows`: `false` when a job with the same id or idempotency key
/// exists, and nothing was written.
fn insert_job(conn: &mut diesel::SqliteConnection, rows: &JobRows<'_>) -> QueryResult<bool> {
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
}

/// The columns a change sets; `None` leaves a column as it is.
#[derive(AsChangeset)]
#[diesel(table_name = jobs)]
struct JobWriteChangeset<'a> {
    state: &'static str,
    updated_at_ms: i64,
    progress: Option<i32>,
    progress_message: Option<&'a str>,
    result_json: Option<&'a str>,
    error: Option<&'a str>,
    agent_id: Option<&'a str>,
    peer_instance_id: Option<&'a str>,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
}

/// Writes `write` to the job `guard` names, with its history entry: the row
/// as written, or `None` when no job matched the guard.
fn write_job_change(
    conn: &mut diesel::SqliteConnection,
    guard: &JobGuard<'_>,
    write: &JobWrite,
) -> QueryResult<Option<JobRow>> {
    let changes = JobWriteChangeset {
        state: write.to_state.as_str(),
        updated_at_ms: write.at_ms,
        progress: write.progress.map(|progress| i32::from(progress.get())),
        progress_message: write.progress_message.as_deref(),
        result_json: write.result_json.as_deref(),
        error: write.error.as_deref(),
        agent_id: write.agent_id.as_deref(),
        peer_instance_id: write.peer_instance_id.as_deref(),
        started_at_ms: write.started_at_ms,
        ended_at_ms: write.ended_at_ms,
    };
    let target = jobs::table
        .filter(jobs::id.eq(guard.job_id))
        .filter(jobs::state.eq(guard.state.as_str()));
    let set = (&changes, jobs::version.eq(jobs::version + 1));
    let row = match guard.version {
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
                job_history::from_state.eq(guard.state.as_str()),
                job_history::to_state.eq(&row.state),
                job_history::progress.eq(row.progress),
                job_history::message.eq(&write.message),
                job_history::actor.eq(&write.actor),
                job_history::at_ms.eq(write.at_ms),
            ))
            .execute(conn)?;
    }
    Ok(row)
}
