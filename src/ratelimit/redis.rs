//! Redis-backed GCRA: one Lua script per call checks all of the call's keys
//! atomically on the Redis server's clock (`TIME`), run by EVALSHA through a
//! `bb8-redis` pool. Several daemons on one Redis and prefix share one budget.
//!
//! The pool is built for the request path: no PING on checkout (it would double
//! the latency), no retry loop on connect, and a connection wait of the check
//! timeout instead of bb8's 30 s. Connections are multiplexed and shared, not
//! held per call; one that failed or stalled is dropped instead of being handed
//! out again (bb8-redis itself never marks a connection broken).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;

use super::decision::{QuotaState, Refusal, Verdict};
use super::key::LimitKey;
use super::tiers::{Tier, TierLimits};

/// The script, loaded once per Redis server by `EVALSHA`'s NOSCRIPT fallback.
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Connections kept open to Redis. Multiplexed connections pipeline many calls
/// each, so a few are plenty.
const POOL_SIZE: u32 = 4;

/// Why a Redis check gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisCheckError {
    /// Connecting or the command failed.
    #[error("redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be had.
    #[error("no redis connection: {0}")]
    Pool(String),
    /// The check took longer than the configured timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The script answered something unexpected.
    #[error("unexpected script reply: {0}")]
    Reply(String),
}

/// A pooled connection that remembers whether it failed.
pub struct TrackedConnection {
    connection: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// bb8's manager for [`TrackedConnection`]s: bb8-redis's manager (or, for
/// a `rediss://` server with CAs of its own, a client built with them) plus
/// a `has_broken` that is true once a command on the connection failed.
#[derive(Clone, Debug)]
pub enum TrackedManager {
    /// `redis://`, or `rediss://` checked against the system's roots.
    Url(RedisConnectionManager),
    /// `rediss://` checked against the CAs of `rate_limit.redis_ca_file`.
    OwnCa(redis::Client),
}

impl TrackedManager {
    /// The manager for `url`, trusting the CAs in `ca_file` when given.
    fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, RedisCheckError> {
        let Some(ca_file) = ca_file else {
            return Ok(TrackedManager::Url(RedisConnectionManager::new(url)?));
        };
        let root_cert = std::fs::read(ca_file).map_err(|error| {
            RedisCheckError::Pool(format!(
                "cannot read rate_limit.redis_ca_file {}: {error}",
                ca_file.display()
            ))
        })?;
        Ok(TrackedManager::OwnCa(redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        )?))
    }
}

impl bb8::ManageConnection for TrackedManager {
    type Connection = TrackedConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let connection = match self {
            TrackedManager::Url(manager) => manager.connect().await?,
            TrackedManager::OwnCa(client) => client.get_multiplexed_async_connection().await?,
        };
        Ok(TrackedConnection {
            connection,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, connection: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING")
            .query_async::<String>(&mut connection.connection)
            .await
            .map(drop)
    }

    fn has_broken(&self, connection: &mut Self::Connection) -> bool {
        connection.broken.load(Ordering::Relaxed)
    }
}

/// The outcome of one script run, before it is tied to keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScriptReply {
    /// Whether every bucket admitted the call.
    pub admitted: bool,
    /// 0-based index of the tightest (admitted) or refusing (refused) key.
    pub index: usize,
    /// Time until whole (admitted) or until the call would pass (refused).
    pub micros: u64,
    /// Calls left in the tightest bucket after the granted ones (admitted).
    pub remaining: u32,
    /// Calls spent on every bucket: this one and the allowance (admitted).
    pub granted: u32,
}

