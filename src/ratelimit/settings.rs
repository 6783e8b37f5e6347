//! Rate-limit configuration: the `MOSAIC_RATE_LIMIT_*` variables (read by clap,
//! with hidden flags), the `[rate_limit]` file section, and the validated result.
//!
//! Variables win over the file. Values are taken as text and parsed here so that
//! an error names both the variable and the file key; zero or nonsense is an
//! error at start, never a silent default.

use std::time::Duration;

use serde::Deserialize;

use super::key::{IpRange, TrustedProxies};
use super::tiers::{Tier, TierLimits};
use crate::config::error::ConfigError;

/// Window of every limit, in seconds (default 60).
pub const ENV_TTL: &str = "MOSAIC_RATE_LIMIT_TTL";
/// Default-tier calls per window (default 100).
pub const ENV_GLOBAL_LIMIT: &str = "MOSAIC_RATE_LIMIT_GLOBAL_LIMIT";
/// Webhook-tier calls per window (default 60).
pub const ENV_WEBHOOK_LIMIT: &str = "MOSAIC_RATE_LIMIT_WEBHOOK_LIMIT";
/// Coordinator-tier calls per window (default 100).
pub const ENV_COORDINATOR_LIMIT: &str = "MOSAIC_RATE_LIMIT_COORDINATOR_LIMIT";
/// Health-tier calls per window (default 300).
pub const ENV_HEALTH_LIMIT: &str = "MOSAIC_RATE_LIMIT_HEALTH_LIMIT";
/// Federation-wire-tier calls per window (default 100).
pub const ENV_FEDERATION_LIMIT: &str = "MOSAIC_RATE_LIMIT_FEDERATION_LIMIT";
/// `memory` or `redis` (default memory).
pub const ENV_STORAGE: &str = "MOSAIC_RATE_LIMIT_STORAGE";
/// `true`: log what would be refused, refuse nothing (default false).
pub const ENV_SHADOW: &str = "MOSAIC_RATE_LIMIT_SHADOW";
/// Daemons sharing the Redis budget; the fallback is `limit / replicas` (default 1).
pub const ENV_REPLICAS: &str = "MOSAIC_RATE_LIMIT_REPLICAS";
/// Comma-separated CIDR ranges whose forwarding headers are believed (default none).
pub const ENV_TRUSTED_PROXIES: &str = "MOSAIC_RATE_LIMIT_TRUSTED_PROXIES";
/// Milliseconds one Redis check may take before the fallback answers (default 50).
pub const ENV_REDIS_TIMEOUT_MS: &str = "MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS";
/// Prefix of every Redis key (default `mosaic:rl:`).
pub const ENV_REDIS_PREFIX: &str = "MOSAIC_RATE_LIMIT_REDIS_PREFIX";

/// Default window: one minute.
pub const DEFAULT_TTL_SECS: u64 = 60;
/// Default Redis key prefix.
pub const DEFAULT_REDIS_PREFIX: &str = "mosaic:rl:";

