//! Opening connections and pooling them: the per-backend connection setup,
//! the time limits, and the bb8 settings.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, PoolError};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

use super::StoreError;
use super::database_url::redact_password;

/// A SQLite connection. SQLite is synchronous; the wrapper runs each
/// operation on tokio's blocking thread pool so it never stalls a worker.
pub(super) type SqliteConnection = SyncConnectionWrapper<diesel::SqliteConnection>;

/// A PostgreSQL connection, asynchronous all the way down.
pub(super) type PostgresConnection = AsyncPgConnection;

/// How long opening and setting up one connection may take. A server that
/// does not answer (a dropped packet rather than a refusal) would otherwise
/// hold `Store::connect` for the operating system's TCP timeout, minutes.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a query waits for a pooled connection before failing with
/// `StoreError::Unavailable`. bb8's default of 30 s would hold a request far
/// beyond any client's deadline.
pub(super) const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(3);

/// SQLite admits one writer at a time however many connections there are;
/// with one connection every statement takes its turn in the store's fair
/// queue (see `Store::turn`) instead of contending for the file lock in
/// SQLite's busy handler, which sleeps in growing steps and is not fair.
pub(super) const SQLITE_POOL_SIZE: u32 = 1;

/// PostgreSQL serves connections concurrently; ten is bb8's default and far
/// below a stock server's `max_connections` of 100, leaving room for replicas.
pub(super) const POSTGRES_POOL_SIZE: u32 = 10;

/// Run on every new SQLite connection. `busy_timeout` comes first so that
/// switching to WAL, which needs a lock, waits for a concurrent connection
/// instead of failing at once. WAL lets readers proceed during a write, and
/// `synchronous = NORMAL` is durable across crashes of the process in WAL
/// mode (a power loss may lose the last transactions, never corrupt the file).
/// No commit checkpoints the WAL (`wal_autocheckpoint = 0`): SQLite would
/// otherwise make every thousandth page's commit copy the WAL into the
/// database and wait for two fsyncs, a spike of milliseconds in some unlucky
/// call's latency; the store's `Checkpointer` does it instead, off the
/// commit path (see `checkpoint.rs`).
const SQLITE_SETUP: &str = "PRAGMA busy_timeout = 5000; \
    PRAGMA journal_mode = WAL; \
    PRAGMA foreign_keys = ON; \
    PRAGMA synchronous = NORMAL; \
    PRAGMA wal_autocheckpoint = 0;";

/// What diesel-async's `ManagerConfig::custom_setup` expects a setup function
/// to return.
type SetupFuture<'a, C> = Pin<Box<dyn Future<Output = ConnectionResult<C>> + Send + 'a>>;

/// How long a PostgreSQL connection sits idle before TCP keepalives probe
/// it, unless the URL says (`keepalives_idle`).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between two keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered probes before the connection counts as dead.
const KEEPALIVE_RETRIES: u32 = 3;

/// A pool of SQLite connections to the database file at `path`.
pub(super) async fn sqlite_pool(path: &str) -> Result<Pool<SqliteConnection>, StoreError> {
    build_pool(path, open_sqlite, SQLITE_POOL_SIZE).await
}

/// A pool of PostgreSQL connections to `url`, each with `call_timeout` as
/// its statement timeout and TCP user timeout.
pub(super) async fn postgres_pool(
    url: &str,
    call_timeout: Duration,
) -> Result<Pool<PostgresConnection>, StoreError> {
    build_pool(
        url,
        move |url| open_postgres(url, call_timeout),
        POSTGRES_POOL_SIZE,
    )
    .await
}

/// Opens one connection directly, then builds the pool around it.
///
/// The first connection is opened here rather than through the pool because
/// bb8 only reports "timed out" when its own attempts fail, and whoever
/// starts the daemon deserves the reason (refused, unknown database, bad
/// password).
async fn build_pool<C>(
    url: &str,
    open: impl for<'a> Fn(&'a str) -> SetupFuture<'a, C> + Send + Sync + 'static,
    max_size: u32,
) -> Result<Pool<C>, StoreError>
where
    C: AsyncConnection + 'static,
    AsyncDieselConnectionManager<C>: bb8::ManageConnection<Connection = C, Error = PoolError>,
{
    let first_connection = open(url)
        .await
        .map_err(|error| StoreError::Unavailable(error.to_string()))?;

    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(open);
    let manager = AsyncDieselConnectionManager::new_with_config(url, manager_config);
    let pool = Pool::builder()
        .max_size(max_size)
        .connection_timeout(CHECKOUT_TIMEOUT)
        // A ping on every checkout doubles the latency of short queries; a
        // broken connection is noticed when it is returned to the pool.
        .test_on_check_out(false)
        .error_sink(Box::new(LogConnectionErrors))
        .build_unchecked(manager);
    if pool.add(first_connection).is_err() {
        // A new pool has room for its first connection; if not, the pool
        // simply opens another on demand.
        tracing::debug!("the new pool did not take its first connection");
    }
    Ok(pool)
}

