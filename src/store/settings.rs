//! `[storage]` in the configuration file: how long a database call may take,
//! the SQLite WAL's bound and how long ended work is kept.

use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;

/// The WAL bound unless configured: small beside any disk, large enough that
/// the checkpointer holds writers back about once a second at the soak's load.
pub const DEFAULT_SQLITE_WAL_MAX_MB: u64 = 64;
/// Ended jobs (with their history and labels) are kept 30 days by default.
pub const DEFAULT_JOB_RETENTION_SECS: u64 = 30 * 24 * 60 * 60;
/// Webhook deliveries are remembered (a redelivery makes no second job) for
/// 7 days by default; senders retry for hours, not days.
pub const DEFAULT_WEBHOOK_DELIVERY_RETENTION_SECS: u64 = 7 * 24 * 60 * 60;
/// Ended agents' records and directories are kept 30 days by default.
pub const DEFAULT_AGENT_RETENTION_SECS: u64 = 30 * 24 * 60 * 60;
/// Ended agents' directories (working directory, output, event journal) are
/// kept 7 days by default; their records stay for the agent retention.
pub const DEFAULT_AGENT_OUTPUT_RETENTION_SECS: u64 = 7 * 24 * 60 * 60;
/// How often expired rows are pruned unless configured.
pub const DEFAULT_PRUNE_INTERVAL_SECS: u64 = 60;
/// How long one database call may take unless configured: far above any
/// healthy query, well below a client's patience.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5_000;
/// The shortest call deadline accepted.
const MIN_CALL_TIMEOUT_MS: u64 = 100;
/// The longest call deadline accepted (10 minutes).
const MAX_CALL_TIMEOUT_MS: u64 = 600_000;

/// `[storage]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageFileConfig {
    /// Milliseconds one database call may take, waiting for a connection
    /// included, before it fails with UNAVAILABLE (default 5000, 100 to
    /// 600000); on PostgreSQL also the server's `statement_timeout` and the
    /// connections' TCP user timeout.
    pub call_timeout_ms: Option<u64>,
    /// MiB the SQLite WAL may reach before writers are briefly held back while
    /// it is truncated (default 64, at least 4; ignored on PostgreSQL).
    pub sqlite_wal_max_mb: Option<u64>,
    /// Seconds an ended job (COMPLETED, FAILED, CANCELLED) is kept with its
    /// history, labels and webhook delivery, counted from its end (default
    /// 2592000, 30 days; 0 keeps forever).
    pub job_retention_secs: Option<u64>,
    /// Seconds a webhook delivery is remembered, so a redelivery makes no
    /// second job (default 604800, 7 days; 0 keeps forever). A delivery goes
    /// with its job if that is pruned first.
    pub webhook_delivery_retention_secs: Option<u64>,
    /// Seconds an ended agent's record, events and directory (its output) are
    /// kept, counted from its end (default 2592000, 30 days; 0 keeps forever).
    pub agent_retention_secs: Option<u64>,
    /// Seconds an ended agent's directory (working directory, output and
    /// event journal) is kept, counted from its end (default 604800, 7 days;
    /// 0 keeps it as long as the record). Its record stays for
    /// `agent_retention_secs`.
    pub agent_output_retention_secs: Option<u64>,
    /// Seconds between two prunings (default 60, at least 1).
    pub prune_interval_secs: Option<u64>,
}

/// The validated `[storage]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSettings {
    /// How long one database call may take (default 5 s).
    pub call_timeout: Duration,
    /// Bytes the SQLite WAL may reach (default 64 MiB).
    pub sqlite_wal_max_bytes: u64,
    /// How long ended jobs are kept; `None` keeps them forever.
    pub job_retention: Option<Duration>,
    /// How long webhook deliveries are remembered; `None`: forever.
    pub webhook_delivery_retention: Option<Duration>,
    /// How long ended agents are kept; `None`: forever.
    pub agent_retention: Option<Duration>,
    /// How long ended agents' directories are kept; `None`: as long as their
    /// records.
    pub agent_output_retention: Option<Duration>,
    /// Time between two prunings.
    pub prune_interval: Duration,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            call_timeout: Duration::from_millis(DEFAULT_CALL_TIMEOUT_MS),
            sqlite_wal_max_bytes: DEFAULT_SQLITE_WAL_MAX_MB * 1024 * 1024,
            job_retention: Some(Duration::from_secs(DEFAULT_JOB_RETENTION_SECS)),
            webhook_delivery_retention: Some(Duration::from_secs(
                DEFAULT_WEBHOOK_DELIVERY_RETENTION_SECS,
            )),
            agent_retention: Some(Duration::from_secs(DEFAULT_AGENT_RETENTION_SECS)),
            agent_output_retention: Some(Duration::from_secs(DEFAULT_AGENT_OUTPUT_RETENTION_SECS)),
            prune_interval: Duration::from_secs(DEFAULT_PRUNE_INTERVAL_SECS),
        }
    }
}

