//! Fresh, throwaway databases for tests, on either backend.
//!
//! Tests get one database each, so they can run in parallel and assert on
//! exact contents. The PostgreSQL server is named by
//! `MOSAIC_TEST_DATABASE_URL`; each test database is created through it and
//! dropped afterwards.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::database_url::redact_password;
use super::pools::CONNECT_TIMEOUT;
use super::{Store, StoreError};

/// The environment variable naming the PostgreSQL server (and a database on
/// it to connect to) under which test databases are created.
pub const TEST_DATABASE_URL_VARIABLE: &str = "MOSAIC_TEST_DATABASE_URL";

/// Used when `MOSAIC_TEST_DATABASE_URL` is not set: a local server with
/// trust authentication.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database that exists for one test.
///
/// A SQLite database is a file in the directory the test provides (usually a
/// `tempfile::TempDir`, which removes it). A PostgreSQL database is dropped by
/// `cleanup`, or, if the test ends early, as best it can when this value is
/// dropped.
pub struct TestDatabase {
    /// The URL to give `Store::connect`.
    pub url: String,
    /// Set for a PostgreSQL database that has not been dropped yet.
    postgres: Option<CreatedDatabase>,
}

/// A PostgreSQL database this helper created, and how to reach the server to
/// drop it.
struct CreatedDatabase {
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// A new SQLite database file in `dir`.
    pub fn sqlite(dir: &std::path::Path) -> TestDatabase {
        let file = dir.join(format!("mosaic-{}.db", uuid::Uuid::new_v4().simple()));
        TestDatabase {
            url: format!("sqlite://{}", file.display()),
            postgres: None,
        }
    }

    /// A new, empty PostgreSQL database `mosaic_test_<uuid>` on the server
    /// named by `MOSAIC_TEST_DATABASE_URL`.
    pub async fn postgres() -> Result<TestDatabase, StoreError> {
        let admin_url = std::env::var(TEST_DATABASE_URL_VARIABLE)
            .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned());
        let name = format!("mosaic_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_database_name(&admin_url, &name);
        let mut admin = connect_admin(&admin_url).await?;
        // The name is built from a UUID above, so it needs no escaping.
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        Ok(TestDatabase {
            url,
            postgres: Some(CreatedDatabase { admin_url, name }),
        })
    }

    /// Connects a `Store` to this database and runs the migrations.
    pub async fn migrated_store(&self) -> Result<Store, StoreError> {
        let store = Store::connect(&self.url).await?;
        store.run_migrations().await?;
        Ok(store)
    }

    /// Drops the PostgreSQL database, disconnecting anyone still using it.
    /// Nothing to do for SQLite.
    pub async fn cleanup(mut self) -> Result<(), StoreError> {
        match self.postgres.take() {
            Some(database) => database.drop_database().await,
            None => Ok(()),
        }
    }
}

impl Drop for TestDatabase {
    /// Drops a PostgreSQL database that `cleanup` did not, for a test that
    /// panicked or returned early. `Drop` cannot await and may run inside a
    /// runtime that must not be blocked on, so the work happens on a thread
    /// of its own with its own runtime; failures are only logged.
    fn drop(&mut self) {
        let Some(database) = self.postgres.take() else {
            return;
        };
        let dropping = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::warn!(%error, "could not start a runtime to drop a test database");
                    return;
                }
            };
            let name = database.name.clone();
            if let Err(error) = runtime.block_on(database.drop_database()) {
                tracing::warn!(%error, database = %name, "could not drop a test database");
            }
        });
        // Waiting keeps the process alive until the database is gone; the
        // connection timeout bounds the wait.
        if dropping.join().is_err() {
            tracing::warn!("the thread dropping a test database panicked");
        }
    }
}

