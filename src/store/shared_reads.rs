//! One PostgreSQL connection shared by the hot point reads (`GetJob`'s row,
//! a job by its idempotency key), on which the queries of concurrent calls
//! are pipelined: written to the socket together and answered together,
//! where a pooled connection costs each call its own write, read and pair of
//! wake-ups. Transactions and writes keep the pool.
//!
//! The reads are hand-written statements (in the files of their tables),
//! prepared once per connection and run with tokio-postgres directly:
//! diesel-async builds a query's SQL text again on every call, which cost
//! more CPU than the rest of such a read (BENCHMARKS.md, issue 23).
//!
//! Each serving thread (`crate::serving`) has a connection of its own,
//! driven on that thread, so that a call's read never wakes another
//! thread; the rest of the daemon shares one more.
//!
//! A connection is opened on first use and again after it closes (the
//! server went away, the network cut it) or after a read on it ran out of
//! time (it may sit behind a server that stopped answering): the next read
//! opens a new one, within its own deadline. A read that failed because its
//! connection closed under it runs once more on a new one: a read changes
//! nothing, so running it twice is safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::StoreError;
use super::database_url::redact_password;
use super::pools;

/// The shared connection of one store, and how to open it again.
pub(super) struct SharedReads {
    /// The PostgreSQL URL. Never printed: it may hold a password.
    url: Arc<str>,
    /// `storage.call_timeout_ms`: each read's deadline, and the connection's
    /// statement and TCP user timeout.
    call_timeout: Duration,
    /// The connections opened: one per serving thread that has read, and
    /// one (`None`) for every other thread. A handful, so a scan.
    current: Mutex<Vec<(Option<ThreadId>, Arc<Link>)>>,
    /// Held while a connection is opened, so that the reads arriving then
    /// wait for that one instead of each opening their own.
    opening: tokio::sync::Mutex<()>,
}

/// One open shared connection.
struct Link {
    client: Client,
    /// The statements prepared on this connection, with their text: a
    /// handful, so a scan beats hashing a few hundred bytes of SQL per read.
    statements: Mutex<Vec<(&'static str, Statement)>>,
    /// Cleared when the connection closes or is retired.
    open: Arc<AtomicBool>,
}

impl Link {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// `sql` prepared on this connection: the first use prepares it.
    async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let known = self
            .statements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(text, _)| *text == sql)
            .map(|(_, statement)| statement.clone());
        match known {
            Some(statement) => Ok(statement),
            None => {
                // Boxed, as opening is below: preparing is rare, and its
                // future would otherwise be carried by every read's.
                let statement = Box::pin(self.client.prepare(sql)).await?;
                self.statements
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((sql, statement.clone()));
                Ok(statement)
            }
        }
    }
}

