//! Jobs over the store: create (idempotently), change through the state
//! machine with an optimistic version check, read, list, watch, and turn
//! webhook deliveries into jobs.
//!
//! Every write is committed before it is acknowledged or published, and a
//! change that loses a race is re-read and re-judged by the state machine, so
//! of two racing terminal changes one wins and the other is refused as an
//! illegal transition.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use super::events::JobEvents;
use super::state::{self, JobChange, JobWrite};
use super::webhook;
use super::{CoordinatorError, CoordinatorState};
use crate::clock::now_ms;
use crate::config::{CoordinatorConfig, WebhookSource};
use crate::store::{
    Conflict, DeliveryOutcome, GroupCommit, JobCursor, JobFilter, JobGuard, JobHistoryRecord,
    JobRecord, JobWriteOp, JobWritten, Store, StoreError,
};

/// Most job writes committed in one transaction.
const MAX_WRITE_BATCH: usize = 32;

/// The group commit of job creates and changes: on SQLite concurrent calls'
/// writes are committed together (one commit, not one per call), each
/// acknowledged only once its batch is committed; on PostgreSQL each call
/// writes its own (see `store::GroupCommit`).
pub(crate) type JobWriter = GroupCommit<JobWriteOp, JobWritten>;

/// How often a change that lost a race is retried before the caller is told
/// to try again. Each retry re-reads the job, so only a job changing
/// continuously under many writers exhausts it.
const MAX_CHANGE_ATTEMPTS: usize = 8;

/// Limits on request fields, in bytes. Payloads and results use
/// `coordinator.max_payload_bytes`.
const MAX_JOB_TYPE: usize = 128;
const MAX_WORKSPACE: usize = 128;
const MAX_IDEMPOTENCY_KEY: usize = 128;
const MAX_LABELS: usize = 32;
const MAX_LABEL_NAME: usize = 64;
const MAX_LABEL_VALUE: usize = 256;
const MAX_MESSAGE: usize = 4096;
const MAX_DELIVERY_ID: usize = 256;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_VALUE: usize = 8192;

/// How often a watcher also reads the job from the database, to catch
/// changes made by another daemon sharing the same PostgreSQL (the
/// in-process feed only carries this daemon's changes).
const WATCH_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Messages a watch stream buffers for a slow client.
const WATCH_BUFFER: usize = 64;

/// A job to create, as the caller asked for it (not yet validated).
#[derive(Clone, Debug, Default)]
pub struct NewJob {
    /// Required.
    pub job_type: String,
    pub workspace: String,
    /// A JSON document or empty.
    pub payload_json: String,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    /// Empty: no deduplication.
    pub idempotency_key: String,
}

/// A webhook delivery as received (not yet validated).
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    pub source: String,
    pub event_type: String,
    pub delivery_id: String,
    pub body: Vec<u8>,
    pub signature: String,
    pub headers: BTreeMap<String, String>,
}

/// What became of a delivery.
#[derive(Clone, Debug)]
pub struct DeliveryResult {
    /// The job made for it (or for its first delivery); `None` when the
    /// source ignores the event.
    pub job: Option<JobRecord>,
    /// The delivery id had been seen before; nothing was created.
    pub duplicate: bool,
}

/// One message of a watch: a change and the job after it.
pub type WatchItem = (JobHistoryRecord, JobRecord);

/// The coordinator's job operations over one store.
#[derive(Clone, Debug)]
pub struct Jobs {
    store: Store,
    events: JobEvents,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The daemon's job writer, shared with every `Jobs` of its
    /// `CoordinatorState`; started on the first write.
    writer: std::sync::Arc<std::sync::OnceLock<JobWriter>>,
    max_payload_bytes: usize,
}

impl Jobs {
    /// Operations on `store`, publishing committed changes to the feed in
    /// `state`.
    pub fn new(store: Store, state: &CoordinatorState, config: &CoordinatorConfig) -> Jobs {
        Jobs {
            events: state.events.clone(),
            shutdown: state.shutdown_signal(),
            writer: state.job_writes(),
            store,
            max_payload_bytes: config.max_payload_bytes,
        }
    }