/// The `MOSAIC_RATE_LIMIT_*` variables. The flags exist (hidden) so that clap reads
/// the variables; operators are expected to use the variables or the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RateLimitArgs {
    /// See [`ENV_TTL`].
    #[arg(long = "rate-limit-ttl", env = ENV_TTL, global = true, hide = true)]
    pub ttl: Option<String>,
    /// See [`ENV_GLOBAL_LIMIT`].
    #[arg(long = "rate-limit-global-limit", env = ENV_GLOBAL_LIMIT, global = true, hide = true)]
    pub global_limit: Option<String>,
    /// See [`ENV_WEBHOOK_LIMIT`].
    #[arg(long = "rate-limit-webhook-limit", env = ENV_WEBHOOK_LIMIT, global = true, hide = true)]
    pub webhook_limit: Option<String>,
    /// See [`ENV_COORDINATOR_LIMIT`].
    #[arg(long = "rate-limit-coordinator-limit", env = ENV_COORDINATOR_LIMIT, global = true, hide = true)]
    pub coordinator_limit: Option<String>,
    /// See [`ENV_HEALTH_LIMIT`].
    #[arg(long = "rate-limit-health-limit", env = ENV_HEALTH_LIMIT, global = true, hide = true)]
    pub health_limit: Option<String>,
    /// See [`ENV_FEDERATION_LIMIT`].
    #[arg(long = "rate-limit-federation-limit", env = ENV_FEDERATION_LIMIT, global = true, hide = true)]
    pub federation_limit: Option<String>,
    /// See [`ENV_STORAGE`].
    #[arg(long = "rate-limit-storage", env = ENV_STORAGE, global = true, hide = true)]
    pub storage: Option<String>,
    /// See [`ENV_SHADOW`].
    #[arg(long = "rate-limit-shadow", env = ENV_SHADOW, global = true, hide = true)]
    pub shadow: Option<String>,
    /// See [`ENV_REPLICAS`].
    #[arg(long = "rate-limit-replicas", env = ENV_REPLICAS, global = true, hide = true)]
    pub replicas: Option<String>,
    /// See [`ENV_TRUSTED_PROXIES`].
    #[arg(long = "rate-limit-trusted-proxies", env = ENV_TRUSTED_PROXIES, global = true, hide = true)]
    pub trusted_proxies: Option<String>,
    /// See [`ENV_REDIS_TIMEOUT_MS`].
    #[arg(long = "rate-limit-redis-timeout-ms", env = ENV_REDIS_TIMEOUT_MS, global = true, hide = true)]
    pub redis_timeout_ms: Option<String>,
    /// See [`ENV_REDIS_PREFIX`].
    #[arg(long = "rate-limit-redis-prefix", env = ENV_REDIS_PREFIX, global = true, hide = true)]
    pub redis_prefix: Option<String>,
}

/// `[rate_limit]` in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFileConfig {
    /// Window in seconds (default 60).
    pub ttl: Option<u64>,
    /// Default-tier calls per window (default 100).
    pub global_limit: Option<u32>,
    /// Webhook-tier calls per window (default 60).
    pub webhook_limit: Option<u32>,
    /// Coordinator-tier calls per window (default 100).
    pub coordinator_limit: Option<u32>,
    /// Health-tier calls per window (default 300).
    pub health_limit: Option<u32>,
    /// Federation-wire-tier calls per window (default 100).
    pub federation_limit: Option<u32>,
    /// `memory` or `redis` (default `memory`).
    pub storage: Option<String>,
    /// Log instead of refusing (default false).
    pub shadow: Option<bool>,
    /// Daemons sharing one Redis budget (default 1).
    pub replicas: Option<u32>,
    /// CIDR ranges of trusted reverse proxies (default none).
    pub trusted_proxies: Option<Vec<String>>,
    /// Milliseconds per Redis check before falling back (default 50).
    pub redis_timeout_ms: Option<u64>,
    /// Prefix of Redis keys (default `mosaic:rl:`).
    pub redis_prefix: Option<String>,
    /// PEM file of the CAs that sign a `rediss://` server's certificate
    /// (default: the system's trusted roots).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Keys held in memory before new keys share one overflow bucket (default 1000000).
    pub max_keys: Option<usize>,
    /// Seconds between prunings of idle in-memory keys (default 60).
    pub prune_interval_secs: Option<u64>,
    /// Consecutive Redis failures that open the circuit breaker (default 3).
    pub breaker_failures: Option<u32>,
    /// Milliseconds the breaker stays open before probing Redis (default 5000).
    pub breaker_cooldown_ms: Option<u64>,
}

/// Where limits are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// In this process (governor keyed limiters).
    Memory,
    /// In Redis/Valkey, shared by every daemon using the same server and prefix.
    Redis,
}

