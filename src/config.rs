//! The configuration tree and its sources. Later sources win: the TOML file
//! (`--config` / `MOSAIC_CONFIG`), then `MOSAIC_*` environment variables, then flags
//! (clap reads each flag's variable itself, so the two share one definition).
//!
//! Every field says its unit and default. Invalid configuration is an error at
//! start that names the key; unknown keys in the file are errors too, so a typo
//! never silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::agents::settings::{
    AgentType, AgentTypeFileConfig, AgentsConfig, AgentsFileConfig, DEFAULT_AGENT_TIMEOUT_SECS,
};
pub use crate::coordinator::settings::{
    CoordinatorConfig, CoordinatorFileConfig, DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_REMOTE_AGENT_POLL_MS, ENV_WEBHOOK_SECRET_PREFIX, WebhookSource,
    WebhookSourceFileConfig, webhook_secret_variable,
};
pub use crate::federation::settings::{FederationConfig, FederationFileConfig};
use crate::identity::InstanceProfile;

pub(crate) mod error;
mod listen;
pub(crate) mod secret;
mod shown_url;
pub use error::ConfigError;
pub(crate) use error::invalid;
pub use listen::parse_listen_address;
pub use secret::Secret;
pub use shown_url::url_without_credentials;

/// Path of the TOML configuration file.
pub const ENV_CONFIG: &str = "MOSAIC_CONFIG";
/// The data directory.
pub const ENV_DATA_DIR: &str = "MOSAIC_DATA_DIR";
/// The listen address.
pub const ENV_LISTEN: &str = "MOSAIC_LISTEN";
/// The database URL.
pub const ENV_DATABASE_URL: &str = "MOSAIC_DATABASE_URL";
/// The Redis URL.
pub const ENV_REDIS_URL: &str = "MOSAIC_REDIS_URL";
/// Plaintext (no TLS) for local development.
pub const ENV_PLAINTEXT: &str = "MOSAIC_PLAINTEXT";
/// The instance name.
pub const ENV_INSTANCE_NAME: &str = "MOSAIC_INSTANCE_NAME";
/// The public URL peers dial.
pub const ENV_PUBLIC_URL: &str = "MOSAIC_PUBLIC_URL";

/// The Prometheus metrics listen address.
pub const ENV_METRICS_LISTEN: &str = "MOSAIC_METRICS_LISTEN";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// The SQLite file inside the data dir.
pub const SQLITE_FILE: &str = "mosaic.db";

/// Settings given as flags or environment variables (clap reads both).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = ENV_CONFIG, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory: SQLite database, master key file, agent work dirs
    /// [default: $XDG_DATA_HOME/mosaicd or ~/.local/share/mosaicd].
    #[arg(long, env = ENV_DATA_DIR, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: `postgres://...` or `sqlite://PATH` [default: SQLite in the data dir].
    #[arg(long, env = ENV_DATABASE_URL, global = true, hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Address to listen on: IP:PORT, or localhost:PORT for 127.0.0.1
    /// [default: 127.0.0.1:7443].
    #[arg(long, env = ENV_LISTEN, global = true, value_name = "ADDR", value_parser = parse_listen_address)]
    pub listen: Option<SocketAddr>,
    /// Redis/Valkey URL for shared rate limits [default: none, in-memory limits].
    #[arg(long, env = ENV_REDIS_URL, global = true, hide_env_values = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Serve without TLS (local development; refused on non-loopback addresses).
    #[arg(long, env = ENV_PLAINTEXT, global = true)]
    pub plaintext: bool,
    /// Instance name shown to peers [default: the host name].
    #[arg(long, env = ENV_INSTANCE_NAME, global = true, value_name = "NAME")]
    pub name: Option<String>,
    /// URL peers use to reach this instance [default: https://LISTEN].
    #[arg(long, env = ENV_PUBLIC_URL, global = true, value_name = "URL")]
    pub public_url: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP) [default: off].
    #[arg(long, env = ENV_METRICS_LISTEN, global = true, value_name = "ADDR", value_parser = parse_listen_address)]
    pub metrics_listen: Option<SocketAddr>,
    /// Rate limits (`MOSAIC_RATE_LIMIT_*`).
    #[command(flatten)]
    pub rate_limit: crate::ratelimit::RateLimitArgs,
    /// TLS mode and CA-mode files (`MOSAIC_TLS_*`).
    #[command(flatten)]
    pub tls: crate::tls::ca::TlsArgs,
}

