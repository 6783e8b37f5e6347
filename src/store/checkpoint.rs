//! Keeping the SQLite WAL bounded: a background task copies the WAL into the
//! database off the commit path, and restarts it from its beginning before it
//! passes its configured bound.
//!
//! Commits never checkpoint (`wal_autocheckpoint = 0`, see `pools.rs`), so
//! nothing on a caller's path waits for an fsync. A PASSIVE checkpoint copies
//! frames without taking a lock any writer waits for, but under sustained
//! writes it never catches up with the end of the WAL: new frames land while
//! it copies, so no writer ever finds the WAL fully copied and SQLite never
//! starts it again from the beginning. The file then grows for as long as the
//! load lasts (6 GB in four minutes in the soak that found it).
//!
//! So the task, on a connection of its own:
//! - runs a PASSIVE checkpoint every `PASSIVE_INTERVAL`, and at once when the
//!   WAL file passes half its bound, holding nobody back: the bulk of the
//!   copying and the database's fsync;
//! - once the WAL file is past half its bound and a PASSIVE checkpoint has
//!   just copied nearly all of it, takes all of the store's turns, so that no
//!   query of this process runs (new writers and readers wait in the store's
//!   fair queue, not in SQLite's sleeping busy handler), and runs a TRUNCATE
//!   checkpoint: the frames written since are copied, the database is synced
//!   and the WAL file is cut to zero bytes. The hold is short because the
//!   PASSIVE checkpoint did most of the work;
//! - while a PASSIVE checkpoint runs, keeps reading the WAL's length every
//!   `CHECK_INTERVAL`: if it passes three quarters of the bound before
//!   the copy is done (writes faster than the disk syncs), the store's turns
//!   are taken at once, so the WAL stops growing while the copy finishes.
//!
//! A reader or writer in another process (an offline `mosaicd` command) can
//! keep the TRUNCATE from finishing; the checkpointer then waits 5 s before
//! holding the daemon's queries again, and says so in the log.
//!
//! The last quarter is the margin for what is written between two readings
//! and while the queries queued ahead of the checkpointer finish: in the
//! store test that writes as fast as it can (50 MB/s of WAL), about 1 MB.
//! Each hold lasts one TRUNCATE checkpoint, 6–10 ms there.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use diesel::Connection as _;
use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often a PASSIVE checkpoint runs whatever the WAL's length.
const PASSIVE_INTERVAL: Duration = Duration::from_millis(500);

/// How often the WAL's length is read: at the soak's rate of writes
/// (30 MB/s) the WAL grows 300 KB between two readings.
const CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// How long a TRUNCATE checkpoint waits for another process's reader or
/// writer before giving up. The store's own queries are held back by its
/// turns and never make it wait.
const OTHER_PROCESS_WAIT_MS: u32 = 250;

/// After a TRUNCATE checkpoint that another process's reader or writer kept
/// from finishing, how long before the next hold: SQLite cannot restart the
/// WAL while that reader reads from it, and holding the daemon's queries for
/// nothing every few milliseconds would stall it.
const OTHER_PROCESS_BACKOFF: Duration = Duration::from_secs(5);

/// What one checkpoint reported (SQLite's `wal_checkpoint` pragma row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
struct CheckpointReport {
    /// 1 when a lock it needed was held and it could not finish.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    busy: i32,
    /// Frames in the WAL when it ran.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    log: i32,
    /// Frames copied into the database.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    checkpointed: i32,
}

/// What the checkpointer has seen and done since start, for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct WalStats {
    wal_bytes: AtomicU64,
    truncations: AtomicU64,
    held_micros: AtomicU64,
    longest_hold_micros: AtomicU64,
}

/// A reading of [`WalStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalReading {
    /// The WAL file's length at the checkpointer's last reading.
    pub wal_bytes: u64,
    /// TRUNCATE checkpoints run, each one hold of the store's queries.
    pub truncations: u64,
    /// Time the store's queries were held back, all holds together.
    pub held: Duration,
    /// The longest single hold.
    pub longest_hold: Duration,
}

