//! `[federation]`: dialing, liveness, the clock window, retries and the
//! command log's retention, as written in the file and as resolved.

use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;

/// `[federation]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFileConfig {
    /// CIDR ranges peer URLs may resolve to (default empty: any range not denied).
    pub dial_allow: Option<Vec<String>>,
    /// CIDR ranges never dialed (default: link-local, cloud metadata, multicast).
    pub dial_deny: Option<Vec<String>>,
    /// Milliseconds between liveness pings to each ACTIVE peer (default 60000).
    pub ping_interval_ms: Option<u64>,
    /// Seconds either side of our clock a peer's issued_at may be (default 300).
    pub clock_window_secs: Option<u64>,
    /// Seconds a message we send stays valid (default 300).
    pub message_lifetime_secs: Option<u64>,
    /// Milliseconds to connect (TCP + TLS) to a peer (default 5000).
    pub connect_timeout_ms: Option<u64>,
    /// Deadline of every call to a peer, milliseconds (default 10000).
    pub call_timeout_ms: Option<u64>,
    /// First retry delay of an undelivered notice, milliseconds (default 1000).
    pub notice_retry_initial_ms: Option<u64>,
    /// Longest retry delay of an undelivered notice, milliseconds (default 300000).
    pub notice_retry_max_ms: Option<u64>,
    /// Fingerprints of peers whose connection requests are accepted at once
    /// (default none).
    pub auto_accept_fingerprints: Option<Vec<String>>,
    /// Capabilities granted to auto-accepted peers (default none).
    pub auto_accept_grants: Option<Vec<String>>,
    /// Most inbound connection requests waiting for an operator at once
    /// (default 100); past it new requests are refused.
    pub max_pending_inbound: Option<u32>,
    /// Most inbound connection requests waiting for an operator from one
    /// source: one client address group (as the rate limiter groups them) and,
    /// separately, one key (default 10).
    pub max_pending_inbound_per_source: Option<u32>,
    /// Seconds an inbound connection request waits for an operator before
    /// it is rejected as expired (default 604800, 7 days; at least 1).
    pub pending_request_ttl_secs: Option<u64>,
    /// Days the command log keeps an entry (default 90).
    pub command_log_retention_days: Option<u64>,
}

/// The resolved `[federation]` settings.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// Which addresses peer URLs may resolve to (default: deny link-local,
    /// cloud metadata, multicast; allow the rest, loopback and private included).
    pub dial_policy: crate::federation::dial::DialPolicy,
    /// Time between liveness pings to each ACTIVE peer (default 60 s).
    pub ping_interval: Duration,
    /// How far a peer's issued_at may be from our clock, either side (default 5 min).
    pub clock_window: Duration,
    /// How long a message we send stays valid (default 5 min).
    pub message_lifetime: Duration,
    /// TCP + TLS connect timeout to a peer (default 5 s).
    pub connect_timeout: Duration,
    /// Deadline of every call to a peer (default 10 s).
    pub call_timeout: Duration,
    /// First retry delay of an undelivered notice (default 1 s); doubles per
    /// attempt, with jitter.
    pub notice_retry_initial: Duration,
    /// Longest retry delay of an undelivered notice (default 5 min).
    pub notice_retry_max: Duration,
    /// Normalised fingerprints of peers accepted without an operator (default none).
    pub auto_accept_fingerprints: Vec<String>,
    /// Capabilities granted to auto-accepted peers (default none).
    pub auto_accept_grants: Vec<String>,
    /// Most inbound requests waiting for an operator (default 100): anyone with a
    /// key can ask, so unanswered requests are bounded.
    pub max_pending_inbound: u32,
    /// Most inbound requests waiting for an operator from one client address
    /// group (IPv4 address, IPv6 /64: the rate limiter's grouping), and from
    /// one key (default 10), so that one source cannot fill the queue of
    /// `max_pending_inbound` and a newcomer from elsewhere can still ask.
    pub max_pending_inbound_per_source: u32,
    /// How long an inbound request waits for an operator before it is
    /// rejected as expired (default 7 days).
    pub pending_request_ttl: Duration,
    /// How long the command log keeps an entry (default 90 days).
    pub command_log_retention: Duration,
}