/// The configuration file, as written. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::listen`].
    #[serde(default, deserialize_with = "listen::deserialize_optional")]
    pub listen: Option<SocketAddr>,
    /// See [`Config::database_url`].
    pub database_url: Option<String>,
    /// See [`Config::redis_url`].
    pub redis_url: Option<String>,
    /// See [`Config::plaintext`].
    pub plaintext: Option<bool>,
    /// See [`Config::metrics_listen`].
    #[serde(default, deserialize_with = "listen::deserialize_optional")]
    pub metrics_listen: Option<SocketAddr>,
    /// `[instance]`.
    #[serde(default)]
    pub instance: InstanceFileConfig,
    /// `[server]`.
    #[serde(default)]
    pub server: ServerFileConfig,
    /// `[federation]`.
    #[serde(default)]
    pub federation: FederationFileConfig,
    /// `[identity]`.
    #[serde(default)]
    pub identity: IdentityFileConfig,
    /// `[agents]` and `[agents.types.NAME]`.
    #[serde(default)]
    pub agents: AgentsFileConfig,
    /// `[rate_limit]`.
    #[serde(default)]
    pub rate_limit: crate::ratelimit::RateLimitFileConfig,
    /// `[coordinator]`.
    #[serde(default)]
    pub coordinator: CoordinatorFileConfig,
    /// `[tls]`.
    #[serde(default)]
    pub tls: crate::tls::ca::TlsFileConfig,
    /// `[storage]`.
    #[serde(default)]
    pub storage: crate::store::StorageFileConfig,
    /// `[replicas]`.
    #[serde(default)]
    pub replicas: crate::replicas::settings::ReplicasFileConfig,
}

/// `[instance]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFileConfig {
    /// Instance name.
    pub name: Option<String>,
    /// Public URL.
    pub public_url: Option<String>,
    /// Capabilities offered to peers.
    pub capabilities: Option<Vec<String>>,
    /// Metadata shown to peers.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `[server]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFileConfig {
    /// Seconds to drain in-flight calls on shutdown (default 10).
    pub shutdown_grace_secs: Option<u64>,
    /// Largest accepted request message in bytes (default 4 MiB).
    pub max_message_bytes: Option<usize>,
    /// Seconds a client has to finish the TLS handshake (default 10).
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Milliseconds an API key, peer connection or peer key read from the store
    /// is believed (default 1000; 0: read on every call).
    pub auth_cache_ms: Option<u64>,
    /// The level of the one log line per call: `info` (default), `debug` or
    /// `off`.
    pub access_log: Option<String>,
    /// Threads that serve calls, each with its own connections (default
    /// half the CPUs, at least one).
    pub serving_threads: Option<usize>,
}

/// `[identity]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFileConfig {
    /// Seconds a rotated-out key stays valid for verification (default 86400).
    pub rotation_grace_secs: Option<u64>,
}

/// Longest key rotation grace, in seconds (30 days): a peer trusts a key this
/// long after it was rotated out.
pub const MAX_ROTATION_GRACE_SECS: u64 = 30 * 24 * 60 * 60;

/// How long, by default, credentials read from the store are believed.
const DEFAULT_AUTH_CACHE_MS: u64 = 1000;
/// The longest `server.auth_cache_ms`: a revoked key must stop working soon.
const MAX_AUTH_CACHE_MS: u64 = 60_000;

/// The most serving threads `server.serving_threads` may ask for.
const MAX_SERVING_THREADS: usize = 256;

/// Half the CPUs this process may use, at least one: the other half is left
/// to the main runtime (background work, agents' I/O), the log's writer and
/// a database or Redis on the same machine. One thread serving every call
/// costs less CPU per call than two sharing them on a 2-CPU machine
/// (BENCHMARKS.md, issue 23, session 24).
fn default_serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
}

