//! Prometheus metrics: call counts and durations recorded per call by [`call_record`],
//! the process and build series, the rate limiter's own counters, and gauges read
//! from the store at scrape time, served as Prometheus text by [`endpoint`] on a
//! separate plain-HTTP listener.
//!
//! The registry and the text format are the `prometheus` crate's. What lives
//! here for the daemon's lifetime (calls, durations, build info, the process
//! collector) is in one registry; what other modules own (the rate limiter's
//! atomics, the store's rows, the signed-command counts, the log writer's drops,
//! the SQLite WAL) is copied into a registry of its own at each scrape by
//! [`scrape`], so those modules keep no metrics library of their own.

pub mod access_line;
pub mod call_record;
pub mod endpoint;
pub mod log_writer;
mod scrape;
pub mod settings;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::ratelimit::RateLimitMetricsSnapshot;

/// The daemon's call metrics, its process and build series, and the metrics
/// listener's address once bound.
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    durations: HistogramVec,
    /// Open connections per serving thread (`crate::serving`).
    serving_connections: IntGaugeVec,
    /// The series of each served method, by [`crate::served::Method::index`].
    served: Box<[MethodSeries]>,
    local_address: OnceLock<SocketAddr>,
}

/// One served method's series in `calls` (one per gRPC code) and
/// `durations`, each found in its family at its first use and kept: a call
/// then neither hashes its labels nor locks the family, and a scrape still
/// shows only the series of calls made.
#[derive(Default)]
struct MethodSeries {
    calls: [OnceLock<IntCounter>; CODES],
    duration: OnceLock<Histogram>,
}

