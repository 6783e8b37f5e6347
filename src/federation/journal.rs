//! Group commit of received commands: each accepted command's message id and
//! log entry must be committed before its signed result leaves (that commit is
//! what makes a replay return the stored result), and on one SQLite connection
//! a commit per command is what bounds how many commands a daemon answers.
//!
//! Receivers hand their rows to one writer task and wait for its answer. The
//! writer takes what has queued up (up to [`MAX_BATCH`]) and commits it in one
//! transaction with an outcome per command (`Store::record_inbound_commands`),
//! so with one caller nothing waits for anything and with many a commit carries
//! many commands.

use tokio::sync::{mpsc, oneshot};

use crate::store::{CommandLogRecord, SeenMessage, Store, StoreError, WriteOutcome};

/// Most commands in one transaction.
const MAX_BATCH: usize = 64;
/// Commands waiting for the writer before receivers wait to queue.
const QUEUE: usize = 1024;

/// One received command's rows and where its outcome goes.
struct Entry {
    seen: SeenMessage,
    record: CommandLogRecord,
    done: oneshot::Sender<Result<WriteOutcome<()>, String>>,
}

/// The queue to the writer task; the task ends when this is dropped.
#[derive(Debug)]
pub(super) struct Journal {
    entries: mpsc::Sender<Entry>,
}

impl Journal {
    /// Starts the writer task on the current tokio runtime.
    pub(super) fn start(store: Store) -> Journal {
        let (entries, queued) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, queued));
        Journal { entries }
    }

    /// Commits a received command's message id and log entry (with whatever
    /// else is queued); [`WriteOutcome::DuplicateMessage`] if its message id
    /// was seen before, and then nothing of it is written.
    pub(super) async fn record(
        &self,
        seen: SeenMessage,
        record: CommandLogRecord,
    ) -> Result<WriteOutcome<()>, StoreError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the command journal has stopped".to_owned());
        self.entries
            .send(Entry { seen, record, done })
            .await
            .map_err(|_| stopped())?;
        outcome
            .await
            .map_err(|_| stopped())?
            .map_err(StoreError::Unavailable)
    }
}

/// The writer: one transaction per batch of queued entries, until the queue
/// closes.
async fn write_batches(store: Store, mut queued: mpsc::Receiver<Entry>) {
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        let (rows, waiting): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|entry| ((entry.seen, entry.record), entry.done))
            .unzip();
        match store.record_inbound_commands(rows).await {
            Ok(outcomes) => {
                for (done, outcome) in waiting.into_iter().zip(outcomes) {
                    // A receiver that gave up (its call was cancelled) is
                    // no longer listening; its rows are written all the same.
                    let _ = done.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not record received commands");
                let message = match error {
                    StoreError::Unavailable(message) => message,
                    other => other.to_string(),
                };
                for done in waiting {
                    let _ = done.send(Err(message.clone()));
                }
            }
        }
    }
}
