//! Prometheus metrics: call counts and durations recorded by [`layer::MetricsLayer`],
//! the rate limiter's own counters, and gauges read from the store at scrape time,
//! served as Prometheus text by [`endpoint`] on a separate plain-HTTP listener.
//!
//! The text format is written by hand: the series are few and fixed, and a small
//! renderer avoids a registry crate whose only job here would be formatting.

pub mod endpoint;
pub mod layer;
pub mod log_writer;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::ratelimit::RateLimitMetricsSnapshot;
use crate::ratelimit::metrics::BreakerGauge;

/// Upper bounds of the duration histogram, in seconds (Prometheus' defaults).
const DURATION_BUCKETS_SECONDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One histogram's cumulative-on-render bucket counts.
#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations that fell in each bucket (not cumulative).
    bucket_counts: [u64; DURATION_BUCKETS_SECONDS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(index) = DURATION_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            && let Some(bucket) = self.bucket_counts.get_mut(index)
        {
            *bucket += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// (service, method)
type MethodLabels = (String, String);

/// The daemon's call metrics and the metrics listener's address once bound.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(String, String, String), u64>>,
    durations: Mutex<BTreeMap<MethodLabels, Histogram>>,
    local_address: OnceLock<SocketAddr>,
}

/// Gauges read from the store for one scrape.
#[derive(Debug, Default, Clone)]
pub struct StoreGauges {
    /// Agents per state (`RUNNING`, ...).
    pub agents_by_state: Vec<(String, i64)>,
    /// Jobs per state (`PENDING`, ...).
    pub jobs_by_state: Vec<(String, i64)>,
    /// Federation connections per (state, reachable).
    pub peers_by_state: Vec<(String, bool, i64)>,
    /// Signed commands since start per (direction, outcome): counters.
    pub commands: Vec<(String, String, u64)>,
    /// The SQLite WAL and its checkpointer's holds; `None` on PostgreSQL.
    pub sqlite_wal: Option<crate::store::WalReading>,
    /// The replicas of the instance: (runner id, state, agents supervised).
    pub replicas: Vec<(String, String, u64)>,
}

impl Metrics {
    /// Records one finished call.
    pub fn record_call(&self, service: &str, method: &str, code: &str, duration: Duration) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls
                .entry((service.to_owned(), method.to_owned(), code.to_owned()))
                .or_insert(0) += 1;
        }
        if let Ok(mut durations) = self.durations.lock() {
            durations
                .entry((service.to_owned(), method.to_owned()))
                .or_default()
                .observe(duration.as_secs_f64());
        }
    }

    /// The metrics listener's address, once it is bound.
    pub fn local_address(&self) -> Option<SocketAddr> {
        self.local_address.get().copied()
    }

    pub(crate) fn set_local_address(&self, address: SocketAddr) {
        let _ = self.local_address.set(address);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, rate_limit: &RateLimitMetricsSnapshot, store: &StoreGauges) -> String {
        let mut text = String::new();
        text.push_str("# HELP mosaic_grpc_calls_total gRPC calls finished, by status code.\n");
        text.push_str("# TYPE mosaic_grpc_calls_total counter\n");
        if let Ok(calls) = self.calls.lock() {
            for ((service, method, code), count) in calls.iter() {
                let _ = writeln!(
                    text,
                    "mosaic_grpc_calls_total{{service=\"{}\",method=\"{}\",code=\"{}\"}} {count}",
                    escape(service),
                    escape(method),
                    escape(code)
                );
            }
        }
        text.push_str("# HELP mosaic_grpc_call_duration_seconds Time from request to the end of the response.\n");
        text.push_str("# TYPE mosaic_grpc_call_duration_seconds histogram\n");
        if let Ok(durations) = self.durations.lock() {
            for ((service, method), histogram) in durations.iter() {
                let labels = format!(
                    "service=\"{}\",method=\"{}\"",
                    escape(service),
                    escape(method)
                );
                let mut cumulative = 0;
                for (bound, bucket) in DURATION_BUCKETS_SECONDS
                    .iter()
                    .zip(histogram.bucket_counts.iter())
                {
                    cumulative += bucket;
                    let _ = writeln!(
                        text,
                        "mosaic_grpc_call_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    text,
                    "mosaic_grpc_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                    histogram.count
                );
                let _ = writeln!(
                    text,
                    "mosaic_grpc_call_duration_seconds_sum{{{labels}}} {}",
                    histogram.sum_seconds
                );
                let _ = writeln!(
                    text,
                    "mosaic_grpc_call_duration_seconds_count{{{labels}}} {}",
                    histogram.count
                );
            }
        }
        render_rate_limit(&mut text, rate_limit);
        text.push_str("# HELP mosaic_agents Local agents by state, read at scrape time.\n");
        text.push_str("# TYPE mosaic_agents gauge\n");
        for (state, count) in &store.agents_by_state {
            let _ = writeln!(text, "mosaic_agents{{state=\"{}\"}} {count}", escape(state));
        }
        text.push_str("# HELP mosaic_jobs Jobs by state, read at scrape time.\n");
        text.push_str("# TYPE mosaic_jobs gauge\n");
        for (state, count) in &store.jobs_by_state {
            let _ = writeln!(text, "mosaic_jobs{{state=\"{}\"}} {count}", escape(state));
        }
        text.push_str(
            "# HELP mosaic_peers Federation connections by state and reachability, read at scrape time.\n",
        );
        text.push_str("# TYPE mosaic_peers gauge\n");
        for (state, reachable, count) in &store.peers_by_state {
            let _ = writeln!(
                text,
                "mosaic_peers{{state=\"{}\",reachable=\"{reachable}\"}} {count}",
                escape(state)
            );
        }
        text.push_str(
            "# HELP mosaic_commands_total Signed commands received (in) and sent (out) since start, by outcome (ok or the gRPC code).\n",
        );
        text.push_str("# TYPE mosaic_commands_total counter\n");
        for (direction, outcome, count) in &store.commands {
            let direction = if direction == "inbound" { "in" } else { "out" };
            let _ = writeln!(
                text,
                "mosaic_commands_total{{direction=\"{direction}\",outcome=\"{}\"}} {count}",
                escape(outcome)
            );
        }
        text.push_str(
            "# HELP mosaic_replica_agents Agents each replica of this instance supervises, with the replica's state (serving, expired, stopped, lost), read at scrape time.\n",
        );
        text.push_str("# TYPE mosaic_replica_agents gauge\n");
        for (runner_id, state, agents) in &store.replicas {
            let _ = writeln!(
                text,
                "mosaic_replica_agents{{runner_id=\"{}\",state=\"{}\"}} {agents}",
                escape(runner_id),
                escape(state)
            );
        }
        text.push_str(
            "# HELP mosaic_log_lines_dropped_total Log lines dropped because the log's queue to stderr was full (stderr slower than the log).\n",
        );
        text.push_str("# TYPE mosaic_log_lines_dropped_total counter\n");
        let _ = writeln!(
            text,
            "mosaic_log_lines_dropped_total {}",
            log_writer::dropped_lines()
        );
        if let Some(wal) = &store.sqlite_wal {
            render_sqlite_wal(&mut text, wal);
        }
        text
    }
}