    /// The job writer, started (on SQLite, a task on the current tokio
    /// runtime) at the first write. Every job write goes through it —
    /// creates, changes and webhook deliveries — so on SQLite the job
    /// writes of the daemon are one queue, committed in batches.
    fn writer(&self) -> &JobWriter {
        self.writer.get_or_init(|| {
            let store = self.store.clone();
            GroupCommit::start(store.backend(), MAX_WRITE_BATCH, move |ops| {
                let store = store.clone();
                async move {
                    let written = write_batch(&store, ops).await;
                    // Watchers on the other replicas hear of the changes.
                    super::events::notify_changes(
                        &store,
                        written.iter().filter_map(|written| match written {
                            Ok(JobWritten::Changed(Some(job))) => {
                                Some((job.id.as_str(), job.version))
                            }
                            _ => None,
                        }),
                    );
                    written
                }
            })
        })
    }

    /// Creates a PENDING job, committed before this returns. With an
    /// idempotency key already used, returns that job and `false`.
    pub async fn create(
        &self,
        new_job: NewJob,
        actor: &str,
    ) -> Result<(JobRecord, bool), CoordinatorError> {
        validate_new_job(&new_job, self.max_payload_bytes)?;
        // No read first: the insert itself finds a used key (a conflict, and
        // nothing written), so a new job costs one write and a retried
        // create one write and one read.
        let key = Some(new_job.idempotency_key.clone()).filter(|key| !key.is_empty());
        let mut job = JobRecord::new_pending(new_job_id(), new_job.job_type, now_ms());
        job.workspace = new_job.workspace;
        job.payload_json = new_job.payload_json;
        job.priority = new_job.priority;
        job.labels = new_job.labels;
        job.created_by = actor.to_owned();
        job.idempotency_key = key.clone();
        let creation = state::creation_entry(&job, actor);
        let op = JobWriteOp::Insert {
            job: job.clone(),
            creation: creation.clone(),
        };
        match self.writer().write(op).await? {
            JobWritten::Inserted(true) => {
                self.events.publish(&job, creation);
                Ok((job, true))
            }
            _ => {
                // An earlier or concurrent create with the same key committed
                // first.
                let existing = match &key {
                    Some(key) => self.store.find_job_by_idempotency_key(key).await?,
                    None => None,
                };
                existing.map(|existing| (existing, false)).ok_or_else(|| {
                    CoordinatorError::Store(StoreError::Conflict(Conflict::JobExists))
                })
            }
        }
    }

