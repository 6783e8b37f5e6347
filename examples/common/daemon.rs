//! `mosaicd` daemons run as separate processes (the release binary next to the
//! examples), each with its own temporary data dir, database (SQLite in the
//! data dir, or a PostgreSQL database it is given), config file and port, and
//! the mutual-TLS client identity the load generators use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mosaic_mesh::identity::{IdentityManager, InstanceProfile, MasterKeySource, PublicKey};
use mosaic_mesh::store::testing::TestDatabase;
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};
use tonic::transport::Channel;

/// The webhook source every bench daemon accepts, and its HMAC secret.
pub const WEBHOOK_SOURCE: &str = "bench";
/// Secret of [`WEBHOOK_SOURCE`] (a throwaway value for loopback benchmarks).
pub const WEBHOOK_SECRET: &str = "bench-webhook-secret";

/// The `mosaicd` binary: `MOSAICD_BIN`, else `mosaicd` in the target dir the
/// running example was built into (`target/release/examples/..` → `target/release/mosaicd`).
pub fn mosaicd_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOSAICD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let example = std::env::current_exe().context("cannot find this executable")?;
    let candidate = example
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("mosaicd"))
        .context("unexpected executable location")?;
    anyhow::ensure!(
        candidate.is_file(),
        "no mosaicd binary at {}: build it with the same profile (`cargo build --release --bin mosaicd`) or set MOSAICD_BIN",
        candidate.display()
    );
    Ok(candidate)
}

/// What a server process is started under: nothing, or a tool such as
/// valgrind with its options. The process then runs `TOOL OPTIONS… PROGRAM
/// ARGS…`; its pid is the tool's, which runs the program in its own process.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The tool and its options; empty to run the program itself.
    pub prefix: Vec<String>,
    /// How long the server may take to answer its first call.
    pub startup: Duration,
}

impl Default for Launcher {
    fn default() -> Launcher {
        Launcher {
            prefix: Vec::new(),
            startup: Duration::from_secs(30),
        }
    }
}

impl Launcher {
    /// `command` (its program, arguments and environment) under this
    /// launcher.
    pub fn wrap(&self, command: std::process::Command) -> std::process::Command {
        let Some((tool, options)) = self.prefix.split_first() else {
            return command;
        };
        let mut wrapped = std::process::Command::new(tool);
        wrapped
            .args(options)
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(name, value),
                None => wrapped.env_remove(name),
            };
        }
        wrapped
    }
}

/// A free loopback port (bound and released; the daemon binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A daemon whose data dir, identity and API key exist but which does not
/// serve yet (so that a peer's config can name its fingerprint first).
pub struct PreparedDaemon {
    /// Instance name.
    pub name: String,
    /// Where it will listen.
    pub address: SocketAddr,
    /// Where it serves `/metrics` (plain HTTP).
    pub metrics_address: SocketAddr,
    /// Its instance id.
    pub instance_id: String,
    /// Its key fingerprint.
    pub fingerprint: String,
    /// An API key with every scope.
    pub api_key: String,
    /// `None`: SQLite in the data dir.
    database_url: Option<String>,
    data_dir: tempfile::TempDir,
    binary: PathBuf,
}

/// The base configuration: generous rate limits (the production defaults of 100
/// calls a minute would throttle a benchmark), agent types `true` and `sh`, and
/// the bench webhook source.
fn base_config(
    name: &str,
    address: SocketAddr,
    metrics_address: SocketAddr,
    database_url: Option<&str>,
) -> String {
    const LIMIT: u32 = 1_000_000_000;
    let database = database_url
        .map(|url| format!("database_url = \"{url}\"\n"))
        .unwrap_or_default();
    format!(
        r#"listen = "{address}"
metrics_listen = "{metrics_address}"
{database}
[instance]
name = "{name}"
public_url = "https://{address}"

[rate_limit]
global_limit = {LIMIT}
webhook_limit = {LIMIT}
coordinator_limit = {LIMIT}
health_limit = {LIMIT}
federation_limit = {LIMIT}

[agents]
max_concurrent = 64
kill_grace_secs = 1

[agents.types.true]
command = ["true"]

[agents.types.sh]
command = ["/bin/sh", "-c", "{{prompt}}"]

[coordinator.webhooks.{WEBHOOK_SOURCE}]
secret = "{WEBHOOK_SECRET}"
job_type = "bench.webhook"
"#
    )
}

