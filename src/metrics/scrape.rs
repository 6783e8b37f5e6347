//! The series read at scrape time — the rate limiter's counters, the store's
//! gauges, the signed commands, the log writer's drops and the SQLite WAL —
//! copied into a registry made for one scrape and gathered from it.
//!
//! Gauges of states are written for every state the daemon knows, 0 included,
//! so a dashboard or an alert sees `0` rather than no series. Likewise every
//! rate-limit tier has its counters from the start.

use std::collections::BTreeMap;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::StoreGauges;
use crate::agents::model::AgentState;
use crate::coordinator::state::JobState;
use crate::federation::state::ConnectionState;
use crate::ratelimit::metrics::{BreakerGauge, TierCounts};
use crate::ratelimit::{RateLimitMetricsSnapshot, Tier};

/// The families of one scrape, from `rate_limit` and `store`.
pub(super) fn families(
    rate_limit: &RateLimitMetricsSnapshot,
    store: &StoreGauges,
) -> prometheus::Result<Vec<MetricFamily>> {
    let scrape = Scrape {
        registry: Registry::new(),
    };
    rate_limit_series(&scrape, rate_limit)?;
    state_gauges(&scrape, store)?;
    let commands = scrape.register(IntCounterVec::new(
        Opts::new(
            "mosaic_commands_total",
            "Signed commands received (in) and sent (out) since start, by outcome (ok or the gRPC code).",
        ),
        &["direction", "outcome"],
    )?)?;
    for (direction, outcome, count) in &store.commands {
        let direction = if direction == "inbound" { "in" } else { "out" };
        commands
            .get_metric_with_label_values(&[direction, outcome.as_str()])?
            .inc_by(*count);
    }
    let replicas = scrape.register(IntGaugeVec::new(
        Opts::new(
            "mosaic_replica_agents",
            "Agents each replica of this instance supervises, with the replica's state (serving, expired, stopped, lost), read at scrape time.",
        ),
        &["runner_id", "state"],
    )?)?;
    for (runner_id, state, agents) in &store.replicas {
        replicas
            .get_metric_with_label_values(&[runner_id.as_str(), state.as_str()])?
            .set(i64::try_from(*agents).unwrap_or(i64::MAX));
    }
    scrape
        .register(IntCounter::new(
            "mosaic_log_lines_dropped_total",
            "Log lines dropped because the log's queue to stderr was full (stderr slower than the log).",
        )?)?
        .inc_by(super::log_writer::dropped_lines());
    if let Some(wal) = &store.sqlite_wal {
        sqlite_wal_series(&scrape, wal)?;
    }
    Ok(scrape.registry.gather())
}

/// The registry of one scrape.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// Registers `collector` and hands it back to be filled in.
    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }
}

/// One per-tier outcome counter: its name, help and field.
type TierSeries = (&'static str, &'static str, fn(&TierCounts) -> u64);

const TIER_SERIES: [TierSeries; 5] = [
    (
        "mosaic_rate_limit_allowed_total",
        "Calls the rate limiter let through, by tier.",
        |counts| counts.allowed,
    ),
    (
        "mosaic_rate_limit_refused_total",
        "Calls refused with RESOURCE_EXHAUSTED, by tier.",
        |counts| counts.refused,
    ),
    (
        "mosaic_rate_limit_shadow_refused_total",
        "Calls shadow mode would have refused, by tier.",
        |counts| counts.shadow_refused,
    ),
    (
        "mosaic_rate_limit_near_limit_total",
        "Calls let through with 80% or more of a quota used, by tier.",
        |counts| counts.near_limit,
    ),
    (
        "mosaic_rate_limit_refused_from_cache_total",
        "Calls refused from the local refused-until cache, by tier.",
        |counts| counts.refused_from_cache,
    ),
];