    /// The job with this id.
    pub async fn get(&self, job_id: &str) -> Result<JobRecord, CoordinatorError> {
        validate_job_id(job_id)?;
        self.store
            .find_job(job_id)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(job_id.to_owned()))
    }

    /// Every change of the job, oldest first.
    pub async fn history(&self, job_id: &str) -> Result<Vec<JobHistoryRecord>, CoordinatorError> {
        self.get(job_id).await?;
        Ok(self.store.job_history(job_id, 0).await?)
    }

    /// A page of jobs matching `filter`, newest first, and the token of the
    /// next page (empty on the last page).
    pub async fn list(
        &self,
        filter: &JobFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<JobRecord>, String), CoordinatorError> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(super::paging::decode(filter, page_token).ok_or_else(|| {
                CoordinatorError::Invalid(
                    "page_token was not made by this server for these filters; start again without it"
                        .to_owned(),
                )
            })?)
        };
        let size = super::paging::page_size(page_size);
        // One more than asked says whether there is a next page.
        let mut jobs = self
            .store
            .list_jobs(filter, after.as_ref(), i64::from(size) + 1)
            .await?;
        let more = jobs.len() > size as usize;
        jobs.truncate(size as usize);
        let next = match jobs.last() {
            Some(last) if more => super::paging::encode(
                filter,
                &JobCursor {
                    created_at_ms: last.created_at_ms,
                    id: last.id.clone(),
                },
            ),
            _ => String::new(),
        };
        Ok((jobs, next))
    }

    /// Applies `change` to the job, committed before this returns.
    ///
    /// A change that is legal from one state only (start, attach, complete)
    /// is written at once, guarded by that state; the job is read only when
    /// the guard fails, to name the reason or to find that it has just moved
    /// into that state. Every other change reads the job, asks the state
    /// machine, and is written guarded by the version it read.
    pub async fn change(
        &self,
        job_id: &str,
        change: JobChange,
        actor: &str,
    ) -> Result<JobRecord, CoordinatorError> {
        // In this order, as before the write without a read: a request with
        // both wrong gets the same message.
        validate_change(&change, self.max_payload_bytes)?;
        validate_job_id(job_id)?;
        if let Some(source) = state::sole_source(&change) {
            let guard = JobGuard {
                job_id,
                state: source,
                version: None,
            };
            let write = state::write_of(&change, actor, now_ms());
            if let Some(job) = self.write_change(&guard, &write).await? {
                return Ok(job);
            }
        }
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let job = self.get(job_id).await?;
            state::check(&job, &change)?;
            let guard = JobGuard {
                job_id,
                state: job.state,
                version: Some(job.version),
            };
            let write = state::write_of(&change, actor, now_ms());
            if let Some(job) = self.write_change(&guard, &write).await? {
                return Ok(job);
            }
        }
        Err(CoordinatorError::Contention)
    }

    /// Writes one change under `guard` and publishes it: the job as written,
    /// or `None` when the stored job did not match the guard.
    async fn write_change(
        &self,
        guard: &JobGuard<'_>,
        write: &JobWrite,
    ) -> Result<Option<JobRecord>, CoordinatorError> {
        let op = JobWriteOp::change(guard, write.clone());
        let written = match self.writer().write(op).await? {
            JobWritten::Changed(job) => job.map(|job| *job),
            JobWritten::Inserted(_) | JobWritten::Delivered(_) => None,
        };
        if let Some(job) = &written {
            let entry = write.entry(job, guard.state);
            tracing::debug!(
                job.id = %job.id,
                job.state = %job.state,
                sequence = entry.sequence,
                "job changed"
            );
            self.events.publish(job, entry);
        }
        Ok(written)
    }

    /// The RUNNING jobs that follow a local agent.
    pub async fn running_jobs_with_local_agents(&self) -> Result<Vec<JobRecord>, CoordinatorError> {
        Ok(self.store.running_jobs_with_local_agents().await?)
    }

    /// The RUNNING jobs that follow an agent on a peer.
    pub async fn running_jobs_with_remote_agents(
        &self,
    ) -> Result<Vec<JobRecord>, CoordinatorError> {
        Ok(self.store.running_jobs_with_remote_agents().await?)
    }

    /// The PENDING jobs without agent created at or after `since_ms`.
    pub async fn pending_jobs_without_agent_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<JobRecord>, CoordinatorError> {
        Ok(self
            .store
            .pending_jobs_without_agent_since(since_ms)
            .await?)
    }

    /// A receiver that sees `true` once the daemon starts shutting down.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Follows a job: the first item is its current state with its latest
    /// history entry, then one item per change, ending after the change into
    /// a terminal state (at once for a job that has already ended).
    pub async fn watch(
        &self,
        job_id: &str,
    ) -> Result<mpsc::Receiver<Result<WatchItem, CoordinatorError>>, CoordinatorError> {
        // Subscribe before reading: a change committed after the read is then
        // certainly in the feed, and one committed before it is skipped by
        // its sequence.
        let feed = self.events.subscribe();
        let hints = self.events.subscribe_hints();
        let job = self.get(job_id).await?;
        // The entry that made this version of the job, not the latest one: a
        // change committed between the two reads must not be paired with the
        // job as it was before it (the stream would then skip that change).
        let entry = self
            .store
            .job_history(job_id, job.version - 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| CoordinatorError::NotFound(job_id.to_owned()))?;
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let store = self.store.clone();
        let watch = Watch {
            store,
            feed,
            hints,
            sender,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watch.follow((entry, job)));
        Ok(receiver)
    }

    /// Turns a webhook delivery into a job as `config` says for its source.
    pub async fn handle_webhook(
        &self,
        delivery: Delivery,
        config: &CoordinatorConfig,
    ) -> Result<DeliveryResult, CoordinatorError> {
        let source = config.webhooks.get(&delivery.source).ok_or_else(|| {
            CoordinatorError::Invalid(format!(
                "unknown webhook source {:?}; configure [coordinator.webhooks.{}]",
                delivery.source, delivery.source
            ))
        })?;
        let now = now_ms();
        let job = webhook_job(&delivery, source, self.max_payload_bytes, now)?;
        let op = JobWriteOp::Delivery {
            source: delivery.source.clone(),
            delivery_id: delivery.delivery_id.clone(),
            job: job.clone().map(Box::new),
            received_at_ms: now,
        };
        let outcome = match self.writer().write(op).await? {
            JobWritten::Delivered(outcome) => outcome,
            JobWritten::Inserted(_) | JobWritten::Changed(_) => {
                return Err(CoordinatorError::Store(StoreError::Unavailable(
                    "a webhook delivery was answered as another kind of write".to_owned(),
                )));
            }
        };
        match outcome {
            DeliveryOutcome::Recorded => {
                tracing::info!(
                    webhook.source = %delivery.source,
                    webhook.event = %delivery.event_type,
                    job.id = job.as_ref().map(|(job, _)| job.id.as_str()).unwrap_or(""),
                    "webhook delivery recorded"
                );
                let job = job.map(|(job, creation)| {
                    self.events.publish(&job, creation);
                    job
                });
                Ok(DeliveryResult {
                    job,
                    duplicate: false,
                })
            }
            DeliveryOutcome::Duplicate { job_id } => {
                let job = match job_id {
                    Some(job_id) => self.store.find_job(&job_id).await?,
                    None => None,
                };
                Ok(DeliveryResult {
                    job,
                    duplicate: true,
                })
            }
        }
    }
}

