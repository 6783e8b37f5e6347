//! The one test-daemon builder every integration test uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::{Config, ConfigArgs, FileConfig, Secret};
use mosaic_mesh::store::Store;
use mosaic_mesh::store::testing::TestDatabase;
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which database a daemon runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the data dir (the embedded default).
    Sqlite,
    /// A fresh PostgreSQL database from `MOSAIC_TEST_DATABASE_URL`, dropped after.
    Postgres,
}

/// A data dir and database that outlive single daemon runs (for restart tests).
pub struct TestEnvironment {
    /// The temporary data dir.
    pub data_dir: tempfile::TempDir,
    /// The database the daemon uses.
    pub database: TestDatabase,
}

impl TestEnvironment {
    /// A new data dir and a fresh database of `backend`.
    pub async fn new(backend: Backend) -> TestEnvironment {
        let data_dir = tempfile::tempdir().expect("temporary data dir");
        let database = match backend {
            Backend::Sqlite => TestDatabase::sqlite(data_dir.path()),
            Backend::Postgres => TestDatabase::postgres().await.expect(
                "create a PostgreSQL test database (is MOSAIC_TEST_DATABASE_URL reachable?)",
            ),
        };
        TestEnvironment { data_dir, database }
    }

    /// The configuration a daemon in this environment runs with.
    pub fn config(&self) -> Config {
        let args = ConfigArgs {
            data_dir: Some(self.data_dir.path().to_path_buf()),
            database_url: Some(self.database.url.clone()),
            listen: Some("127.0.0.1:0".parse().expect("address")),
            name: Some("test-instance".to_owned()),
            ..ConfigArgs::default()
        };
        let mut config = Config::resolve(FileConfig::default(), &args).expect("test config");
        // Tests poll daemons quickly from one address; the production limits
        // (100 calls a minute) would throttle them. Rate-limit tests set their own.
        let generous = mosaic_mesh::ratelimit::RateLimitFileConfig {
            global_limit: Some(1_000_000),
            webhook_limit: Some(1_000_000),
            coordinator_limit: Some(1_000_000),
            health_limit: Some(1_000_000),
            federation_limit: Some(1_000_000),
            ..Default::default()
        };
        config.rate_limit = mosaic_mesh::ratelimit::RateLimitSettings::resolve(
            generous,
            &Default::default(),
            false,
        )
        .expect("test rate limits");
        config
    }

