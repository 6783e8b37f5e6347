//! Local allowances: calls a replica has already spent in Redis and may admit
//! on its own, so a key far below a high limit costs one Redis round trip per
//! batch of calls rather than one per call.
//!
//! When the script admits a call, it may spend up to `wanted` calls of every
//! bucket of the call at once (as many as each can spare). The replica keeps
//! the ones beyond the first for each key and admits later calls whose every
//! key has one left, without I/O. The calls are spent in Redis before they
//! are admitted here, so replicas together never admit more than the limit.
//!
//! What an allowance costs is calls spent and not used, which lapse after
//! [`LIFETIME`]. The batch is therefore a tenth of what the replica's share
//! of the limit earns back in one lifetime (`limit × LIFETIME / (window ×
//! replicas × 10)`, at most [`MAX_BATCH`]): a caller too slow to use its
//! allowances burns at most one batch a lifetime, a tenth of the pace its
//! limit allows, so it is never refused for calls it did not make. A quota
//! earning back under 10 calls per replica a second (under 600 a minute) is
//! checked against Redis on every call, exactly as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::decision::QuotaState;
use super::key::LimitKey;
use super::tiers::{Tier, TierQuota};

/// The most calls one Redis check spends for later calls of a key.
pub const MAX_BATCH: u32 = 64;

/// The batch is this share of what the replica's part of a quota earns
/// back in one [`LIFETIME`].
const SHARE_DIVISOR: u128 = 10;

/// How long an allowance may be used after Redis granted it.
pub const LIFETIME: Duration = Duration::from_secs(1);

/// Allowances held, at most (an optimisation; a full map grants no more).
const CAPACITY: usize = 100_000;

/// What a replica may still admit for one key.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// Calls left.
    left: u32,
    /// Calls the bucket had left beyond the allowance when it was granted.
    remaining: u32,
    /// Time until the bucket was whole again, when it was granted.
    reset: Duration,
    /// When the allowance lapses.
    until: Instant,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Allowances {
    replicas: u32,
    held: Mutex<HashMap<(Tier, LimitKey), Held, foldhash::quality::RandomState>>,
}

impl Allowances {
    /// Allowances of one replica among `replicas` sharing the Redis budget.
    pub fn new(replicas: u32) -> Allowances {
        Allowances {
            replicas: replicas.max(1),
            held: Mutex::new(HashMap::default()),
        }
    }

    /// Calls one Redis check of `quota` asks for: this call and a batch of
    /// a tenth of what the replica's share of the limit earns back in one
    /// [`LIFETIME`], at most [`MAX_BATCH`] in all; 1 (no allowance) for a
    /// quota earning back under 10 calls a second per replica.
    pub fn wanted(&self, quota: &TierQuota) -> u32 {
        let earned = u128::from(quota.limit) * LIFETIME.as_micros()
            / (quota.window.as_micros().max(1) * u128::from(self.replicas) * SHARE_DIVISOR);
        u32::try_from(earned)
            .unwrap_or(MAX_BATCH)
            .clamp(1, MAX_BATCH)
    }

    /// Admits a call of `tier` on `keys` from the allowances, when every key
    /// has a call left that has not lapsed; spends one of each.
    pub fn take(
        &self,
        tier: Tier,
        keys: &[LimitKey],
        limit: u32,
        now: Instant,
    ) -> Option<QuotaState> {
        if keys.is_empty() {
            return None;
        }
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if held.is_empty() {
            return None;
        }
        // One lookup per key: each is spent as it is found, and a key
        // without a call left gives back what the ones before it spent.
        let mut tightest: Option<(u32, Duration)> = None;
        for (index, key) in keys.iter().enumerate() {
            let usable = held
                .get_mut(&(tier, key.clone()))
                .filter(|allowance| allowance.left > 0 && allowance.until > now);
            let Some(allowance) = usable else {
                for spent in &keys[..index] {
                    if let Some(allowance) = held.get_mut(&(tier, spent.clone())) {
                        allowance.left += 1;
                    }
                }
                return None;
            };
            let remaining = allowance.remaining.saturating_add(allowance.left - 1);
            allowance.left -= 1;
            if tightest.is_none_or(|(fewest, _)| remaining < fewest) {
                tightest = Some((remaining, allowance.reset));
            }
        }
        let (remaining, reset) = tightest?;
        Some(QuotaState {
            limit,
            remaining: remaining.min(limit),
            reset,
        })
    }

