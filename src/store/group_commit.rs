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
//! Written behind its callers (`start_behind`), on both backends, a caller
//! goes on once its write is queued and nobody hears its answer: for writes
//! nothing waits on, whose failures the write function logs; `flush` waits
//! for what is queued.
//!
//! Users: `federation::journal` (received commands, answered; the log entries
//! of sent reads, behind) and the coordinator's job writes
//! (`coordinator::jobs`).

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::{Backend, StoreError};

/// Writes waiting for the writer before callers wait to queue.
const QUEUE: usize = 1024;

/// What the writer task is handed.
enum Item<Op, Out> {
    /// A write and, unless it is written behind, where its answer goes.
    Write {
        op: Op,
        done: Option<oneshot::Sender<Result<Out, StoreError>>>,
    },
    /// Answered once every write queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// How a batch is written: commits it and answers each write, in order.
type WriteBatch<Op, Out> =
    Arc<dyn Fn(Vec<Op>) -> BoxFuture<'static, Vec<Result<Out, StoreError>>> + Send + Sync>;

/// The queue to a writer task or the write itself (PostgreSQL, answered); a
/// writer task ends when the last clone of this is dropped, after writing
/// what is queued.
pub struct GroupCommit<Op, Out> {
    route: Route<Op, Out>,
}

enum Route<Op, Out> {
    /// To the writer task; callers wait for their answer.
    Queued(mpsc::Sender<Item<Op, Out>>),
    /// To the writer task; callers go on once their write is queued.
    Behind(mpsc::Sender<Item<Op, Out>>),
    /// Written in the caller's task.
    Direct(WriteBatch<Op, Out>),
}

impl<Op, Out> Clone for GroupCommit<Op, Out> {
    fn clone(&self) -> Self {
        GroupCommit {
            route: match &self.route {
                Route::Queued(queue) => Route::Queued(queue.clone()),
                Route::Behind(queue) => Route::Behind(queue.clone()),
                Route::Direct(write) => Route::Direct(Arc::clone(write)),
            },
        }
    }
}

impl<Op, Out> std::fmt::Debug for GroupCommit<Op, Out> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let route = match self.route {
            Route::Queued(_) => "queued",
            Route::Behind(_) => "behind",
            Route::Direct(_) => "direct",
        };
        formatter
            .debug_struct("GroupCommit")
            .field("route", &route)
            .finish()
    }
}