    /// A store on the same database, for arranging and checking state.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.database.url)
            .await
            .expect("connect store");
        store.run_migrations().await.expect("migrations");
        store
    }

    /// Starts a daemon here with the default test configuration.
    pub async fn start(&self) -> TestDaemon {
        self.start_with(self.config()).await.expect("daemon starts")
    }

    /// Starts a daemon with `config` (which should point at this environment).
    /// Returns the daemon's start-up error instead of panicking.
    pub async fn start_with(&self, config: Config) -> anyhow::Result<TestDaemon> {
        mosaic_mesh::tls::install_default_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shared = mosaic_mesh::server::prepare(&config).await?;
        let rate_limiter = Arc::clone(&shared.rate_limiter);
        let metrics = Arc::clone(&shared.metrics);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(mosaic_mesh::server::serve(listener, shared, async {
            let _ = stopped.await;
        }));
        Ok(TestDaemon {
            address,
            data_dir: self.data_dir.path().to_path_buf(),
            config,
            rate_limiter,
            metrics,
            stop: Some(stop),
            handle: Some(handle),
        })
    }

    /// Starts a daemon that peers can reach: its public URL is its real address,
    /// and federation timings are short (pings every 300 ms, notice retries from
    /// 100 ms up to 500 ms). `port` 0 picks a free port; a previous daemon's port
    /// restarts it where its peers expect it. `configure` adjusts the rest.
    pub async fn start_peer(&self, port: u16, configure: impl FnOnce(&mut Config)) -> TestDaemon {
        mosaic_mesh::tls::install_default_provider();
        let listener = bind_loopback(port).await;
        let address = listener.local_addr().expect("listener address");
        let mut config = self.config();
        config.listen = address;
        config.instance.public_url = format!("https://{address}");
        config.federation.ping_interval = Duration::from_millis(300);
        config.federation.notice_retry_initial = Duration::from_millis(100);
        config.federation.notice_retry_max = Duration::from_millis(500);
        config.federation.connect_timeout = Duration::from_secs(2);
        config.federation.call_timeout = Duration::from_secs(5);
        configure(&mut config);
        let shared = mosaic_mesh::server::prepare(&config)
            .await
            .expect("daemon prepares");
        let rate_limiter = Arc::clone(&shared.rate_limiter);
        let metrics = Arc::clone(&shared.metrics);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(mosaic_mesh::server::serve(listener, shared, async {
            let _ = stopped.await;
        }));
        TestDaemon {
            address,
            data_dir: self.data_dir.path().to_path_buf(),
            config,
            rate_limiter,
            metrics,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Drops the PostgreSQL database, if any.
    pub async fn cleanup(self) {
        self.database.cleanup().await.expect("drop test database");
    }
}

/// A daemon running inside the test process on a real socket.
pub struct TestDaemon {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// The configuration it runs with.
    pub config: Config,
    /// Its rate limiter (for its counters).
    pub rate_limiter: Arc<mosaic_mesh::ratelimit::RateLimiter>,
    /// Its call metrics (and the metrics listener's address, when enabled).
    pub metrics: Arc<mosaic_mesh::metrics::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestDaemon {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// The certificate PEM the daemon wrote into its data dir.
    pub fn certificate_pem(&self) -> String {
        std::fs::read_to_string(self.certificate_path()).expect("daemon certificate")
    }

    /// Path of that certificate.
    pub fn certificate_path(&self) -> PathBuf {
        mosaic_mesh::config::certificate_path(&self.data_dir)
    }

    /// A TLS channel that pins the key in the daemon's certificate file.
    pub async fn channel(&self) -> tonic::transport::Channel {
        let spki = spki_of_pem(&self.certificate_pem());
        let key = mosaic_mesh::identity::PublicKey::from_spki_der(&spki).expect("p-256 key");
        self.channel_pinned(ServerPin::PublicKey(key))
            .await
            .expect("connect to the test daemon")
    }

    /// A TLS channel with an explicit pin (may fail).
    pub async fn channel_pinned(
        &self,
        pin: ServerPin,
    ) -> Result<tonic::transport::Channel, mosaic_mesh::tls::TlsError> {
        let tls = Arc::new(mosaic_mesh::tls::pinned_client_config(pin).expect("client tls"));
        mosaic_mesh::tls::connect_channel(&self.url(), Some(tls), ChannelTimeouts::default()).await
    }

    /// Creates an API key with `scopes` directly in the daemon's database.
    pub async fn api_key(&self, scopes: &[Scope]) -> String {
        let store = Store::connect(&self.config.database_url)
            .await
            .expect("store");
        let created = mosaic_mesh::auth::create_api_key(&store, "test key", scopes)
            .await
            .expect("create api key");
        created.secret.to_string()
    }

    /// Stops the daemon and waits for it to finish draining.
    pub async fn stop(mut self) {
        self.shutdown().await.expect("daemon stops cleanly");
    }

    async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(handle) => handle.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The instance a daemon describes in `GetInstance` over `channel`.
pub async fn instance_of(
    channel: tonic::transport::Channel,
) -> mosaic_mesh::proto::federation::Instance {
    use mosaic_mesh::proto::federation as pb;
    pb::federation_client::FederationClient::new(channel)
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("GetInstance")
        .into_inner()
        .instance
        .expect("instance")
}

/// Binds 127.0.0.1:`port`, waiting up to 10 s for a port that a stopped daemon
/// just released.
pub async fn bind_loopback(port: u16) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return listener,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, port, "port busy; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot bind 127.0.0.1:{port}: {error}"),
        }
    }
}

/// Adds `authorization: Bearer <key>` to a request.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header value"),
    );
    request
}

/// The SubjectPublicKeyInfo inside a PEM certificate.
pub fn spki_of_pem(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    mosaic_mesh::identity::certificate::spki_of_certificate(&der).expect("spki")
}

/// A configuration whose master key is `master_key_base64` instead of the key file.
pub fn with_master_key(mut config: Config, master_key_base64: &str) -> Config {
    config.master_key = Some(Secret(zeroize::Zeroizing::new(
        master_key_base64.to_owned(),
    )));
    config
}

/// The `mosaicd` binary built for these tests.
pub fn mosaicd_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mosaicd"))
}
