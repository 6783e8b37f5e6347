//! Rate-limit benchmark (not a test): `cargo run --release --example bench_ratelimit`.
//!
//! Prints, in one run:
//! 1. the in-memory check as the layer runs it (tier lookup, client key, refused
//!    gate, governor check, verdict, shadow/metrics) against governor's own
//!    keyed check on the same keys and quota (goal: at most 100 ns more);
//! 2. the Redis-backed check against a raw EVALSHA of the same script on one
//!    multiplexed connection (goal: ratio at most 1.2);
//! 3. the p99 a call pays with Redis down once the breaker is open (goal ≤ 1 ms);
//! 4. RSS with 1 M keys in memory, before and after pruning.
//!
//! Redis: `MOSAIC_TEST_REDIS_URL` [default redis://127.0.0.1:6379]; its keys go
//! under a unique prefix and are deleted at the end.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use mosaic_mesh::ratelimit::memory::MemoryLimiter;
use mosaic_mesh::ratelimit::redis::GCRA_SCRIPT;
use mosaic_mesh::ratelimit::tiers::{TierLimits, tier_for};
use mosaic_mesh::ratelimit::{
    LimitKey, RateLimitArgs, RateLimitFileConfig, RateLimitSettings, RateLimiter, Tier, Verdict,
};

const WARM_KEYS: u32 = 1_000;
const MEMORY_ITERATIONS: u32 = 5_000_000;
const REDIS_ITERATIONS: usize = 5_000;

fn settings(section: &str, redis: bool) -> RateLimitSettings {
    let file: RateLimitFileConfig = toml::from_str(section).expect("section");
    RateLimitSettings::resolve(file, &RateLimitArgs::default(), redis).expect("settings")
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index]
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len() as u32
}

/// Nanoseconds per call of `body` over `calls` calls.
fn per_call_ns(calls: u32, mut body: impl FnMut(u32)) -> f64 {
    let started = Instant::now();
    for iteration in 0..calls {
        body(iteration);
    }
    started.elapsed().as_nanos() as f64 / f64::from(calls)
}

/// In-memory check vs governor alone (figure 1). The machine is shared, so the
/// variants run interleaved in short rounds and each reports its best round.
fn memory_check() {
    // A million per second: the warm keys never run dry, so both sides admit.
    let section = "ttl = 1\nglobal_limit = 1000000\nhealth_limit = 1000000\n";
    let limiter = RateLimiter::new(settings(section, false), None).expect("limiter");
    let store = MemoryLimiter::new(settings(section, false).limits, 2_000_000);
    let quota = governor::Quota::with_period(Duration::from_micros(1))
        .expect("quota")
        .allow_burst(std::num::NonZeroU32::new(1_000_000).expect("burst"));
    let governor_alone = governor::RateLimiter::<LimitKey, _, _>::keyed(quota);
    let keys: Vec<LimitKey> = (0..WARM_KEYS).map(|n| LimitKey::for_ip(ip(n))).collect();
    let addresses: Vec<IpAddr> = (0..WARM_KEYS).map(ip).collect();
    let headers = http::HeaderMap::new();
    let path = "/grpc.health.v1.Health/Check";
    let key_of = |iteration: u32| &keys[(iteration % WARM_KEYS) as usize];

    let rounds = 25;
    let calls = MEMORY_ITERATIONS / rounds;
    let mut best = [f64::MAX; 5];
    let mut admitted = 0u64;
    for _ in 0..rounds {
        let figures = [
            per_call_ns(calls, |iteration| {
                if governor_alone.check_key(key_of(iteration)).is_ok() {
                    admitted += 1;
                }
            }),
            per_call_ns(calls, |iteration| {
                std::hint::black_box(store.check(Tier::Health, key_of(iteration)));
            }),
            per_call_ns(calls, |iteration| {
                std::hint::black_box(
                    limiter.count_now(Tier::Health, std::slice::from_ref(key_of(iteration))),
                );
            }),
            per_call_ns(calls, |iteration| {
                let address = addresses[(iteration % WARM_KEYS) as usize];
                std::hint::black_box(tier_for(std::hint::black_box(path)));
                std::hint::black_box(limiter.client_key(Some(address), &headers));
            }),
            // Everything the layer does per call, as it does it.
            per_call_ns(calls, |iteration| {
                let address = addresses[(iteration % WARM_KEYS) as usize];
                let tier = tier_for(std::hint::black_box(path));
                let key = limiter.client_key(Some(address), &headers);
                if limiter.gate(tier, &key).is_some() {
                    return;
                }
                let verdict = limiter
                    .count_now(tier, std::slice::from_ref(&key))
                    .expect("memory storage");
                if matches!(
                    limiter.enforce(tier, verdict, path),
                    mosaic_mesh::ratelimit::limiter::Enforcement::Admit(_)
                ) {
                    admitted += 1;
                }
            }),
        ];
        for (best, figure) in best.iter_mut().zip(figures) {
            *best = best.min(figure);
        }
    }
    assert_eq!(
        admitted,
        2 * u64::from(calls) * u64::from(rounds),
        "a warm key was refused"
    );
    let [governor_ns, store_ns, count_ns, routing_ns, ours_ns] = best;
    println!(
        "1. in-memory check, {WARM_KEYS} warm keys, best of {rounds} interleaved rounds of {calls} calls"
    );
    println!("   governor keyed check alone:        {governor_ns:8.1} ns");
    println!("   memory store check (governor + quota state + key cap): {store_ns:.1} ns");
    println!("   limiter count (store + verdict):                      {count_ns:.1} ns");
    println!("   tier lookup + client key:                             {routing_ns:.1} ns");
    println!("   mosaicd per-call limiter work:     {ours_ns:8.1} ns");
    println!(
        "   added over governor:               {:8.1} ns   (goal <= 100 ns)",
        ours_ns - governor_ns
    );
}

