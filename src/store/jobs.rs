//! Queries for coordinator jobs: creating a job with its first history entry,
//! changing it under a guard, and recording webhook deliveries; reading,
//! listing and paging are in `jobs/reads.rs`.
//!
//! Every change is a conditional `UPDATE ... WHERE id = ? AND state = ?`
//! (and `AND version = ?` when the caller read the job first) written
//! atomically with its history entry, so of two racing changes exactly one is
//! written and the other sees that the job moved on.
//!
//! The two writes on the hot path of the coordinator, creating a job and
//! changing one, cost one database round trip each: on PostgreSQL one SQL
//! statement (data-modifying CTEs; a statement outside an explicit
//! transaction is atomic on its own), on SQLite one blocking call that runs
//! `BEGIN IMMEDIATE`, the statements and `COMMIT` on the connection's thread.
//! They are therefore written once per backend, unlike the other queries
//! here; the unit tests below run each on both. A webhook delivery and its
//! job are a third write of the same kind, so that every job write goes
//! through the coordinator's one job writer.

mod postgres;
mod reads;
mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::AsyncConnection as _;
// For the test-only write below; the other writes run in `postgres.rs` and
// `sqlite.rs`, the reads in `reads.rs`.
#[cfg(test)]
use diesel_async::RunQueryDsl;

use super::schema::{job_history, job_labels, jobs, webhook_deliveries};
use super::{Conflict, Store, StoreError};
use crate::coordinator::state::{JobState, JobWrite, Percent};

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub job_type: String,
    /// Empty: no workspace.
    pub workspace: String,
    /// A JSON document, or empty.
    pub payload_json: String,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub state: JobState,
    pub progress: Percent,
    pub progress_message: String,
    /// A JSON document, or empty; set when COMPLETED.
    pub result_json: String,
    /// Set when FAILED.
    pub error: String,
    pub created_by: String,
    /// Empty: no agent.
    pub agent_id: String,
    /// Empty: a local agent or none.
    pub peer_instance_id: String,
    pub idempotency_key: Option<String>,
    /// The number of history entries, which is the sequence of the latest.
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
}

impl JobRecord {
    /// A PENDING job with no payload, labels or key, created at `now_ms`;
    /// version 1, the creation entry's sequence.
    pub fn new_pending(id: String, job_type: String, now_ms: i64) -> JobRecord {
        JobRecord {
            id,
            job_type,
            workspace: String::new(),
            payload_json: String::new(),
            priority: 0,
            labels: BTreeMap::new(),
            state: JobState::Pending,
            progress: Percent::default(),
            progress_message: String::new(),
            result_json: String::new(),
            error: String::new(),
            created_by: String::new(),
            agent_id: String::new(),
            peer_instance_id: String::new(),
            idempotency_key: None,
            version: 1,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            started_at_ms: None,
            ended_at_ms: None,
        }
    }
}

/// One recorded change of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobHistoryRecord {
    pub job_id: String,
    /// 1 for the creation, then one more per change.
    pub sequence: i64,
    /// `None` for the creation entry.
    pub from_state: Option<JobState>,
    pub to_state: JobState,
    pub progress: Percent,
    pub message: String,
    pub actor: String,
    pub at_ms: i64,
}

/// Which jobs `list_jobs` returns; `None` and empty match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub job_type: Option<String>,
    pub workspace: Option<String>,
    /// Every one must be carried with this exact value.
    pub labels: BTreeMap<String, String>,
}

/// Where a page of `list_jobs` starts: strictly after (older than) this job
/// in newest-first order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCursor {
    pub created_at_ms: i64,
    pub id: String,
}

/// Which stored job `write_job_change` may change: the one with this id, in
/// this state and, when `version` is set, at this version. Without a version
/// the state alone decides, which is right only for a change whose legality
/// depends on the state alone (see `coordinator::state::sole_source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobGuard<'a> {
    pub job_id: &'a str,
    pub state: JobState,
    pub version: Option<i64>,
}

