//! The command log's writers on the two paths every command takes.
//!
//! Received commands (`ReceivedLog`): each accepted command's message id and log
//! entry must be committed before its signed result leaves (that commit is
//! what makes a replay return the stored result), and on one SQLite
//! connection a commit per command is what bounds how many commands a daemon
//! answers; it goes through a `store::GroupCommit`, which on SQLite commits
//! the rows that queued up together in one transaction with an outcome per
//! row (on PostgreSQL each row is committed on its own, as it comes). Sent
//! reads (`SentLog`): a status or list read's log entry is written behind its
//! answer, in batches, by the same group commit in its mode written behind
//! its callers, and a listing of the log waits for what is queued.

use crate::store::{CommandLogRecord, GroupCommit, SeenMessage, Store, StoreError, WriteOutcome};

/// Most commands or log entries in one transaction.
const MAX_BATCH: usize = 64;

/// The group commit of received commands; a writer task ends when this is
/// dropped.
#[derive(Debug)]
pub(super) struct ReceivedLog {
    writer: GroupCommit<(SeenMessage, CommandLogRecord), WriteOutcome<()>>,
}

impl ReceivedLog {
    /// Starts the writer task (SQLite) on the current tokio runtime.
    pub(super) fn start(store: Store) -> ReceivedLog {
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
        ReceivedLog { writer }
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

/// The log entries of sent reads, written behind their answers (both
/// backends; `GroupCommit::start_behind`): a status or list read's caller
/// hears the answer once its entry is queued, and the writer commits
/// whatever has queued, up to [`MAX_BATCH`] entries in one transaction. The
/// entry records what the sender asked and heard, and changes nothing that a
/// retry or a replay check depends on (reads have no retry id; the peer
/// keeps its own record of the message id), so nothing waits on its commit.
/// [`SentLog::flush`] is what makes the log read its own writes: the log
/// listing and shutdown wait on it. An entry is lost only if the process
/// dies within the batch's commit (a millisecond or so); a failed batch is
/// logged as a warning. The writer task ends when this is dropped, after
/// writing what is queued (while its runtime runs: the server flushes
/// before it stops).
#[derive(Debug)]
pub(super) struct SentLog {
    writer: GroupCommit<CommandLogRecord, WriteOutcome<()>>,
}

impl SentLog {
    /// Starts the writer task on the current tokio runtime.
    pub(super) fn start(store: Store) -> SentLog {
        let writer = GroupCommit::start_behind(MAX_BATCH, move |entries: Vec<_>| {
            let store = store.clone();
            async move {
                let count = entries.len();
                let written = store.insert_command_logs(entries).await;
                match &written {
                    Ok(outcomes) => {
                        let duplicates = outcomes
                            .iter()
                            .filter(|outcome| **outcome != WriteOutcome::Done(()))
                            .count();
                        if duplicates > 0 {
                            tracing::warn!(
                                duplicates,
                                "sent reads whose message id was logged already were not logged again"
                            );
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, count, "could not record the outcome of sent reads");
                    }
                }
                crate::store::each_or_all(written, count)
            }
        });
        SentLog { writer }
    }

    /// Queues a sent read's log entry; waits only while the queue is full.
    pub(super) async fn record(&self, record: CommandLogRecord) -> Result<(), StoreError> {
        self.writer.queue(record).await
    }

    /// Returns once every entry queued before this call is written (or its
    /// batch has failed and been logged).
    pub(super) async fn flush(&self) {
        self.writer.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{status_log_entry, test_on_both_backends};
    use crate::store::{CommandDirection, CommandLogFilter};

    test_on_both_backends!(a_flush_returns_once_every_queued_read_is_in_the_log);

    async fn a_flush_returns_once_every_queued_read_is_in_the_log(store: Store) {
        let sent_log = std::sync::Arc::new(SentLog::start(store.clone()));
        // More entries than one batch, from concurrent callers; each call
        // returns once its entry is queued.
        let callers: Vec<_> = (0..4)
            .map(|caller| {
                let sent_log = std::sync::Arc::clone(&sent_log);
                tokio::spawn(async move {
                    for n in 0..50 {
                        sent_log
                            .record(status_log_entry(
                                CommandDirection::Outbound,
                                &format!("m-{caller}-{n}"),
                            ))
                            .await
                            .expect("queue a log entry");
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.expect("caller");
        }
        sent_log.flush().await;
        let logged = store
            .list_command_log(&CommandLogFilter {
                peer_instance_id: None,
                workspace: None,
                direction: Some(CommandDirection::Outbound),
                after: None,
                limit: 1_000,
            })
            .await
            .expect("list the log");
        let mut ids: Vec<String> = logged.into_iter().map(|entry| entry.message_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 200, "every queued entry is written, once");
    }
}
