//! Wall-clock time as epoch milliseconds, the one unit every stored time uses,
//! and the [`Clock`] that logic depending on time is given (tests set it).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
///
/// Stored times are epoch milliseconds so that one SQL type (`BIGINT`) serves both
/// SQLite and PostgreSQL. A clock before 1970 reads as 0 rather than panicking.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Converts epoch milliseconds to a protobuf `Timestamp`.
pub fn timestamp_from_ms(epoch_ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: epoch_ms.div_euclid(1000),
        nanos: i32::try_from(epoch_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Converts a protobuf `Timestamp` to epoch milliseconds (saturating).
pub fn ms_from_timestamp(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(timestamp.nanos) / 1_000_000)
}

/// Where logic that depends on time reads it, so that a test can set the time
/// instead of sleeping (leases, expiries). Epoch milliseconds, like `now_ms`.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch, now.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock: [`now_ms`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock reading `epoch_ms`.
    pub fn at(epoch_ms: i64) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicI64::new(epoch_ms))
    }

    /// Moves the clock forward by `elapsed_ms`.
    pub fn advance(&self, elapsed_ms: i64) {
        self.0
            .fetch_add(elapsed_ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_negative_times() {
        for epoch_ms in [0, 1, 999, 1_000, 1_763_900_000_123, -1, -1_500] {
            assert_eq!(ms_from_timestamp(&timestamp_from_ms(epoch_ms)), epoch_ms);
        }
    }
}