/// What `record_webhook_delivery` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The delivery is new: it and its job (if any) were written.
    Recorded,
    /// The delivery was already recorded; nothing was written. `job_id` is
    /// the first delivery's job, `None` if that delivery was ignored.
    Duplicate { job_id: Option<String> },
}

/// One write of a batch written by `Store::write_jobs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobWriteOp {
    /// A new job, its labels and its creation entry.
    Insert {
        job: JobRecord,
        creation: JobHistoryRecord,
    },
    /// A change of the job the guard names, with its history entry.
    Change {
        job_id: String,
        state: JobState,
        version: Option<i64>,
        write: JobWrite,
    },
    /// A webhook delivery of `source` and, unless the delivery is ignored
    /// (`job` is `None`), its job and creation entry: all written, or
    /// nothing when the source's delivery id is already recorded. An empty
    /// delivery id is not deduplicated (and no delivery row is kept).
    Delivery {
        source: String,
        delivery_id: String,
        job: Option<Box<(JobRecord, JobHistoryRecord)>>,
        received_at_ms: i64,
    },
}

impl JobWriteOp {
    /// A change under `guard`.
    pub fn change(guard: &JobGuard<'_>, write: JobWrite) -> JobWriteOp {
        JobWriteOp::Change {
            job_id: guard.job_id.to_owned(),
            state: guard.state,
            version: guard.version,
            write,
        }
    }
}

/// What one write of a batch did, in the order of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobWritten {
    /// An insert: `false` when a job with its id or idempotency key exists
    /// and nothing of it was written.
    Inserted(bool),
    /// A change: the job as written, or `None` when no stored job matched
    /// the guard and nothing was written.
    Changed(Option<Box<JobRecord>>),
    /// A webhook delivery: recorded, or a duplicate and nothing written.
    Delivered(DeliveryOutcome),
}

impl Store {
    /// Writes a new job, its labels and its creation entry atomically, in
    /// one round trip. `StoreError::Conflict` if a job already has its
    /// idempotency key (or its id); nothing is written then.
    pub async fn insert_job(
        &self,
        job: &JobRecord,
        creation: &JobHistoryRecord,
    ) -> Result<(), StoreError> {
        let op = JobWriteOp::Insert {
            job: job.clone(),
            creation: creation.clone(),
        };
        match self.write_job(op).await? {
            JobWritten::Inserted(true) => Ok(()),
            _ => Err(StoreError::Conflict(Conflict::JobExists)),
        }
    }

    /// Applies `write` to the job `guard` names, with its history entry
    /// (from `guard.state`, sequence the new version), atomically and in one
    /// round trip: the job as written, or `None` when no stored job matched
    /// the guard and nothing was written (it does not exist, or it is in
    /// another state or at another version; the caller reads it to know).
    pub async fn write_job_change(
        &self,
        guard: &JobGuard<'_>,
        write: &JobWrite,
    ) -> Result<Option<JobRecord>, StoreError> {
        match self
            .write_job(JobWriteOp::change(guard, write.clone()))
            .await?
        {
            JobWritten::Changed(job) => Ok(job.map(|job| *job)),
            JobWritten::Inserted(_) | JobWritten::Delivered(_) => Ok(None),
        }
    }

    /// Writes `op` alone: `write_jobs` with a batch of one.
    pub async fn write_job(&self, op: JobWriteOp) -> Result<JobWritten, StoreError> {
        self.write_jobs(Arc::from([op]))
            .await?
            .pop()
            .ok_or_else(|| StoreError::Unavailable("the write was not answered".to_owned()))
    }

