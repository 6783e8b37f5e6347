//! The coordinator's job writes on PostgreSQL (a new job, a change, a
//! webhook delivery and its job), each one SQL
//! statement and so one round trip: a statement run outside an explicit
//! transaction is atomic on its own, its data-modifying CTEs pass rows to
//! each other through `RETURNING`, and the foreign keys are checked at its
//! end. And its hot reads (a job by id, by idempotency key), on the shared
//! read connection (`store/shared_reads.rs`).

use diesel::QueryResult;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;

use super::{
    DeliveryOutcome, DeliveryRows, JobGuard, JobRow, JobRows, JobWriteOp, Prepared, Written,
};
use crate::coordinator::state::JobWrite;
use crate::store::StoreError;
use crate::store::pools::PostgresConnection;
use crate::store::prepared::Cached;
use crate::store::schema::webhook_deliveries;
use crate::store::shared_reads::SharedReads;

/// The columns of a new job's row, bound as `$1` to `$20` in this order.
macro_rules! job_columns {
    () => {
        "id, job_type, workspace, payload_json, priority, labels_json, state, progress, \
         progress_message, result_json, error, created_by, agent_id, peer_instance_id, \
         idempotency_key, version, created_at_ms, updated_at_ms, started_at_ms, ended_at_ms"
    };
}

/// The parameters of [`job_columns`].
macro_rules! job_parameters {
    () => {
        "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19, $20"
    };
}

/// A job by id, its columns in [`job_columns`]' order.
pub(super) const JOB_BY_ID: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");

/// A job by idempotency key, its columns in [`job_columns`]' order.
pub(super) const JOB_BY_IDEMPOTENCY_KEY: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM jobs WHERE idempotency_key = $1"
);

/// The row of the job `sql` ([`JOB_BY_ID`] or [`JOB_BY_IDEMPOTENCY_KEY`])
/// finds with `value`, on the shared read connection.
pub(super) async fn read_job(
    reads: &SharedReads,
    sql: &'static str,
    value: &str,
) -> Result<Option<JobRow>, StoreError> {
    reads
        .query_opt(sql, &[&value])
        .await?
        .map(|row| job_row(&row).map_err(StoreError::undecodable))
        .transpose()
}

/// A job's row from the columns of [`job_columns`], in that order.
fn job_row(row: &tokio_postgres::Row) -> Result<JobRow, tokio_postgres::Error> {
    Ok(JobRow {
        id: row.try_get(0)?,
        job_type: row.try_get(1)?,
        workspace: row.try_get(2)?,
        payload_json: row.try_get(3)?,
        priority: row.try_get(4)?,
        labels_json: row.try_get(5)?,
        state: row.try_get(6)?,
        progress: row.try_get(7)?,
        progress_message: row.try_get(8)?,
        result_json: row.try_get(9)?,
        error: row.try_get(10)?,
        created_by: row.try_get(11)?,
        agent_id: row.try_get(12)?,
        peer_instance_id: row.try_get(13)?,
        idempotency_key: row.try_get(14)?,
        version: row.try_get(15)?,
        created_at_ms: row.try_get(16)?,
        updated_at_ms: row.try_get(17)?,
        started_at_ms: row.try_get(18)?,
        ended_at_ms: row.try_get(19)?,
    })
}

/// The label rows (`$21`, `$22`) and the creation entry (`$23` to `$29`) of
/// the job the CTE `job` returned, if it returned one.
macro_rules! labels_and_creation {
    () => {
        "), labels AS (
    INSERT INTO job_labels (job_id, name, value)
    SELECT job.id, label.name, label.value
    FROM job, unnest($21::text[], $22::text[]) AS label (name, value)
)
INSERT INTO job_history (job_id, sequence, from_state, to_state, progress, message,
    actor, at_ms)
SELECT id, $23, $24, $25, $26, $27, $28, $29 FROM job"
    };
}

/// The job row, its label rows and its creation entry. `ON CONFLICT DO
/// NOTHING` covers the id and the idempotency key: on a conflict no job row is
/// returned, so no label or history row is written either, and the statement
/// reports 0 rows.
const INSERT_JOB: &str = concat!(
    "WITH job AS (\n    INSERT INTO jobs (",
    job_columns!(),
    ")\n    VALUES (",
    job_parameters!(),
    ")\n    ON CONFLICT DO NOTHING\n    RETURNING id\n",
    labels_and_creation!()
);