/// Writes a batch of job writes in one transaction. If the batch fails, each
/// write is tried again alone, so that a write that cannot be made fails
/// only its own call (nothing of a failed batch was committed).
async fn write_batch(store: &Store, ops: Vec<JobWriteOp>) -> Vec<Result<JobWritten, StoreError>> {
    let ops: std::sync::Arc<[JobWriteOp]> = ops.into();
    match store.write_jobs(std::sync::Arc::clone(&ops)).await {
        Ok(written) => written.into_iter().map(Ok).collect(),
        Err(error) if ops.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::debug!(%error, writes = ops.len(), "a batch of job writes failed; writing each alone");
            let mut answers = Vec::with_capacity(ops.len());
            for op in ops.iter() {
                answers.push(store.write_job(op.clone()).await);
            }
            answers
        }
    }
}

/// What one watch stream's task holds.
struct Watch {
    store: Store,
    feed: broadcast::Receiver<std::sync::Arc<super::events::JobEvent>>,
    /// Changes made through other replicas: (job id, version after).
    hints: broadcast::Receiver<std::sync::Arc<(String, i64)>>,
    sender: mpsc::Sender<Result<WatchItem, CoordinatorError>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Watch {
    /// Feeds the stream with the changes of the job in `first` until it ends,
    /// the client goes away, or the daemon shuts down.
    async fn follow(self, first: WatchItem) {
        let Watch {
            store,
            mut feed,
            mut hints,
            sender,
            mut shutdown,
        } = self;
        let job_id = first.1.id.clone();
        let mut last_sequence = first.0.sequence;
        let mut ended = first.1.state.is_terminal();
        if sender.send(Ok(first)).await.is_err() || ended {
            return;
        }
        let mut poll = tokio::time::interval(WATCH_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !ended {
            // `None`: read what was missed from the history.
            let next: Option<Vec<WatchItem>> = tokio::select! {
                () = sender.closed() => return,
                () = shutdown_begins(&mut shutdown) => {
                    let _ = sender.send(Err(CoordinatorError::ShuttingDown)).await;
                    return;
                }
                received = feed.recv() => match received {
                    Ok(event) if event.job.id != job_id || event.entry.sequence <= last_sequence => {
                        continue;
                    }
                    Ok(event) if event.entry.sequence == last_sequence + 1 => {
                        Some(vec![(event.entry.clone(), event.job.clone())])
                    }
                    // A gap (changes published out of order) or a lag: the
                    // history has everything.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                hint = hints.recv() => match hint {
                    // The history sequence of a change is the version it
                    // made.
                    Ok(hint) if hint.0 != job_id || hint.1 <= last_sequence => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = poll.tick() => None,
            };
            let items = match next {
                Some(items) => items,
                None => match catch_up(&store, &job_id, last_sequence).await {
                    Ok(items) => items,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                },
            };
            for item in items {
                last_sequence = item.0.sequence;
                ended = item.0.to_state.is_terminal();
                if sender.send(Ok(item)).await.is_err() {
                    return;
                }
                if ended {
                    break;
                }
            }
        }
    }
}

/// Completes once shutdown has begun (or can no longer be signalled).
async fn shutdown_begins(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; it is dropped here at once.
    let _ = shutdown.wait_for(|stopping| *stopping).await.is_ok();
}

/// The changes after `last_sequence`, read from the database, each with the
/// job as it is now.
async fn catch_up(
    store: &Store,
    job_id: &str,
    last_sequence: i64,
) -> Result<Vec<WatchItem>, CoordinatorError> {
    let Some(job) = store.find_job(job_id).await? else {
        return Err(CoordinatorError::NotFound(job_id.to_owned()));
    };
    if job.version <= last_sequence {
        return Ok(Vec::new());
    }
    let entries = store.job_history(job_id, last_sequence).await?;
    Ok(entries
        .into_iter()
        .map(|entry| (entry, job.clone()))
        .collect())
}

/// A new job id: a UUIDv7, so ids sort roughly by creation time.
fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Checks a one-line field: at most `max` bytes, no control characters.
fn check_length(field: &str, value: &str, max: usize) -> Result<(), CoordinatorError> {
    check_size(field, value, max)?;
    if has_control(value) {
        return Err(CoordinatorError::Invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Whether `value` holds a control character (Unicode's `Cc`: C0, DEL and
/// C1). The ASCII ones are found by byte, which is what most identifiers
/// are made of; only text beyond ASCII is decoded to look for C1.
fn has_control(value: &str) -> bool {
    value.bytes().any(|byte| byte.is_ascii_control())
        || (!value.is_ascii() && value.chars().any(char::is_control))
}

/// Checks free text (messages may span lines): at most `max` bytes.
fn check_size(field: &str, value: &str, max: usize) -> Result<(), CoordinatorError> {
    if value.len() > max {
        return Err(CoordinatorError::Invalid(format!(
            "{field} is {} bytes; at most {max} are accepted",
            value.len()
        )));
    }
    Ok(())
}

fn check_json(field: &str, value: &str, max: usize) -> Result<(), CoordinatorError> {
    if value.len() > max {
        return Err(CoordinatorError::Invalid(format!(
            "{field} is {} bytes; at most {max} are accepted (coordinator.max_payload_bytes)",
            value.len()
        )));
    }
    if !value.is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(value).is_err() {
        return Err(CoordinatorError::Invalid(format!(
            "{field} is not a JSON document"
        )));
    }
    Ok(())
}

/// Checks an id before it reaches the database.
pub fn validate_job_id(job_id: &str) -> Result<(), CoordinatorError> {
    if job_id.trim().is_empty() {
        return Err(CoordinatorError::Invalid("job_id is required".to_owned()));
    }
    check_length("job_id", job_id, MAX_IDEMPOTENCY_KEY)
}

/// Checks a CreateJob request: required fields, sizes, JSON payload, labels.
pub fn validate_new_job(
    new_job: &NewJob,
    max_payload_bytes: usize,
) -> Result<(), CoordinatorError> {
    if new_job.job_type.trim().is_empty() {
        return Err(CoordinatorError::Invalid("job_type is required".to_owned()));
    }
    check_length("job_type", &new_job.job_type, MAX_JOB_TYPE)?;
    check_length("workspace", &new_job.workspace, MAX_WORKSPACE)?;
    check_length(
        "idempotency_key",
        &new_job.idempotency_key,
        MAX_IDEMPOTENCY_KEY,
    )?;
    check_json("payload_json", &new_job.payload_json, max_payload_bytes)?;
    if new_job.labels.len() > MAX_LABELS {
        return Err(CoordinatorError::Invalid(format!(
            "{} labels; at most {MAX_LABELS} are accepted",
            new_job.labels.len()
        )));
    }
    for (name, value) in &new_job.labels {
        if name.is_empty() {
            return Err(CoordinatorError::Invalid(
                "label names must not be empty".to_owned(),
            ));
        }
        check_length("label name", name, MAX_LABEL_NAME)?;
        check_length("label value", value, MAX_LABEL_VALUE)?;
    }
    Ok(())
}

fn validate_change(change: &JobChange, max_payload_bytes: usize) -> Result<(), CoordinatorError> {
    match change {
        JobChange::AttachAgent {
            agent_id,
            peer_instance_id,
        } => {
            check_length("agent_id", agent_id, MAX_IDEMPOTENCY_KEY)?;
            check_length("peer_instance_id", peer_instance_id, MAX_IDEMPOTENCY_KEY)
        }
        JobChange::Start { message }
        | JobChange::Progress { message, .. }
        | JobChange::Fail { error: message }
        | JobChange::Cancel { reason: message } => check_size("message", message, MAX_MESSAGE),
        JobChange::Complete { result_json } => {
            check_json("result_json", result_json, max_payload_bytes)
        }
    }
}

/// The checks of a webhook delivery for `source` and the job it becomes (with
/// its creation history entry), or `None` when the source ignores the event.
/// Pure: no I/O, nothing recorded. `Jobs::handle_webhook` runs it before its one
/// write; public so the fuzz targets in `fuzz/` reach the same code.
pub fn webhook_job(
    delivery: &Delivery,
    source: &WebhookSource,
    max_payload_bytes: usize,
    now: i64,
) -> Result<Option<(JobRecord, JobHistoryRecord)>, CoordinatorError> {
    validate_delivery(delivery, max_payload_bytes)?;
    if let Some(secret) = &source.secret {
        webhook::verify_signature(secret.0.as_bytes(), &delivery.body, &delivery.signature)?;
    }
    let actor = format!("webhook:{}", delivery.source);
    let job = match webhook::job_type_for(&delivery.source, source, &delivery.event_type) {
        None => None,
        Some(job_type) => {
            let payload_json = webhook::job_payload(
                &delivery.source,
                &delivery.event_type,
                &delivery.delivery_id,
                &delivery.headers,
                &delivery.body,
            )
            .ok_or_else(|| {
                CoordinatorError::Invalid("the webhook body is not a JSON document".to_owned())
            })?;
            check_length(
                "job_type (from the webhook configuration)",
                &job_type,
                MAX_JOB_TYPE,
            )?;
            let mut job = JobRecord::new_pending(new_job_id(), job_type, now);
            job.workspace = source.workspace.clone();
            job.payload_json = payload_json;
            job.created_by = actor.clone();
            job.labels = BTreeMap::from([
                ("webhook.source".to_owned(), delivery.source.clone()),
                ("webhook.event".to_owned(), delivery.event_type.clone()),
            ]);
            let creation = state::creation_entry(&job, &actor);
            Some((job, creation))
        }
    };
    Ok(job)
}

fn validate_delivery(
    delivery: &Delivery,
    max_payload_bytes: usize,
) -> Result<(), CoordinatorError> {
    if delivery.body.len() > max_payload_bytes {
        return Err(CoordinatorError::Invalid(format!(
            "the webhook body is {} bytes; at most {max_payload_bytes} are accepted (coordinator.max_payload_bytes)",
            delivery.body.len()
        )));
    }
    check_length("event_type", &delivery.event_type, MAX_JOB_TYPE)?;
    check_length("delivery_id", &delivery.delivery_id, MAX_DELIVERY_ID)?;
    if delivery.headers.len() > MAX_HEADERS {
        return Err(CoordinatorError::Invalid(format!(
            "{} headers; at most {MAX_HEADERS} are accepted",
            delivery.headers.len()
        )));
    }
    for (name, value) in &delivery.headers {
        check_length("header name", name, MAX_LABEL_NAME)?;
        check_length("header value", value, MAX_HEADER_VALUE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
