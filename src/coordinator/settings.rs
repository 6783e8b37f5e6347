//! `[coordinator]` and `[coordinator.webhooks.SOURCE]`: the job
//! coordinator's settings as written in the file, and as resolved and
//! checked.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;

/// `[coordinator]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFileConfig {
    /// Largest job payload, job result and webhook body in bytes (default
    /// 262144, 256 KiB).
    pub max_payload_bytes: Option<usize>,
    /// How often a job dispatched to a peer asks the peer for its agent's
    /// state, in milliseconds (default 2000; 10 to 600000).
    pub remote_agent_poll_ms: Option<u64>,
    /// `[coordinator.webhooks.SOURCE]`: the webhook sources `HandleWebhook`
    /// accepts, by name.
    #[serde(default)]
    pub webhooks: BTreeMap<String, WebhookSourceFileConfig>,
}

/// `[coordinator.webhooks.SOURCE]` in the file.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSourceFileConfig {
    /// HMAC-SHA256 secret; when set (here or in
    /// `MOSAIC_WEBHOOK_SECRET_<SOURCE>`), deliveries must carry a valid
    /// `sha256=HEX` signature (default: none, signatures are not checked).
    pub secret: Option<String>,
    /// Job type of events not listed in `events` (default `SOURCE.EVENT`).
    pub job_type: Option<String>,
    /// Workspace of the jobs made from this source (default none).
    pub workspace: Option<String>,
    /// Event type to job type; an empty job type ignores the event.
    #[serde(default)]
    pub events: BTreeMap<String, String>,
}

impl std::fmt::Debug for WebhookSourceFileConfig {
    /// Never prints the secret.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WebhookSourceFileConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("job_type", &self.job_type)
            .field("workspace", &self.workspace)
            .field("events", &self.events)
            .finish()
    }
}

/// The coordinator's settings (`[coordinator]`).
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Largest job payload, job result and webhook body (default 256 KiB).
    pub max_payload_bytes: usize,
    /// How often a job dispatched to a peer polls its agent (signed
    /// `agent.status`); backs off while the peer cannot be reached.
    pub remote_agent_poll: Duration,
    /// Webhook sources by name (default none: `HandleWebhook` refuses all).
    pub webhooks: BTreeMap<String, WebhookSource>,
}

/// Default of `coordinator.max_payload_bytes`.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Default of `coordinator.remote_agent_poll_ms`.
pub const DEFAULT_REMOTE_AGENT_POLL_MS: u64 = 2000;

/// The prefix of the variables that override a webhook source's secret:
/// `MOSAIC_WEBHOOK_SECRET_GITHUB` for source `github` (upper case, `-` as `_`).
pub const ENV_WEBHOOK_SECRET_PREFIX: &str = "MOSAIC_WEBHOOK_SECRET_";

/// One webhook source (`[coordinator.webhooks.SOURCE]`).
#[derive(Debug, Clone)]
pub struct WebhookSource {
    /// HMAC-SHA256 secret; `None`: signatures are not checked.
    pub secret: Option<crate::config::secret::Secret>,
    /// Job type of events not listed in `events` (default `SOURCE.EVENT`).
    pub job_type: Option<String>,
    /// Workspace of the jobs made (default empty).
    pub workspace: String,
    /// Event type to job type; an empty job type ignores the event.
    pub events: BTreeMap<String, String>,
}

impl CoordinatorConfig {
    /// Replaces the secret of each source whose variable
    /// (`webhook_secret_variable`) `lookup` finds set and non-empty.
    pub fn apply_secret_overrides(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        for (name, source) in &mut self.webhooks {
            if let Some(value) =
                lookup(&webhook_secret_variable(name)).filter(|value| !value.is_empty())
            {
                source.secret = Some(crate::config::secret::Secret(zeroize::Zeroizing::new(
                    value,
                )));
            }
        }
    }
}

/// The variable that overrides the secret of webhook source `source`.
pub fn webhook_secret_variable(source: &str) -> String {
    format!(
        "{ENV_WEBHOOK_SECRET_PREFIX}{}",
        source.to_ascii_uppercase().replace('-', "_")
    )
}

pub(crate) fn resolve(file: CoordinatorFileConfig) -> Result<CoordinatorConfig, ConfigError> {
    let max_payload_bytes = file.max_payload_bytes.unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
    if !(1024..=16 * 1024 * 1024).contains(&max_payload_bytes) {
        return Err(crate::config::error::invalid(
            "coordinator.max_payload_bytes",
            "must be between 1024 and 16777216".into(),
        ));
    }
    let poll_ms = file
        .remote_agent_poll_ms
        .unwrap_or(DEFAULT_REMOTE_AGENT_POLL_MS);
    if !(10..=600_000).contains(&poll_ms) {
        return Err(crate::config::error::invalid(
            "coordinator.remote_agent_poll_ms",
            "must be between 10 and 600000".into(),
        ));
    }
    let mut webhooks = BTreeMap::new();
    for (name, source) in file.webhooks {
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !valid_name {
            return Err(crate::config::error::invalid(
                "coordinator.webhooks",
                format!("source name {name:?} must be 1 to 64 characters of a-z, 0-9, `-` and `_`"),
            ));
        }
        if source.secret.as_deref() == Some("") {
            return Err(crate::config::error::invalid(
                "coordinator.webhooks.SOURCE.secret",
                format!("the secret of source {name:?} is empty; remove it or set one"),
            ));
        }
        if source.job_type.as_deref() == Some("") {
            return Err(crate::config::error::invalid(
                "coordinator.webhooks.SOURCE.job_type",
                format!("the job type of source {name:?} is empty; remove it or set one"),
            ));
        }
        webhooks.insert(
            name,
            WebhookSource {
                secret: source
                    .secret
                    .map(|secret| crate::config::secret::Secret(zeroize::Zeroizing::new(secret))),
                job_type: source.job_type,
                workspace: source.workspace.unwrap_or_default(),
                events: source.events,
            },
        );
    }
    Ok(CoordinatorConfig {
        max_payload_bytes,
        remote_agent_poll: Duration::from_millis(poll_ms),
        webhooks,
    })
}