impl WalStats {
    /// The counters now.
    pub(super) fn read(&self) -> WalReading {
        WalReading {
            wal_bytes: self.wal_bytes.load(Ordering::Relaxed),
            truncations: self.truncations.load(Ordering::Relaxed),
            held: Duration::from_micros(self.held_micros.load(Ordering::Relaxed)),
            longest_hold: Duration::from_micros(self.longest_hold_micros.load(Ordering::Relaxed)),
        }
    }

    fn record_hold(&self, held: Duration) {
        let micros = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.truncations.fetch_add(1, Ordering::Relaxed);
        self.held_micros.fetch_add(micros, Ordering::Relaxed);
        self.longest_hold_micros
            .fetch_max(micros, Ordering::Relaxed);
    }
}

/// The background checkpointer of one SQLite database.
pub(super) struct Checkpointer {
    database: String,
    wal: PathBuf,
    /// Past this length the WAL is truncated after the next PASSIVE
    /// checkpoint: half the bound.
    truncate_above_bytes: u64,
    /// Past this length while a PASSIVE checkpoint runs, writers are held at
    /// once: three quarters of the bound.
    hold_above_bytes: u64,
    /// The checkpointer's own connection, opened on first use and kept.
    connection: Option<diesel::SqliteConnection>,
    stats: Arc<WalStats>,
}

impl Checkpointer {
    /// A checkpointer for the database file at `database`, keeping its WAL
    /// under `wal_max_bytes`, counting what it does in `stats`.
    pub(super) fn new(database: String, wal_max_bytes: u64, stats: Arc<WalStats>) -> Checkpointer {
        let wal = PathBuf::from(format!("{database}-wal"));
        Checkpointer {
            database,
            wal,
            truncate_above_bytes: wal_max_bytes / 2,
            hold_above_bytes: wal_max_bytes / 4 * 3,
            connection: None,
            stats,
        }
    }

    /// Runs until the last strong reference to `turns` (the store's fair
    /// queue of connection turns) is gone.
    pub(super) fn spawn(self, turns: Weak<Semaphore>) {
        tokio::spawn(self.run(turns));
    }

    async fn run(mut self, turns: Weak<Semaphore>) {
        let mut last_passive = Instant::now();
        let mut no_hold_until = Instant::now();
        loop {
            // Every 10 ms, busy or not: a longer pause when the WAL had not
            // grown between two readings let it pass its bound in the store
            // test, where the writers queued behind a hold take more than
            // 10 ms to write again after a truncation and then fill the WAL
            // in less than 100 ms. A reading is one stat of a local file.
            tokio::time::sleep(CHECK_INTERVAL).await;
            let Some(turns) = turns.upgrade() else {
                break;
            };
            let wal_bytes = self.wal_bytes();
            if wal_bytes <= self.truncate_above_bytes && last_passive.elapsed() < PASSIVE_INTERVAL {
                continue;
            }
            last_passive = Instant::now();
            let may_hold = Instant::now() >= no_hold_until;
            let mut held = self.passive_watching(&turns, may_hold).await;
            if held.is_none() && may_hold && self.wal_bytes() > self.truncate_above_bytes {
                held = hold(&turns).await;
            }
            if let Some((permit, since)) = held {
                let report = self.checkpoint("TRUNCATE").await;
                drop(permit);
                let held_for = since.elapsed();
                self.stats.record_hold(held_for);
                if report.is_some_and(|report| report.busy != 0) {
                    no_hold_until = Instant::now() + OTHER_PROCESS_BACKOFF;
                    tracing::warn!(
                        wal_bytes,
                        "another process is reading or writing the database; the SQLite WAL \
                         cannot be emptied until it finishes (retrying in 5 s)"
                    );
                }
                tracing::debug!(
                    wal_bytes,
                    held_us = held_for.as_micros(),
                    ?report,
                    "truncated the SQLite WAL"
                );
            }
        }
    }

    /// The WAL file's length; a stat of a local file, microseconds, fine on
    /// a worker thread. No file reads as empty.
    fn wal_bytes(&self) -> u64 {
        let bytes = std::fs::metadata(&self.wal).map_or(0, |file| file.len());
        self.stats.wal_bytes.store(bytes, Ordering::Relaxed);
        bytes
    }