    /// Keeps `left` calls of every key in `keys`, granted by Redis now with
    /// `state` the tightest bucket's state after them. Calls still held for a
    /// key (checks of one key overlap under concurrent calls) are kept too:
    /// they were spent in Redis as well.
    pub fn hold(&self, tier: Tier, keys: &[LimitKey], left: u32, state: &QuotaState, now: Instant) {
        if left == 0 {
            return;
        }
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if held.len() + keys.len() > CAPACITY {
            held.retain(|_, allowance| allowance.until > now && allowance.left > 0);
            if held.len() + keys.len() > CAPACITY {
                return;
            }
        }
        for key in keys {
            let allowance = held.entry((tier, key.clone())).or_insert(Held {
                left: 0,
                remaining: state.remaining,
                reset: state.reset,
                until: now,
            });
            if allowance.until <= now {
                allowance.left = 0;
            }
            allowance.left = allowance.left.saturating_add(left);
            allowance.remaining = state.remaining;
            allowance.reset = state.reset;
            allowance.until = now + LIFETIME;
        }
    }

    /// Drops lapsed and used-up allowances; the number kept.
    pub fn prune(&self, now: Instant) -> usize {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        held.retain(|_, allowance| allowance.until > now && allowance.left > 0);
        held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(limit: u32) -> TierQuota {
        TierQuota {
            limit,
            window: Duration::from_secs(60),
        }
    }

    fn key(subject: &str) -> LimitKey {
        LimitKey::ApiKey(std::sync::Arc::from(subject))
    }

    fn state(remaining: u32) -> QuotaState {
        QuotaState {
            limit: 1_000,
            remaining,
            reset: Duration::from_secs(3),
        }
    }

    #[test]
    fn the_batch_is_a_tenth_of_what_a_lifetime_earns_back_and_none_for_slow_quotas() {
        let one = Allowances::new(1);
        // Per minute: 600 earn back 10 a second, a batch of 1.
        assert_eq!(one.wanted(&quota(300)), 1);
        assert_eq!(one.wanted(&quota(1_199)), 1);
        assert_eq!(one.wanted(&quota(6_000)), 10);
        assert_eq!(one.wanted(&quota(100_000_000)), MAX_BATCH);
        assert_eq!(Allowances::new(5).wanted(&quota(6_000)), 2);
        assert_eq!(Allowances::new(0).wanted(&quota(6_000)), 10);
        // A long window earns little back each second: no batch.
        let slow = TierQuota {
            limit: 4_000,
            window: Duration::from_secs(3_600),
        };
        assert_eq!(one.wanted(&slow), 1);
    }

    #[test]
    fn a_call_is_admitted_only_when_every_key_has_a_call_left() {
        let allowances = Allowances::new(1);
        let now = Instant::now();
        let (ip, api) = (key("ip"), key("api"));
        assert_eq!(
            allowances.take(Tier::Default, std::slice::from_ref(&ip), 1_000, now),
            None
        );
        allowances.hold(
            Tier::Default,
            &[ip.clone(), api.clone()],
            2,
            &state(900),
            now,
        );
        let first = allowances
            .take(Tier::Default, &[ip.clone(), api.clone()], 1_000, now)
            .expect("both keys hold calls");
        assert_eq!(first.remaining, 901);
        // Another tier, or a key without an allowance, goes to Redis.
        assert_eq!(
            allowances.take(Tier::Health, std::slice::from_ref(&ip), 1_000, now),
            None
        );
        assert_eq!(
            allowances.take(Tier::Default, &[ip.clone(), key("other")], 1_000, now),
            None
        );
        // A refused take spent nothing: one call is left for each key.
        let second = allowances
            .take(Tier::Default, &[ip.clone(), api.clone()], 1_000, now)
            .expect("one call left");
        assert_eq!(second.remaining, 900);
        assert_eq!(allowances.take(Tier::Default, &[ip], 1_000, now), None);
        assert_eq!(allowances.prune(now), 0, "both allowances are used up");
    }

    #[test]
    fn a_key_named_twice_is_spent_twice_or_not_at_all() {
        let allowances = Allowances::new(1);
        let now = Instant::now();
        let ip = key("ip");
        allowances.hold(Tier::Default, std::slice::from_ref(&ip), 1, &state(10), now);
        assert_eq!(
            allowances.take(Tier::Default, &[ip.clone(), ip.clone()], 1_000, now),
            None,
            "one call held, two wanted"
        );
        assert!(
            allowances
                .take(Tier::Default, std::slice::from_ref(&ip), 1_000, now)
                .is_some(),
            "the refused take spent nothing"
        );
    }

    #[test]
    fn an_allowance_lapses() {
        let allowances = Allowances::new(1);
        let now = Instant::now();
        allowances.hold(Tier::Default, &[key("ip")], 10, &state(500), now);
        let later = now + LIFETIME;
        assert_eq!(
            allowances.take(Tier::Default, &[key("ip")], 1_000, later),
            None
        );
        assert_eq!(allowances.prune(later), 0);
    }
}
