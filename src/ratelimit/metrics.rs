//! The rate limiter's counters, in one place, for the metrics endpoint a later
//! issue serves. Relaxed atomics: each counter is independent and only ever read
//! as a snapshot.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// State of the Redis circuit breaker, as exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerGauge {
    /// Redis is used (or storage is memory and there is no breaker).
    Closed,
    /// Redis is skipped; the in-memory fallback answers.
    Open,
    /// One probe call is trying Redis again.
    HalfOpen,
}

impl BreakerGauge {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => BreakerGauge::Open,
            2 => BreakerGauge::HalfOpen,
            _ => BreakerGauge::Closed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            BreakerGauge::Closed => 0,
            BreakerGauge::Open => 1,
            BreakerGauge::HalfOpen => 2,
        }
    }
}

/// Live counters.
#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    allowed: AtomicU64,
    refused: AtomicU64,
    shadow_refused: AtomicU64,
    near_limit: AtomicU64,
    redis_checks: AtomicU64,
    redis_errors: AtomicU64,
    fallback_checks: AtomicU64,
    refused_from_cache: AtomicU64,
    breaker_state: AtomicU8,
    key_count: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitMetricsSnapshot {
    /// Calls let through.
    pub allowed: u64,
    /// Calls refused with RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Calls shadow mode would have refused (and let through).
    pub shadow_refused: u64,
    /// Calls let through with 80 % or more of a quota used.
    pub near_limit: u64,
    /// Checks answered by Redis.
    pub redis_checks: u64,
    /// Redis checks that failed or timed out.
    pub redis_errors: u64,
    /// Checks answered by the in-memory fallback while Redis was unusable.
    pub fallback_checks: u64,
    /// Calls refused from the local "refused until" cache without asking Redis.
    pub refused_from_cache: u64,
    /// The breaker's state now.
    pub breaker: BreakerGauge,
    /// Keys held in memory at the last pruning.
    pub key_count: u64,
}

impl RateLimitMetrics {
    pub(crate) fn allowed(&self, near_limit: bool) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
        if near_limit {
            self.near_limit.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn refused(&self, shadow: bool) {
        if shadow {
            self.shadow_refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn redis_check(&self) {
        self.redis_checks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fallback_check(&self) {
        self.fallback_checks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused_from_cache(&self) {
        self.refused_from_cache.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_breaker(&self, state: BreakerGauge) {
        self.breaker_state.store(state.as_u8(), Ordering::Relaxed);
    }

    pub(crate) fn set_key_count(&self, keys: usize) {
        self.key_count
            .store(u64::try_from(keys).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> RateLimitMetricsSnapshot {
        RateLimitMetricsSnapshot {
            allowed: self.allowed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            shadow_refused: self.shadow_refused.load(Ordering::Relaxed),
            near_limit: self.near_limit.load(Ordering::Relaxed),
            redis_checks: self.redis_checks.load(Ordering::Relaxed),
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            fallback_checks: self.fallback_checks.load(Ordering::Relaxed),
            refused_from_cache: self.refused_from_cache.load(Ordering::Relaxed),
            breaker: BreakerGauge::from_u8(self.breaker_state.load(Ordering::Relaxed)),
            key_count: self.key_count.load(Ordering::Relaxed),
        }
    }
}