    /// Writes `ops` in order in one transaction, with one answer per write
    /// (an insert that finds its key used and a change whose guard does not
    /// match write nothing and are no error). Any error rolls the whole
    /// batch back.
    ///
    /// One write is one round trip: on PostgreSQL one statement, atomic on
    /// its own; on SQLite one blocking call running `BEGIN IMMEDIATE`, the
    /// statements and `COMMIT`. A batch adds no round trip on SQLite and
    /// `BEGIN` and `COMMIT` on PostgreSQL, and commits once.
    /// The writes are shared, not copied, with the blocking thread that
    /// writes them on SQLite; the caller keeps them (to write them again one
    /// at a time if the batch fails).
    pub async fn write_jobs(&self, ops: Arc<[JobWriteOp]>) -> Result<Vec<JobWritten>, StoreError> {
        // Encoded before any connection is taken: a job whose labels cannot be
        // stored fails the batch without a round trip.
        let mut labels = ops
            .iter()
            .map(|op| match op {
                JobWriteOp::Insert { job, .. } => labels_json(job).map(Some),
                JobWriteOp::Delivery { job: Some(job), .. } => labels_json(&job.0).map(Some),
                JobWriteOp::Change { .. } | JobWriteOp::Delivery { job: None, .. } => Ok(None),
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let rows = with_connection!(
            self,
            sqlite = |conn| {
                let ops = Arc::clone(&ops);
                conn.spawn_blocking(move |conn| {
                    conn.immediate_transaction(|conn| {
                        ops.iter()
                            .zip(labels)
                            .map(|(op, labels)| sqlite::write(conn, op, labels))
                            .collect::<QueryResult<Vec<_>>>()
                    })
                })
                .await?
            },
            postgres = |conn| {
                if let ([op], [labels]) = (&ops[..], labels.as_mut_slice()) {
                    vec![postgres::write(conn, op, labels.take()).await?]
                } else {
                    conn.transaction::<_, StoreError, _>(async |conn| {
                        let mut rows = Vec::with_capacity(ops.len());
                        for (op, labels) in ops.iter().zip(&labels) {
                            rows.push(postgres::write(conn, op, labels.clone()).await?);
                        }
                        Ok(rows)
                    })
                    .await?
                }
            }
        );
        rows.into_iter()
            .map(|written| {
                Ok(match written {
                    Written::Inserted(inserted) => JobWritten::Inserted(inserted),
                    Written::Changed(row) => JobWritten::Changed(
                        row.map(|row| JobRecord::try_from(*row).map(Box::new))
                            .transpose()?,
                    ),
                    Written::Delivered(outcome) => JobWritten::Delivered(outcome),
                })
            })
            .collect()
    }

    /// Records a webhook delivery of `source` and, unless the delivery is
    /// ignored (`job` is `None`), its job, atomically (`JobWriteOp::Delivery`,
    /// written alone; the coordinator writes it through its job writer). A
    /// delivery id already recorded for the source writes nothing and
    /// returns the first delivery's job id. An empty `delivery_id` is not
    /// deduplicated.
    pub async fn record_webhook_delivery(
        &self,
        source: &str,
        delivery_id: &str,
        job: Option<(&JobRecord, &JobHistoryRecord)>,
        now_ms: i64,
    ) -> Result<DeliveryOutcome, StoreError> {
        let op = JobWriteOp::Delivery {
            source: source.to_owned(),
            delivery_id: delivery_id.to_owned(),
            job: job.map(|(job, creation)| Box::new((job.clone(), creation.clone()))),
            received_at_ms: now_ms,
        };
        match self.write_job(op).await? {
            JobWritten::Delivered(outcome) => Ok(outcome),
            JobWritten::Inserted(_) | JobWritten::Changed(_) => Err(StoreError::Unavailable(
                "the delivery was answered as another kind of write".to_owned(),
            )),
        }
    }

    /// Writes a history entry of its own, as if a change had been recorded
    /// without its job being updated: the job's next change then breaks the
    /// history's primary key and fails. For tests of failing writes.
    #[cfg(test)]
    pub(crate) async fn plant_job_history(
        &self,
        entry: &JobHistoryRecord,
    ) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::insert_into(job_history::table)
                .values(NewHistoryRow::of(entry))
                .execute(conn)
                .await?
        });
        Ok(())
    }
}

