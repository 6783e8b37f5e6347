//! The rate limiter the server holds: the chosen storage (memory, or Redis with
//! its breaker and in-memory fallback), the "refused until" cache, shadow mode
//! and the counters, behind the calls the front door makes per request.
//!
//! Per request: [`RateLimiter::gate`] on the client IP before authentication
//! (refuses a key that is known to be refused, without I/O), then after
//! authentication a count on the client IP plus the caller's key (gated
//! first), or on the IP alone when authentication failed (so random API keys
//! cost their sender's IP budget but create no state of their own).
//! [`RateLimiter::count_now`] answers a count that needs no wait: in memory,
//! or with Redis from the replica's local allowance when every key has one
//! (`allowance.rs`); else [`RateLimiter::count`] makes one script call that
//! may spend a batch of calls ahead.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::allowance::Allowances;
use super::breaker::{CircuitBreaker, Permit, Transition};
use super::decision::{QuotaState, Refusal, Verdict};
use super::key::LimitKey;
use super::memory::MemoryLimiter;
use super::metrics::RateLimitMetrics;
use super::redis::{RedisCheckError, RedisLimiter};
use super::settings::{RateLimitSettings, Storage};
use super::tiers::Tier;

/// Keys remembered as refused, at most (an optimisation; older entries are dropped).
const REFUSED_CACHE_CAPACITY: usize = 100_000;

/// What the layer does with a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Let it through; report this quota state (none when no key was checked).
    Admit(Option<QuotaState>),
    /// Refuse it with RESOURCE_EXHAUSTED.
    Refuse(Refusal),
}

struct RedisStorage {
    redis: RedisLimiter,
    fallback: MemoryLimiter,
    breaker: Mutex<CircuitBreaker>,
    /// Calls spent in Redis ahead, admitted here without a round trip.
    allowances: Allowances,
}

enum Backend {
    Memory(MemoryLimiter),
    Redis(Box<RedisStorage>),
}

/// See the module documentation.
pub struct RateLimiter {
    settings: RateLimitSettings,
    backend: Backend,
    refused: super::refused_cache::RefusedUntilCache,
    metrics: RateLimitMetrics,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RateLimiter")
            .field("storage", &self.settings.storage)
            .field("shadow", &self.settings.shadow)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter as configured. With Redis storage nothing connects yet: the
    /// daemon starts (and limits on the fallback) even when Redis is down.
    pub fn new(
        settings: RateLimitSettings,
        redis_url: Option<&str>,
    ) -> Result<RateLimiter, RedisCheckError> {
        let backend = match (settings.storage, redis_url) {
            (Storage::Redis, Some(url)) => Backend::Redis(Box::new(RedisStorage {
                redis: RedisLimiter::new(
                    url,
                    settings.redis_ca_file.as_deref(),
                    &settings.redis_prefix,
                    settings.redis_timeout,
                )?,
                fallback: MemoryLimiter::new(
                    settings.limits.divided_among(settings.replicas),
                    settings.max_keys,
                ),
                breaker: Mutex::new(CircuitBreaker::new(
                    settings.breaker_failures,
                    settings.breaker_cooldown,
                )),
                allowances: Allowances::new(settings.replicas),
            })),
            _ => Backend::Memory(MemoryLimiter::new(settings.limits, settings.max_keys)),
        };
        Ok(RateLimiter {
            settings,
            backend,
            refused: super::refused_cache::RefusedUntilCache::new(REFUSED_CACHE_CAPACITY),
            metrics: RateLimitMetrics::default(),
        })
    }

    /// PING through the limiter's pool of Redis connections: `None` when
    /// limits are kept in memory (Redis is not used).
    pub async fn ping_redis(&self) -> Option<Result<(), RedisCheckError>> {
        match &self.backend {
            Backend::Redis(storage) => Some(storage.redis.ping().await),
            Backend::Memory(_) => None,
        }
    }

    /// The configuration in force.
    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// The counters.
    pub fn metrics(&self) -> &RateLimitMetrics {
        &self.metrics
    }

    /// The client-IP key of a call from `peer` (forwarding headers believed only
    /// from trusted proxies). Without a peer address, calls share one bucket.
    pub fn client_key(&self, peer: Option<IpAddr>, headers: &http::HeaderMap) -> LimitKey {
        let peer = peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        LimitKey::for_ip(self.settings.trusted_proxies.client_address(peer, headers))
    }