impl<Op: Send + 'static, Out: Send + 'static> GroupCommit<Op, Out> {
    /// A group commit for a database of `backend` whose callers wait for
    /// their commit: on SQLite it starts the writer task on the current
    /// tokio runtime, which hands `write` batches of at most `max_batch`
    /// writes; on PostgreSQL `write` gets each write alone, in its caller's
    /// task. `write` returns one answer per write, in order; a failed write
    /// is its caller's to handle.
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
        GroupCommit {
            route: Route::Queued(spawn_writer(max_batch, write)),
        }
    }

    /// A group commit written behind its callers, on either backend: a
    /// caller goes on once its write is queued (it waits only while the
    /// queue is full), the writer task commits whatever has queued in
    /// batches of at most `max_batch`, and [`Self::flush`] waits for what
    /// is queued. Nobody hears a write's answer: failures are `write`'s to
    /// report (a log line), which is the policy for writes nothing depends
    /// on, such as the log entries of sent reads.
    pub fn start_behind<W, F>(max_batch: usize, write: W) -> GroupCommit<Op, Out>
    where
        W: Fn(Vec<Op>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<Result<Out, StoreError>>> + Send + 'static,
    {
        let write: WriteBatch<Op, Out> = Arc::new(move |ops| Box::pin(write(ops)));
        GroupCommit {
            route: Route::Behind(spawn_writer(max_batch, write)),
        }
    }

    /// Writes `op` (queued with whatever else comes meanwhile, on SQLite) and
    /// returns its answer once it is committed. A group commit written
    /// behind its callers has no answer to give: use [`Self::queue`].
    pub async fn write(&self, op: Op) -> Result<Out, StoreError> {
        let stopped = || StoreError::Unavailable("the database writer has stopped".to_owned());
        match &self.route {
            Route::Direct(write) => write(vec![op]).await.pop().ok_or_else(stopped)?,
            Route::Queued(queue) => {
                let (done, answer) = oneshot::channel();
                let item = Item::Write {
                    op,
                    done: Some(done),
                };
                queue.send(item).await.map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            }
            Route::Behind(_) => Err(StoreError::Unavailable(
                "this writer commits behind its callers and answers nobody".to_owned(),
            )),
        }
    }

    /// Queues `op` on a group commit written behind its callers
    /// ([`Self::start_behind`]), waiting only while the queue is full; on
    /// any other, writes it and drops the answer.
    pub async fn queue(&self, op: Op) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable("the database writer has stopped".to_owned());
        let Route::Behind(queue) = &self.route else {
            return self.write(op).await.map(drop);
        };
        match queue.try_send(Item::Write { op, done: None }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                queue.send(item).await.map_err(|_| stopped())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(stopped()),
        }
    }

    /// Returns once every write queued before this call is written (or its
    /// batch has failed); at once when nothing is queued behind callers.
    pub async fn flush(&self) {
        let (Route::Queued(queue) | Route::Behind(queue)) = &self.route else {
            return;
        };
        let (done, written) = oneshot::channel();
        if queue.send(Item::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// Starts the writer task on the current tokio runtime: it hands `write`
/// what has queued, up to `max_batch` writes, answers each waiting caller
/// in order, then the flushes queued among them.
fn spawn_writer<Op: Send + 'static, Out: Send + 'static>(
    max_batch: usize,
    write: WriteBatch<Op, Out>,
) -> mpsc::Sender<Item<Op, Out>> {
    let (queue, mut queued) = mpsc::channel::<Item<Op, Out>>(QUEUE);
    tokio::spawn(async move {
        while let Some(first) = queued.recv().await {
            let mut ops = Vec::new();
            let mut waiting = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Item::Write { op, done } => {
                        ops.push(op);
                        waiting.push(done);
                    }
                    Item::Flush(done) => flushes.push(done),
                }
                if ops.len() < max_batch.max(1) {
                    next = queued.try_recv().ok();
                }
            }
            if !ops.is_empty() {
                let answers = write(ops).await;
                // A caller that gave up (its call was cancelled) is no
                // longer listening; its write is committed all the same. A
                // write without an answer (never, from a correct `write`)
                // reaches its caller as the writer having stopped.
                for (done, answer) in waiting.into_iter().zip(answers) {
                    if let Some(done) = done {
                        let _ = done.send(answer);
                    }
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    });
    queue
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
                            Err(StoreError::Conflict(crate::store::Conflict::Unique(
                                "seven".to_owned(),
                            )))
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

    #[tokio::test]
    async fn written_behind_a_caller_goes_on_at_once_and_a_flush_waits_for_the_queue() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&written);
        let (release, released) = tokio::sync::watch::channel(false);
        let writer = GroupCommit::start_behind(4, move |ops: Vec<u32>| {
            let (seen, mut released) = (Arc::clone(&seen), released.clone());
            async move {
                // The first batch waits until the test lets it go.
                let _ = released.wait_for(|go| *go).await;
                seen.lock().unwrap().extend(ops.iter().copied());
                ops.into_iter().map(Ok).collect()
            }
        });
        for op in 0..10 {
            writer.queue(op).await.expect("queued without waiting");
        }
        assert!(written.lock().unwrap().is_empty(), "nothing is written yet");
        assert!(
            writer.write(99).await.is_err(),
            "a writer behind its callers answers nobody"
        );
        release.send_replace(true);
        writer.flush().await;
        assert_eq!(*written.lock().unwrap(), (0..10).collect::<Vec<_>>());
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