    /// Runs a PASSIVE checkpoint, reading the WAL's length while it runs.
    /// Returns the store's turns, and when they were taken, if it had to
    /// take them (`may_hold`) because the WAL passed three quarters of its
    /// bound meanwhile.
    async fn passive_watching(&mut self, turns: &Arc<Semaphore>, may_hold: bool) -> Option<Held> {
        let mut passive = self.start("PASSIVE");
        let mut held = None;
        let outcome = loop {
            tokio::select! {
                outcome = &mut passive => break outcome,
                () = tokio::time::sleep(CHECK_INTERVAL), if may_hold && held.is_none() => {
                    if self.wal_bytes() > self.hold_above_bytes {
                        held = hold(turns).await;
                    }
                }
            }
        };
        self.finish("PASSIVE", outcome);
        held
    }

    /// Runs `PRAGMA wal_checkpoint(mode)` and waits for it.
    async fn checkpoint(&mut self, mode: &'static str) -> Option<CheckpointReport> {
        let outcome = self.start(mode).await;
        self.finish(mode, outcome)
    }

    /// Starts `PRAGMA wal_checkpoint(mode)` on the checkpointer's connection
    /// (opened first if need be) in tokio's blocking pool.
    fn start(&mut self, mode: &'static str) -> tokio::task::JoinHandle<Checkpointed> {
        let database = self.database.clone();
        let reused = self.connection.take();
        tokio::task::spawn_blocking(move || {
            let mut connection = match reused {
                Some(connection) => connection,
                None => open(&database).map_err(|error| error.to_string())?,
            };
            let report = diesel::sql_query(format!("PRAGMA wal_checkpoint({mode});"))
                .get_result::<CheckpointReport>(&mut connection)
                .map_err(|error| error.to_string())?;
            Ok((connection, report))
        })
    }

    /// Keeps the connection of a finished checkpoint. A failure is logged and
    /// the next checkpoint opens a new connection.
    fn finish(
        &mut self,
        mode: &'static str,
        outcome: Result<Checkpointed, tokio::task::JoinError>,
    ) -> Option<CheckpointReport> {
        match outcome {
            Ok(Ok((connection, report))) => {
                self.connection = Some(connection);
                Some(report)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, mode, "could not checkpoint the SQLite WAL");
                None
            }
            Err(error) => {
                tracing::warn!(%error, mode, "the SQLite checkpoint task failed");
                None
            }
        }
    }
}

/// A checkpoint's connection and report, or why it failed.
type Checkpointed = Result<(diesel::SqliteConnection, CheckpointReport), String>;

/// All of the store's turns, and when they were taken.
type Held = (OwnedSemaphorePermit, Instant);

/// Takes all of the store's turns, in the fair queue behind the queries
/// already waiting. `None` only if the store closed its queue.
async fn hold(turns: &Arc<Semaphore>) -> Option<Held> {
    let permit = Arc::clone(turns)
        .acquire_many_owned(super::pools::SQLITE_POOL_SIZE)
        .await
        .ok()?;
    Some((permit, Instant::now()))
}

