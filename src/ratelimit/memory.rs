//! In-memory GCRA: one `governor` keyed limiter per tier, on a DashMap store that
//! counts its keys so the total can be capped.
//!
//! The clock is injected (`governor`'s `Clock`): the daemon uses the default
//! (quanta) clock, tests a `FakeRelativeClock` they advance by hand.
//!
//! Memory stays bounded two ways: [`MemoryLimiter::prune`] drops keys whose bucket
//! is full again (`retain_recent`) and gives the memory back (`shrink_to_fit`);
//! and once the store holds `max_keys` keys, calls from keys it does not know
//! share one [`LimitKey::Overflow`] bucket until pruning makes room. Known keys —
//! active or throttled — are never dropped, so pruning never hands a throttled
//! client a fresh budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};

use super::decision::{QuotaState, Refusal, Verdict};
use super::key::LimitKey;
use super::tiers::{Tier, TierLimits, TierQuota};

/// How many keys the stores of one [`MemoryLimiter`] hold, against the cap.
#[derive(Debug)]
struct KeyGauge {
    entries: AtomicUsize,
    cap: usize,
}

impl KeyGauge {
    fn saturated(&self) -> bool {
        self.entries.load(Ordering::Relaxed) >= self.cap
    }
}

/// A DashMap store that counts the keys it creates.
#[derive(Debug)]
pub struct CountingStore {
    map: Arc<DashMapStateStore<LimitKey>>,
    gauge: Arc<KeyGauge>,
}

impl StateStore for CountingStore {
    type Key = LimitKey;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, decide: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.map.measure_and_replace(key, |previous| {
            // `None` is a key without state: one just created.
            if previous.is_none() {
                self.gauge.entries.fetch_add(1, Ordering::Relaxed);
            }
            decide(previous)
        })
    }
}

impl ShrinkableKeyedStateStore<LimitKey> for CountingStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.map.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.map);
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type KeyedLimiter<C> = RateLimiter<LimitKey, CountingStore, C, StateInformationMiddleware>;

struct TierLimiter<C: Clock> {
    limiter: KeyedLimiter<C>,
    map: Arc<DashMapStateStore<LimitKey>>,
    quota: TierQuota,
    /// `quota.emission_interval()`, computed once.
    interval: Duration,
}

/// See the module documentation.
pub struct MemoryLimiter<C: Clock = DefaultClock> {
    tiers: Vec<TierLimiter<C>>,
    gauge: Arc<KeyGauge>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for MemoryLimiter<C> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MemoryLimiter")
            .field("keys", &self.gauge.entries.load(Ordering::Relaxed))
            .field("max_keys", &self.gauge.cap)
            .finish()
    }
}