fn rate_limit_series(
    scrape: &Scrape,
    snapshot: &RateLimitMetricsSnapshot,
) -> prometheus::Result<()> {
    for (name, help, field) in TIER_SERIES {
        let counter = scrape.register(IntCounterVec::new(Opts::new(name, help), &["tier"])?)?;
        for tier in Tier::ALL {
            counter
                .get_metric_with_label_values(&[tier.as_str()])?
                .inc_by(field(&snapshot.tier(tier)));
        }
    }
    let storage_counters: [(&str, &str, u64); 3] = [
        (
            "mosaic_rate_limit_redis_checks_total",
            "Checks answered by Redis.",
            snapshot.redis_checks,
        ),
        (
            "mosaic_rate_limit_redis_errors_total",
            "Redis checks that failed or timed out.",
            snapshot.redis_errors,
        ),
        (
            "mosaic_rate_limit_fallback_checks_total",
            "Checks answered by the in-memory fallback while Redis was unusable.",
            snapshot.fallback_checks,
        ),
    ];
    for (name, help, value) in storage_counters {
        scrape.register(IntCounter::new(name, help)?)?.inc_by(value);
    }
    scrape
        .register(IntGauge::new(
            "mosaic_rate_limit_fallback_active",
            "1 while the in-memory fallback answers instead of Redis.",
        )?)?
        .set(i64::from(snapshot.breaker != BreakerGauge::Closed));
    let breaker = scrape.register(IntGaugeVec::new(
        Opts::new(
            "mosaic_rate_limit_breaker_state",
            "1 for the Redis circuit breaker's current state.",
        ),
        &["state"],
    )?)?;
    for (state, name) in [
        (BreakerGauge::Closed, "closed"),
        (BreakerGauge::Open, "open"),
        (BreakerGauge::HalfOpen, "half_open"),
    ] {
        breaker
            .get_metric_with_label_values(&[name])?
            .set(i64::from(snapshot.breaker == state));
    }
    scrape
        .register(IntGauge::new(
            "mosaic_rate_limit_keys",
            "Keys held in memory at the last pruning.",
        )?)?
        .set(i64::try_from(snapshot.key_count).unwrap_or(i64::MAX));
    Ok(())
}

/// Agents, jobs and peers by state: every known state, then the rows (a state
/// stored by a newer version is shown too). A count the store could not make
/// leaves its series out.
fn state_gauges(scrape: &Scrape, store: &StoreGauges) -> prometheus::Result<()> {
    if let Some(rows) = &store.agents_by_state {
        let agents = scrape.register(IntGaugeVec::new(
            Opts::new(
                "mosaic_agents",
                "Local agents by state, read at scrape time.",
            ),
            &["state"],
        )?)?;
        let known = AgentState::ALL.map(AgentState::as_str);
        for (state, count) in with_every_state(&known, rows) {
            agents.get_metric_with_label_values(&[state])?.set(count);
        }
    }
    if let Some(rows) = &store.jobs_by_state {
        let jobs = scrape.register(IntGaugeVec::new(
            Opts::new("mosaic_jobs", "Jobs by state, read at scrape time."),
            &["state"],
        )?)?;
        let known = JobState::ALL.map(JobState::as_str);
        for (state, count) in with_every_state(&known, rows) {
            jobs.get_metric_with_label_values(&[state])?.set(count);
        }
    }
    if let Some(rows) = &store.peers_by_state {
        let peers = scrape.register(IntGaugeVec::new(
            Opts::new(
                "mosaic_peers",
                "Federation connections by state and reachability, read at scrape time.",
            ),
            &["state", "reachable"],
        )?)?;
        let mut by_state_and_reachability: BTreeMap<(&str, bool), i64> = ConnectionState::ALL
            .into_iter()
            .flat_map(|state| [(state.as_str(), false), (state.as_str(), true)])
            .map(|pair| (pair, 0))
            .collect();
        for (state, reachable, count) in rows {
            *by_state_and_reachability
                .entry((state.as_str(), *reachable))
                .or_default() += count;
        }
        for ((state, reachable), count) in by_state_and_reachability {
            let reachable = if reachable { "true" } else { "false" };
            peers
                .get_metric_with_label_values(&[state, reachable])?
                .set(count);
        }
    }
    Ok(())
}

/// `rows` with a 0 for each of `known` that has no row.
fn with_every_state<'a>(known: &[&'a str], rows: &'a [(String, i64)]) -> BTreeMap<&'a str, i64> {
    let mut counts: BTreeMap<&str, i64> = known.iter().map(|state| (*state, 0)).collect();
    for (state, count) in rows {
        *counts.entry(state.as_str()).or_default() += count;
    }
    counts
}