impl FederationConfig {
    /// Validates `[federation]`, naming the key at fault; `capabilities` are
    /// the ones the instance offers (auto-accept grants must be among them).
    pub(crate) fn resolve(
        file: FederationFileConfig,
        capabilities: &[String],
    ) -> Result<Self, ConfigError> {
        use crate::federation::dial::{Cidr, DialPolicy};
        let parse_ranges = |key: &'static str, ranges: Vec<String>| {
            ranges
                .iter()
                .map(|range| {
                    Cidr::parse(range)
                        .map_err(|message| crate::config::error::invalid(key, message))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut dial_policy = DialPolicy::default();
        if let Some(allow) = file.dial_allow {
            dial_policy.allow = parse_ranges("federation.dial_allow", allow)?;
        }
        if let Some(deny) = file.dial_deny {
            dial_policy.deny = parse_ranges("federation.dial_deny", deny)?;
        }
        let positive_ms = |key: &'static str, value: Option<u64>, default: u64| {
            let value = value.unwrap_or(default);
            if value == 0 {
                return Err(crate::config::error::invalid(
                    key,
                    "must be at least 1".into(),
                ));
            }
            Ok(Duration::from_millis(value))
        };
        let positive_secs = |key: &'static str, value: Option<u64>, default: u64| {
            let value = value.unwrap_or(default);
            if value == 0 {
                return Err(crate::config::error::invalid(
                    key,
                    "must be at least 1".into(),
                ));
            }
            Ok(Duration::from_secs(value))
        };
        let auto_accept_fingerprints = file
            .auto_accept_fingerprints
            .unwrap_or_default()
            .iter()
            .map(|typed| {
                crate::identity::fingerprint::normalize(typed).ok_or_else(|| {
                    crate::config::error::invalid(
                        "federation.auto_accept_fingerprints",
                        format!("{typed:?} is not a fingerprint (eight groups of four like ABCD-EFGH-...)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let auto_accept_grants = file.auto_accept_grants.unwrap_or_default();
        if let Some(unknown) = auto_accept_grants
            .iter()
            .find(|grant| !capabilities.contains(grant))
        {
            return Err(crate::config::error::invalid(
                "federation.auto_accept_grants",
                format!(
                    "{unknown:?} is not a capability this instance offers ({})",
                    capabilities.join(", ")
                ),
            ));
        }
        let notice_retry_initial = positive_ms(
            "federation.notice_retry_initial_ms",
            file.notice_retry_initial_ms,
            1_000,
        )?;
        let notice_retry_max = positive_ms(
            "federation.notice_retry_max_ms",
            file.notice_retry_max_ms,
            300_000,
        )?;
        if notice_retry_max < notice_retry_initial {
            return Err(crate::config::error::invalid(
                "federation.notice_retry_max_ms",
                "must not be below federation.notice_retry_initial_ms".into(),
            ));
        }
        Ok(Self {
            dial_policy,
            ping_interval: positive_ms(
                "federation.ping_interval_ms",
                file.ping_interval_ms,
                60_000,
            )?,
            clock_window: positive_secs(
                "federation.clock_window_secs",
                file.clock_window_secs,
                300,
            )?,
            message_lifetime: positive_secs(
                "federation.message_lifetime_secs",
                file.message_lifetime_secs,
                300,
            )?,
            connect_timeout: positive_ms(
                "federation.connect_timeout_ms",
                file.connect_timeout_ms,
                5_000,
            )?,
            call_timeout: positive_ms("federation.call_timeout_ms", file.call_timeout_ms, 10_000)?,
            notice_retry_initial,
            notice_retry_max,
            auto_accept_fingerprints,
            auto_accept_grants,
            max_pending_inbound: file.max_pending_inbound.unwrap_or(100),
            max_pending_inbound_per_source: file.max_pending_inbound_per_source.unwrap_or(10),
            pending_request_ttl: positive_secs(
                "federation.pending_request_ttl_secs",
                file.pending_request_ttl_secs,
                7 * 24 * 60 * 60,
            )?,
            command_log_retention: positive_secs(
                "federation.command_log_retention_days",
                file.command_log_retention_days
                    .map(|days| days.saturating_mul(24 * 60 * 60)),
                90 * 24 * 60 * 60,
            )?,
        })
    }
}
