//! Keys that the authoritative store refused (Redis; or memory when storage is
//! memory), remembered locally until their retry time, so that a flooding client
//! costs a hash lookup per call instead of a Redis round trip — and, because the
//! layer consults it before authentication, no database lookup either.
//!
//! The cache only ever refuses what the store already refused, and only until the
//! moment the store said; it is an optimisation and forgets entries when full.
//! Refusals by the in-memory fallback are not remembered, so they cannot outlive
//! Redis's recovery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::key::LimitKey;
use super::tiers::Tier;

/// See the module documentation.
#[derive(Debug)]
pub struct RefusedUntilCache {
    entries: Mutex<HashMap<(Tier, LimitKey), Instant>>,
    /// The number of entries, readable without the lock: the common case (nobody
    /// refused) costs one atomic load per call, no lock and no clock read.
    entry_count: AtomicUsize,
    capacity: usize,
}

impl RefusedUntilCache {
    /// A cache of at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            entry_count: AtomicUsize::new(0),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Tier, LimitKey), Instant>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Whether nothing is remembered (a hint: it may be briefly out of date).
    pub fn is_empty(&self) -> bool {
        self.entry_count.load(Ordering::Relaxed) == 0
    }

    /// How long `key` stays refused in `tier`, if Redis refused it and the time
    /// has not yet come.
    pub fn refused_for(&self, tier: Tier, key: &LimitKey, now: Instant) -> Option<Duration> {
        let entries = self.lock();
        if entries.is_empty() {
            return None;
        }
        let until = *entries.get(&(tier, key.clone()))?;
        (until > now).then(|| until - now)
    }

    /// Remembers that `key` is refused in `tier` until `until`.
    pub fn remember(&self, tier: Tier, key: LimitKey, until: Instant, now: Instant) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, refused_until| *refused_until > now);
            self.entry_count.store(entries.len(), Ordering::Relaxed);
            if entries.len() >= self.capacity {
                return;
            }
        }
        entries.insert((tier, key), until);
        self.entry_count.store(entries.len(), Ordering::Relaxed);
    }

    /// Drops entries whose time has come; returns how many remain.
    pub fn prune(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        entries.retain(|_, refused_until| *refused_until > now);
        entries.shrink_to_fit();
        self.entry_count.store(entries.len(), Ordering::Relaxed);
        entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_until_the_time_redis_gave_and_then_forgets() {
        let cache = RefusedUntilCache::new(10);
        let now = Instant::now();
        let key = LimitKey::for_ip("192.0.2.1".parse().expect("ip"));
        cache.remember(Tier::Health, key.clone(), now + Duration::from_secs(2), now);
        assert_eq!(
            cache.refused_for(Tier::Health, &key, now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(cache.refused_for(Tier::Webhook, &key, now), None);
        assert_eq!(
            cache.refused_for(Tier::Health, &key, now + Duration::from_secs(2)),
            None
        );
        assert_eq!(cache.prune(now + Duration::from_secs(3)), 0);
    }

    #[test]
    fn a_full_cache_makes_room_only_from_expired_entries() {
        let cache = RefusedUntilCache::new(2);
        let now = Instant::now();
        let key = |n: u8| LimitKey::for_ip(std::net::IpAddr::from([192, 0, 2, n]));
        cache.remember(Tier::Health, key(1), now + Duration::from_secs(1), now);
        cache.remember(Tier::Health, key(2), now + Duration::from_secs(9), now);
        cache.remember(Tier::Health, key(3), now + Duration::from_secs(9), now);
        assert!(cache.refused_for(Tier::Health, &key(3), now).is_none());
        let later = now + Duration::from_secs(2);
        cache.remember(Tier::Health, key(3), now + Duration::from_secs(9), later);
        assert!(cache.refused_for(Tier::Health, &key(3), later).is_some());
        assert!(cache.refused_for(Tier::Health, &key(2), later).is_some());
    }
}
