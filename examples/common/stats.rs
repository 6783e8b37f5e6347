//! Latency samples: percentiles, means and the formatting the reports use.

use std::time::Duration;

/// Latency samples of one measurement and the wall time they took.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    /// One entry per completed call.
    pub latencies: Vec<Duration>,
    /// Wall time of the measurement windows (summed over rounds).
    pub wall: Duration,
}

impl Samples {
    /// Adds another round's samples.
    pub fn extend(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.wall += other.wall;
    }

    /// Calls per second over the wall time.
    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The `fraction` percentile (0.5 = median, 0.99 = p99).
    pub fn percentile(&self, fraction: f64) -> Duration {
        percentile(&self.latencies, fraction)
    }

    /// Median.
    pub fn p50(&self) -> Duration {
        self.percentile(0.5)
    }

    /// 99th percentile.
    pub fn p99(&self) -> Duration {
        self.percentile(0.99)
    }
}

/// The `fraction` percentile of `samples` (nearest rank); zero when empty.
pub fn percentile(samples: &[Duration], fraction: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

/// Mean of `samples`; zero when empty.
pub fn mean(samples: &[Duration]) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.iter().sum::<Duration>() / samples.len() as u32
}

/// A duration in microseconds.
pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// A duration for a table: µs below 10 ms, else ms.
pub fn human(duration: Duration) -> String {
    let micros = micros(duration);
    if micros < 10_000.0 {
        format!("{micros:.0} µs")
    } else {
        format!("{:.1} ms", micros / 1000.0)
    }
}

/// The median of `values` (the mean of the middle two for an even count),
/// or NaN when there are none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The benchmark setting in the variable `name`, or `default` when it is
/// unset or does not parse.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// `value / base`, or NaN when the base is zero.
pub fn ratio(value: f64, base: f64) -> f64 {
    if base == 0.0 { f64::NAN } else { value / base }
}

/// "met" or "**not met**" for a goal check.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}
