//! Group commit of received commands: each accepted command's message id and
//! log entry must be committed before its signed result leaves (that commit is
//! what makes a replay return the stored result), and on one SQLite connection
//! a commit per command is what bounds how many commands a daemon answers.
//! Receivers' rows go through a `store::GroupCommit`, which commits those
//! that queued up together in one transaction with an outcome per command
//! (`Store::record_inbound_commands`).

use crate::store::{CommandLogRecord, GroupCommit, SeenMessage, Store, StoreError, WriteOutcome};

/// Most commands in one transaction.
const MAX_BATCH: usize = 64;

/// The queue to the writer task; the task ends when this is dropped.
#[derive(Debug)]
pub(super) struct Journal {
    writer: GroupCommit<(SeenMessage, CommandLogRecord), WriteOutcome<()>>,
}

impl Journal {
    /// Starts the writer task on the current tokio runtime.
    pub(super) fn start(store: Store) -> Journal {
        let writer = GroupCommit::start(MAX_BATCH, move |rows: Vec<_>| {
            let store = store.clone();
            async move {
                let count = rows.len();
                let written = store.record_inbound_commands(rows).await;
                if let Err(error) = &written {
                    tracing::warn!(%error, "could not record received commands");
                }
                crate::store::each_or_all(written, count)
            }
        });
        Journal { writer }
    }

    /// Commits a received command's message id and log entry (with whatever
    /// else is queued); [`WriteOutcome::DuplicateMessage`] if its message id
    /// was seen before, and then nothing of it is written.
    pub(super) async fn record(
        &self,
        seen: SeenMessage,
        record: CommandLogRecord,
    ) -> Result<WriteOutcome<()>, StoreError> {
        self.writer.write((seen, record)).await
    }
}
