//! The rate limiter's counters, in one place, read by the metrics endpoint as a
//! snapshot. Relaxed atomics: each counter is independent and only ever read as
//! a snapshot.
//!
//! The outcome of each call (allowed, refused, ...) is counted per tier in a
//! fixed array indexed by [`Tier::index`]: the tiers are known at compile time,
//! so the hot path is one relaxed add at a known address — no label lookup, no
//! allocation. The Redis and fallback counters describe the storage, not the
//! callers, and stay single counters.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::tiers::Tier;

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

/// One tier's live outcome counters.
#[derive(Debug, Default)]
struct TierCounters {
    allowed: AtomicU64,
    refused: AtomicU64,
    shadow_refused: AtomicU64,
    near_limit: AtomicU64,
    refused_from_cache: AtomicU64,
}

impl TierCounters {
    fn snapshot(&self) -> TierCounts {
        TierCounts {
            allowed: self.allowed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            shadow_refused: self.shadow_refused.load(Ordering::Relaxed),
            near_limit: self.near_limit.load(Ordering::Relaxed),
            refused_from_cache: self.refused_from_cache.load(Ordering::Relaxed),
        }
    }
}

/// Live counters.
#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    tiers: [TierCounters; Tier::ALL.len()],
    redis_checks: AtomicU64,
    redis_errors: AtomicU64,
    fallback_checks: AtomicU64,
    breaker_state: AtomicU8,
    key_count: AtomicU64,
}

/// What happened to the calls of one tier, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounts {
    /// Calls let through.
    pub allowed: u64,
    /// Calls refused with RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Calls shadow mode would have refused (and let through).
    pub shadow_refused: u64,
    /// Calls let through with 80 % or more of a quota used.
    pub near_limit: u64,
    /// Calls refused from the local "refused until" cache without asking Redis.
    pub refused_from_cache: u64,
}

/// A copy of the counters at one moment. The outcome fields are the sums over
/// every tier; [`RateLimitMetricsSnapshot::tier`] has each tier's own.
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
    by_tier: [TierCounts; Tier::ALL.len()],
}

impl RateLimitMetricsSnapshot {
    /// The outcome counters of `tier` alone.
    pub fn tier(&self, tier: Tier) -> TierCounts {
        self.by_tier.get(tier.index()).copied().unwrap_or_default()
    }
}

impl RateLimitMetrics {
    fn of(&self, tier: Tier) -> Option<&TierCounters> {
        self.tiers.get(tier.index())
    }

    pub(crate) fn allowed(&self, tier: Tier, near_limit: bool) {
        if let Some(counters) = self.of(tier) {
            counters.allowed.fetch_add(1, Ordering::Relaxed);
            if near_limit {
                counters.near_limit.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn refused(&self, tier: Tier, shadow: bool) {
        if let Some(counters) = self.of(tier) {
            let counter = if shadow {
                &counters.shadow_refused
            } else {
                &counters.refused
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn refused_from_cache(&self, tier: Tier) {
        if let Some(counters) = self.of(tier) {
            counters.refused_from_cache.fetch_add(1, Ordering::Relaxed);
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

    pub(crate) fn set_breaker(&self, state: BreakerGauge) {
        self.breaker_state.store(state.as_u8(), Ordering::Relaxed);
    }

    pub(crate) fn set_key_count(&self, keys: usize) {
        self.key_count
            .store(u64::try_from(keys).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> RateLimitMetricsSnapshot {
        let by_tier = Tier::ALL.map(|tier| {
            self.of(tier)
                .map(TierCounters::snapshot)
                .unwrap_or_default()
        });
        let sum = |field: fn(&TierCounts) -> u64| by_tier.iter().map(field).sum();
        RateLimitMetricsSnapshot {
            allowed: sum(|counts| counts.allowed),
            refused: sum(|counts| counts.refused),
            shadow_refused: sum(|counts| counts.shadow_refused),
            near_limit: sum(|counts| counts.near_limit),
            redis_checks: self.redis_checks.load(Ordering::Relaxed),
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            fallback_checks: self.fallback_checks.load(Ordering::Relaxed),
            refused_from_cache: sum(|counts| counts.refused_from_cache),
            breaker: BreakerGauge::from_u8(self.breaker_state.load(Ordering::Relaxed)),
            key_count: self.key_count.load(Ordering::Relaxed),
            by_tier,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_in_their_own_tier_and_summed() {
        let metrics = RateLimitMetrics::default();
        metrics.allowed(Tier::Webhook, true);
        metrics.allowed(Tier::Default, false);
        metrics.refused(Tier::Health, false);
        metrics.refused(Tier::Health, true);
        metrics.refused_from_cache(Tier::Federation);
        let snapshot = metrics.snapshot();
        assert_eq!(
            snapshot.tier(Tier::Webhook),
            TierCounts {
                allowed: 1,
                near_limit: 1,
                ..TierCounts::default()
            }
        );
        assert_eq!(
            snapshot.tier(Tier::Health),
            TierCounts {
                refused: 1,
                shadow_refused: 1,
                ..TierCounts::default()
            }
        );
        assert_eq!(snapshot.tier(Tier::Federation).refused_from_cache, 1);
        assert_eq!(snapshot.tier(Tier::Coordinator), TierCounts::default());
        assert_eq!((snapshot.allowed, snapshot.near_limit), (2, 1));
        assert_eq!((snapshot.refused, snapshot.shadow_refused), (1, 1));
        assert_eq!(snapshot.refused_from_cache, 1);
    }
}
