//! The start-up lock: on PostgreSQL, replicas started at the same instant
//! migrate the database and create the instance identity one at a time.
//!
//! Without it, two replicas on an empty database both create the migrations
//! table (`__diesel_schema_migrations already exists`, or a duplicate
//! `pg_type` row), and both try to create the identity, of which one fails.
//! The lock is a session-level advisory lock on a connection of its own,
//! outside the pool: whoever holds it runs the migrations and loads or
//! creates the identity, then lets go; the next finds the schema up to date
//! and the identity made. A holder that dies releases it with its connection.
//! SQLite is one process's database: there the lock takes nothing.

use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Bool};
use diesel_async::RunQueryDsl;

use super::database_url::DatabaseTarget;
use super::pools::{self, PostgresConnection};
use super::{Store, StoreError};

/// The advisory lock's key: "mosaic" and 1 in ASCII hex, unlikely to clash
/// with another application's keys on a shared server.
const STARTUP_LOCK_KEY: i64 = 0x6d6f_7361_6963_0001;
/// How often a waiting replica tries the lock again.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// Held while migrating and loading the identity; dropping it lets the next
/// replica go.
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct StartupLock {
    /// The connection holding the advisory lock (PostgreSQL only). Closing
    /// it releases the lock on the server.
    _holder: Option<Holder>,
}

/// The lock's own connection, kept open (and so the lock held) until
/// dropped.
struct Holder {
    _connection: PostgresConnection,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Holder")
    }
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

impl Store {
    /// Takes the start-up lock of the database at `database_url`, waiting up
    /// to `patience` for a replica that holds it (its migrations, then its
    /// identity). UNAVAILABLE when the database does not answer or the lock
    /// stays taken.
    pub async fn lock_for_startup(
        database_url: &str,
        patience: Duration,
    ) -> Result<StartupLock, StoreError> {
        let DatabaseTarget::Postgres { url } = DatabaseTarget::parse(database_url)? else {
            return Ok(StartupLock { _holder: None });
        };
        let mut connection = pools::open_postgres(
            &url,
            Duration::from_millis(super::settings::DEFAULT_CALL_TIMEOUT_MS),
        )
        .await
        .map_err(|error| StoreError::Unavailable(error.to_string()))?;
        let started = Instant::now();
        let mut told = false;
        loop {
            let attempt = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
                .bind::<BigInt, _>(STARTUP_LOCK_KEY)
                .get_result::<Locked>(&mut connection);
            let locked = tokio::time::timeout(pools::CONNECT_TIMEOUT, attempt)
                .await
                .map_err(|_elapsed| {
                    StoreError::Unavailable("no answer from the database".to_owned())
                })??;
            if locked.locked {
                return Ok(StartupLock {
                    _holder: Some(Holder {
                        _connection: connection,
                    }),
                });
            }
            if started.elapsed() >= patience {
                return Err(StoreError::Unavailable(format!(
                    "another replica has been starting up (migrating or creating the identity) for {} s; \
                     it holds the start-up lock until it is done or its connection closes",
                    patience.as_secs()
                )));
            }
            if !told {
                tracing::info!("waiting for another replica to finish starting up");
                told = true;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDatabase;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_replica_waits_until_the_first_lets_go() {
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let first = Store::lock_for_startup(&database.url, Duration::from_secs(5))
            .await
            .expect("the first takes it");
        let refused = Store::lock_for_startup(&database.url, Duration::from_millis(300)).await;
        assert!(
            matches!(&refused, Err(StoreError::Unavailable(message)) if message.contains("start-up lock")),
            "{refused:?}"
        );
        let url = database.url.clone();
        let second =
            tokio::spawn(
                async move { Store::lock_for_startup(&url, Duration::from_secs(10)).await },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second must wait");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second gets it once the first lets go")
            .expect("join");
        assert!(second.is_ok(), "{second:?}");
        drop(second);
        database.cleanup().await.expect("drop the test database");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_takes_no_lock() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let database = TestDatabase::sqlite(dir.path());
        let first = Store::lock_for_startup(&database.url, Duration::ZERO).await;
        let second = Store::lock_for_startup(&database.url, Duration::ZERO).await;
        assert!(first.is_ok() && second.is_ok());
    }
}