/// What one write of a batch did, before its row is decoded.
enum Written {
    Inserted(bool),
    Changed(Option<Box<JobRow>>),
    Delivered(DeliveryOutcome),
}

/// A write as each backend's statements take it: the rows of a new job, a
/// change and its guard, or a delivery and its job's rows.
enum Prepared<'a> {
    Insert(Box<JobRows<'a>>),
    Change(JobGuard<'a>, &'a JobWrite),
    Delivery(DeliveryRows<'a>),
}

/// The error of a webhook job whose id another job has (a new UUID v7:
/// never, short of a broken clock and generator), on either backend.
fn webhook_job_id_taken() -> diesel::result::Error {
    diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::UniqueViolation,
        Box::new("a job with the webhook job's id exists".to_owned()),
    )
}

/// A webhook delivery as written: its row (not written when its id is
/// empty) and its job's rows (none when the delivery is ignored).
struct DeliveryRows<'a> {
    delivery: NewDeliveryRow<'a>,
    job: Option<Box<JobRows<'a>>>,
}

impl JobWriteOp {
    /// This write as rows and guard; `labels_json` is the new job's labels,
    /// encoded (`None` for a change).
    fn prepare(&self, labels_json: Option<String>) -> Prepared<'_> {
        match self {
            JobWriteOp::Insert { job, creation } => Prepared::Insert(Box::new(JobRows::of(
                job,
                creation,
                labels_json.unwrap_or_default(),
            ))),
            JobWriteOp::Change {
                job_id,
                state,
                version,
                write,
            } => Prepared::Change(
                JobGuard {
                    job_id,
                    state: *state,
                    version: *version,
                },
                write,
            ),
            JobWriteOp::Delivery {
                source,
                delivery_id,
                job,
                received_at_ms,
            } => Prepared::Delivery(DeliveryRows {
                delivery: NewDeliveryRow {
                    source,
                    delivery_id,
                    job_id: job.as_ref().map(|job| job.0.id.as_str()),
                    received_at_ms: *received_at_ms,
                },
                job: job.as_ref().map(|job| {
                    Box::new(JobRows::of(&job.0, &job.1, labels_json.unwrap_or_default()))
                }),
            }),
        }
    }
}

/// The rows one new job is written as.
struct JobRows<'a> {
    job: NewJobRow<'a>,
    labels: Vec<NewLabelRow<'a>>,
    creation: NewHistoryRow<'a>,
}

impl<'a> JobRows<'a> {
    fn of(job: &'a JobRecord, creation: &'a JobHistoryRecord, labels_json: String) -> Self {
        JobRows {
            job: NewJobRow {
                id: &job.id,
                job_type: &job.job_type,
                workspace: &job.workspace,
                payload_json: &job.payload_json,
                priority: job.priority,
                labels_json,
                state: job.state.as_str(),
                progress: i32::from(job.progress.get()),
                progress_message: &job.progress_message,
                result_json: &job.result_json,
                error: &job.error,
                created_by: &job.created_by,
                agent_id: &job.agent_id,
                peer_instance_id: &job.peer_instance_id,
                idempotency_key: job.idempotency_key.as_deref(),
                version: job.version,
                created_at_ms: job.created_at_ms,
                updated_at_ms: job.updated_at_ms,
                started_at_ms: job.started_at_ms,
                ended_at_ms: job.ended_at_ms,
            },
            labels: job
                .labels
                .iter()
                .map(|(name, value)| NewLabelRow {
                    job_id: &job.id,
                    name,
                    value,
                })
                .collect(),
            creation: NewHistoryRow::of(creation),
        }
    }
}

/// The job's labels as the JSON object stored in `jobs.labels_json`.
fn labels_json(job: &JobRecord) -> Result<String, StoreError> {
    serde_json::to_string(&job.labels).map_err(StoreError::unencodable)
}