/// The governor quota meaning "`limit` per `window`": a burst of `limit`, one more
/// every `window / limit`.
fn governor_quota(quota: TierQuota) -> Quota {
    let burst = std::num::NonZeroU32::new(quota.limit).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::with_period(quota.emission_interval())
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

impl MemoryLimiter<DefaultClock> {
    /// A limiter on the system's monotonic clock.
    pub fn new(limits: TierLimits, max_keys: usize) -> Self {
        Self::with_clock(limits, max_keys, DefaultClock::default())
    }
}

impl<C: Clock + Clone> MemoryLimiter<C> {
    /// A limiter on `clock` (tests pass a fake clock they advance).
    pub fn with_clock(limits: TierLimits, max_keys: usize, clock: C) -> Self {
        let gauge = Arc::new(KeyGauge {
            entries: AtomicUsize::new(0),
            cap: max_keys,
        });
        let tiers = Tier::ALL
            .iter()
            .map(|tier| {
                let quota = limits.quota(*tier);
                let map = Arc::new(DashMapStateStore::<LimitKey>::default());
                let store = CountingStore {
                    map: Arc::clone(&map),
                    gauge: Arc::clone(&gauge),
                };
                let limiter: KeyedLimiter<C> =
                    RateLimiter::new(governor_quota(quota), store, clock.clone());
                TierLimiter {
                    limiter,
                    map,
                    quota,
                    interval: quota.emission_interval(),
                }
            })
            .collect();
        Self {
            tiers,
            gauge,
            clock,
        }
    }
}

impl<C: Clock> MemoryLimiter<C> {
    fn tier(&self, tier: Tier) -> &TierLimiter<C> {
        // `tiers` holds one entry per `Tier::ALL`, in index order.
        &self.tiers[tier.index()]
    }

    /// Counts one call against `key` in `tier`.
    pub fn check(&self, tier: Tier, key: &LimitKey) -> Verdict {
        let tier_limiter = self.tier(tier);
        let key = if self.gauge.saturated() && !tier_limiter.map.contains_key(key) {
            &LimitKey::Overflow
        } else {
            key
        };
        let quota = tier_limiter.quota;
        match tier_limiter.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(quota.limit);
                Verdict::Admitted(QuotaState {
                    limit: quota.limit,
                    remaining,
                    reset: tier_limiter.interval * (quota.limit - remaining),
                })
            }
            Err(not_until) => Verdict::Refused(Box::new(Refusal {
                key: key.clone(),
                tier,
                limit: quota.limit,
                window: quota.window,
                retry_after: not_until.wait_time_from(self.clock.now()),
            })),
        }
    }

    /// Counts one call against each of `keys` in order, stopping at the first
    /// refusal (governor cannot take back a spent cell, so keys before the refusing
    /// one are spent; the layer orders keys so that this is the IP before the API
    /// key, never the other way round).
    pub fn check_all(&self, tier: Tier, keys: &[LimitKey]) -> Option<Verdict> {
        let mut tightest: Option<QuotaState> = None;
        for key in keys {
            match self.check(tier, key) {
                Verdict::Admitted(state) => {
                    tightest = Some(tightest.map_or(state, |previous| previous.tighter(state)));
                }
                refused @ Verdict::Refused(_) => return Some(refused),
            }
        }
        tightest.map(Verdict::Admitted)
    }

    /// Drops keys whose bucket is full again, returns the memory, and recounts.
    /// Returns the number of keys kept.
    pub fn prune(&self) -> usize {
        let mut kept = 0;
        for tier in &self.tiers {
            tier.limiter.retain_recent();
            tier.limiter.shrink_to_fit();
            kept += tier.limiter.len();
        }
        self.gauge.entries.store(kept, Ordering::Relaxed);
        kept
    }

    /// Keys held (as counted since the last pruning).
    pub fn key_count(&self) -> usize {
        self.gauge.entries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter(
        limit: u32,
        window_secs: u64,
        max_keys: usize,
    ) -> (MemoryLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let limits = TierLimits::new(
            Duration::from_secs(window_secs),
            Tier::ALL.map(|tier| (tier, limit)),
        )
        .expect("limits");
        let clock = FakeRelativeClock::default();
        (
            MemoryLimiter::with_clock(limits, max_keys, clock.clone()),
            clock,
        )
    }

    fn ip(n: u32) -> LimitKey {
        LimitKey::for_ip(std::net::IpAddr::from(std::net::Ipv4Addr::from(n)))
    }

    #[test]
    fn exact_burst_then_exactly_one_per_interval() {
        let (limiter, clock) = limiter(10, 60, 1_000);
        let key = ip(1);
        for expected_remaining in (0..10).rev() {
            match limiter.check(Tier::Webhook, &key) {
                Verdict::Admitted(state) => {
                    assert_eq!(state.limit, 10);
                    assert_eq!(state.remaining, expected_remaining);
                }
                Verdict::Refused(refusal) => panic!("refused inside the burst: {refusal:?}"),
            }
        }
        let Verdict::Refused(refusal) = limiter.check(Tier::Webhook, &key) else {
            panic!("call 11 of 10 admitted");
        };
        assert_eq!(refusal.retry_after, Duration::from_secs(6), "one interval");
        assert_eq!(refusal.key, key);
        assert_eq!(refusal.tier, Tier::Webhook);

        clock.advance(Duration::from_secs(5));
        assert!(matches!(
            limiter.check(Tier::Webhook, &key),
            Verdict::Refused(_)
        ));
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            limiter.check(Tier::Webhook, &key),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            limiter.check(Tier::Webhook, &key),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn keys_and_tiers_are_independent() {
        let (limiter, _clock) = limiter(2, 60, 1_000);
        let api_key = LimitKey::ApiKey("key-1".into());
        for _ in 0..2 {
            assert!(matches!(
                limiter.check(Tier::Webhook, &ip(1)),
                Verdict::Admitted(_)
            ));
        }
        assert!(matches!(
            limiter.check(Tier::Webhook, &ip(1)),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            limiter.check(Tier::Webhook, &ip(2)),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            limiter.check(Tier::Webhook, &api_key),
            Verdict::Admitted(_)
        ));
        assert!(matches!(
            limiter.check(Tier::Health, &ip(1)),
            Verdict::Admitted(_)
        ));
    }

    #[test]
    fn check_all_stops_at_the_first_refusal() {
        let (limiter, _clock) = limiter(1, 60, 1_000);
        let api_key = LimitKey::ApiKey("key-1".into());
        assert!(matches!(
            limiter.check(Tier::Default, &ip(1)),
            Verdict::Admitted(_)
        ));
        let verdict = limiter.check_all(Tier::Default, &[ip(1), api_key.clone()]);
        let Some(Verdict::Refused(refusal)) = verdict else {
            panic!("expected the IP to refuse: {verdict:?}");
        };
        assert_eq!(refusal.key, ip(1));
        // The API key was not reached, so its budget is whole.
        assert!(matches!(
            limiter.check(Tier::Default, &api_key),
            Verdict::Admitted(_)
        ));
    }

    #[test]
    fn one_hundred_thousand_keys_are_pruned_but_throttled_keys_survive() {
        let (limiter, clock) = limiter(5, 60, 1_000_000);
        for n in 0..100_000 {
            assert!(matches!(
                limiter.check(Tier::Default, &ip(n)),
                Verdict::Admitted(_)
            ));
        }
        assert_eq!(limiter.key_count(), 100_000);
        // A throttled key: its bucket is empty.
        let throttled = LimitKey::ApiKey("flooder".into());
        while matches!(
            limiter.check(Tier::Default, &throttled),
            Verdict::Admitted(_)
        ) {}
        // Governor keeps a key for one interval after its bucket is whole again;
        // after two intervals the casual keys are gone, the flooder is not.
        clock.advance(Duration::from_secs(24));
        assert_eq!(limiter.prune(), 1);
        assert_eq!(limiter.key_count(), 1);
        for earned in 0..2 {
            assert!(
                matches!(
                    limiter.check(Tier::Default, &throttled),
                    Verdict::Admitted(_)
                ),
                "cell {earned} earned back in two intervals"
            );
        }
        assert!(
            matches!(
                limiter.check(Tier::Default, &throttled),
                Verdict::Refused(_)
            ),
            "and no fresh budget of 5 from pruning"
        );
    }

    #[test]
    fn past_the_cap_new_keys_share_the_overflow_bucket() {
        let (limiter, _clock) = limiter(3, 60, 1_000);
        for n in 0..1_000 {
            limiter.check(Tier::Default, &ip(n));
        }
        // A known key keeps its own bucket.
        assert!(matches!(
            limiter.check(Tier::Default, &ip(0)),
            Verdict::Admitted(_)
        ));
        // Unknown keys share one bucket of 3.
        for n in 0..3 {
            assert!(matches!(
                limiter.check(Tier::Default, &ip(5_000 + n)),
                Verdict::Admitted(_)
            ));
        }
        let Verdict::Refused(refusal) = limiter.check(Tier::Default, &ip(6_000)) else {
            panic!("overflow bucket not shared");
        };
        assert_eq!(refusal.key, LimitKey::Overflow);
        assert!(limiter.key_count() <= 1_001 + 1);
    }
}