impl PreparedDaemon {
    /// Creates the data dir, config, identity and an all-scopes API key, on
    /// SQLite in the data dir.
    pub fn new(name: &str) -> anyhow::Result<PreparedDaemon> {
        PreparedDaemon::on(name, None)
    }

    /// `new`, on the database at `database_url` if given.
    pub fn on(name: &str, database_url: Option<String>) -> anyhow::Result<PreparedDaemon> {
        let binary = mosaicd_binary()?;
        let data_dir = tempfile::tempdir()?;
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let metrics_address: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut prepared = PreparedDaemon {
            name: name.to_owned(),
            address,
            metrics_address,
            instance_id: String::new(),
            fingerprint: String::new(),
            api_key: String::new(),
            database_url,
            data_dir,
            binary,
        };
        prepared.write_config("")?;
        let init = prepared.run_json(&["init"])?;
        prepared.instance_id = json_text(&init, "instance_id")?;
        prepared.fingerprint = json_text(&init, "fingerprint")?;
        let key = prepared.run_json(&[
            "apikey",
            "create",
            "--name",
            "bench",
            "--scope",
            "admin,agents,coordinator,webhook",
        ])?;
        prepared.api_key = json_text(&key, "key")?;
        Ok(prepared)
    }

    /// The database the daemon uses.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir
                    .path()
                    .join(mosaic_mesh::config::SQLITE_FILE)
                    .display()
            )
        })
    }

    fn config_file(&self) -> PathBuf {
        self.data_dir.path().join("mosaic.toml")
    }

    fn write_config(&self, extra_toml: &str) -> anyhow::Result<()> {
        let text = format!(
            "{}\n{extra_toml}",
            base_config(
                &self.name,
                self.address,
                self.metrics_address,
                self.database_url.as_deref()
            )
        );
        std::fs::write(self.config_file(), text)?;
        Ok(())
    }

    /// `mosaicd` on this data dir and config, with no `MOSAIC_*` variable
    /// inherited from the caller's shell.
    fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MOSAIC_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--config")
            .arg(self.config_file())
            .env("MOSAIC_LOG", "warn");
        command
    }

    fn run_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let output = self.command().args(args).arg("--json").output()?;
        anyhow::ensure!(
            output.status.success(),
            "mosaicd {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Starts `mosaicd serve` with `extra_toml` appended to the base config and
    /// waits until it answers a health check over TLS (at most 30 s). The
    /// daemon logs at `warn` (per-call logs off) into `daemon.log` in its data dir.
    pub async fn serve(self, extra_toml: &str) -> anyhow::Result<Daemon> {
        self.serve_with_env(extra_toml, &[]).await
    }

    /// [`serve`](Self::serve), with the environment variables `env` set for
    /// `mosaicd serve` only (not for `init` or `apikey`), after the defaults:
    /// `MOSAIC_LOG` here replaces the default `warn`. For settings appended TOML
    /// cannot give, such as root keys or `[rate_limit]`, which the base config
    /// already writes.
    pub async fn serve_with_env(
        self,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        self.serve_under(&Launcher::default(), extra_toml, env)
            .await
    }

    /// [`serve_with_env`](Self::serve_with_env), `mosaicd serve` started
    /// under `launcher`.
    pub async fn serve_under(
        self,
        launcher: &Launcher,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        self.write_config(extra_toml)?;
        let log = std::fs::File::create(self.data_dir.path().join("daemon.log"))?;
        let mut command = tokio::process::Command::from(launcher.wrap(self.command()));
        command
            .envs(env.iter().copied())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = command.spawn().context("cannot start mosaicd serve")?;
        let pid = child.id().context("mosaicd exited at once")?;
        let mut daemon = Daemon {
            prepared: self,
            child,
            pid,
            server_key: None,
        };
        daemon.wait_until_serving(launcher.startup).await?;
        Ok(daemon)
    }
}

fn json_text(value: &serde_json::Value, field: &str) -> anyhow::Result<String> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no `{field}` in {value}"))
}