/// The validated rate-limit configuration.
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    /// Limits per tier over one window.
    pub limits: TierLimits,
    /// Where limits are counted (default memory).
    pub storage: Storage,
    /// Log would-be refusals instead of refusing (default false).
    pub shadow: bool,
    /// Daemons sharing the Redis budget (default 1, at least 1).
    pub replicas: u32,
    /// Proxies whose forwarding headers are believed (default none).
    pub trusted_proxies: TrustedProxies,
    /// Time one Redis check may take (default 50 ms).
    pub redis_timeout: Duration,
    /// Prefix of Redis keys (default `mosaic:rl:`).
    pub redis_prefix: String,
    /// CAs for a `rediss://` server (default the system's roots).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Keys held in memory before new ones share the overflow bucket (default 1 M).
    pub max_keys: usize,
    /// Time between prunings of idle in-memory keys (default 60 s).
    pub prune_interval: Duration,
    /// Consecutive failures that open the breaker (default 3).
    pub breaker_failures: u32,
    /// Time the breaker stays open before a probe (default 5 s).
    pub breaker_cooldown: Duration,
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// Parses a variable (which wins) or takes the file value, requiring at least `minimum`.
fn number<T>(
    variable: &Option<String>,
    file: Option<T>,
    default: T,
    minimum: T,
    key: &'static str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let value = match variable {
        Some(text) => text.trim().parse::<T>().map_err(|_| {
            invalid(
                key,
                format!("{text:?} is not a whole number (at least {minimum})"),
            )
        })?,
        None => file.unwrap_or(default),
    };
    if value < minimum {
        return Err(invalid(
            key,
            format!("{value} is below the minimum {minimum}"),
        ));
    }
    Ok(value)
}

