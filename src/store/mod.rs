//! Persistent state in SQLite or PostgreSQL: the `Store` handle, its pools,
//! migrations, and the queries, one file per group of tables.
//!
//! Every query is written once. `with_connection!` expands the same diesel
//! code once per backend, and the schema keeps to column types both backends
//! share (text, 64-bit integers with times as epoch milliseconds, booleans,
//! bytes), so SQLite and PostgreSQL behave alike. Only this module uses
//! diesel.

/// Runs `$body` with `$conn` bound to a `&mut` connection checked out of the
/// store's pool, whichever backend that is, within the store's call deadline
/// (`storage.call_timeout_ms`, the wait for a turn and a connection
/// included): past it the call is UNAVAILABLE and the connection, which may
/// still hold an unanswered query, is closed instead of pooled again.
///
/// The body is expanded once per backend, so one piece of diesel query code
/// is compiled against both SQLite and PostgreSQL. It runs in an async block
/// whose error type is `StoreError`: `.await` and `?` work as in the calling
/// function (which must return `Result<_, StoreError>`), but `return` would
/// leave the block only, so bodies do not use it. The connection goes back to
/// the pool when the body finishes.
///
/// ```text
/// let count = with_connection!(self, |conn| {
///     api_keys::table.count().get_result::<i64>(conn).await?
/// });
/// ```
///
/// The second form gives each backend its own body, for the few writes that
/// are one SQL statement on PostgreSQL and one blocking call on SQLite (see
/// `jobs.rs`):
///
/// ```text
/// with_connection!(
///     self,
///     sqlite = |conn| conn.spawn_blocking(move |conn| ...).await?,
///     postgres = |conn| diesel::sql_query(...).execute(conn).await?
/// )
/// ```
macro_rules! with_connection {
    ($store:expr, |$conn:ident| $body:expr) => {
        with_connection!($store, sqlite = |$conn| $body, postgres = |$conn| $body)
    };
    ($store:expr, sqlite = |$sqlite:ident| $sqlite_body:expr, postgres = |$postgres:ident| $postgres_body:expr) => {{
        let store: &$crate::store::Store = &$store;
        let deadline = tokio::time::Instant::now() + store.call_timeout;
        match &store.pools {
            $crate::store::Pools::Sqlite(pool) => {
                pooled!(
                    store,
                    pool,
                    deadline,
                    |$sqlite: $crate::store::pools::SqliteConnection| $sqlite_body
                )
            }
            $crate::store::Pools::Postgres(pool, _) => {
                pooled!(
                    store,
                    pool,
                    deadline,
                    |$postgres: $crate::store::pools::PostgresConnection| $postgres_body
                )
            }
        }
    }};
}

/// `with_connection!`'s work on one pool: a turn, a connection from `$pool`
/// and `$body` on it, all by `$deadline`.
macro_rules! pooled {
    ($store:expr, $pool:expr, $deadline:expr, |$conn:ident: $connection:ty| $body:expr) => {{
        // A turn first, in arrival order; then the pool cannot hand a
        // connection to a task that arrived later (bb8 lets a new `get` take
        // a connection just returned before a waiter wakes).
        let _turn = $store.turn($deadline).await?;
        let mut pooled = $store.checkout($pool.get(), $deadline).await?;
        let outcome = {
            let $conn: &mut $connection = &mut pooled;
            tokio::time::timeout_at($deadline, async {
                Ok::<_, $crate::store::StoreError>($body)
            })
            .await
        };
        $crate::store::deadline::settle(outcome, &mut *pooled, $store.call_timeout)?
    }};
}

/// Runs one transaction on either backend, through `with_connection!`'s
/// second form: `in_transaction!(store, |conn| sqlite_body, |conn| postgres_body)`.
/// On SQLite the first body runs with diesel's synchronous API in a single
/// trip to the blocking pool, where an async transaction makes one trip per
/// statement, BEGIN and COMMIT included; on PostgreSQL the second body runs in
/// an async transaction. Both bodies return `Result<T, StoreError>`; the SQLite
/// body gets owned data only (it moves to the blocking thread).
///
/// `in_transaction!(store, |conn| sqlite_body, statement = |conn| postgres_body)`
/// runs the PostgreSQL body without BEGIN and COMMIT: for a body that is one
/// statement, atomic on its own (the hot-path writes).
macro_rules! in_transaction {
    ($store:expr, |$sconn:ident| $sqlite:expr, |$pconn:ident| $postgres:expr $(,)?) => {
        in_transaction!(
            $store,
            |$sconn| $sqlite,
            statement = |$pconn| diesel_async::AsyncConnection::transaction::<
                _,
                $crate::store::StoreError,
                _,
            >($pconn, async |$pconn| $postgres)
            .await
        )
    };
    ($store:expr, |$sconn:ident| $sqlite:expr, statement = |$pconn:ident| $postgres:expr $(,)?) => {
        with_connection!(
            $store,
            sqlite = |wrapper| wrapper
                .spawn_blocking(move |$sconn: &mut diesel::SqliteConnection| {
                    use diesel::Connection as _;
                    Ok($sconn.transaction::<_, $crate::store::StoreError, _>(|$sconn| $sqlite))
                })
                .await
                .unwrap_or_else(|error| Err($crate::store::StoreError::from(error))),
            postgres = |$pconn| $postgres
        )
    };
}

