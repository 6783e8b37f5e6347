//! Rate limiting in front of every service: GCRA per client IP, API key and
//! federated instance, by method tier, in memory (`governor`) or shared across
//! replicas through Redis, with a circuit breaker and an in-memory fallback.
//!
//! One concept per file, in reading order:
//!
//! - [`tiers`]: which tier a method is in, and each tier's quota (pure).
//! - [`settings`]: `MOSAIC_RATE_LIMIT_*` and `[rate_limit]`, validated (pure).
//! - [`key`]: who a limit counts against — client IP (/64 for IPv6, trusted-proxy
//!   forwarding), API key id, instance (pure).
//! - [`decision`]: admitted with the quota left, or refused with the wait (pure).
//! - [`memory`]: in-memory GCRA on governor keyed limiters, pruned and capped.
//! - [`redis`]: the atomic multi-key GCRA script on Redis's clock, via bb8-redis.
//! - [`allowance`]: calls spent in Redis ahead, admitted locally without I/O.
//! - [`breaker`]: the circuit breaker in front of Redis (pure).
//! - [`refused_cache`]: keys refused until a known time, answered locally.
//! - [`metrics`]: every counter, in one place.
//! - [`limiter`]: the above put together: storage choice, fallback, shadow mode.
//! - [`response`]: the headers and RESOURCE_EXHAUSTED details a client sees.
//!
//! The front door (`crate::front_door`) puts them to work on every call: IP
//! gate, authentication, then the keyed check.

pub mod allowance;
pub mod breaker;
pub mod decision;
pub mod key;
pub mod limiter;
pub mod memory;
pub mod metrics;
pub mod redis;
pub mod refused_cache;
pub mod response;
pub mod settings;
pub mod tiers;

pub use self::decision::{QuotaState, Refusal, Verdict};
pub use self::key::LimitKey;
pub use self::limiter::{MaintenanceGuard, RateLimiter};
pub use self::metrics::{RateLimitMetrics, RateLimitMetricsSnapshot};
pub use self::settings::{RateLimitArgs, RateLimitFileConfig, RateLimitSettings, Storage};
pub use self::tiers::Tier;