/// Opens the checkpointer's connection.
fn open(database: &str) -> Result<diesel::SqliteConnection, diesel::result::Error> {
    let mut connection = diesel::SqliteConnection::establish(database)
        .map_err(|error| diesel::result::Error::QueryBuilderError(Box::new(error)))?;
    connection.batch_execute(&format!("PRAGMA busy_timeout = {OTHER_PROCESS_WAIT_MS};"))?;
    Ok(connection)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use crate::store::testing::TestDatabase;
    use crate::store::{JobFilter, JobRecord, StorageSettings, Store};

    /// Inserts jobs of about 16 KiB each until `stop`, counting them.
    async fn write_jobs(store: Store, writer: usize, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
        let mut index = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut job =
                JobRecord::new_pending(format!("job-{writer}-{index}"), "review".to_owned(), 1_000);
            job.payload_json = format!("{{\"pad\":\"{}\"}}", "x".repeat(16_000));
            let creation = crate::coordinator::state::creation_entry(&job, "tester");
            store.insert_job(&job, &creation).await.expect("insert");
            count.fetch_add(1, Ordering::Relaxed);
            index += 1;
        }
    }

    /// A migrated SQLite store in `dir` whose WAL is bounded at `bound`
    /// bytes, and its database file's path.
    async fn bounded_store(dir: &std::path::Path, bound: u64) -> (Store, String) {
        let database = TestDatabase::sqlite(dir);
        let settings = StorageSettings {
            sqlite_wal_max_bytes: bound,
            ..StorageSettings::default()
        };
        let store = Store::open(&database.url, &settings).await.expect("open");
        store.run_migrations().await.expect("migrations");
        let path = database.url.strip_prefix("sqlite://").expect("a file url");
        (store, path.to_owned())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_wal_stays_under_its_bound_while_writers_and_readers_run() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let bound: u64 = 8 * 1024 * 1024;
        let (store, path) = bounded_store(dir.path(), bound).await;
        let wal = format!("{path}-wal");

        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for writer in 0..8 {
            tasks.push(tokio::spawn(write_jobs(
                store.clone(),
                writer,
                Arc::clone(&stop),
                Arc::clone(&written),
            )));
        }
        for _ in 0..2 {
            let (store, stop, reads) = (store.clone(), Arc::clone(&stop), Arc::clone(&reads));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store
                        .list_jobs(&JobFilter::default(), None, 50)
                        .await
                        .expect("list");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // At least 4 s, and on until the writers wrote the bound three times
        // over (a busy machine writes more slowly), within a minute.
        let mut largest = 0;
        let started = std::time::Instant::now();
        let enough = |jobs: u64| jobs * 16_000 > 3 * bound;
        while started.elapsed() < Duration::from_secs(4)
            || (!enough(written.load(Ordering::Relaxed))
                && started.elapsed() < Duration::from_secs(60))
        {
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |file| file.len()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("task");
        }
        let jobs = written.load(Ordering::Relaxed);
        // Each job is over 16 KiB in its row alone: the writers wrote the
        // bound several times over, which an unbounded WAL would have kept.
        assert!(
            enough(jobs),
            "the load was too light to test the bound: {jobs} jobs"
        );
        assert!(reads.load(Ordering::Relaxed) > 0);
        let stats = store.sqlite_wal().expect("SQLite WAL statistics");
        assert!(stats.truncations > 0, "{stats:?}");
        assert!(stats.longest_hold <= stats.held, "{stats:?}");
        assert!(
            largest <= bound,
            "the WAL reached {largest} bytes, over its bound of {bound} ({jobs} jobs written)"
        );
        eprintln!("{jobs} jobs written, the WAL reached {largest} of {bound} bytes; {stats:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_reader_in_another_process_does_not_stall_the_store() {
        use diesel::Connection as _;
        use diesel::connection::SimpleConnection as _;

        let dir = tempfile::tempdir().expect("create a temporary directory");
        let bound: u64 = 4 * 1024 * 1024;
        let (store, path) = bounded_store(dir.path(), bound).await;
        // Another process's reader: a read transaction left open keeps SQLite
        // from restarting the WAL.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut connection = diesel::SqliteConnection::establish(&path).expect("reader");
            connection
                .batch_execute("BEGIN; SELECT count(*) FROM jobs;")
                .expect("open a read transaction");
            let _ = released.recv();
            connection.batch_execute("COMMIT;").expect("end it");
        });

        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_jobs(
            store.clone(),
            0,
            Arc::clone(&stop),
            Arc::clone(&written),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = store.sqlite_wal().expect("statistics");
        // The WAL passed its bound (it cannot be emptied), yet the store was
        // held back at most once per back-off, not at every reading.
        assert!(during.wal_bytes > bound, "{during:?}");
        assert!(during.truncations <= 1, "{during:?}");
        assert!(written.load(Ordering::Relaxed) > 100, "the writes stalled");

        release.send(()).expect("release the reader");
        reader.join().expect("reader thread");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while store.sqlite_wal().expect("statistics").wal_bytes > bound {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not emptied after the reader left: {:?}",
                store.sqlite_wal()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
    }
}
