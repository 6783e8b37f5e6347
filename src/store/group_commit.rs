//! Group commit: writes from many concurrent callers committed together.
//!
//! A write that must be committed before its caller answers costs a commit
//! (on PostgreSQL a WAL flush, on SQLite a turn on the one writer connection)
//! per call, and under concurrent callers the commits, not the statements,
//! bound how many calls a daemon answers. Callers hand their write to one
//! writer task and wait for its answer; the writer takes whatever has queued
//! up (up to a batch size) and writes it with one `write` call, which commits
//! the batch in one transaction and answers each write. With one caller
//! nothing waits for anything: a batch of one is written at once.
//!
//! Users: `federation::journal` (received commands), the outbound log of
//! command reads (`federation::commands`) and the coordinator's job writes
//! (`coordinator::jobs`).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Writes waiting for the writer before callers wait to queue.
const QUEUE: usize = 1024;

/// One write and where its answer goes.
struct Queued<Op, Out> {
    op: Op,
    done: oneshot::Sender<Result<Out, StoreError>>,
}

/// The queue to a writer task; the task ends when the last clone of this is
/// dropped.
#[derive(Debug)]
pub struct GroupCommit<Op, Out> {
    queue: mpsc::Sender<Queued<Op, Out>>,
}

impl<Op, Out> Clone for GroupCommit<Op, Out> {
    fn clone(&self) -> Self {
        GroupCommit {
            queue: self.queue.clone(),
        }
    }
}

impl<Op: Send + 'static, Out: Send + 'static> GroupCommit<Op, Out> {
    /// Starts the writer task on the current tokio runtime. `write` commits
    /// a batch of at most `max_batch` writes and returns one answer per
    /// write, in order.
    pub fn start<W, F>(max_batch: usize, mut write: W) -> GroupCommit<Op, Out>
    where
        W: FnMut(Vec<Op>) -> F + Send + 'static,
        F: Future<Output = Vec<Result<Out, StoreError>>> + Send + 'static,
    {
        let (queue, mut queued) = mpsc::channel::<Queued<Op, Out>>(QUEUE);
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut batch = vec![first];
                while batch.len() < max_batch.max(1) {
                    match queued.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (ops, waiting): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|next| (next.op, next.done)).unzip();
                let answers = write(ops).await;
                // A caller that gave up (its call was cancelled) is no
                // longer listening; its write is committed all the same. A
                // write without an answer (never, from a correct `write`)
                // reaches its caller as the writer having stopped.
                for (done, answer) in waiting.into_iter().zip(answers) {
                    let _ = done.send(answer);
                }
            }
        });
        GroupCommit { queue }
    }

    /// Queues `op`, waits for the batch it lands in to be written, and
    /// returns its answer.
    pub async fn write(&self, op: Op) -> Result<Out, StoreError> {
        let stopped = || StoreError::Unavailable("the database writer has stopped".to_owned());
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Queued { op, done })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The answers for a batch written by one fallible call: each write's own
/// answer, or the batch's error for every write (as `Unavailable`, whose
/// message names the cause; `StoreError` cannot be cloned).
pub fn each_or_all<Out>(
    written: Result<Vec<Out>, StoreError>,
    count: usize,
) -> Vec<Result<Out, StoreError>> {
    match written {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(error) => {
            let message = match error {
                StoreError::Unavailable(message) => message,
                other => other.to_string(),
            };
            (0..count)
                .map(|_| Err(StoreError::Unavailable(message.clone())))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn concurrent_writes_share_batches_and_each_gets_its_own_answer() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let writer = GroupCommit::start(4, move |ops: Vec<u32>| {
            seen.lock().unwrap().push(ops.len());
            async move {
                // Long enough for the other callers to queue behind it.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                ops.into_iter()
                    .map(|op| {
                        if op == 7 {
                            Err(StoreError::Conflict("seven".to_owned()))
                        } else {
                            Ok(op * 10)
                        }
                    })
                    .collect()
            }
        });
        let calls: Vec<_> = (0..10)
            .map(|op| {
                let writer = writer.clone();
                tokio::spawn(async move { (op, writer.write(op).await) })
            })
            .collect();
        for call in calls {
            let (op, answer) = call.await.unwrap();
            match answer {
                Ok(out) => assert_eq!(out, op * 10),
                Err(StoreError::Conflict(_)) => assert_eq!(op, 7),
                Err(other) => panic!("op {op}: {other}"),
            }
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10);
        assert!(batches.iter().all(|&size| size <= 4), "{batches:?}");
        assert!(batches.len() < 10, "no batch held two writes: {batches:?}");
    }

    #[test]
    fn a_failed_batch_fails_each_of_its_writes() {
        let answers = each_or_all::<u32>(Err(StoreError::NotFound), 3);
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|answer| matches!(
            answer,
            Err(StoreError::Unavailable(message)) if message == "not found"
        )));
        let answers = each_or_all(Ok(vec![1, 2]), 2);
        assert_eq!(
            answers.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