/// See the module documentation.
pub struct RedisLimiter {
    pool: bb8::Pool<TrackedManager>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisLimiter {
    /// A limiter on the Redis at `url`. Connects lazily: the daemon starts and
    /// serves (on the fallback) even when Redis is down at start.
    pub fn new(
        url: &str,
        ca_file: Option<&std::path::Path>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RedisCheckError> {
        let manager = TrackedManager::new(url, ca_file)?;
        let pool = bb8::Pool::builder()
            .max_size(POOL_SIZE)
            .test_on_check_out(false)
            .retry_connection(false)
            .connection_timeout(timeout)
            .build_unchecked(manager);
        Ok(Self {
            pool,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// PING on a pooled connection, within the timeout: whether Redis
    /// answers, for health checks (no connection of its own).
    pub async fn ping(&self) -> Result<(), RedisCheckError> {
        self.on_shared_connection(async |connection| {
            redis::cmd("PING")
                .query_async::<String>(connection)
                .await
                .map_err(RedisCheckError::from)
        })
        .await
        .map(drop)
    }

    /// Runs `command` on a pooled connection within the timeout. A command
    /// that fails or is cut off by the timeout condemns the connection it
    /// used (its "broken" flag lives out here for that reason), so the pool
    /// does not hand it out again.
    async fn on_shared_connection<T>(
        &self,
        command: impl AsyncFnOnce(&mut MultiplexedConnection) -> Result<T, RedisCheckError>,
    ) -> Result<T, RedisCheckError> {
        let mut used_connection: Option<Arc<AtomicBool>> = None;
        let outcome = tokio::time::timeout(self.timeout, async {
            let (mut connection, broken) = self.shared_connection().await?;
            used_connection = Some(broken);
            command(&mut connection).await
        })
        .await
        .unwrap_or(Err(RedisCheckError::Timeout(self.timeout)));
        if outcome.is_err()
            && let Some(broken) = used_connection
        {
            broken.store(true, Ordering::Relaxed);
        }
        outcome
    }

    /// The Redis key of `key`'s bucket in `tier`: `<prefix><tier>:<subject>`.
    pub fn bucket_name(&self, tier: Tier, key: &LimitKey) -> String {
        format!("{}{}:{}", self.prefix, tier.as_str(), key.subject())
    }

    /// Runs the script for `keys` in `tier`, within the timeout, asking for
    /// `wanted` calls (this one and an allowance): the verdict on this call
    /// and how many calls were spent (0 when refused).
    pub async fn check(
        &self,
        limits: &TierLimits,
        tier: Tier,
        keys: &[LimitKey],
        wanted: u32,
    ) -> Result<(Verdict, u32), RedisCheckError> {
        let quota = limits.quota(tier);
        let interval_micros =
            u64::try_from(quota.emission_interval().as_micros()).unwrap_or(u64::MAX);
        let buckets: Vec<String> = keys.iter().map(|key| self.bucket_name(tier, key)).collect();
        let reply = self
            .on_shared_connection(async |connection| {
                self.run_script(connection, &buckets, interval_micros, quota.limit, wanted)
                    .await
            })
            .await?;
        let key = keys.get(reply.index).cloned().ok_or_else(|| {
            RedisCheckError::Reply(format!("key index {} out of range", reply.index))
        })?;
        let micros = Duration::from_micros(reply.micros);
        Ok(if reply.admitted {
            let state = QuotaState {
                limit: quota.limit,
                remaining: reply.remaining.min(quota.limit),
                reset: micros,
            };
            (
                Verdict::Admitted(state),
                reply.granted.clamp(1, wanted.max(1)),
            )
        } else {
            let refusal = Refusal {
                key,
                tier,
                limit: quota.limit,
                window: quota.window,
                retry_after: micros,
            };
            (Verdict::Refused(Box::new(refusal)), 0)
        })
    }

    /// A multiplexed connection from the pool, and its "broken" flag. The pooled
    /// handle goes straight back: a multiplexed connection pipelines any number
    /// of concurrent calls, so holding it exclusively for one call would queue
    /// every other call behind it. A connection flagged broken is dropped by the
    /// pool the next time it is returned, and a new one is made.
    async fn shared_connection(
        &self,
    ) -> Result<(MultiplexedConnection, Arc<AtomicBool>), RedisCheckError> {
        // A connection condemned while idle is discarded as its handle returns;
        // the pool holds at most POOL_SIZE, so this ends.
        for _ in 0..=POOL_SIZE {
            let pooled = self
                .pool
                .get()
                .await
                .map_err(|error| RedisCheckError::Pool(error.to_string()))?;
            if !pooled.broken.load(Ordering::Relaxed) {
                return Ok((pooled.connection.clone(), Arc::clone(&pooled.broken)));
            }
        }
        Err(RedisCheckError::Pool(
            "every pooled connection has failed".to_owned(),
        ))
    }

    /// One EVALSHA of the script on `connection` (loading it on NOSCRIPT).
    async fn run_script(
        &self,
        connection: &mut MultiplexedConnection,
        buckets: &[String],
        interval_micros: u64,
        limit: u32,
        wanted: u32,
    ) -> Result<ScriptReply, RedisCheckError> {
        let mut invocation = self.script.prepare_invoke();
        for bucket in buckets {
            invocation.key(bucket);
        }
        invocation.arg(interval_micros).arg(limit).arg(wanted);
        let reply: Vec<i64> = invocation.invoke_async(connection).await?;
        parse_reply(&reply)
    }
}

fn parse_reply(reply: &[i64]) -> Result<ScriptReply, RedisCheckError> {
    let [admitted, index, micros, remaining, granted] = reply else {
        return Err(RedisCheckError::Reply(format!("{reply:?}")));
    };
    let index = usize::try_from(*index)
        .ok()
        .and_then(|index| index.checked_sub(1))
        .ok_or_else(|| RedisCheckError::Reply(format!("{reply:?}")))?;
    Ok(ScriptReply {
        admitted: *admitted == 1,
        index,
        micros: u64::try_from(*micros).unwrap_or(0),
        remaining: u32::try_from(*remaining).unwrap_or(0),
        granted: u32::try_from(*granted).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_and_checked() {
        assert_eq!(
            parse_reply(&[1, 2, 600_000, 7, 3]).expect("reply"),
            ScriptReply {
                admitted: true,
                index: 1,
                micros: 600_000,
                remaining: 7,
                granted: 3,
            }
        );
        assert!(parse_reply(&[1, 0, 0, 0, 1]).is_err());
        assert!(parse_reply(&[1, 1, 0, 0]).is_err());
    }
}