    /// Before authentication: refuses `key` if a check refused it and its retry
    /// time has not come. No I/O, so a flood from a refused IP costs neither a
    /// database lookup nor a Redis round trip.
    pub fn gate(&self, tier: Tier, key: &LimitKey) -> Option<Refusal> {
        if self.refused.is_empty() {
            return None;
        }
        let wait = self.refused.refused_for(tier, key, Instant::now())?;
        self.metrics.refused_from_cache(tier);
        let quota = self.settings.limits.quota(tier);
        Some(Refusal {
            key: key.clone(),
            tier,
            limit: quota.limit,
            window: quota.window,
            retry_after: wait,
        })
    }

    /// Counts one call against every key in `keys` (in `tier`), after refusing
    /// any key [`Self::gate`] knows to be refused. With Redis, all or none of the
    /// keys are spent; in memory (and on the fallback) keys are spent in order up
    /// to the first refusal, which is why callers put the IP first. This is the
    /// hook for checks made outside the layer (for example a per-instance check
    /// inside the signed-COMMAND path).
    pub async fn check(&self, tier: Tier, keys: &[LimitKey]) -> Verdict {
        for key in keys {
            if let Some(refusal) = self.gate(tier, key) {
                return Verdict::Refused(Box::new(refusal));
            }
        }
        self.count(tier, keys).await
    }

    /// [`Self::check`] without the gate, for a caller that has gated every
    /// key already (the front door gates the IP before authentication, the
    /// caller's key after it).
    pub async fn count(&self, tier: Tier, keys: &[LimitKey]) -> Verdict {
        if let Some(verdict) = self.count_now(tier, keys) {
            return verdict;
        }
        let Backend::Redis(storage) = &self.backend else {
            return self.untouched(tier);
        };
        let limit = self.settings.limits.quota(tier).limit;
        // Boxed: the Redis future is kilobytes, and carrying it in every caller's
        // future slowed the memory path down.
        let (verdict, authoritative) = Box::pin(self.check_redis(storage, tier, keys)).await;
        // Refused, but a concurrent check of the same keys may have left calls
        // here while this one waited: they were spent for this replica.
        if let Some(Verdict::Refused(_)) = &verdict
            && let Some(state) = storage.allowances.take(tier, keys, limit, Instant::now())
        {
            return Verdict::Admitted(state);
        }
        self.settle(tier, verdict, authoritative)
    }

    /// [`Self::count`] when it needs no wait: always with memory storage;
    /// with Redis when every key has a call left in this replica's
    /// allowance. Answered synchronously, so the hot path pays for no future
    /// at all. `None` when only Redis can answer: nothing was spent, and
    /// [`Self::count`] is the call to make.
    pub fn count_now(&self, tier: Tier, keys: &[LimitKey]) -> Option<Verdict> {
        match &self.backend {
            Backend::Memory(memory) => Some(self.settle(tier, memory.check_all(tier, keys), true)),
            Backend::Redis(storage) => {
                let limit = self.settings.limits.quota(tier).limit;
                storage
                    .allowances
                    .take(tier, keys, limit, Instant::now())
                    .map(Verdict::Admitted)
            }
        }
    }

    /// Fills in a verdict for no keys and remembers refusals from the
    /// authoritative store (a refusal by the fallback must not outlive Redis's
    /// recovery).
    fn settle(&self, tier: Tier, verdict: Option<Verdict>, authoritative: bool) -> Verdict {
        let verdict = verdict.unwrap_or_else(|| self.untouched(tier));
        if authoritative && let Verdict::Refused(refusal) = &verdict {
            // Read the clock only here: the admitted path needs no time of ours.
            let now = Instant::now();
            self.refused
                .remember(tier, refusal.key.clone(), now + refusal.retry_after, now);
        }
        verdict
    }

    /// The verdict of a call that counted against no key.
    fn untouched(&self, tier: Tier) -> Verdict {
        let quota = self.settings.limits.quota(tier);
        Verdict::Admitted(QuotaState {
            limit: quota.limit,
            remaining: quota.limit,
            reset: std::time::Duration::ZERO,
        })
    }