/// 2. Redis-backed check vs a raw EVALSHA round trip.
async fn redis_check(url: &str) {
    let prefix = format!("mosaic:rl:bench:{}:", uuid::Uuid::new_v4().simple());
    let section = format!(
        "ttl = 1\nhealth_limit = 1000000\nstorage = \"redis\"\nredis_prefix = \"{prefix}\"\nredis_timeout_ms = 1000\n"
    );
    let limiter = RateLimiter::new(settings(&section, true), Some(url)).expect("limiter");
    let client = redis::Client::open(url).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let script = redis::Script::new(GCRA_SCRIPT);
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(GCRA_SCRIPT)
        .query_async(&mut connection)
        .await
        .expect("SCRIPT LOAD");
    assert_eq!(sha, script.get_hash());
    let key = LimitKey::for_ip(ip(1));
    let bucket = format!("{prefix}health:{}", key.subject());
    let quota = settings(&section, true).limits.quota(Tier::Health);
    let interval_micros = quota.emission_interval().as_micros() as u64;

    let mut raw = Vec::with_capacity(REDIS_ITERATIONS);
    let mut ours = Vec::with_capacity(REDIS_ITERATIONS);
    // Interleaved, so drift on a shared machine hits both alike.
    for _ in 0..REDIS_ITERATIONS + 500 {
        let started = Instant::now();
        let reply: Vec<i64> = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(1)
            .arg(&bucket)
            .arg(interval_micros)
            .arg(quota.limit)
            .query_async(&mut connection)
            .await
            .expect("EVALSHA");
        raw.push(started.elapsed());
        assert_eq!(reply[0], 1, "raw script refused");

        let started = Instant::now();
        let verdict = limiter
            .check(Tier::Health, std::slice::from_ref(&key))
            .await;
        ours.push(started.elapsed());
        assert!(matches!(verdict, Verdict::Admitted(_)), "{verdict:?}");
    }
    let counters = limiter.metrics().snapshot();
    assert_eq!(counters.redis_errors, 0, "{counters:?}");
    // Drop the warm-up.
    let mut raw = raw.split_off(500);
    let mut ours = ours.split_off(500);
    raw.sort();
    ours.sort();
    println!("2. redis-backed check, {REDIS_ITERATIONS} sequential calls on loopback");
    for (name, samples) in [
        ("raw EVALSHA round trip", &raw),
        ("mosaicd redis check", &ours),
    ] {
        println!(
            "   {name:<24} mean {:>7.1} µs   p50 {:>7.1} µs   p99 {:>7.1} µs",
            mean(samples).as_secs_f64() * 1e6,
            percentile(samples, 0.5).as_secs_f64() * 1e6,
            percentile(samples, 0.99).as_secs_f64() * 1e6
        );
    }
    println!(
        "   ratio (mean):   {:.3}   ratio (p50): {:.3}   (goal <= 1.2)",
        mean(&ours).as_secs_f64() / mean(&raw).as_secs_f64(),
        percentile(&ours, 0.5).as_secs_f64() / percentile(&raw, 0.5).as_secs_f64()
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&bucket)
        .query_async(&mut connection)
        .await
        .unwrap_or(0);
}

