//! `[replicas]`: how this replica is known to the others, as written in the
//! file and as resolved and checked.

use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;

/// `[replicas]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasFileConfig {
    /// How long a replica's lease lasts after its last heartbeat, in seconds
    /// (default 30; 3 to 3600); it beats every third of that.
    pub lease_secs: Option<u64>,
    /// How the other replicas reach this one (default `https://` and the
    /// address the daemon listens on, once bound).
    pub advertise_url: Option<String>,
}

/// This replica's settings (`[replicas]`).
#[derive(Debug, Clone)]
pub struct ReplicasConfig {
    /// How long the lease lasts after a heartbeat.
    pub lease: Duration,
    /// How the other replicas reach this one; `None`: the bound listen
    /// address.
    pub advertise_url: Option<String>,
}

/// Default of `replicas.lease_secs`.
pub const DEFAULT_LEASE_SECS: u64 = 30;

impl Default for ReplicasConfig {
    fn default() -> Self {
        ReplicasConfig {
            lease: Duration::from_secs(DEFAULT_LEASE_SECS),
            advertise_url: None,
        }
    }
}

/// Resolves `[replicas]`.
pub(crate) fn resolve(file: ReplicasFileConfig) -> Result<ReplicasConfig, ConfigError> {
    let lease_secs = file.lease_secs.unwrap_or(DEFAULT_LEASE_SECS);
    if !(3..=3600).contains(&lease_secs) {
        return Err(crate::config::error::invalid(
            "replicas.lease_secs",
            "must be between 3 and 3600".into(),
        ));
    }
    if let Some(advertise_url) = &file.advertise_url {
        let parsed: Option<http::Uri> = advertise_url.parse().ok();
        let valid = parsed.is_some_and(|uri| {
            uri.host().is_some() && matches!(uri.scheme_str(), Some("https" | "http"))
        });
        if !valid {
            return Err(crate::config::error::invalid(
                "replicas.advertise_url",
                format!("{advertise_url:?} must look like https://HOST:PORT"),
            ));
        }
    }
    Ok(ReplicasConfig {
        lease: Duration::from_secs(lease_secs),
        advertise_url: file.advertise_url,
    })
}