/// Smallest WAL bound: below it the checkpointer would hold writers back for
/// nearly every burst.
const MIN_SQLITE_WAL_MAX_MB: u64 = 4;
/// Largest WAL bound (64 GiB); past it, "bounded" means nothing.
const MAX_SQLITE_WAL_MAX_MB: u64 = 64 * 1024;

impl StorageSettings {
    /// Validates `[storage]`, naming the key at fault.
    pub fn resolve(file: StorageFileConfig) -> Result<StorageSettings, ConfigError> {
        let call_timeout_ms = file.call_timeout_ms.unwrap_or(DEFAULT_CALL_TIMEOUT_MS);
        if !(MIN_CALL_TIMEOUT_MS..=MAX_CALL_TIMEOUT_MS).contains(&call_timeout_ms) {
            return Err(ConfigError::Invalid {
                key: "storage.call_timeout_ms",
                message: format!(
                    "{call_timeout_ms} is outside {MIN_CALL_TIMEOUT_MS} to {MAX_CALL_TIMEOUT_MS}"
                ),
            });
        }
        let wal_mb = file.sqlite_wal_max_mb.unwrap_or(DEFAULT_SQLITE_WAL_MAX_MB);
        if !(MIN_SQLITE_WAL_MAX_MB..=MAX_SQLITE_WAL_MAX_MB).contains(&wal_mb) {
            return Err(ConfigError::Invalid {
                key: "storage.sqlite_wal_max_mb",
                message: format!(
                    "{wal_mb} is outside {MIN_SQLITE_WAL_MAX_MB} to {MAX_SQLITE_WAL_MAX_MB}"
                ),
            });
        }
        let prune_interval_secs = file
            .prune_interval_secs
            .unwrap_or(DEFAULT_PRUNE_INTERVAL_SECS);
        if prune_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "storage.prune_interval_secs",
                message: "must be at least 1".to_owned(),
            });
        }
        Ok(StorageSettings {
            call_timeout: Duration::from_millis(call_timeout_ms),
            sqlite_wal_max_bytes: wal_mb * 1024 * 1024,
            job_retention: retention(file.job_retention_secs, DEFAULT_JOB_RETENTION_SECS),
            webhook_delivery_retention: retention(
                file.webhook_delivery_retention_secs,
                DEFAULT_WEBHOOK_DELIVERY_RETENTION_SECS,
            ),
            agent_retention: retention(file.agent_retention_secs, DEFAULT_AGENT_RETENTION_SECS),
            agent_output_retention: retention(
                file.agent_output_retention_secs,
                DEFAULT_AGENT_OUTPUT_RETENTION_SECS,
            ),
            prune_interval: Duration::from_secs(prune_interval_secs),
        })
    }
}

/// A retention in seconds, `0` meaning forever.
fn retention(secs: Option<u64>, default: u64) -> Option<Duration> {
    match secs.unwrap_or(default) {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let settings = StorageSettings::resolve(StorageFileConfig::default()).expect("defaults");
        assert_eq!(settings, StorageSettings::default());
        assert_eq!(settings.sqlite_wal_max_bytes, 64 * 1024 * 1024);
        assert_eq!(
            settings.job_retention,
            Some(Duration::from_secs(30 * 24 * 3600))
        );
        assert_eq!(
            settings.agent_output_retention,
            Some(Duration::from_secs(7 * 24 * 3600))
        );
    }

    #[test]
    fn zero_keeps_forever() {
        let settings = StorageSettings::resolve(StorageFileConfig {
            job_retention_secs: Some(0),
            webhook_delivery_retention_secs: Some(0),
            agent_retention_secs: Some(0),
            agent_output_retention_secs: Some(0),
            ..StorageFileConfig::default()
        })
        .expect("valid");
        assert_eq!(settings.agent_output_retention, None);
        assert_eq!(settings.job_retention, None);
        assert_eq!(settings.webhook_delivery_retention, None);
        assert_eq!(settings.agent_retention, None);
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (file, key) in [
            (
                StorageFileConfig {
                    sqlite_wal_max_mb: Some(1),
                    ..StorageFileConfig::default()
                },
                "storage.sqlite_wal_max_mb",
            ),
            (
                StorageFileConfig {
                    prune_interval_secs: Some(0),
                    ..StorageFileConfig::default()
                },
                "storage.prune_interval_secs",
            ),
            (
                StorageFileConfig {
                    call_timeout_ms: Some(99),
                    ..StorageFileConfig::default()
                },
                "storage.call_timeout_ms",
            ),
        ] {
            match StorageSettings::resolve(file) {
                Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key),
                other => panic!("expected {key} to be refused: {other:?}"),
            }
        }
    }
}