impl SharedReads {
    /// Shared reads on `url`; nothing is opened until the first read.
    pub(super) fn new(url: Arc<str>, call_timeout: Duration) -> SharedReads {
        SharedReads {
            url,
            call_timeout,
            current: Mutex::new(Vec::new()),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// The row `sql` (one statement, at most one row) finds with `params`,
    /// within the store's call deadline; else UNAVAILABLE.
    pub(super) async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut retried = false;
        loop {
            let link = self.link(deadline).await?;
            let outcome = tokio::time::timeout_at(deadline, async {
                let statement = link.statement(sql).await?;
                link.client.query_opt(&statement, params).await
            })
            .await;
            match outcome {
                Ok(Ok(row)) => return Ok(row),
                // Closed under the read: once more, on a new connection.
                Ok(Err(_)) if !retried && !link.is_open() => retried = true,
                Ok(Err(error)) => return Err(self.store_error(&error)),
                Err(_elapsed) => {
                    link.retire();
                    return Err(StoreError::Unavailable(format!(
                        "the database did not answer within {} ms",
                        self.call_timeout.as_millis()
                    )));
                }
            }
        }
    }

    /// A failed read in the store's terms: a lost connection, a server
    /// shutting down or a statement cancelled by its timeout is
    /// UNAVAILABLE; anything else is a failed query.
    fn store_error(&self, error: &tokio_postgres::Error) -> StoreError {
        match error.code() {
            None => StoreError::Unavailable("the connection to the database was lost".to_owned()),
            Some(code) if code.code().starts_with("08") || code.code().starts_with("57") => {
                StoreError::Unavailable(format!(
                    "the database did not answer the read: {}",
                    error.as_db_error().map_or("", |error| error.message())
                ))
            }
            Some(_) => StoreError::Query(DieselError::DatabaseError(
                DatabaseErrorKind::Unknown,
                Box::new(redact_password(&error.to_string(), &self.url)),
            )),
        }
    }

    /// The open connection, or a new one if there is none, by `deadline`;
    /// else UNAVAILABLE.
    async fn link(&self, deadline: tokio::time::Instant) -> Result<Arc<Link>, StoreError> {
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        let no_connection = || {
            StoreError::Unavailable(format!(
                "no database connection within {} ms",
                self.call_timeout.as_millis()
            ))
        };
        let _opening = tokio::time::timeout_at(deadline, self.opening.lock())
            .await
            .map_err(|_elapsed| no_connection())?;
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        // Boxed: opening a connection (TLS included) is a future of
        // kilobytes, and every read's future, copied on each call, would
        // otherwise carry it (GetJob's from 1.5 to 9.5 KB).
        let link = tokio::time::timeout_at(deadline, Box::pin(self.open()))
            .await
            .map_err(|_elapsed| no_connection())??;
        let home = crate::serving::serving_thread();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.retain(|(thread, _)| *thread != home);
        current.push((home, Arc::clone(&link)));
        Ok(link)
    }

    /// This thread's connection if it is still open; a closed one is let go.
    fn open_link(&self) -> Option<Arc<Link>> {
        let home = crate::serving::serving_thread();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let index = current.iter().position(|(thread, _)| *thread == home)?;
        if current[index].1.is_open() {
            Some(Arc::clone(&current[index].1))
        } else {
            current.swap_remove(index);
            None
        }
    }

    /// Opens a connection set up as the pool's are (TLS, keepalives, the
    /// statement and TCP user timeouts), driving its socket on a task of
    /// its own, on the caller's runtime, that marks it closed when the
    /// socket closes.
    async fn open(&self) -> Result<Arc<Link>, StoreError> {
        let (client, driver) = pools::open_postgres_client(&self.url, self.call_timeout)
            .await
            // The password is already taken out of the error (`pools.rs`).
            .map_err(|error| StoreError::Unavailable(error.to_string()))?;
        let open = Arc::new(AtomicBool::new(true));
        let marks_closed = Arc::clone(&open);
        tokio::spawn(async move {
            if let Err(error) = driver.await {
                tracing::debug!(error = %error, "the shared read connection closed");
            }
            marks_closed.store(false, Ordering::Release);
        });
        client
            .batch_execute(&pools::statement_timeout_sql(self.call_timeout))
            .await
            .map_err(|error| self.store_error(&error))?;
        Ok(Arc::new(Link {
            client,
            statements: Mutex::new(Vec::new()),
            open,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use diesel::sql_types::BigInt;
    use diesel_async::RunQueryDsl;

    use crate::coordinator::state::creation_entry;
    use crate::store::testing::TestDatabase;
    use crate::store::{JobRecord, Store, StoreError};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        count: i64,
    }

    /// The connections open to the store's database, this query's own
    /// included.
    async fn connections(store: &Store) -> Result<i64, StoreError> {
        let count: Count = with_connection!(store, |conn| {
            diesel::sql_query(
                "SELECT count(*) AS count FROM pg_stat_activity \
                 WHERE datname = current_database()",
            )
            .get_result(conn)
            .await?
        });
        Ok(count.count)
    }

    /// Closes every connection to the store's database but the one this
    /// runs on, as a server restart or a network cut would.
    async fn close_other_connections(store: &Store) -> Result<(), StoreError> {
        let _: Vec<Count> = with_connection!(store, |conn| {
            diesel::sql_query(
                "SELECT count(pg_terminate_backend(pid)) AS count FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .load(conn)
            .await?
        });
        Ok(())
    }

    async fn store_with_a_job() -> (TestDatabase, Store) {
        let database = TestDatabase::postgres()
            .await
            .expect("create a PostgreSQL test database");
        let store = database.migrated_store().await.expect("open the database");
        let job = JobRecord::new_pending("j1".to_owned(), "review".to_owned(), 1_000);
        store
            .insert_job(&job, &creation_entry(&job, "tester"))
            .await
            .expect("insert a job");
        (database, store)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_point_read_carries_none_of_the_rare_paths() {
        // GetJob's read is copied with its call's future on every call.
        // Opening a connection, preparing a statement and the pool's path
        // are boxed, so they add a pointer each, not kilobytes.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = TestDatabase::sqlite(dir.path())
            .migrated_store()
            .await
            .expect("open the database");
        let read = store.find_job("j1");
        // The size of a future is what moving it copies.
        let bytes = std::mem::size_of_val(&read);
        assert!(bytes <= 4096, "GetJob's read is a future of {bytes} bytes");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_point_reads_share_one_connection() {
        let (database, store) = store_with_a_job().await;
        let before = connections(&store).await.expect("count connections");
        let reads: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.find_job("j1").await })
            })
            .collect();
        for read in reads {
            let job = read.await.expect("the read's task").expect("read");
            assert_eq!(job.map(|job| job.id).as_deref(), Some("j1"));
        }
        assert_eq!(
            connections(&store).await.expect("count connections"),
            before + 1,
            "64 concurrent reads opened one connection between them"
        );
        drop(store);
        database.cleanup().await.expect("drop the test database");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_open_a_new_connection_after_the_server_closed_theirs() {
        let (database, store) = store_with_a_job().await;
        store.find_job("j1").await.expect("the first read");
        close_other_connections(&store)
            .await
            .expect("close the connections");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut failures = 0;
        loop {
            match store.find_job("j1").await {
                Ok(job) => {
                    assert!(job.is_some());
                    break;
                }
                Err(_) if tokio::time::Instant::now() < deadline => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("reads did not recover: {error}"),
            }
        }
        // The server's word that it closed the connection may reach a read
        // before it reaches the task that drives the connection: that one
        // read may fail; the next finds the connection gone.
        assert!(
            failures <= 1,
            "at most the read racing the close fails, {failures} did"
        );
        for _ in 0..10 {
            assert!(store.find_job("j1").await.expect("read").is_some());
        }
        drop(store);
        database.cleanup().await.expect("drop the test database");
    }
}