/// gRPC's codes, 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Metrics")
            .field("local_address", &self.local_address.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Gauges read from the store for one scrape.
#[derive(Debug, Default, Clone)]
pub struct StoreGauges {
    /// Agents per state (`RUNNING`, ...), one row per state that has agents.
    /// `None` when they could not be counted: the series is then left out of
    /// the scrape rather than shown as 0 in every state.
    pub agents_by_state: Option<Vec<(String, i64)>>,
    /// Jobs per state (`PENDING`, ...), one row per state that has jobs;
    /// `None` when they could not be counted.
    pub jobs_by_state: Option<Vec<(String, i64)>>,
    /// Federation connections per (state, reachable), one row per pair
    /// present; `None` when they could not be counted.
    pub peers_by_state: Option<Vec<(String, bool, i64)>>,
    /// Signed commands since start per (direction, outcome): counters.
    pub commands: Vec<(String, String, u64)>,
    /// The SQLite WAL and its checkpointer's holds; `None` on PostgreSQL.
    pub sqlite_wal: Option<crate::store::WalReading>,
    /// The replicas of the instance: (runner id, state, agents supervised).
    pub replicas: Vec<(String, String, u64)>,
}

impl Metrics {
    /// Empty call metrics, the build series and (on Linux) the process collector.
    pub fn new() -> Self {
        // The names, labels and buckets are constants checked by the unit tests:
        // creating and registering them cannot fail at run time.
        let calls = IntCounterVec::new(
            Opts::new(
                "mosaic_grpc_calls_total",
                "gRPC calls finished, by status code.",
            ),
            &["service", "method", "code"],
        )
        .expect("the call counter's name and labels are valid");
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "mosaic_grpc_call_duration_seconds",
                "Time from request to the end of the response.",
            )
            .buckets(prometheus::DEFAULT_BUCKETS.to_vec()),
            &["service", "method"],
        )
        .expect("the duration histogram's name, labels and buckets are valid");
        let build_info = IntGauge::with_opts(
            Opts::new(
                "mosaic_build_info",
                "Always 1; the labels say which build of mosaicd is running.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("the build series' name and label are valid");
        build_info.set(1);
        let serving_connections = IntGaugeVec::new(
            Opts::new(
                "mosaic_serving_thread_connections",
                "Client connections open on each serving thread (server.serving_threads).",
            ),
            &["thread"],
        )
        .expect("the serving threads' gauge name and label are valid");
        let registry = Registry::new();
        for collector in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(durations.clone()),
            Box::new(build_info),
            Box::new(serving_connections.clone()),
        ] {
            registry
                .register(collector)
                .expect("each series is registered once");
        }
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds, ...: read from /proc/self at each scrape.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process series are registered once");
        Self {
            registry,
            calls,
            durations,
            serving_connections,
            served: crate::served::all()
                .iter()
                .map(|_| MethodSeries::default())
                .collect(),
            local_address: OnceLock::new(),
        }
    }

    /// Records one finished call of a served method: as
    /// [`Metrics::record_call`] with its service and name, without looking
    /// its series up again.
    pub fn record_served(
        &self,
        method: &crate::served::Method,
        code: tonic::Code,
        duration: Duration,
    ) {
        let series = self.served.get(method.index);
        let calls = usize::try_from(code as i32)
            .ok()
            .and_then(|index| series?.calls.get(index));
        let (Some(series), Some(calls)) = (series, calls) else {
            self.record_call(
                method.service(),
                method.name(),
                crate::error::code_name(code),
                duration,
            );
            return;
        };
        calls
            .get_or_init(|| {
                self.calls.with_label_values(&[
                    method.service(),
                    method.name(),
                    crate::error::code_name(code),
                ])
            })
            .inc();
        series
            .duration
            .get_or_init(|| {
                self.durations
                    .with_label_values(&[method.service(), method.name()])
            })
            .observe(duration.as_secs_f64());
    }

    /// Records one finished call.
    pub fn record_call(&self, service: &str, method: &str, code: &str, duration: Duration) {
        self.calls.with_label_values(&[service, method, code]).inc();
        self.durations
            .with_label_values(&[service, method])
            .observe(duration.as_secs_f64());
    }

    /// The open-connection gauges of `threads` serving threads, numbered
    /// from 0.
    pub(crate) fn serving_thread_gauges(&self, threads: usize) -> Vec<IntGauge> {
        (0..threads)
            .map(|thread| {
                self.serving_connections
                    .with_label_values(&[thread.to_string().as_str()])
            })
            .collect()
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
        let mut families = self.registry.gather();
        match scrape::families(rate_limit, store) {
            Ok(read_now) => families.extend(read_now),
            // Only a programming error (a bad name) gets here; the daemon's own
            // series are still served.
            Err(error) => tracing::error!(%error, "metrics: cannot build the scraped series"),
        }
        families.sort_by(|left, right| left.name().cmp(right.name()));
        let mut text = String::new();
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
            tracing::error!(%error, "metrics: cannot encode the series");
        }
        text
    }
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
        // The library writes labels sorted by name.
        assert!(
            text.contains("mosaic_grpc_calls_total{code=\"OK\",method=\"M\",service=\"svc\"} 2\n"),
            "{text}"
        );
        assert!(text.contains(
            "mosaic_grpc_calls_total{code=\"UNAUTHENTICATED\",method=\"M\",service=\"svc\"} 1\n"
        ));
        assert!(text.contains(
            "mosaic_grpc_call_duration_seconds_bucket{method=\"M\",service=\"svc\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "mosaic_grpc_call_duration_seconds_bucket{method=\"M\",service=\"svc\",le=\"0.05\"} 3\n"
        ));
        assert!(
            text.contains(
                "mosaic_grpc_call_duration_seconds_count{method=\"M\",service=\"svc\"} 3\n"
            )
        );
    }

    #[test]
    fn a_served_method_is_shown_only_once_called_and_as_any_call() {
        let metrics = Metrics::default();
        let method = crate::served::lookup("/mosaic.coordinator.v1.Coordinator/GetJob")
            .expect("GetJob is served");
        let before = metrics.render(&empty_rate_limit(), &StoreGauges::default());
        assert!(!before.contains("GetJob"), "{before}");
        metrics.record_served(method, tonic::Code::Ok, Duration::from_millis(3));
        metrics.record_served(method, tonic::Code::Ok, Duration::from_millis(30));
        metrics.record_served(method, tonic::Code::NotFound, Duration::from_millis(1));
        let text = metrics.render(&empty_rate_limit(), &StoreGauges::default());
        let labels = "method=\"GetJob\",service=\"mosaic.coordinator.v1.Coordinator\"";
        for series in [
            format!("mosaic_grpc_calls_total{{code=\"OK\",{labels}}} 2\n"),
            format!("mosaic_grpc_calls_total{{code=\"NOT_FOUND\",{labels}}} 1\n"),
            format!("mosaic_grpc_call_duration_seconds_count{{{labels}}} 3\n"),
            format!("mosaic_grpc_call_duration_seconds_bucket{{{labels},le=\"0.005\"}} 2\n"),
        ] {
            assert!(text.contains(&series), "{series} in {text}");
        }
        assert!(!text.contains("code=\"INTERNAL\""), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::default();
        metrics.record_call("a\"b\\c\nd", "M", "OK", Duration::ZERO);
        let text = metrics.render(&empty_rate_limit(), &StoreGauges::default());
        assert!(
            text.contains(
                "mosaic_grpc_calls_total{code=\"OK\",method=\"M\",service=\"a\\\"b\\\\c\\nd\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_build_and_the_process_are_described() {
        let text = Metrics::default().render(&empty_rate_limit(), &StoreGauges::default());
        assert!(
            text.contains(&format!(
                "mosaic_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name} in {text}");
        }
    }
}