/// Creates the data directory (and any missing parent) readable by this
/// user alone: it holds sealed keys, API-key hashes and agents' output. An
/// existing directory keeps its mode (the operator's, or systemd's).
pub fn create_data_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory (SQLite file, master key file, TLS certificate copy).
    pub data_dir: PathBuf,
    /// Listen address (default 127.0.0.1:7443).
    pub listen: SocketAddr,
    /// Database URL (default `sqlite://<data_dir>/mosaic.db`).
    pub database_url: String,
    /// Redis URL, if rate limits are shared (default none).
    pub redis_url: Option<String>,
    /// Serve without TLS (default false; loopback only).
    pub plaintext: bool,
    /// The instance profile published to peers.
    pub instance: InstanceProfile,
    /// Time to drain in-flight calls on shutdown (default 10 s).
    pub shutdown_grace: Duration,
    /// Largest accepted request message (default 4 MiB).
    pub max_message_bytes: usize,
    /// Time a client has to complete the TLS handshake (default 10 s).
    pub tls_handshake_timeout: Duration,
    /// The level of the one log line per call (default info).
    pub access_log: crate::metrics::settings::AccessLog,
    /// Threads that serve calls, each owning the connections handed to it
    /// (default half the CPUs, at least one; see [`crate::serving`]).
    pub serving_threads: usize,
    /// How long an API key, peer connection or peer key read from the store is
    /// believed before it is read again (default 1 s; zero: every call reads).
    /// Changes made through this daemon apply at once; see [`crate::cache`].
    pub auth_cache: Duration,
    /// How long a rotated-out key still verifies (default 24 h).
    pub rotation_grace: Duration,
    /// Federation with peers: dialing, liveness, clock window, retries.
    pub federation: FederationConfig,
    /// The master key from `MOSAIC_MASTER_KEY` (base64), if set; otherwise the key
    /// file in the data dir is used. Read from the environment only, never a flag,
    /// so it does not show in process listings.
    pub master_key: Option<Secret>,
    /// The agent runtime (`[agents]`).
    pub agents: AgentsConfig,
    /// Rate limits: tiers, storage, fallback, proxies (see `ratelimit::settings`).
    pub rate_limit: crate::ratelimit::RateLimitSettings,
    /// The job coordinator: payload limit and webhook sources.
    pub coordinator: CoordinatorConfig,
    /// How this replica is known to the others: its lease and address.
    pub replicas: crate::replicas::settings::ReplicasConfig,
    /// Where `/metrics` is served over plain HTTP (default none: no metrics listener).
    pub metrics_listen: Option<SocketAddr>,
    /// Pinned keys only (default), or CA mode with the operator's chain and bundle.
    pub tls: crate::tls::ca::TlsSettings,
    /// The SQLite WAL's bound and the retention of ended work (see `store::settings`).
    pub storage: crate::store::StorageSettings,
}