mod agents;
mod api_keys;
mod checkpoint;
mod command_log;
mod database_url;
mod deadline;
mod error;
mod federation;
mod group_commit;
mod identity;
mod inbound_requests;
mod jobs;
mod leases;
mod metrics;
mod notify;
mod outbox;
mod pools;
mod postgres_tls;
mod prepared;
mod replicas;
mod retention;
mod schema;
mod seen_messages;
mod settings;
mod shared_reads;
mod single_server;
mod startup;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::fmt;
use std::sync::Arc;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::{AsyncConnection, AsyncMigrationHarness, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub use agents::AgentCursor;
pub use api_keys::ApiKeyRecord;
pub use checkpoint::WalReading;
pub use command_log::{CommandDirection, CommandLogFilter, CommandLogRecord, SignedCommand};
pub use error::{Conflict, StoreError, WriteOutcome};
pub use federation::{
    ConnectionCapabilities, ConnectionChange, ConnectionEventRecord, ConnectionFilter,
    ConnectionRecord, NoticeRecord, PeerKeyRecord,
};
pub use group_commit::{GroupCommit, each_or_all};
pub use identity::{InstanceKeyRecord, InstanceRecord};
pub use inbound_requests::InstanceKeyBinding;
pub use jobs::{
    DeliveryOutcome, JobCursor, JobFilter, JobGuard, JobHistoryRecord, JobRecord, JobWriteOp,
    JobWritten,
};
pub use notify::{Listener, Topic};
pub use replicas::{NewReplica, ReplicaRecord};
pub use seen_messages::{SeenMessage, StoredReply};
pub use settings::{StorageFileConfig, StorageSettings};
pub use single_server::ServingLock;
pub use startup::StartupLock;

use database_url::DatabaseTarget;
use pools::{PostgresConnection, SqliteConnection};

/// The schema changes under `migrations/`, compiled into the binary so the
/// daemon can bring any database it is given up to date.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Which database engine a `Store` talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file: the embedded default, nothing to install.
    Sqlite,
    /// A PostgreSQL server: for production and for replicas sharing state.
    Postgres,
}

/// A handle to the database. Cloning is cheap (the pools are reference
/// counted) and every clone shares the same connections.
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    /// One permit per pooled connection, handed out first come, first served
    /// (tokio's semaphore is fair); see `with_connection!`.
    turns: Arc<tokio::sync::Semaphore>,
    /// What the SQLite checkpointer has done; `None` on PostgreSQL.
    wal: Option<Arc<checkpoint::WalStats>>,
    /// The PostgreSQL URL, for connections outside the pool (listening for
    /// notifications); `None` on SQLite. Never printed: it may hold a
    /// password.
    postgres_url: Option<Arc<str>>,
    /// How long one call may take (`storage.call_timeout_ms`).
    call_timeout: std::time::Duration,
    /// The SQLite database file; `None` on PostgreSQL.
    sqlite_path: Option<Arc<str>>,
}

/// One pool per backend; `with_connection!` matches on it. PostgreSQL's
/// hot point reads share one more connection (`shared_reads.rs`).
#[derive(Clone)]
enum Pools {
    Sqlite(Pool<SqliteConnection>),
    Postgres(Pool<PostgresConnection>, Arc<shared_reads::SharedReads>),
}

