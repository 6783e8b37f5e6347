//! A lease: one holder's claim on one thing for a limited time, fenced by a
//! token that grows with every change of holder. Pure: the time comes from an
//! injected [`Clock`], nothing is stored here.
//!
//! The holder renews before the lease expires; another may take it over only
//! once it has expired, and gets the next token. Whoever acts for the holder
//! carries the token it was granted, and whatever it acts on refuses a token
//! older than the newest it has seen, so a holder that paused past its expiry
//! (a GC pause, a stopped VM) cannot overwrite what its successor did.

use std::time::Duration;

use crate::clock::Clock;

/// One holder's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it (a replica's runner id).
    pub holder: String,
    /// The fencing token: 1 for the first holder, one more per takeover.
    pub token: u64,
    /// When it lapses unless renewed, epoch milliseconds.
    pub expires_at_ms: i64,
}

/// Why a lease was not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds it and it has not expired.
    #[error("held by {holder} until {expires_at_ms}")]
    Held {
        /// The current holder.
        holder: String,
        /// When it lapses.
        expires_at_ms: i64,
    },
    /// The renewer's lease expired (or was never its own): it must take it
    /// over like anyone else, with a new token.
    #[error("the lease is no longer held by {holder}")]
    Lost {
        /// Who asked to renew.
        holder: String,
    },
}

impl Lease {
    /// The first lease on a thing: token 1, for `ttl` from now.
    pub fn grant(holder: &str, clock: &dyn Clock, ttl: Duration) -> Lease {
        Lease {
            holder: holder.to_owned(),
            token: 1,
            expires_at_ms: expiry(clock, ttl),
        }
    }

    /// Whether `holder` holds it now.
    pub fn is_held_by(&self, holder: &str, clock: &dyn Clock) -> bool {
        self.holder == holder && !self.is_expired(clock)
    }

    /// Whether it has lapsed.
    pub fn is_expired(&self, clock: &dyn Clock) -> bool {
        clock.now_ms() >= self.expires_at_ms
    }

    /// The holder's lease for `ttl` more from now, same token; refused once
    /// it has expired or to anyone else.
    pub fn renew(
        &self,
        holder: &str,
        clock: &dyn Clock,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        if !self.is_held_by(holder, clock) {
            return Err(LeaseError::Lost {
                holder: holder.to_owned(),
            });
        }
        Ok(Lease {
            expires_at_ms: expiry(clock, ttl),
            ..self.clone()
        })
    }

    /// `holder`'s lease after this one expired, with the next token; refused
    /// while it is still held.
    pub fn take_over(
        &self,
        holder: &str,
        clock: &dyn Clock,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        if !self.is_expired(clock) {
            return Err(LeaseError::Held {
                holder: self.holder.clone(),
                expires_at_ms: self.expires_at_ms,
            });
        }
        Ok(Lease {
            holder: holder.to_owned(),
            token: self.token.saturating_add(1),
            expires_at_ms: expiry(clock, ttl),
        })
    }

    /// Whether an action carrying `token` may still act on what this lease
    /// guards: not if a later holder has taken it over since.
    pub fn admits(&self, token: u64) -> bool {
        token >= self.token
    }
}

fn expiry(clock: &dyn Clock, ttl: Duration) -> i64 {
    clock
        .now_ms()
        .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn the_holder_renews_before_expiry_and_others_are_refused() {
        let clock = ManualClock::at(1_000);
        let lease = Lease::grant("a", &clock, TTL);
        assert_eq!(lease.expires_at_ms, 11_000);
        assert!(lease.is_held_by("a", &clock));
        clock.advance(9_000);
        let renewed = lease.renew("a", &clock, TTL).expect("renew");
        assert_eq!((renewed.token, renewed.expires_at_ms), (1, 20_000));
        assert_eq!(
            renewed.take_over("b", &clock, TTL),
            Err(LeaseError::Held {
                holder: "a".to_owned(),
                expires_at_ms: 20_000
            })
        );
        assert!(matches!(
            renewed.renew("b", &clock, TTL),
            Err(LeaseError::Lost { .. })
        ));
    }

    #[test]
    fn after_expiry_another_takes_over_and_the_old_token_is_fenced() {
        let clock = ManualClock::at(0);
        let first = Lease::grant("a", &clock, TTL);
        clock.advance(10_000);
        assert!(first.is_expired(&clock));
        assert_eq!(
            first.renew("a", &clock, TTL),
            Err(LeaseError::Lost {
                holder: "a".to_owned()
            })
        );
        let second = first.take_over("b", &clock, TTL).expect("take over");
        assert_eq!((second.holder.as_str(), second.token), ("b", 2));
        assert!(second.admits(2));
        assert!(
            !second.admits(first.token),
            "the first holder's token must be refused"
        );
    }
}