/// A running `mosaicd serve` process, killed when dropped.
pub struct Daemon {
    // Declared first so that it is killed before the data dir is removed.
    child: tokio::process::Child,
    /// Its data dir, identity and key.
    pub prepared: PreparedDaemon,
    /// The process id (for its resident memory).
    pub pid: u32,
    server_key: Option<PublicKey>,
}

impl Daemon {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.prepared.address)
    }

    /// The all-scopes API key.
    pub fn api_key(&self) -> &str {
        &self.prepared.api_key
    }

    /// Its resident memory now (VmRSS, KiB).
    pub fn rss_kib(&self) -> Option<u64> {
        super::machine::rss_kib(self.pid)
    }

    /// The key in the certificate the daemon wrote into its data dir.
    fn read_server_key(&self) -> anyhow::Result<PublicKey> {
        use rustls_pki_types::pem::PemObject;
        let path = mosaic_mesh::config::certificate_path(self.prepared.data_dir.path());
        let der = rustls_pki_types::CertificateDer::from_pem_file(&path)
            .with_context(|| format!("no certificate at {}", path.display()))?;
        let spki = mosaic_mesh::identity::certificate::spki_of_certificate(&der)
            .context("certificate without a key")?;
        Ok(PublicKey::from_spki_der(&spki)?)
    }

    async fn wait_until_serving(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let client = ClientIdentity::new().await?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "mosaicd {} exited with {status}; see its log: {}",
                    self.prepared.name,
                    std::fs::read_to_string(self.prepared.data_dir.path().join("daemon.log"))
                        .unwrap_or_default()
                );
            }
            if let Ok(key) = self.read_server_key() {
                self.server_key = Some(key);
                if let Ok(channel) = self.channel(&client).await {
                    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                    if health
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "mosaicd {} did not serve within {} s",
                self.prepared.name,
                limit.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A mutual-TLS channel to this daemon: pins its key and presents
    /// `client`'s P-256 certificate.
    pub async fn channel(&self, client: &ClientIdentity) -> anyhow::Result<Channel> {
        let key = self
            .server_key
            .clone()
            .context("the daemon's key is not known yet")?;
        client.channel(&self.url(), key).await
    }

    /// The Prometheus text the daemon serves at `/metrics`.
    pub async fn scrape_metrics(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.prepared.metrics_address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: mosaicd\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("a metrics response without a body")?;
        Ok(body.to_owned())
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A client's own instance identity (P-256 key and self-signed certificate), so
/// that load generators talk mutual TLS like peers do; it is unknown to the
/// daemons, which authenticate its calls by API key.
pub struct ClientIdentity {
    /// The identity, as a daemon would hold it.
    pub identity: Arc<IdentityManager>,
    _data_dir: tempfile::TempDir,
}

impl ClientIdentity {
    /// A fresh identity in a temporary SQLite database.
    pub async fn new() -> anyhow::Result<ClientIdentity> {
        mosaic_mesh::tls::install_default_provider();
        let data_dir = tempfile::tempdir()?;
        let store = TestDatabase::sqlite(data_dir.path())
            .migrated_store()
            .await?;
        let source = MasterKeySource {
            environment_value: None,
            key_file: data_dir.path().join("master.key"),
        };
        let profile = InstanceProfile {
            name: "bench-client".to_owned(),
            public_url: "https://127.0.0.1:1".to_owned(),
            capabilities: Vec::new(),
            metadata: Default::default(),
        };
        let identity = IdentityManager::load_or_create(store, &source, &profile).await?;
        Ok(ClientIdentity {
            identity: Arc::new(identity),
            _data_dir: data_dir,
        })
    }

    /// A mutual-TLS channel to `url`, pinning `server_key`.
    pub async fn channel(&self, url: &str, server_key: PublicKey) -> anyhow::Result<Channel> {
        let tls = mosaic_mesh::tls::mutual_client_config(
            ServerPin::PublicKey(server_key),
            Arc::clone(&self.identity),
        )?;
        Ok(
            mosaic_mesh::tls::connect_channel(url, Some(Arc::new(tls)), ChannelTimeouts::default())
                .await?,
        )
    }
}

/// Adds `authorization: Bearer <key>` to a request.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