/// 3. p99 per call with Redis down and the breaker open.
async fn redis_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let section = "ttl = 1\nhealth_limit = 1000000\nstorage = \"redis\"\nredis_timeout_ms = 50\n";
    let limiter = RateLimiter::new(settings(section, true), Some(&url)).expect("limiter");
    let memory = RateLimiter::new(settings("ttl = 1\nhealth_limit = 1000000\n", false), None)
        .expect("limiter");
    let key = LimitKey::for_ip(ip(2));
    // Three failures open the breaker.
    for _ in 0..3 {
        limiter
            .check(Tier::Health, std::slice::from_ref(&key))
            .await;
    }
    let counters = limiter.metrics().snapshot();
    assert_eq!(
        counters.breaker,
        mosaic_mesh::ratelimit::metrics::BreakerGauge::Open
    );
    let mut down = Vec::new();
    let mut in_memory = Vec::new();
    let calls = 200_000;
    for _ in 0..calls {
        let started = Instant::now();
        let verdict = limiter
            .check(Tier::Health, std::slice::from_ref(&key))
            .await;
        down.push(started.elapsed());
        assert!(matches!(verdict, Verdict::Admitted(_)));
        let started = Instant::now();
        memory.check(Tier::Health, std::slice::from_ref(&key)).await;
        in_memory.push(started.elapsed());
    }
    down.sort();
    in_memory.sort();
    let errors = limiter.metrics().snapshot().redis_errors;
    println!("3. redis down (connection refused), breaker open, {calls} calls");
    println!(
        "   p50 {:.2} µs   p99 {:.2} µs   max {:.1} µs   (memory storage p99 {:.2} µs; goal p99 <= 1 ms)",
        percentile(&down, 0.5).as_secs_f64() * 1e6,
        percentile(&down, 0.99).as_secs_f64() * 1e6,
        down.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
        percentile(&in_memory, 0.99).as_secs_f64() * 1e6,
    );
    println!("   redis attempts in all (3 to open, then one probe per cool-down): {errors}");
}

/// 4. RSS with 1 M keys, before and after pruning.
fn memory_footprint() {
    let keys = 1_000_000u32;
    let limits = TierLimits::new(Duration::from_secs(60), Tier::ALL.map(|tier| (tier, 100)))
        .expect("limits");
    let clock = FakeRelativeClock::default();
    let before_keys = rss_kib();
    let limiter = MemoryLimiter::with_clock(limits, 2_000_000, clock.clone());
    for n in 0..keys {
        limiter.check(Tier::Default, &LimitKey::for_ip(ip(n)));
    }
    let with_keys = rss_kib();
    // Two intervals later every bucket is whole again, so all keys are idle.
    clock.advance(Duration::from_secs(2));
    let started = Instant::now();
    let kept = limiter.prune();
    let prune_time = started.elapsed();
    let after = rss_kib();
    println!("4. memory: {keys} distinct client IPs");
    println!(
        "   RSS before keys {} MiB, with keys {} MiB ({} bytes/key), after pruning {} MiB ({kept} keys kept, prune took {} ms)",
        before_keys / 1024,
        with_keys / 1024,
        (with_keys.saturating_sub(before_keys)) * 1024 / u64::from(keys),
        after / 1024,
        prune_time.as_millis()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::var("MOSAIC_TEST_REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    memory_check();
    redis_check(&url).await;
    redis_down().await;
    memory_footprint();
}