fn sqlite_wal_series(scrape: &Scrape, wal: &crate::store::WalReading) -> prometheus::Result<()> {
    scrape
        .register(IntGauge::new(
            "mosaic_sqlite_wal_bytes",
            "Length of the SQLite write-ahead log file (storage.sqlite_wal_max_mb bounds it).",
        )?)?
        .set(i64::try_from(wal.wal_bytes).unwrap_or(i64::MAX));
    scrape
        .register(IntCounter::new(
            "mosaic_sqlite_wal_truncations_total",
            "Checkpoints that emptied the SQLite write-ahead log, each holding queries back briefly.",
        )?)?
        .inc_by(wal.truncations);
    scrape
        .register(Counter::new(
            "mosaic_sqlite_wal_hold_seconds_total",
            "Time queries were held back while the SQLite write-ahead log was emptied.",
        )?)?
        .inc_by(wal.held.as_secs_f64());
    scrape
        .register(Gauge::new(
            "mosaic_sqlite_wal_longest_hold_seconds",
            "The longest single hold since start.",
        )?)?
        .set(wal.longest_hold.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    fn empty_rate_limit() -> RateLimitMetricsSnapshot {
        crate::ratelimit::RateLimitMetrics::default().snapshot()
    }

    #[test]
    fn store_gauges_and_breaker_render() {
        let gauges = StoreGauges {
            agents_by_state: Some(vec![("RUNNING".into(), 2)]),
            jobs_by_state: Some(vec![("PENDING".into(), 3)]),
            peers_by_state: Some(vec![("active".into(), true, 1)]),
            commands: vec![
                ("inbound".into(), "ok".into(), 4),
                ("outbound".into(), "UNAVAILABLE".into(), 1),
            ],
            sqlite_wal: Some(crate::store::WalReading {
                wal_bytes: 4096,
                truncations: 3,
                held: Duration::from_millis(21),
                longest_hold: Duration::from_millis(9),
            }),
            replicas: vec![("runner-1".into(), "serving".into(), 2)],
        };
        let text = Metrics::default().render(&empty_rate_limit(), &gauges);
        assert!(
            text.contains("mosaic_agents{state=\"RUNNING\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("mosaic_jobs{state=\"PENDING\"} 3\n"));
        assert!(
            text.contains("mosaic_replica_agents{runner_id=\"runner-1\",state=\"serving\"} 2\n")
        );
        assert!(text.contains("mosaic_peers{reachable=\"true\",state=\"active\"} 1\n"));
        assert!(text.contains("mosaic_rate_limit_breaker_state{state=\"closed\"} 1\n"));
        assert!(text.contains("mosaic_rate_limit_fallback_active 0\n"));
        assert!(text.contains("mosaic_commands_total{direction=\"in\",outcome=\"ok\"} 4\n"));
        assert!(
            text.contains("mosaic_commands_total{direction=\"out\",outcome=\"UNAVAILABLE\"} 1\n")
        );
        assert!(text.contains("mosaic_sqlite_wal_bytes 4096\n"));
        assert!(text.contains("mosaic_sqlite_wal_truncations_total 3\n"));
        assert!(text.contains("mosaic_sqlite_wal_hold_seconds_total 0.021\n"));
        assert!(text.contains("mosaic_sqlite_wal_longest_hold_seconds 0.009\n"));
    }

    #[test]
    fn every_state_has_a_gauge_even_at_zero() {
        let gauges = StoreGauges {
            agents_by_state: Some(vec![("RUNNING".into(), 2)]),
            jobs_by_state: Some(Vec::new()),
            peers_by_state: Some(Vec::new()),
            ..StoreGauges::default()
        };
        let text = Metrics::default().render(&empty_rate_limit(), &gauges);
        for state in AgentState::ALL {
            let count = if state == AgentState::Running { 2 } else { 0 };
            let series = format!("mosaic_agents{{state=\"{}\"}} {count}\n", state.as_str());
            assert!(text.contains(&series), "{series} in {text}");
        }
        for state in JobState::ALL {
            let series = format!("mosaic_jobs{{state=\"{}\"}} 0\n", state.as_str());
            assert!(text.contains(&series), "{series} in {text}");
        }
        for state in ConnectionState::ALL {
            for reachable in ["false", "true"] {
                let series = format!(
                    "mosaic_peers{{reachable=\"{reachable}\",state=\"{}\"}} 0\n",
                    state.as_str()
                );
                assert!(text.contains(&series), "{series} in {text}");
            }
        }
    }

    #[test]
    fn a_count_the_store_could_not_make_is_left_out_not_zero() {
        let gauges = StoreGauges {
            agents_by_state: None,
            jobs_by_state: Some(Vec::new()),
            peers_by_state: None,
            ..StoreGauges::default()
        };
        let text = Metrics::default().render(&empty_rate_limit(), &gauges);
        assert!(!text.contains("mosaic_agents"), "{text}");
        assert!(!text.contains("mosaic_peers"), "{text}");
        assert!(
            text.contains("mosaic_jobs{state=\"PENDING\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn rate_limit_outcomes_carry_their_tier() {
        let limiter = crate::ratelimit::RateLimitMetrics::default();
        limiter.refused(Tier::Health, false);
        limiter.allowed(Tier::Webhook, true);
        let text = Metrics::default().render(&limiter.snapshot(), &StoreGauges::default());
        assert!(
            text.contains("mosaic_rate_limit_refused_total{tier=\"health\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("mosaic_rate_limit_refused_total{tier=\"webhook\"} 0\n"));
        assert!(text.contains("mosaic_rate_limit_allowed_total{tier=\"webhook\"} 1\n"));
        assert!(text.contains("mosaic_rate_limit_near_limit_total{tier=\"webhook\"} 1\n"));
        for tier in Tier::ALL {
            let series = format!(
                "mosaic_rate_limit_refused_from_cache_total{{tier=\"{}\"}} 0\n",
                tier.as_str()
            );
            assert!(text.contains(&series), "{series} in {text}");
        }
        assert!(text.contains("mosaic_rate_limit_redis_checks_total 0\n"));
    }
}