#[derive(Insertable)]
#[diesel(table_name = jobs)]
struct NewJobRow<'a> {
    id: &'a str,
    job_type: &'a str,
    workspace: &'a str,
    payload_json: &'a str,
    priority: i32,
    labels_json: String,
    state: &'static str,
    progress: i32,
    progress_message: &'a str,
    result_json: &'a str,
    error: &'a str,
    created_by: &'a str,
    agent_id: &'a str,
    peer_instance_id: &'a str,
    idempotency_key: Option<&'a str>,
    version: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
}

#[derive(Insertable)]
#[diesel(table_name = job_labels)]
struct NewLabelRow<'a> {
    job_id: &'a str,
    name: &'a str,
    value: &'a str,
}

#[derive(Insertable)]
#[diesel(table_name = job_history)]
struct NewHistoryRow<'a> {
    job_id: &'a str,
    sequence: i64,
    from_state: Option<&'static str>,
    to_state: &'static str,
    progress: i32,
    message: &'a str,
    actor: &'a str,
    at_ms: i64,
}

impl<'a> NewHistoryRow<'a> {
    fn of(entry: &'a JobHistoryRecord) -> Self {
        NewHistoryRow {
            job_id: &entry.job_id,
            sequence: entry.sequence,
            from_state: entry.from_state.map(JobState::as_str),
            to_state: entry.to_state.as_str(),
            progress: i32::from(entry.progress.get()),
            message: &entry.message,
            actor: &entry.actor,
            at_ms: entry.at_ms,
        }
    }
}

#[derive(Insertable)]
#[diesel(table_name = webhook_deliveries)]
struct NewDeliveryRow<'a> {
    source: &'a str,
    delivery_id: &'a str,
    job_id: Option<&'a str>,
    received_at_ms: i64,
}

#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = jobs, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct JobRow {
    id: String,
    job_type: String,
    workspace: String,
    payload_json: String,
    priority: i32,
    labels_json: String,
    state: String,
    progress: i32,
    progress_message: String,
    result_json: String,
    error: String,
    created_by: String,
    agent_id: String,
    peer_instance_id: String,
    idempotency_key: Option<String>,
    version: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = job_history, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct HistoryRow {
    job_id: String,
    sequence: i64,
    from_state: Option<String>,
    to_state: String,
    progress: i32,
    message: String,
    actor: String,
    at_ms: i64,
}

fn decode_state(text: &str) -> Result<JobState, StoreError> {
    JobState::parse(text)
        .ok_or_else(|| StoreError::undecodable(format!("unknown job state {text:?}")))
}

fn decode_percent(value: i32) -> Result<Percent, StoreError> {
    u32::try_from(value)
        .ok()
        .and_then(Percent::new)
        .ok_or_else(|| StoreError::undecodable(format!("job progress {value} is not 0 to 100")))
}

impl TryFrom<JobRow> for JobRecord {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(JobRecord {
            labels: serde_json::from_str(&row.labels_json).map_err(StoreError::undecodable)?,
            state: decode_state(&row.state)?,
            progress: decode_percent(row.progress)?,
            id: row.id,
            job_type: row.job_type,
            workspace: row.workspace,
            payload_json: row.payload_json,
            priority: row.priority,
            progress_message: row.progress_message,
            result_json: row.result_json,
            error: row.error,
            created_by: row.created_by,
            agent_id: row.agent_id,
            peer_instance_id: row.peer_instance_id,
            idempotency_key: row.idempotency_key,
            version: row.version,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            started_at_ms: row.started_at_ms,
            ended_at_ms: row.ended_at_ms,
        })
    }
}

impl TryFrom<HistoryRow> for JobHistoryRecord {
    type Error = StoreError;

    fn try_from(row: HistoryRow) -> Result<Self, StoreError> {
        Ok(JobHistoryRecord {
            from_state: row.from_state.as_deref().map(decode_state).transpose()?,
            to_state: decode_state(&row.to_state)?,
            progress: decode_percent(row.progress)?,
            job_id: row.job_id,
            sequence: row.sequence,
            message: row.message,
            actor: row.actor,
            at_ms: row.at_ms,
        })
    }
}

#[cfg(test)]
mod tests;
