//! A small time-bounded cache for what the daemon reads on every call but rarely
//! changes: API keys, and peers' connections and keys.
//!
//! Each entry is believed for at most the cache's lifetime after it was read
//! (`server.auth_cache_ms`). Changes made through this daemon invalidate the entries
//! they touch at once; a change made by another process (the offline `apikey revoke`,
//! a replica on the same PostgreSQL) reaches this daemon when the entry expires. A
//! lifetime of zero turns the cache off: every call reads the store.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most; a full cache drops its expired entries, then all of them.
/// Entries are made only for records that exist in the store (API keys, connections),
/// so a stranger's guesses cannot grow it.
const MAX_ENTRIES: usize = 4096;

/// Values of type `V` by key `K`, each for at most `lifetime` after it was read.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    lifetime: Duration,
    entries: Mutex<Entries<K, V>>,
}

#[derive(Debug)]
struct Entries<K, V> {
    map: HashMap<K, (Instant, V), foldhash::quality::RandomState>,
    /// Bumped by every invalidation, so that a value read before one is not
    /// stored after it (a reader racing a change would otherwise put the old
    /// record back for a whole lifetime).
    generation: u64,
}

/// What a cache lookup hands to [`TtlCache::insert`]: the generation the read
/// started in.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// A cache whose entries live `lifetime`; zero turns it off.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            entries: Mutex::new(Entries {
                map: HashMap::default(),
                generation: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<K, V>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The fresh value for `key`, or a ticket to store the value read from the
    /// store with [`TtlCache::insert`].
    pub fn get(&self, key: &K) -> Result<V, Ticket> {
        let entries = self.lock();
        match entries.map.get(key) {
            Some((read_at, value)) if read_at.elapsed() < self.lifetime => Ok(value.clone()),
            _ => Err(Ticket(entries.generation)),
        }
    }

    /// Stores `value` read from the store under `ticket`, unless the cache is
    /// off or an invalidation came since the read began.
    pub fn insert(&self, ticket: Ticket, key: K, value: V) {
        if self.lifetime.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.generation != ticket.0 {
            return;
        }
        if entries.map.len() >= MAX_ENTRIES {
            let lifetime = self.lifetime;
            entries
                .map
                .retain(|_, (read_at, _)| read_at.elapsed() < lifetime);
            if entries.map.len() >= MAX_ENTRIES {
                entries.map.clear();
            }
        }
        entries.map.insert(key, (Instant::now(), value));
    }

    /// Forgets every entry: after this returns, no lookup answers from a read
    /// made before it.
    pub fn clear(&self) {
        let mut entries = self.lock();
        entries.generation = entries.generation.wrapping_add(1);
        entries.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_their_lifetime() {
        let cache = TtlCache::new(Duration::from_millis(30));
        let ticket = cache.get(&"key").expect_err("empty");
        cache.insert(ticket, "key", 1);
        assert_eq!(cache.get(&"key").ok(), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.get(&"key").is_err(), "expired");
    }

    #[test]
    fn a_zero_lifetime_keeps_nothing() {
        let cache = TtlCache::new(Duration::ZERO);
        let ticket = cache.get(&"key").expect_err("empty");
        cache.insert(ticket, "key", 1);
        assert!(cache.get(&"key").is_err());
    }

    #[test]
    fn a_read_from_before_a_clear_is_not_stored() {
        let cache = TtlCache::new(Duration::from_secs(60));
        let stale = cache.get(&"key").expect_err("empty");
        cache.clear();
        cache.insert(stale, "key", 1);
        assert!(cache.get(&"key").is_err(), "the stale read was dropped");
        let fresh = cache.get(&"key").expect_err("empty");
        cache.insert(fresh, "key", 2);
        assert_eq!(cache.get(&"key").ok(), Some(2));
    }

    #[test]
    fn a_full_cache_makes_room() {
        let cache = TtlCache::new(Duration::from_secs(60));
        for index in 0..(MAX_ENTRIES + 10) {
            let ticket = cache.get(&index).expect_err("new");
            cache.insert(ticket, index, index);
        }
        assert!(cache.lock().map.len() <= MAX_ENTRIES);
        let last = MAX_ENTRIES + 9;
        assert_eq!(cache.get(&last).ok(), Some(last));
    }
}
