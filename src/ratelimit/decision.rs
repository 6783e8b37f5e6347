//! What a check decides: admitted with the quota left (for the `x-ratelimit-*`
//! headers), or refused with who was refused and how long to wait. Pure.

use std::time::Duration;

use super::key::LimitKey;
use super::tiers::Tier;

/// The state of the tightest quota a call was counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// Calls per window of that quota.
    pub limit: u32,
    /// Calls left right now.
    pub remaining: u32,
    /// Time until the quota is whole again.
    pub reset: Duration,
}

impl QuotaState {
    /// Whether 80 % or more of the quota is used.
    pub fn near_limit(&self) -> bool {
        u64::from(self.remaining) * 5 <= u64::from(self.limit)
    }

    /// The tighter of two states (fewer calls left; then the later reset).
    pub fn tighter(self, other: QuotaState) -> QuotaState {
        match self.remaining.cmp(&other.remaining) {
            std::cmp::Ordering::Less => self,
            std::cmp::Ordering::Greater => other,
            std::cmp::Ordering::Equal if other.reset > self.reset => other,
            std::cmp::Ordering::Equal => self,
        }
    }
}

/// A call that must wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The key whose quota is spent.
    pub key: LimitKey,
    /// The tier of the method.
    pub tier: Tier,
    /// That quota's calls per window.
    pub limit: u32,
    /// The window.
    pub window: Duration,
    /// How long until the call would be admitted.
    pub retry_after: Duration,
}

impl Refusal {
    /// Whole seconds to wait, rounded up and never 0 (`retry-after: 0` would invite
    /// an immediate retry that is refused again).
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs();
        let rounded = if self.retry_after.subsec_nanos() > 0 {
            secs + 1
        } else {
            secs
        };
        rounded.max(1)
    }

    /// The quota state a refused call reports in its headers.
    pub fn quota_state(&self) -> QuotaState {
        QuotaState {
            limit: self.limit,
            remaining: 0,
            reset: self.retry_after,
        }
    }
}

/// The outcome of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the call through.
    Admitted(QuotaState),
    /// Refuse it. Boxed: refusals are the rare path, and a small verdict keeps
    /// the admitted path from copying a large value through every layer.
    Refused(Box<Refusal>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(retry_after: Duration) -> Refusal {
        Refusal {
            key: LimitKey::Overflow,
            tier: Tier::Default,
            limit: 10,
            window: Duration::from_secs(60),
            retry_after,
        }
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(refusal(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(refusal(Duration::from_millis(1)).retry_after_secs(), 1);
        assert_eq!(refusal(Duration::from_millis(1000)).retry_after_secs(), 1);
        assert_eq!(refusal(Duration::from_millis(1001)).retry_after_secs(), 2);
    }

    #[test]
    fn near_limit_means_eighty_percent_used() {
        let state = |remaining| QuotaState {
            limit: 100,
            remaining,
            reset: Duration::ZERO,
        };
        assert!(state(20).near_limit());
        assert!(!state(21).near_limit());
        assert_eq!(state(5).tighter(state(7)).remaining, 5);
    }
}