/// A webhook delivery (`$30` to `$32`; its job id is `$1`) and its job, as
/// [`INSERT_JOB`] writes one, in one statement: when the source's delivery
/// id is recorded already, `ON CONFLICT DO NOTHING` returns no delivery, so
/// no job, label or history row is written and the statement reports 0
/// rows. The delivery's reference to the job is checked at the statement's
/// end, when the job's row exists.
const DELIVER_JOB: &str = concat!(
    "WITH delivery AS (
    INSERT INTO webhook_deliveries (source, delivery_id, job_id, received_at_ms)
    VALUES ($30, $31, $1, $32)
    ON CONFLICT DO NOTHING
    RETURNING job_id
), job AS (\n    INSERT INTO jobs (",
    job_columns!(),
    ")\n    SELECT ",
    job_parameters!(),
    "\n    WHERE EXISTS (SELECT 1 FROM delivery)\n    RETURNING id\n",
    labels_and_creation!()
);

/// A change under its guard and its history entry. `COALESCE` keeps the
/// fields the change leaves alone (a NULL parameter); `version = COALESCE($13,
/// version)` is no condition when the guard has no version. Under a
/// concurrent change of the same row PostgreSQL waits for it and evaluates the
/// WHERE clause again on the row it wrote, so of two racing changes only one
/// matches.
///
/// The state is compared as `(state = $12) IS TRUE`, which no index can
/// serve, so the row is always found through the primary key. Compared
/// plainly, PostgreSQL's generic plan for a table never analyzed (every new
/// database) finds the row through `jobs_by_state` instead, a pooled
/// connection keeps that plan for its life, and each change of a PENDING job
/// then reads the index entries of every PENDING job: on the PostgreSQL soak
/// the writes slowed as the pending webhook jobs piled up, halving the rate
/// within three minutes. `state` is NOT NULL, so `IS TRUE` changes no result.
const WRITE_JOB_CHANGE: &str = "\
WITH changed AS (
    UPDATE jobs SET
        state = $1,
        version = version + 1,
        updated_at_ms = $2,
        progress = COALESCE($3, progress),
        progress_message = COALESCE($4, progress_message),
        result_json = COALESCE($5, result_json),
        error = COALESCE($6, error),
        agent_id = COALESCE($7, agent_id),
        peer_instance_id = COALESCE($8, peer_instance_id),
        started_at_ms = COALESCE($9, started_at_ms),
        ended_at_ms = COALESCE($10, ended_at_ms)
    WHERE id = $11 AND (state = $12) IS TRUE AND version = COALESCE($13, version)
    RETURNING *
), entry AS (
    INSERT INTO job_history (job_id, sequence, from_state, to_state, progress, message,
        actor, at_ms)
    SELECT id, version, $12, state, progress, $14, $15, $2 FROM changed
)
SELECT * FROM changed";

/// `$statement` with a new job's `$1` to `$29` bound: its row, its labels
/// and its creation entry, from `$rows` (`JobRows`).
macro_rules! bind_job {
    ($statement:expr, $rows:expr) => {{
        let rows: &JobRows<'_> = $rows;
        let (label_names, label_values): (Vec<&str>, Vec<&str>) = rows
            .labels
            .iter()
            .map(|label| (label.name, label.value))
            .unzip();
        let job = &rows.job;
        let creation = &rows.creation;
        $statement
            .bind::<Text, _>(job.id)
            .bind::<Text, _>(job.job_type)
            .bind::<Text, _>(job.workspace)
            .bind::<Text, _>(job.payload_json)
            .bind::<Integer, _>(job.priority)
            .bind::<Text, _>(job.labels_json.as_str())
            .bind::<Text, _>(job.state)
            .bind::<Integer, _>(job.progress)
            .bind::<Text, _>(job.progress_message)
            .bind::<Text, _>(job.result_json)
            .bind::<Text, _>(job.error)
            .bind::<Text, _>(job.created_by)
            .bind::<Text, _>(job.agent_id)
            .bind::<Text, _>(job.peer_instance_id)
            .bind::<Nullable<Text>, _>(job.idempotency_key)
            .bind::<BigInt, _>(job.version)
            .bind::<BigInt, _>(job.created_at_ms)
            .bind::<BigInt, _>(job.updated_at_ms)
            .bind::<Nullable<BigInt>, _>(job.started_at_ms)
            .bind::<Nullable<BigInt>, _>(job.ended_at_ms)
            .bind::<Array<Text>, _>(label_names)
            .bind::<Array<Text>, _>(label_values)
            .bind::<BigInt, _>(creation.sequence)
            .bind::<Nullable<Text>, _>(creation.from_state)
            .bind::<Text, _>(creation.to_state)
            .bind::<Integer, _>(creation.progress)
            .bind::<Text, _>(creation.message)
            .bind::<Text, _>(creation.actor)
            .bind::<BigInt, _>(creation.at_ms)
    }};
}

/// Writes `op` in one statement (atomic on its own, or part of the caller's
/// transaction).
pub(super) async fn write(
    conn: &mut PostgresConnection,
    op: &JobWriteOp,
    labels_json: Option<String>,
) -> QueryResult<Written> {
    match op.prepare(labels_json) {
        Prepared::Insert(rows) => insert_job(conn, &rows).await.map(Written::Inserted),
        Prepared::Change(guard, write) => write_job_change(conn, &guard, write)
            .await
            .map(|row| Written::Changed(row.map(Box::new))),
        Prepared::Delivery(rows) => record_delivery(conn, &rows).await.map(Written::Delivered),
    }
}

