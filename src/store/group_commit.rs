//! Group commit: writes from many concurrent callers committed together, on
//! SQLite.
//!
//! SQLite has one writer: a write that must be committed before its caller
//! answers takes a turn on the one connection and a commit per call, and under
//! concurrent callers those turns, not the statements, bound how many calls a
//! daemon answers. Callers hand their write to one writer task and wait for its
//! answer; the writer takes whatever has queued up (up to a batch size) and
//! writes it with one `write` call, which commits the batch in one transaction
//! and answers each write. With one caller nothing waits for anything: a batch
//! of one is written at once.
//!
//! PostgreSQL runs transactions in parallel and already groups the WAL flushes
//! of concurrent commits; a queue in front of it only serialises them (job
//! lifecycles measured 10–20 % slower through it, `BENCHMARKS.md`). There each
//! write is written at once, on its own, by the same `write` function.
//!
//! Users: `federation::journal` (received commands and the log entries of sent
//! reads) and the coordinator's job writes (`coordinator::jobs`).

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::{Backend, StoreError};

/// Writes waiting for the writer before callers wait to queue.
const QUEUE: usize = 1024;

/// One write and where its answer goes.
struct Queued<Op, Out> {
    op: Op,
    done: oneshot::Sender<Result<Out, StoreError>>,
}

/// How a batch is written: commits it and answers each write, in order.
type WriteBatch<Op, Out> =
    Arc<dyn Fn(Vec<Op>) -> BoxFuture<'static, Vec<Result<Out, StoreError>>> + Send + Sync>;

/// The queue to a writer task (SQLite) or the write itself (PostgreSQL); a
/// writer task ends when the last clone of this is dropped.
pub struct GroupCommit<Op, Out> {
    route: Route<Op, Out>,
}

enum Route<Op, Out> {
    Queued(mpsc::Sender<Queued<Op, Out>>),
    Direct(WriteBatch<Op, Out>),
}

impl<Op, Out> Clone for GroupCommit<Op, Out> {
    fn clone(&self) -> Self {
        GroupCommit {
            route: match &self.route {
                Route::Queued(queue) => Route::Queued(queue.clone()),
                Route::Direct(write) => Route::Direct(Arc::clone(write)),
            },
        }
    }
}

impl<Op, Out> std::fmt::Debug for GroupCommit<Op, Out> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let route = match self.route {
            Route::Queued(_) => "queued",
            Route::Direct(_) => "direct",
        };
        formatter
            .debug_struct("GroupCommit")
            .field("route", &route)
            .finish()
    }
}

impl<Op: Send + 'static, Out: Send + 'static> GroupCommit<Op, Out> {
    /// A group commit for a database of `backend`: on SQLite it starts the
    /// writer task on the current tokio runtime, which hands `write` batches
    /// of at most `max_batch` writes; on PostgreSQL `write` gets each write
    /// alone, in its caller's task. `write` returns one answer per write, in
    /// order.
    pub fn start<W, F>(backend: Backend, max_batch: usize, write: W) -> GroupCommit<Op, Out>
    where
        W: Fn(Vec<Op>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<Result<Out, StoreError>>> + Send + 'static,
    {
        let write: WriteBatch<Op, Out> = Arc::new(move |ops| Box::pin(write(ops)));
        if backend == Backend::Postgres {
            return GroupCommit {
                route: Route::Direct(write),
            };
        }
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
        GroupCommit {
            route: Route::Queued(queue),
        }
    }

    /// Writes `op` (queued with whatever else comes meanwhile, on SQLite) and
    /// returns its answer once it is committed.
    pub async fn write(&self, op: Op) -> Result<Out, StoreError> {
        let stopped = || StoreError::Unavailable("the database writer has stopped".to_owned());
        match &self.route {
            Route::Direct(write) => write(vec![op]).await.pop().ok_or_else(stopped)?,
            Route::Queued(queue) => {
                let (done, answer) = oneshot::channel();
                queue
                    .send(Queued { op, done })
                    .await
                    .map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            }
        }
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

    /// Writes `0..count` from as many concurrent tasks; each write with its
    /// answer.
    async fn write_concurrently(
        writer: &GroupCommit<u32, u32>,
        count: u32,
    ) -> Vec<(u32, Result<u32, StoreError>)> {
        let calls: Vec<_> = (0..count)
            .map(|op| {
                let writer = writer.clone();
                tokio::spawn(async move { (op, writer.write(op).await) })
            })
            .collect();
        let mut answers = Vec::with_capacity(calls.len());
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn concurrent_writes_share_batches_and_each_gets_its_own_answer() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let writer = GroupCommit::start(Backend::Sqlite, 4, move |ops: Vec<u32>| {
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
        for (op, answer) in write_concurrently(&writer, 10).await {
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

    #[tokio::test]
    async fn on_postgres_each_write_is_written_alone_in_its_callers_task() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let writer = GroupCommit::start(Backend::Postgres, 4, move |ops: Vec<u32>| {
            seen.lock().unwrap().push(ops.len());
            async move { ops.into_iter().map(|op| Ok(op + 1)).collect() }
        });
        for (op, answer) in write_concurrently(&writer, 10).await {
            assert_eq!(answer.unwrap(), op + 1);
        }
        assert_eq!(*batches.lock().unwrap(), vec![1; 10]);
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