fn render_sqlite_wal(text: &mut String, wal: &crate::store::WalReading) {
    let series: [(&str, &str, &str, String); 4] = [
        (
            "mosaic_sqlite_wal_bytes",
            "gauge",
            "Length of the SQLite write-ahead log file (storage.sqlite_wal_max_mb bounds it).",
            wal.wal_bytes.to_string(),
        ),
        (
            "mosaic_sqlite_wal_truncations_total",
            "counter",
            "Checkpoints that emptied the SQLite write-ahead log, each holding queries back briefly.",
            wal.truncations.to_string(),
        ),
        (
            "mosaic_sqlite_wal_hold_seconds_total",
            "counter",
            "Time queries were held back while the SQLite write-ahead log was emptied.",
            wal.held.as_secs_f64().to_string(),
        ),
        (
            "mosaic_sqlite_wal_longest_hold_seconds",
            "gauge",
            "The longest single hold since start.",
            wal.longest_hold.as_secs_f64().to_string(),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        let _ = writeln!(text, "{name} {value}");
    }
}

fn render_rate_limit(text: &mut String, snapshot: &RateLimitMetricsSnapshot) {
    let counters: [(&str, &str, u64); 8] = [
        (
            "mosaic_rate_limit_allowed_total",
            "Calls the rate limiter let through.",
            snapshot.allowed,
        ),
        (
            "mosaic_rate_limit_refused_total",
            "Calls refused with RESOURCE_EXHAUSTED.",
            snapshot.refused,
        ),
        (
            "mosaic_rate_limit_shadow_refused_total",
            "Calls shadow mode would have refused.",
            snapshot.shadow_refused,
        ),
        (
            "mosaic_rate_limit_near_limit_total",
            "Calls let through with 80% or more of a quota used.",
            snapshot.near_limit,
        ),
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
        (
            "mosaic_rate_limit_refused_from_cache_total",
            "Calls refused from the local refused-until cache.",
            snapshot.refused_from_cache,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let fallback_active = u8::from(snapshot.breaker != BreakerGauge::Closed);
    let _ = writeln!(
        text,
        "# HELP mosaic_rate_limit_fallback_active 1 while the in-memory fallback answers instead of Redis.\n# TYPE mosaic_rate_limit_fallback_active gauge\nmosaic_rate_limit_fallback_active {fallback_active}"
    );
    text.push_str(
        "# HELP mosaic_rate_limit_breaker_state 1 for the Redis circuit breaker's current state.\n",
    );
    text.push_str("# TYPE mosaic_rate_limit_breaker_state gauge\n");
    for (state, name) in [
        (BreakerGauge::Closed, "closed"),
        (BreakerGauge::Open, "open"),
        (BreakerGauge::HalfOpen, "half_open"),
    ] {
        let _ = writeln!(
            text,
            "mosaic_rate_limit_breaker_state{{state=\"{name}\"}} {}",
            u8::from(snapshot.breaker == state)
        );
    }
    let _ = writeln!(
        text,
        "# HELP mosaic_rate_limit_keys Keys held in memory at the last pruning.\n# TYPE mosaic_rate_limit_keys gauge\nmosaic_rate_limit_keys {}",
        snapshot.key_count
    );
}

/// Escapes a label value per the text format (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_rate_limit() -> RateLimitMetricsSnapshot {
        crate::ratelimit::RateLimitMetrics::default().snapshot()
    }

    #[test]
    fn calls_render_as_counters_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.record_call("svc", "M", "OK", Duration::from_millis(3));
        metrics.record_call("svc", "M", "OK", Duration::from_millis(30));
        metrics.record_call("svc", "M", "UNAUTHENTICATED", Duration::from_millis(1));
        let text = metrics.render(&empty_rate_limit(), &StoreGauges::default());
        assert!(
            text.contains("mosaic_grpc_calls_total{service=\"svc\",method=\"M\",code=\"OK\"} 2\n")
        );
        assert!(text.contains(
            "mosaic_grpc_calls_total{service=\"svc\",method=\"M\",code=\"UNAUTHENTICATED\"} 1\n"
        ));
        assert!(text.contains(
            "mosaic_grpc_call_duration_seconds_bucket{service=\"svc\",method=\"M\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "mosaic_grpc_call_duration_seconds_bucket{service=\"svc\",method=\"M\",le=\"0.05\"} 3\n"
        ));
        assert!(
            text.contains(
                "mosaic_grpc_call_duration_seconds_count{service=\"svc\",method=\"M\"} 3\n"
            )
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn store_gauges_and_breaker_render() {
        let gauges = StoreGauges {
            agents_by_state: vec![("RUNNING".into(), 2)],
            jobs_by_state: vec![("PENDING".into(), 3)],
            peers_by_state: vec![("ACTIVE".into(), true, 1)],
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
        assert!(text.contains("mosaic_agents{state=\"RUNNING\"} 2\n"));
        assert!(text.contains("mosaic_jobs{state=\"PENDING\"} 3\n"));
        assert!(
            text.contains("mosaic_replica_agents{runner_id=\"runner-1\",state=\"serving\"} 2\n")
        );
        assert!(text.contains("mosaic_peers{state=\"ACTIVE\",reachable=\"true\"} 1\n"));
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
}