/// Capabilities an instance offers unless configured otherwise.
pub fn default_capabilities() -> Vec<String> {
    ["agent.spawn", "agent.status", "agent.kill"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

impl Config {
    /// Why the URL this instance gives peers cannot be dialed, if its host is
    /// "every address" (`0.0.0.0` or `[::]`): what a public URL derived from
    /// `listen = "0.0.0.0:7443"` looks like.
    pub fn public_url_warning(&self) -> Option<String> {
        let unspecified = self
            .instance
            .public_host()?
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_unspecified());
        unspecified.then(|| {
            format!(
                "the URL this instance gives peers is {}, which no peer can dial; set \
                 instance.public_url (--public-url, MOSAIC_PUBLIC_URL) to https://HOST:PORT \
                 with a name or address peers reach",
                self.instance.public_url
            )
        })
    }

    /// Reads the file named by `args.config` (if any) and resolves everything.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Self::resolve(file, args)?;
        config.master_key = std::env::var(crate::identity::sealing::MASTER_KEY_ENV)
            .ok()
            .filter(|value| !value.is_empty())
            .map(|value| Secret(zeroize::Zeroizing::new(value)));
        config
            .coordinator
            .apply_secret_overrides(|name| std::env::var(name).ok());
        Ok(config)
    }

    /// Combines the file and the flags/environment, flags winning, and validates.
    pub fn resolve(file: FileConfig, args: &ConfigArgs) -> Result<Self, ConfigError> {
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let listen = match (args.listen, file.listen) {
            (Some(listen), _) | (None, Some(listen)) => listen,
            (None, None) => DEFAULT_LISTEN
                .parse()
                .map_err(|_| invalid("listen", "default address does not parse".into()))?,
        };
        let plaintext = args.plaintext || file.plaintext.unwrap_or(false);
        if plaintext && !listen.ip().is_loopback() {
            return Err(invalid(
                "plaintext",
                format!(
                    "--plaintext is only allowed on a loopback address, not {listen}; remove --plaintext or listen on 127.0.0.1"
                ),
            ));
        }
        let database_url = args
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join(SQLITE_FILE).display()));
        if !(database_url.starts_with("sqlite://")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database_url",
                "expected postgres://... or sqlite://PATH".into(),
            ));
        }
        let redis_url = args.redis_url.clone().or(file.redis_url);
        let metrics_listen = args.metrics_listen.or(file.metrics_listen);
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid("redis_url", "expected redis://HOST:PORT".into()));
        }

        let scheme = if plaintext { "http" } else { "https" };
        let public_url = args
            .public_url
            .clone()
            .or(file.instance.public_url)
            .unwrap_or_else(|| format!("{scheme}://{listen}"));
        let parsed: http::Uri = public_url
            .parse()
            .map_err(|_| invalid("public_url", format!("{public_url:?} is not a URL")))?;
        if parsed.host().is_none() || !matches!(parsed.scheme_str(), Some("https" | "http")) {
            return Err(invalid(
                "public_url",
                format!("{public_url:?} must look like https://HOST:PORT"),
            ));
        }
        let name = args
            .name
            .clone()
            .or(file.instance.name)
            .unwrap_or_else(default_instance_name);
        if name.trim().is_empty() || name.len() > 128 {
            return Err(invalid("name", "must be 1 to 128 characters".into()));
        }
        let capabilities = file
            .instance
            .capabilities
            .unwrap_or_else(default_capabilities);
        let federation = FederationConfig::resolve(file.federation, &capabilities)?;

        let shutdown_grace = Duration::from_secs(file.server.shutdown_grace_secs.unwrap_or(10));
        let max_message_bytes = file.server.max_message_bytes.unwrap_or(4 * 1024 * 1024);
        if !(1024..=64 * 1024 * 1024).contains(&max_message_bytes) {
            return Err(invalid(
                "server.max_message_bytes",
                "must be between 1024 and 67108864".into(),
            ));
        }
        let handshake_secs = file.server.tls_handshake_timeout_secs.unwrap_or(10);
        if handshake_secs == 0 {
            return Err(invalid(
                "server.tls_handshake_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let access_log = match file.server.access_log.as_deref() {
            None => crate::metrics::settings::AccessLog::Info,
            Some(level) => level
                .parse()
                .map_err(|message| invalid("server.access_log", message))?,
        };
        let serving_threads = file
            .server
            .serving_threads
            .unwrap_or_else(default_serving_threads);
        if !(1..=MAX_SERVING_THREADS).contains(&serving_threads) {
            return Err(invalid(
                "server.serving_threads",
                format!("must be between 1 and {MAX_SERVING_THREADS}"),
            ));
        }
        let auth_cache_ms = file.server.auth_cache_ms.unwrap_or(DEFAULT_AUTH_CACHE_MS);
        if auth_cache_ms > MAX_AUTH_CACHE_MS {
            return Err(invalid(
                "server.auth_cache_ms",
                format!("must be at most {MAX_AUTH_CACHE_MS} (one minute)"),
            ));
        }
        let rotation_grace_secs = file.identity.rotation_grace_secs.unwrap_or(24 * 60 * 60);
        // The same bound RotateKeys puts on a grace asked for per call.
        if rotation_grace_secs > MAX_ROTATION_GRACE_SECS {
            return Err(invalid(
                "identity.rotation_grace_secs",
                format!("must be at most {MAX_ROTATION_GRACE_SECS} (30 days)"),
            ));
        }
        let tls = crate::tls::ca::TlsSettings::resolve(file.tls, &args.tls, plaintext)?;
        let coordinator = crate::coordinator::settings::resolve(file.coordinator)?;
        let replicas = crate::replicas::settings::resolve(file.replicas)?;
        let agents = crate::agents::settings::resolve(file.agents, max_message_bytes)?;
        let rate_limit = crate::ratelimit::RateLimitSettings::resolve(
            file.rate_limit,
            &args.rate_limit,
            redis_url.is_some(),
        )?;
        let storage = crate::store::StorageSettings::resolve(file.storage)?;

        Ok(Self {
            data_dir,
            listen,
            database_url,
            redis_url,
            plaintext,
            instance: InstanceProfile {
                name,
                public_url,
                capabilities,
                metadata: file.instance.metadata,
            },
            shutdown_grace,
            max_message_bytes,
            tls_handshake_timeout: Duration::from_secs(handshake_secs),
            access_log,
            serving_threads,
            auth_cache: Duration::from_millis(auth_cache_ms),
            rotation_grace: Duration::from_secs(rotation_grace_secs),
            federation,
            master_key: None,
            agents,
            rate_limit,
            coordinator,
            replicas,
            metrics_listen,
            tls,
            storage,
        })
    }

    /// Where the master key comes from for this configuration.
    pub fn master_key_source(&self) -> crate::identity::MasterKeySource {
        crate::identity::MasterKeySource {
            environment_value: self.master_key.as_ref().map(|secret| secret.0.clone()),
            key_file: self
                .data_dir
                .join(crate::identity::sealing::MASTER_KEY_FILE),
        }
    }

    /// The copy of the current certificate written for local clients.
    pub fn certificate_path(&self) -> PathBuf {
        certificate_path(&self.data_dir)
    }
}

/// Where the daemon writes its current certificate (public) for local clients.
pub fn certificate_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("cert.pem")
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&text).map_err(|message| ConfigError::Parse {
        path: path.display().to_string(),
        message,
    })
}

/// Parses configuration file text.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|error| error.to_string())
}

fn default_data_dir() -> PathBuf {
    if let Some(data_home) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return PathBuf::from(data_home).join("mosaicd");
    }
    match std::env::var_os("HOME").filter(|value| !value.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/mosaicd"),
        None => PathBuf::from(".mosaicd"),
    }
}

fn default_instance_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "mosaic".to_owned())
}

#[cfg(test)]
mod tests;