    /// Asks Redis (unless the breaker says not to), falling back to memory. The
    /// flag says whether the answer came from Redis.
    async fn check_redis(
        &self,
        storage: &RedisStorage,
        tier: Tier,
        keys: &[LimitKey],
    ) -> (Option<Verdict>, bool) {
        if keys.is_empty() {
            return (None, true);
        }
        let permit = self.with_breaker(storage, |breaker| breaker.permit(Instant::now()));
        if permit == Permit::Skip {
            return (self.fallback(storage, tier, keys), false);
        }
        let wanted = storage.allowances.wanted(&self.settings.limits.quota(tier));
        match storage
            .redis
            .check(&self.settings.limits, tier, keys, wanted)
            .await
        {
            Ok((verdict, granted)) => {
                self.metrics.redis_check();
                if let Verdict::Admitted(state) = &verdict {
                    storage.allowances.hold(
                        tier,
                        keys,
                        granted.saturating_sub(1),
                        state,
                        Instant::now(),
                    );
                }
                if self.with_breaker(storage, CircuitBreaker::record_success)
                    == Some(Transition::Closed)
                {
                    tracing::info!("redis answers again: rate limits are shared again");
                }
                (Some(verdict), true)
            }
            Err(error) => {
                self.metrics.redis_error();
                let transition =
                    self.with_breaker(storage, |breaker| breaker.record_failure(Instant::now()));
                if transition == Some(Transition::Opened) {
                    tracing::warn!(
                        %error,
                        replicas = self.settings.replicas,
                        cooldown_ms = self.settings.breaker_cooldown.as_millis() as u64,
                        "redis is failing: rate limiting in memory at limit / replicas until it recovers"
                    );
                } else {
                    tracing::debug!(%error, "redis rate-limit check failed; using the fallback");
                }
                (self.fallback(storage, tier, keys), false)
            }
        }
    }

    fn fallback(&self, storage: &RedisStorage, tier: Tier, keys: &[LimitKey]) -> Option<Verdict> {
        self.metrics.fallback_check();
        storage.fallback.check_all(tier, keys)
    }

    fn with_breaker<T>(
        &self,
        storage: &RedisStorage,
        action: impl FnOnce(&mut CircuitBreaker) -> T,
    ) -> T {
        // The lock is held for a few instructions and never across an await.
        let mut breaker = storage
            .breaker
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let result = action(&mut breaker);
        self.metrics.set_breaker(breaker.gauge());
        result
    }

    /// Turns a verdict on a call of `tier` into what the layer does, applying
    /// shadow mode and counting the outcome in the tier's counters.
    pub fn enforce(&self, tier: Tier, verdict: Verdict, method: &str) -> Enforcement {
        match verdict {
            Verdict::Admitted(state) => {
                self.metrics.allowed(tier, state.near_limit());
                Enforcement::Admit(Some(state))
            }
            Verdict::Refused(refusal) if self.settings.shadow => {
                self.metrics.refused(tier, true);
                tracing::info!(
                    subject = %refusal.key.subject(),
                    tier = %refusal.tier,
                    method,
                    retry_after_ms = refusal.retry_after.as_millis() as u64,
                    "shadow mode: this call would be refused by the rate limit"
                );
                Enforcement::Admit(Some(refusal.quota_state()))
            }
            Verdict::Refused(refusal) => {
                self.metrics.refused(tier, false);
                tracing::debug!(
                    subject = %refusal.key.subject(),
                    tier = %refusal.tier,
                    method,
                    "rate limit refused a call"
                );
                Enforcement::Refuse(*refusal)
            }
        }
    }

    /// Drops idle in-memory keys and expired cache entries; updates the key gauge.
    pub fn prune(&self) -> usize {
        let kept = match &self.backend {
            Backend::Memory(memory) => memory.prune(),
            Backend::Redis(storage) => {
                storage.allowances.prune(Instant::now());
                storage.fallback.prune()
            }
        };
        self.refused.prune(Instant::now());
        self.metrics.set_key_count(kept);
        kept
    }

    /// Starts the periodic pruning; it stops when the returned guard is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> MaintenanceGuard {
        let limiter = Arc::clone(self);
        let interval = self.settings.prune_interval;
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let started = Instant::now();
                let kept = limiter.prune();
                tracing::debug!(
                    keys = kept,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "pruned idle rate-limit keys"
                );
            }
        });
        MaintenanceGuard { task }
    }
}

/// Stops the pruning task when dropped.
#[derive(Debug)]
pub struct MaintenanceGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MaintenanceGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}