impl CreatedDatabase {
    async fn drop_database(self) -> Result<(), StoreError> {
        let mut admin = connect_admin(&self.admin_url).await?;
        diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// Connects to the server's admin database, within the usual time limit.
async fn connect_admin(admin_url: &str) -> Result<AsyncPgConnection, StoreError> {
    let unavailable =
        |message: String| StoreError::Unavailable(redact_password(&message, admin_url));
    match tokio::time::timeout(CONNECT_TIMEOUT, AsyncPgConnection::establish(admin_url)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(unavailable(error.to_string())),
        Err(_elapsed) => Err(unavailable(format!(
            "no answer from the test database server within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// `url` with its database name replaced by `name`, keeping any parameters.
fn with_database_name(url: &str, name: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((before_query, query)) => (before_query, Some(query)),
        None => (url, None),
    };
    let authority_start = before_query.find("://").map_or(0, |index| index + 3);
    let server = match before_query[authority_start..].find('/') {
        Some(slash) => &before_query[..authority_start + slash],
        None => before_query,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Runs `sql` on the store's database: how a test breaks the database on
/// purpose (dropping a table makes every write to it fail).
#[cfg(test)]
impl Store {
    pub(crate) async fn execute_for_test(&self, sql: &str) -> Result<(), StoreError> {
        with_connection!(self, |conn| diesel::sql_query(sql).execute(conn).await?);
        Ok(())
    }
}

/// Generates, for each named `async fn(Store)` in the enclosing module, one
/// test on a fresh SQLite file (`sqlite::<name>`) and one on a fresh
/// PostgreSQL database (`postgres::<name>`), both migrated.
#[cfg(test)]
macro_rules! test_on_both_backends {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let dir = tempfile::tempdir().expect("create a temporary directory");
                    let database = $crate::store::testing::TestDatabase::sqlite(dir.path());
                    let store = database.migrated_store().await.expect("open the test database");
                    super::$test(store).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let database = $crate::store::testing::TestDatabase::postgres()
                        .await
                        .expect("create a PostgreSQL test database");
                    let store = database.migrated_store().await.expect("open the test database");
                    super::$test(store).await;
                    database.cleanup().await.expect("drop the test database");
                }
            )+
        }
    };
}

#[cfg(test)]
pub(crate) use test_on_both_backends;

/// A finished `agent.status` command's log entry between this instance
/// (`us`) and `peer` in workspace `ws`, outcome `ok`, in `direction`.
#[cfg(test)]
pub(crate) fn status_log_entry(
    direction: super::CommandDirection,
    message_id: &str,
) -> super::CommandLogRecord {
    let (sender, recipient) = match direction {
        super::CommandDirection::Inbound => ("peer", "us"),
        super::CommandDirection::Outbound => ("us", "peer"),
    };
    super::CommandLogRecord {
        id: uuid::Uuid::new_v4().to_string(),
        direction,
        message_id: message_id.to_owned(),
        sender_instance_id: sender.to_owned(),
        recipient_instance_id: recipient.to_owned(),
        workspace: "ws".to_owned(),
        command_type: "agent.status".to_owned(),
        outcome: "ok".to_owned(),
        detail: String::new(),
        issued_at_ms: 1_000,
        recorded_at_ms: 1_000,
        request_digest: None,
        envelope: None,
    }
}

/// The plan PostgreSQL keeps for `sql` once it stops planning each call
/// afresh (its generic plan, which a pooled connection's prepared statement
/// switches to after five calls and keeps for the connection's life), made on
/// the tables of the database at `url` as they are now. `types` lists the
/// parameters' SQL types in order, as `PREPARE` takes them.
#[cfg(test)]
pub(crate) async fn generic_plan(
    url: &str,
    sql: &str,
    types: &[&str],
) -> Result<String, StoreError> {
    use diesel::sql_types::Text;
    use diesel_async::SimpleAsyncConnection;

    #[derive(diesel::QueryableByName)]
    struct PlanLine {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }

    let mut connection = AsyncPgConnection::establish(url)
        .await
        .map_err(|error| StoreError::Unavailable(redact_password(&error.to_string(), url)))?;
    connection
        .batch_execute(&format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE probe ({}) AS {sql}",
            types.join(", ")
        ))
        .await?;
    let nulls = vec!["NULL"; types.len()].join(", ");
    let lines: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN EXECUTE probe ({nulls})"))
        .load(&mut connection)
        .await?;
    Ok(lines
        .into_iter()
        .map(|plan| plan.line)
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn dropping_without_cleanup_removes_the_postgres_database() {
        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let url = database.url.clone();
        Store::connect(&url).await.expect("the database exists");
        drop(database);
        let outcome = Store::connect(&url).await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
    }

    #[test]
    fn replaces_the_database_name_and_keeps_parameters() {
        assert_eq!(
            with_database_name("postgres://postgres@127.0.0.1:5432/test", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database_name("postgresql://u:p@db/admin?sslmode=disable", "t2"),
            "postgresql://u:p@db/t2?sslmode=disable"
        );
        assert_eq!(
            with_database_name("postgres://db", "t3"),
            "postgres://db/t3"
        );
        assert_eq!(
            with_database_name("postgres://db?user=u", "t4"),
            "postgres://db/t4?user=u"
        );
    }
}