impl RateLimitSettings {
    /// Combines the file section and the variables (variables win) and validates.
    /// `redis_configured` says whether a Redis URL is set (`storage = redis` needs one).
    pub fn resolve(
        file: RateLimitFileConfig,
        args: &RateLimitArgs,
        redis_configured: bool,
    ) -> Result<RateLimitSettings, ConfigError> {
        let ttl = number(
            &args.ttl,
            file.ttl,
            DEFAULT_TTL_SECS,
            1,
            "rate_limit.ttl (MOSAIC_RATE_LIMIT_TTL)",
        )?;
        let limit = |variable: &Option<String>, value, default, key| {
            number::<u32>(variable, value, default, 1, key)
        };
        let limits = [
            (
                Tier::Default,
                limit(
                    &args.global_limit,
                    file.global_limit,
                    100,
                    "rate_limit.global_limit (MOSAIC_RATE_LIMIT_GLOBAL_LIMIT)",
                )?,
            ),
            (
                Tier::Webhook,
                limit(
                    &args.webhook_limit,
                    file.webhook_limit,
                    60,
                    "rate_limit.webhook_limit (MOSAIC_RATE_LIMIT_WEBHOOK_LIMIT)",
                )?,
            ),
            (
                Tier::Coordinator,
                limit(
                    &args.coordinator_limit,
                    file.coordinator_limit,
                    100,
                    "rate_limit.coordinator_limit (MOSAIC_RATE_LIMIT_COORDINATOR_LIMIT)",
                )?,
            ),
            (
                Tier::Health,
                limit(
                    &args.health_limit,
                    file.health_limit,
                    300,
                    "rate_limit.health_limit (MOSAIC_RATE_LIMIT_HEALTH_LIMIT)",
                )?,
            ),
            (
                Tier::Federation,
                limit(
                    &args.federation_limit,
                    file.federation_limit,
                    100,
                    "rate_limit.federation_limit (MOSAIC_RATE_LIMIT_FEDERATION_LIMIT)",
                )?,
            ),
        ];
        let limits = TierLimits::new(Duration::from_secs(ttl), limits).ok_or_else(|| {
            invalid(
                "rate_limit.ttl (MOSAIC_RATE_LIMIT_TTL)",
                "limits must be at least 1 per window of at least 1 second".into(),
            )
        })?;

        let storage_key = "rate_limit.storage (MOSAIC_RATE_LIMIT_STORAGE)";
        let storage = match args
            .storage
            .clone()
            .or(file.storage)
            .as_deref()
            .map(str::trim)
        {
            None | Some("memory") => Storage::Memory,
            Some("redis") => Storage::Redis,
            Some(other) => {
                return Err(invalid(
                    storage_key,
                    format!("{other:?} is not a storage; expected `memory` or `redis`"),
                ));
            }
        };
        if storage == Storage::Redis && !redis_configured {
            return Err(invalid(
                storage_key,
                "`redis` storage needs a Redis URL: set --redis-url / MOSAIC_REDIS_URL / redis_url"
                    .into(),
            ));
        }

        let shadow = match args.shadow.as_deref().map(str::trim) {
            None => file.shadow.unwrap_or(false),
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no" | "") => false,
            Some(other) => {
                return Err(invalid(
                    "rate_limit.shadow (MOSAIC_RATE_LIMIT_SHADOW)",
                    format!("{other:?} is not a boolean; expected `true` or `false`"),
                ));
            }
        };
        let replicas = number(
            &args.replicas,
            file.replicas,
            1u32,
            1,
            "rate_limit.replicas (MOSAIC_RATE_LIMIT_REPLICAS)",
        )?;

        let proxies_key = "rate_limit.trusted_proxies (MOSAIC_RATE_LIMIT_TRUSTED_PROXIES)";
        let proxy_texts: Vec<String> = match &args.trusted_proxies {
            Some(text) => text
                .split(',')
                .map(str::trim)
                .filter(|range| !range.is_empty())
                .map(str::to_owned)
                .collect(),
            None => file.trusted_proxies.unwrap_or_default(),
        };
        let ranges = proxy_texts
            .iter()
            .map(|text| text.parse::<IpRange>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| invalid(proxies_key, message))?;

        let redis_timeout_ms = number(
            &args.redis_timeout_ms,
            file.redis_timeout_ms,
            50u64,
            1,
            "rate_limit.redis_timeout_ms (MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS)",
        )?;
        if redis_timeout_ms > 10_000 {
            return Err(invalid(
                "rate_limit.redis_timeout_ms (MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS)",
                format!(
                    "{redis_timeout_ms} ms would stall every call while Redis is slow; use at most 10000"
                ),
            ));
        }
        let redis_prefix = args
            .redis_prefix
            .clone()
            .or(file.redis_prefix)
            .unwrap_or_else(|| DEFAULT_REDIS_PREFIX.to_owned());
        if redis_prefix.is_empty() || redis_prefix.len() > 128 {
            return Err(invalid(
                "rate_limit.redis_prefix (MOSAIC_RATE_LIMIT_REDIS_PREFIX)",
                "must be 1 to 128 characters".into(),
            ));
        }
        let max_keys = file.max_keys.unwrap_or(1_000_000);
        if max_keys < 1_000 {
            return Err(invalid(
                "rate_limit.max_keys",
                format!("{max_keys} is below the minimum 1000"),
            ));
        }
        let prune_interval_secs = file.prune_interval_secs.unwrap_or(60);
        if prune_interval_secs == 0 {
            return Err(invalid(
                "rate_limit.prune_interval_secs",
                "must be at least 1".into(),
            ));
        }
        let breaker_failures = file.breaker_failures.unwrap_or(3);
        if breaker_failures == 0 {
            return Err(invalid(
                "rate_limit.breaker_failures",
                "must be at least 1".into(),
            ));
        }
        let breaker_cooldown_ms = file.breaker_cooldown_ms.unwrap_or(5_000);
        if breaker_cooldown_ms == 0 {
            return Err(invalid(
                "rate_limit.breaker_cooldown_ms",
                "must be at least 1".into(),
            ));
        }

        Ok(RateLimitSettings {
            limits,
            storage,
            shadow,
            replicas,
            trusted_proxies: TrustedProxies::new(ranges),
            redis_timeout: Duration::from_millis(redis_timeout_ms),
            redis_prefix,
            redis_ca_file: file.redis_ca_file,
            max_keys,
            prune_interval: Duration::from_secs(prune_interval_secs),
            breaker_failures,
            breaker_cooldown: Duration::from_millis(breaker_cooldown_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(file: &str, args: RateLimitArgs) -> Result<RateLimitSettings, ConfigError> {
        let file: RateLimitFileConfig = toml::from_str(file).expect("toml");
        RateLimitSettings::resolve(file, &args, true)
    }

    #[test]
    fn defaults_match_the_issue() {
        let settings = resolve("", RateLimitArgs::default()).expect("defaults");
        let limit = |tier| settings.limits.quota(tier).limit;
        assert_eq!(settings.limits.window(), Duration::from_secs(60));
        assert_eq!(limit(Tier::Webhook), 60);
        assert_eq!(limit(Tier::Coordinator), 100);
        assert_eq!(limit(Tier::Health), 300);
        assert_eq!(limit(Tier::Federation), 100);
        assert_eq!(limit(Tier::Default), 100);
        assert_eq!(settings.storage, Storage::Memory);
        assert!(!settings.shadow);
        assert_eq!(settings.redis_timeout, Duration::from_millis(50));
        assert_eq!(settings.redis_prefix, "mosaic:rl:");
    }

    #[test]
    fn variables_win_over_the_file() {
        let args = RateLimitArgs {
            webhook_limit: Some("7".into()),
            storage: Some("redis".into()),
            shadow: Some("true".into()),
            trusted_proxies: Some("10.0.0.0/8, fd00::/8".into()),
            ..RateLimitArgs::default()
        };
        let settings =
            resolve("webhook_limit = 5\nttl = 30\nstorage = \"memory\"\n", args).expect("settings");
        assert_eq!(settings.limits.quota(Tier::Webhook).limit, 7);
        assert_eq!(settings.limits.window(), Duration::from_secs(30));
        assert_eq!(settings.storage, Storage::Redis);
        assert!(settings.shadow);
    }

    #[test]
    fn zero_and_nonsense_name_the_variable_and_key() {
        let cases: Vec<(RateLimitArgs, &str)> = vec![
            (
                RateLimitArgs {
                    ttl: Some("0".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_TTL",
            ),
            (
                RateLimitArgs {
                    health_limit: Some("lots".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_HEALTH_LIMIT",
            ),
            (
                RateLimitArgs {
                    global_limit: Some("-5".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_GLOBAL_LIMIT",
            ),
            (
                RateLimitArgs {
                    storage: Some("disk".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_STORAGE",
            ),
            (
                RateLimitArgs {
                    shadow: Some("maybe".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_SHADOW",
            ),
            (
                RateLimitArgs {
                    trusted_proxies: Some("10.0.0.0/99".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_TRUSTED_PROXIES",
            ),
            (
                RateLimitArgs {
                    replicas: Some("0".into()),
                    ..RateLimitArgs::default()
                },
                "MOSAIC_RATE_LIMIT_REPLICAS",
            ),
        ];
        for (args, variable) in cases {
            let error = resolve("", args).expect_err("refused");
            assert!(error.to_string().contains(variable), "{error}");
        }
        let error = resolve("webhook_limit = 0\n", RateLimitArgs::default()).expect_err("zero");
        assert!(
            error.to_string().contains("rate_limit.webhook_limit"),
            "{error}"
        );
        assert!(toml::from_str::<RateLimitFileConfig>("webhok_limit = 5").is_err());
    }

    #[test]
    fn redis_storage_needs_a_redis_url() {
        let args = RateLimitArgs {
            storage: Some("redis".into()),
            ..RateLimitArgs::default()
        };
        let error = RateLimitSettings::resolve(RateLimitFileConfig::default(), &args, false)
            .expect_err("no url");
        assert!(error.to_string().contains("MOSAIC_REDIS_URL"), "{error}");
    }
}