/// Creates a new SQLite database file readable by this user alone, before
/// SQLite creates it with the umask's mode (its WAL and shared-memory files
/// then take the same mode). An existing file is left as it is; a failure
/// here is left for SQLite to report.
fn create_private_file(path: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

impl Store {
    /// Connects to the database named by `database_url`: `sqlite://<path>`
    /// or a bare path ending in `.db` for SQLite, `postgres://...` or
    /// `postgresql://...` for PostgreSQL, with the default storage settings.
    ///
    /// One connection is opened before this returns, so a database that is
    /// unreachable fails here with `StoreError::Unavailable`, within a few
    /// seconds, rather than on the first query. Migrations are not run; call
    /// `run_migrations` for that.
    pub async fn connect(database_url: &str) -> Result<Store, StoreError> {
        Store::open(database_url, &StorageSettings::default()).await
    }

    /// `connect` with the daemon's `[storage]` settings: on SQLite, a
    /// background task keeps the WAL under `sqlite_wal_max_bytes` for as long
    /// as any clone of the store lives (see `checkpoint.rs`).
    pub async fn open(database_url: &str, settings: &StorageSettings) -> Result<Store, StoreError> {
        let (pools, size, sqlite_path, postgres_url) = match DatabaseTarget::parse(database_url)? {
            DatabaseTarget::Sqlite { path } => (
                Pools::Sqlite({
                    create_private_file(&path);
                    pools::sqlite_pool(&path).await?
                }),
                pools::SQLITE_POOL_SIZE,
                Some(path),
                None,
            ),
            DatabaseTarget::Postgres { url } => (
                Pools::Postgres(
                    pools::postgres_pool(&url, settings.call_timeout).await?,
                    Arc::new(shared_reads::SharedReads::new(
                        Arc::from(url.as_str()),
                        settings.call_timeout,
                    )),
                ),
                pools::POSTGRES_POOL_SIZE,
                None,
                Some(Arc::from(url.as_str())),
            ),
        };
        let wal = sqlite_path
            .as_ref()
            .map(|_| Arc::new(checkpoint::WalStats::default()));
        let mut store = Store {
            pools,
            turns: Arc::new(tokio::sync::Semaphore::new(size as usize)),
            wal: wal.clone(),
            postgres_url,
            call_timeout: settings.call_timeout,
            sqlite_path: None,
        };
        if let (Some(path), Some(stats)) = (sqlite_path, wal) {
            store.sqlite_path = Some(Arc::from(path.as_str()));
            // Ends once the last clone of the store is dropped.
            checkpoint::Checkpointer::new(path, settings.sqlite_wal_max_bytes, stats)
                .spawn(Arc::downgrade(&store.turns));
        }
        tracing::debug!(backend = ?store.backend(), "connected to the database");
        Ok(store)
    }

    /// Waits, in arrival order, for a turn to use a pooled connection; until
    /// the call's `deadline`, then UNAVAILABLE.
    async fn turn(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        match tokio::time::timeout_at(deadline, self.turns.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(StoreError::Unavailable(
                "timed out waiting for a database connection".to_owned(),
            )),
        }
    }

    /// A connection from the pool by the call's `deadline` (a server that
    /// does not answer makes opening one hang), else UNAVAILABLE.
    async fn checkout<P, E>(
        &self,
        checkout: impl std::future::Future<Output = Result<P, E>>,
        deadline: tokio::time::Instant,
    ) -> Result<P, StoreError>
    where
        StoreError: From<E>,
    {
        match tokio::time::timeout_at(deadline, checkout).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_elapsed) => Err(StoreError::Unavailable(format!(
                "no database connection within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// The SQLite WAL's length and the checkpointer's holds since start;
    /// `None` on PostgreSQL.
    pub fn sqlite_wal(&self) -> Option<WalReading> {
        self.wal.as_ref().map(|stats| stats.read())
    }

    /// The shared read connection of a PostgreSQL store (`shared_reads.rs`);
    /// `None` on SQLite, whose reads take the pool.
    fn shared_reads(&self) -> Option<&shared_reads::SharedReads> {
        match &self.pools {
            Pools::Sqlite(_) => None,
            Pools::Postgres(_, reads) => Some(reads),
        }
    }

    /// The database engine behind this store.
    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Sqlite(_) => Backend::Sqlite,
            Pools::Postgres(..) => Backend::Postgres,
        }
    }

    /// Checks that the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::sql_query("SELECT 1").execute(conn).await?;
        });
        Ok(())
    }

    /// Applies the embedded migrations that the database has not seen yet;
    /// with none pending it changes nothing.
    ///
    /// diesel's migration runner is synchronous; diesel-async bridges it with
    /// `tokio::task::block_in_place`, which needs the multi-thread runtime.
    /// On any other runtime this returns `StoreError::Migration` instead of
    /// panicking.
    pub async fn run_migrations(&self) -> Result<(), StoreError> {
        let on_multi_thread_runtime = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        if !on_multi_thread_runtime {
            return Err(StoreError::Migration(
                "migrations must run on tokio's multi-thread runtime".to_owned(),
            ));
        }
        match &self.pools {
            Pools::Sqlite(pool) => apply_pending_migrations(pool.get_owned().await?),
            Pools::Postgres(pool, _) => apply_pending_migrations(pool.get_owned().await?),
        }
    }
}

