//! The circuit breaker in front of Redis: after a run of failures it stops calling
//! Redis for a cool-down, then lets one probe through; a successful probe closes
//! it again. Pure: the caller passes the time in, so tests need no clock.

use std::time::Duration;

use tokio::time::Instant;

use super::metrics::BreakerGauge;

/// What the breaker lets a caller do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Call Redis.
    Call,
    /// Call Redis as the one probe after a cool-down.
    Probe,
    /// Do not call Redis; use the fallback.
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

/// A change worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Redis is now skipped.
    Opened,
    /// Redis is used again.
    Closed,
}

/// See the module documentation.
#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cooldown: Duration,
    state: State,
}

impl CircuitBreaker {
    /// Opens after `failure_threshold` consecutive failures, probes after `cooldown`.
    pub fn new(failure_threshold: u32, cooldown: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            cooldown,
            state: State::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// Whether a call at `now` may use Redis. A probe that never reported back
    /// (its caller went away) is replaced by a new one after another cool-down,
    /// so the breaker cannot stay half-open forever.
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Call,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probe_started: now };
                Permit::Probe
            }
            State::Open { .. } => Permit::Skip,
            State::HalfOpen { probe_started } if now >= probe_started + self.cooldown => {
                self.state = State::HalfOpen { probe_started: now };
                Permit::Probe
            }
            State::HalfOpen { .. } => Permit::Skip,
        }
    }

    /// Redis answered.
    pub fn record_success(&mut self) -> Option<Transition> {
        let was_closed = matches!(self.state, State::Closed { .. });
        self.state = State::Closed {
            consecutive_failures: 0,
        };
        (!was_closed).then_some(Transition::Closed)
    }

    /// Redis failed or timed out at `now`.
    pub fn record_failure(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed {
                consecutive_failures,
            } => {
                let failures = consecutive_failures + 1;
                if failures >= self.failure_threshold {
                    self.state = State::Open {
                        until: now + self.cooldown,
                    };
                    Some(Transition::Opened)
                } else {
                    self.state = State::Closed {
                        consecutive_failures: failures,
                    };
                    None
                }
            }
            State::HalfOpen { .. } | State::Open { .. } => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                None
            }
        }
    }

    /// The state as exported in the metrics.
    pub fn gauge(&self) -> BreakerGauge {
        match self.state {
            State::Closed { .. } => BreakerGauge::Closed,
            State::Open { .. } => BreakerGauge::Open,
            State::HalfOpen { .. } => BreakerGauge::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(5);

    #[test]
    fn opens_after_the_threshold_and_skips_until_the_cooldown() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, COOLDOWN);
        assert_eq!(breaker.record_failure(start), None);
        assert_eq!(breaker.record_failure(start), None);
        assert_eq!(breaker.permit(start), Permit::Call);
        assert_eq!(breaker.record_failure(start), Some(Transition::Opened));
        assert_eq!(breaker.permit(start), Permit::Skip);
        assert_eq!(breaker.permit(start + COOLDOWN / 2), Permit::Skip);
        assert_eq!(breaker.gauge(), BreakerGauge::Open);
    }

    #[test]
    fn a_success_resets_the_failure_run() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, COOLDOWN);
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.record_success(), None);
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.permit(start), Permit::Call);
    }

    #[test]
    fn one_probe_after_the_cooldown_closes_or_reopens() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, COOLDOWN);
        breaker.record_failure(start);
        let later = start + COOLDOWN;
        assert_eq!(breaker.permit(later), Permit::Probe);
        assert_eq!(
            breaker.permit(later),
            Permit::Skip,
            "only one probe at a time"
        );
        assert_eq!(breaker.gauge(), BreakerGauge::HalfOpen);
        // The probe fails: open for another cool-down.
        assert_eq!(breaker.record_failure(later), None);
        assert_eq!(breaker.permit(later + COOLDOWN / 2), Permit::Skip);
        assert_eq!(breaker.permit(later + COOLDOWN), Permit::Probe);
        // This probe succeeds: closed.
        assert_eq!(breaker.record_success(), Some(Transition::Closed));
        assert_eq!(breaker.permit(later + COOLDOWN), Permit::Call);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_a_cooldown() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, COOLDOWN);
        breaker.record_failure(start);
        assert_eq!(breaker.permit(start + COOLDOWN), Permit::Probe);
        assert_eq!(breaker.permit(start + COOLDOWN * 2), Permit::Probe);
    }
}
