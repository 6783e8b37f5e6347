//! The checks behind `Coordinator.Health`: database round trip, Redis PING
//! (when configured), agent runtime, version and uptime. (`grpc.health.v1`
//! follows the database in `crate::health`.)
//!
//! Anyone may call Health, so a call costs no round trip of its own: the
//! database and Redis are probed at most once per [`PROBE_EVERY`], by the
//! first call after the last probe aged (the others wait for it and share
//! it), through the store's pool and the rate limiter's Redis pool.

use std::sync::Arc;
use std::time::Duration;

use crate::agents::runtime::AgentRuntime;
use crate::config::Config;
use crate::proto::coordinator as pb;
use crate::ratelimit::RateLimiter;
use crate::store::Store;

/// How long the database may take to answer the health query.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How old a probe of the database and Redis may be when a call reports it.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What `Health` looks at, handed over by the server when it builds the
/// service, and the last probe of the database and Redis, shared by the
/// calls that come within [`PROBE_EVERY`] of it.
#[derive(Clone)]
pub struct HealthCheck {
    store: Store,
    rate_limiter: Arc<RateLimiter>,
    agents: Arc<AgentRuntime>,
    /// Whether `redis_url` is set.
    redis_configured: bool,
    /// Whether any agent type is configured.
    agents_configured: bool,
    /// When the daemon started, for the uptime.
    started_at: tokio::time::Instant,
    last: Arc<tokio::sync::Mutex<Option<Probed>>>,
}

#[derive(Debug)]
struct Probed {
    at: tokio::time::Instant,
    database: pb::ComponentHealth,
    redis: pb::ComponentHealth,
}

impl HealthCheck {
    /// Checks of these parts, as `config` sets them up (whether Redis and
    /// agent types are configured), counting the uptime from now.
    pub fn new(
        store: Store,
        rate_limiter: Arc<RateLimiter>,
        agents: Arc<AgentRuntime>,
        config: &Config,
    ) -> HealthCheck {
        HealthCheck {
            store,
            rate_limiter,
            agents,
            redis_configured: config.redis_url.is_some(),
            agents_configured: !config.agents.types.is_empty(),
            started_at: tokio::time::Instant::now(),
            last: Arc::default(),
        }
    }

    /// Checks every component and gives the verdict.
    pub async fn check(&self) -> pb::HealthResponse {
        let (database, redis) = self.components().await;
        let redis = with_fallback_state(redis, &self.rate_limiter);
        let agent_runtime = self.check_agent_runtime();
        let status = verdict(&database, &redis);
        pb::HealthResponse {
            status: status.into(),
            database: Some(database),
            redis: Some(redis),
            agent_runtime: Some(agent_runtime),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started_at.elapsed().as_secs(),
        }
    }

    /// The database's and Redis's health, probed now unless a probe younger
    /// than [`PROBE_EVERY`] exists. Holding the lock while probing makes
    /// the calls that arrive meanwhile wait for this probe, not start theirs.
    async fn components(&self) -> (pb::ComponentHealth, pb::ComponentHealth) {
        let mut last = self.last.lock().await;
        if let Some(probed) = last.as_ref()
            && probed.at.elapsed() < PROBE_EVERY
        {
            return (probed.database.clone(), probed.redis.clone());
        }
        let (database, redis) = tokio::join!(check_database(&self.store), self.check_redis());
        *last = Some(Probed {
            at: tokio::time::Instant::now(),
            database: database.clone(),
            redis: redis.clone(),
        });
        (database, redis)
    }

    /// NOT_CONFIGURED without agent types; DEGRADED at the concurrent-agent
    /// cap (spawns are refused); else OK, with how many agents run.
    fn check_agent_runtime(&self) -> pb::ComponentHealth {
        if !self.agents_configured {
            return component(
                pb::ComponentStatus::NotConfigured,
                "no agent types configured ([agents.types.NAME])",
                None,
            );
        }
        let status = self.agents.status();
        let detail = format!("{} of {} agents running", status.running, status.capacity);
        if status.is_full() {
            component(pb::ComponentStatus::Degraded, &detail, None)
        } else {
            component(pb::ComponentStatus::Ok, &detail, None)
        }
    }

    /// PING through the rate limiter's pool (within its `redis_timeout`). The
    /// detail never repeats the URL (it may hold a password).
    async fn check_redis(&self) -> pb::ComponentHealth {
        if !self.redis_configured {
            return component(
                pb::ComponentStatus::NotConfigured,
                "in-memory rate limiting; set redis_url to share limits",
                None,
            );
        }
        let started = tokio::time::Instant::now();
        match self.rate_limiter.ping_redis().await {
            None => component(
                pb::ComponentStatus::NotConfigured,
                "redis_url is set but rate limits are kept in memory (rate_limit.storage = \"memory\")",
                None,
            ),
            Some(Ok(())) => component(pb::ComponentStatus::Ok, "", Some(started.elapsed())),
            Some(Err(error)) => component(pb::ComponentStatus::Down, &error.to_string(), None),
        }
    }
}

/// NOT_SERVING when the database is down (calls will fail); DEGRADED when
/// something with a fallback is not OK; else SERVING.
fn verdict(database: &pb::ComponentHealth, redis: &pb::ComponentHealth) -> pb::ServingStatus {
    let ok_or_unused = |status: i32| {
        status == i32::from(pb::ComponentStatus::Ok)
            || status == i32::from(pb::ComponentStatus::NotConfigured)
    };
    if database.status != i32::from(pb::ComponentStatus::Ok) {
        pb::ServingStatus::NotServing
    } else if !ok_or_unused(redis.status) {
        pb::ServingStatus::Degraded
    } else {
        pb::ServingStatus::Serving
    }
}

fn component(
    status: pb::ComponentStatus,
    detail: &str,
    latency: Option<Duration>,
) -> pb::ComponentHealth {
    pb::ComponentHealth {
        status: status.into(),
        detail: detail.to_owned(),
        latency_ms: latency.map(|latency| u32::try_from(latency.as_millis()).unwrap_or(u32::MAX)),
    }
}

/// A reachable Redis is still DEGRADED while the rate limiter's breaker keeps
/// it on the in-memory fallback.
fn with_fallback_state(
    redis: pb::ComponentHealth,
    rate_limiter: &RateLimiter,
) -> pb::ComponentHealth {
    use crate::ratelimit::metrics::BreakerGauge;
    let breaker = rate_limiter.metrics().snapshot().breaker;
    if redis.status == i32::from(pb::ComponentStatus::Ok) && breaker != BreakerGauge::Closed {
        return pb::ComponentHealth {
            status: pb::ComponentStatus::Degraded.into(),
            detail: "rate limiting is on its in-memory fallback until Redis answers reliably"
                .to_owned(),
            latency_ms: redis.latency_ms,
        };
    }
    redis
}

async fn check_database(store: &Store) -> pb::ComponentHealth {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(DATABASE_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => component(
            pb::ComponentStatus::Ok,
            &format!("{:?}", store.backend()).to_lowercase(),
            Some(started.elapsed()),
        ),
        // Store errors never carry the URL's password (see store/error.rs).
        Ok(Err(error)) => component(pb::ComponentStatus::Down, &error.to_string(), None),
        Err(_) => component(
            pb::ComponentStatus::Down,
            &format!("no answer within {} ms", DATABASE_TIMEOUT.as_millis()),
            None,
        ),
    }
}
