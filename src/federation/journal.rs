//! Group commit of the command log on the two paths every command takes.
//!
//! Received commands (`Journal`): each accepted command's message id and log
//! entry must be committed before its signed result leaves (that commit is
//! what makes a replay return the stored result), and on one SQLite
//! connection a commit per command is what bounds how many commands a daemon
//! answers. Sent reads (`SentLog`): a status or list read is logged once it
//! ends, before its caller hears the answer. Each goes through a
//! `store::GroupCommit`, which on SQLite commits the rows that queued up
//! together in one transaction with an outcome per row (on PostgreSQL each
//! row is committed on its own, as it comes).

use crate::store::{CommandLogRecord, GroupCommit, SeenMessage, Store, StoreError, WriteOutcome};

/// Most commands or log entries in one transaction.
const MAX_BATCH: usize = 64;

/// The group commit of received commands; a writer task ends when this is
/// dropped.
#[derive(Debug)]
pub(super) struct Journal {
    writer: GroupCommit<(SeenMessage, CommandLogRecord), WriteOutcome<()>>,
}

impl Journal {
    /// Starts the writer task (SQLite) on the current tokio runtime.
    pub(super) fn start(store: Store) -> Journal {
        let writer = GroupCommit::start(store.backend(), MAX_BATCH, move |rows: Vec<_>| {
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

/// The group commit of sent reads' log entries; a writer task ends when
/// this is dropped.
#[derive(Debug)]
pub(super) struct SentLog {
    writer: GroupCommit<CommandLogRecord, WriteOutcome<()>>,
}

impl SentLog {
    /// Starts the writer task (SQLite) on the current tokio runtime.
    pub(super) fn start(store: Store) -> SentLog {
        let writer = GroupCommit::start(store.backend(), MAX_BATCH, move |records: Vec<_>| {
            let store = store.clone();
            async move {
                let count = records.len();
                let written = store.insert_command_logs(records).await;
                crate::store::each_or_all(written, count)
            }
        });
        SentLog { writer }
    }

    /// Commits a sent command's log entry (with whatever else is queued);
    /// [`WriteOutcome::DuplicateMessage`] if its message id is logged
    /// already, and then nothing is written.
    pub(super) async fn record(
        &self,
        record: CommandLogRecord,
    ) -> Result<WriteOutcome<()>, StoreError> {
        self.writer.write(record).await
    }
}