/// Opens a SQLite connection and applies `SQLITE_SETUP`.
fn open_sqlite(path: &str) -> SetupFuture<'_, SqliteConnection> {
    Box::pin(within_connect_timeout(async move {
        let mut connection = SqliteConnection::establish(path).await?;
        connection
            .batch_execute(SQLITE_SETUP)
            .await
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok(connection)
    }))
}

/// Opens a PostgreSQL connection, with TLS as the URL's `sslmode` says
/// (`postgres_tls.rs`), keeping the URL's password out of any error. The
/// connection is set up as `postgres_client_config` and
/// `set_statement_timeout` say.
pub(super) fn open_postgres(
    url: &str,
    call_timeout: Duration,
) -> SetupFuture<'_, PostgresConnection> {
    Box::pin(async move {
        within_connect_timeout(async {
            let (config, tls) = postgres_client_config(url, call_timeout)?;
            let mut connection = match tls {
                None => {
                    let (client, connection) = config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .map_err(bad_connection)?;
                    PostgresConnection::try_from_client_and_connection(client, connection).await?
                }
                Some(tls) => {
                    let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                    let (client, connection) =
                        config.connect(connector).await.map_err(bad_connection)?;
                    PostgresConnection::try_from_client_and_connection(client, connection).await?
                }
            };
            set_statement_timeout(&mut connection, call_timeout).await?;
            Ok(connection)
        })
        .await
        .map_err(|error| ConnectionError::BadConnection(redact_password(&error.to_string(), url)))
    })
}

/// The future that drives a tokio-postgres connection's socket: it ends
/// when the connection closes.
pub(super) type ConnectionDriver =
    Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// Opens a PostgreSQL client set up like `open_postgres`'s, handing back
/// the future that drives its socket for the caller to spawn, so that the
/// caller learns when the connection has closed (`shared_reads.rs`).
pub(super) async fn open_postgres_client(
    url: &str,
    call_timeout: Duration,
) -> ConnectionResult<(tokio_postgres::Client, ConnectionDriver)> {
    within_connect_timeout(async {
        let (config, tls) = postgres_client_config(url, call_timeout)?;
        let opened: (tokio_postgres::Client, ConnectionDriver) = match tls {
            None => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(bad_connection)?;
                (client, Box::pin(connection))
            }
            Some(tls) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, connection) =
                    config.connect(connector).await.map_err(bad_connection)?;
                (client, Box::pin(connection))
            }
        };
        Ok(opened)
    })
    .await
    .map_err(|error| ConnectionError::BadConnection(redact_password(&error.to_string(), url)))
}

/// The client settings of every connection to `url`, and its TLS settings
/// if the URL asks for TLS. The socket sends keepalives when idle, and
/// gives up on data left unacknowledged for `call_timeout`, so that a
/// server which stops answering (packets dropped, no reset) is noticed
/// rather than waited on for the system's minutes. The URL's own
/// `keepalives_idle` and `tcp_user_timeout` win.
fn postgres_client_config(
    url: &str,
    call_timeout: Duration,
) -> ConnectionResult<(
    tokio_postgres::Config,
    Option<std::sync::Arc<rustls::ClientConfig>>,
)> {
    let tls = super::postgres_tls::prepare(url).map_err(ConnectionError::InvalidConnectionUrl)?;
    let mut config: tokio_postgres::Config =
        tls.url.parse().map_err(|error: tokio_postgres::Error| {
            ConnectionError::InvalidConnectionUrl(error.to_string())
        })?;
    if !url.contains("keepalives_idle") {
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
    }
    if !url.contains("tcp_user_timeout") {
        config.tcp_user_timeout(call_timeout);
    }
    Ok((config, tls.config))
}

/// Has the server cancel any statement of `connection` running longer than
/// `call_timeout`.
async fn set_statement_timeout<C: SimpleAsyncConnection>(
    connection: &mut C,
    call_timeout: Duration,
) -> ConnectionResult<()> {
    connection
        .batch_execute(&statement_timeout_sql(call_timeout))
        .await
        .map_err(ConnectionError::CouldntSetupConfiguration)
}

/// The statement that sets a session's `statement_timeout` to
/// `call_timeout`.
pub(super) fn statement_timeout_sql(call_timeout: Duration) -> String {
    format!("SET statement_timeout = {}", call_timeout.as_millis())
}

/// A failure to connect, with the causes the error carries.
fn bad_connection(error: tokio_postgres::Error) -> ConnectionError {
    ConnectionError::BadConnection(crate::text::error_chain(&error))
}

/// Bounds the time `opening` may take by `CONNECT_TIMEOUT`.
async fn within_connect_timeout<C>(
    opening: impl Future<Output = ConnectionResult<C>>,
) -> ConnectionResult<C> {
    tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .unwrap_or_else(|_elapsed| {
            Err(ConnectionError::BadConnection(format!(
                "no answer from the database within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })
}

/// Logs the failures of connections the pool opens in the background; a
/// caller waiting for one of them only sees a timeout.
#[derive(Debug, Clone, Copy)]
struct LogConnectionErrors;

impl bb8::ErrorSink<PoolError> for LogConnectionErrors {
    fn sink(&self, error: PoolError) {
        tracing::warn!(error = %error, "database connection failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<PoolError>> {
        Box::new(*self)
    }
}