/// Writes a webhook delivery and its job in one statement, unless the
/// source's delivery id is recorded already (then reads the first
/// delivery's job id). A concurrent delivery of the same id makes the
/// statement wait for its transaction, then write nothing.
async fn record_delivery(
    conn: &mut PostgresConnection,
    rows: &DeliveryRows<'_>,
) -> QueryResult<DeliveryOutcome> {
    use diesel::{ExpressionMethods as _, QueryDsl as _};

    let delivery = &rows.delivery;
    let recorded = match (&rows.job, delivery.delivery_id.is_empty()) {
        // Not deduplicated: the job alone.
        (Some(job), true) => {
            if !insert_job(conn, job).await? {
                return Err(super::webhook_job_id_taken());
            }
            true
        }
        (None, true) => true,
        (None, false) => {
            diesel::insert_into(webhook_deliveries::table)
                .values(delivery)
                .on_conflict_do_nothing()
                .execute(conn)
                .await?
                == 1
        }
        (Some(job), false) => {
            let statement = bind_job!(diesel::sql_query(DELIVER_JOB), job)
                .bind::<Text, _>(delivery.source)
                .bind::<Text, _>(delivery.delivery_id)
                .bind::<BigInt, _>(delivery.received_at_ms);
            Cached(statement).execute(conn).await? == 1
        }
    };
    if recorded {
        return Ok(DeliveryOutcome::Recorded);
    }
    let job_id = webhook_deliveries::table
        .filter(webhook_deliveries::source.eq(delivery.source))
        .filter(webhook_deliveries::delivery_id.eq(delivery.delivery_id))
        .select(webhook_deliveries::job_id)
        .first::<Option<String>>(conn)
        .await?;
    Ok(DeliveryOutcome::Duplicate { job_id })
}

/// Writes `rows` in one statement: `false` when a job with the same id or
/// idempotency key exists, and nothing was written.
async fn insert_job(conn: &mut PostgresConnection, rows: &JobRows<'_>) -> QueryResult<bool> {
    let statement = bind_job!(diesel::sql_query(INSERT_JOB), rows);
    let inserted = Cached(statement).execute(conn).await?;
    Ok(inserted == 1)
}

/// Writes `write` to the job `guard` names, with its history entry, in one
/// statement: the row as written, or `None` when no job matched the guard.
async fn write_job_change(
    conn: &mut PostgresConnection,
    guard: &JobGuard<'_>,
    write: &JobWrite,
) -> QueryResult<Option<JobRow>> {
    let statement = diesel::sql_query(WRITE_JOB_CHANGE)
        .bind::<Text, _>(write.to_state.as_str())
        .bind::<BigInt, _>(write.at_ms)
        .bind::<Nullable<Integer>, _>(write.progress.map(|progress| i32::from(progress.get())))
        .bind::<Nullable<Text>, _>(write.progress_message.as_deref())
        .bind::<Nullable<Text>, _>(write.result_json.as_deref())
        .bind::<Nullable<Text>, _>(write.error.as_deref())
        .bind::<Nullable<Text>, _>(write.agent_id.as_deref())
        .bind::<Nullable<Text>, _>(write.peer_instance_id.as_deref())
        .bind::<Nullable<BigInt>, _>(write.started_at_ms)
        .bind::<Nullable<BigInt>, _>(write.ended_at_ms)
        .bind::<Text, _>(guard.job_id)
        .bind::<Text, _>(guard.state.as_str())
        .bind::<Nullable<BigInt>, _>(guard.version)
        .bind::<Text, _>(write.message.as_str())
        .bind::<Text, _>(write.actor.as_str());
    let mut rows: Vec<JobRow> = Cached(statement).load(conn).await?;
    // The id is the primary key: at most one row.
    Ok(rows.pop())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{TestDatabase, generic_plan};

    /// The parameters of `WRITE_JOB_CHANGE`, in order.
    const CHANGE_TYPES: [&str; 15] = [
        "text", "bigint", "integer", "text", "text", "text", "text", "text", "bigint", "bigint",
        "text", "text", "bigint", "text", "text",
    ];

    #[tokio::test(flavor = "multi_thread")]
    async fn a_change_finds_its_job_by_id_even_on_tables_never_analyzed() {
        // A daemon's first writes plan against empty tables; the generic plan
        // made then is kept by the pooled connection for its life. Were it to
        // find the row through `jobs_by_state`, each change of a PENDING job
        // would read every PENDING job's index entry (the PostgreSQL soak:
        // 270 million index entries read for 46 000 changes).
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        database.migrated_store().await.expect("migrate");
        let plan = generic_plan(&database.url, WRITE_JOB_CHANGE, &CHANGE_TYPES)
            .await
            .expect("plan");
        assert!(plan.contains("jobs_pkey"), "{plan}");
        assert!(!plan.contains("jobs_by_state"), "{plan}");
        database.cleanup().await.expect("drop the test database");
    }
}