impl fmt::Debug for Store {
    /// Shows the backend only: the pools hold the database URL, which may
    /// contain a password.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Runs the pending embedded migrations over one connection.
fn apply_pending_migrations<C>(connection: C) -> Result<(), StoreError>
where
    C: AsyncConnection + 'static,
    AsyncMigrationHarness<C>: MigrationHarness<C::Backend>,
{
    let mut harness = AsyncMigrationHarness::new(connection);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map_err(|error| StoreError::Migration(error.to_string()))?;
    if !applied.is_empty() {
        let versions: Vec<String> = applied.iter().map(ToString::to_string).collect();
        tracing::info!(count = applied.len(), versions = ?versions, "applied database migrations");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{TestDatabase, test_on_both_backends};

    async fn ping_answers(store: Store) {
        store.ping().await.expect("ping");
    }

    async fn migrations_run_twice_are_a_no_op(store: Store) {
        let key = ApiKeyRecord {
            id: "kept".to_owned(),
            name: "kept".to_owned(),
            key_hash: vec![1],
            prefix: "mk_kept".to_owned(),
            scopes: vec!["read".to_owned()],
            created_at_ms: 1_000,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        store.insert_api_key(&key).await.expect("insert");
        store
            .run_migrations()
            .await
            .expect("run the migrations again");
        assert_eq!(store.list_api_keys().await.expect("list"), vec![key]);
    }

    test_on_both_backends!(ping_answers, migrations_run_twice_are_a_no_op);

    #[tokio::test(flavor = "multi_thread")]
    async fn each_url_form_selects_its_backend() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let sqlite_url = TestDatabase::sqlite(dir.path()).url.clone();
        let bare_path = dir.path().join("bare.db");
        let bare_path = bare_path.to_str().expect("a UTF-8 path");
        for url in [sqlite_url.as_str(), bare_path] {
            let store = Store::connect(url).await.expect("connect");
            assert_eq!(store.backend(), Backend::Sqlite);
        }
        assert!(std::path::Path::new(bare_path).exists());

        let database = TestDatabase::postgres()
            .await
            .expect("create a test database");
        let store = Store::connect(&database.url).await.expect("connect");
        assert_eq!(store.backend(), Backend::Postgres);
        assert_eq!(format!("{store:?}"), "Store { backend: Postgres, .. }");
        drop(store);
        database.cleanup().await.expect("drop the test database");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unreachable_postgres_is_unavailable_within_seconds() {
        let started = tokio::time::Instant::now();
        let outcome = Store::connect("postgres://postgres@127.0.0.1:1/x").await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(6));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_server_that_never_answers_is_unavailable_within_seconds() {
        // The kernel completes the TCP handshake for a listener nobody
        // accepts on, so the client waits for a reply that never comes.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a listener");
        let port = silent.local_addr().expect("listener address").port();
        let started = tokio::time::Instant::now();
        let outcome = Store::connect(&format!("postgres://postgres@127.0.0.1:{port}/x")).await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(6));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connection_errors_do_not_reveal_the_password() {
        let urls = [
            "postgres://postgres:hunter2secret@127.0.0.1:1/x",
            // Reaches the server, which refuses the database name.
            "postgres://postgres:hunter2secret@127.0.0.1:5432/no_such_database_hunter2secret",
        ];
        for url in urls {
            let outcome = Store::connect(url).await;
            let Err(error) = outcome else {
                panic!("{url}: expected an error");
            };
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
            for printed in [error.to_string(), format!("{error:?}")] {
                assert!(!printed.contains("hunter2secret"), "{printed}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_sqlite_file_that_cannot_be_opened_is_unavailable() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let url = format!("sqlite://{}/missing-dir/mosaic.db", dir.path().display());
        let outcome = Store::connect(&url).await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unsupported_urls_are_invalid() {
        let outcome = Store::connect("mysql://root@127.0.0.1/mosaic").await;
        assert!(
            matches!(outcome, Err(StoreError::InvalidUrl(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn migrations_on_a_current_thread_runtime_fail_without_panicking() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let database = TestDatabase::sqlite(dir.path());
        let store = Store::connect(&database.url).await.expect("connect");
        let outcome = store.run_migrations().await;
        assert!(
            matches!(outcome, Err(StoreError::Migration(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_sqlite_wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let database = TestDatabase::sqlite(dir.path());
        let store = database.migrated_store().await.expect("store");
        let file = database
            .url
            .strip_prefix("sqlite://")
            .expect("a file url")
            .to_owned();
        // Let a checkpoint of the migrations pass, then write fewer pages
        // than SQLite's own auto-checkpoint waits for (1000): only the
        // store's background checkpoint copies them into the database.
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        let size = || std::fs::metadata(&file).expect("database file").len();
        let before = size();
        for index in 0..50 {
            let mut job =
                JobRecord::new_pending(format!("job-{index}"), "review".to_owned(), 1_000);
            job.payload_json = format!("{{\"pad\":\"{}\"}}", "x".repeat(4000));
            let creation = crate::coordinator::state::creation_entry(&job, "tester");
            store.insert_job(&job, &creation).await.expect("insert");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while size() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not checkpointed within 5 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
