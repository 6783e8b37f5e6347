//! Whether a call gets in: the client IP rate-limited before authentication,
//! the caller authenticated, then the IP and the caller's key limited
//! together.
//!
//! Order, per call:
//! 1. The client IP is known from the connection (or a trusted proxy's header);
//!    if that IP is known to be refused in the method's tier, the call is refused
//!    here — no database lookup, no Redis round trip.
//! 2. The [`Authenticator`] decides who is calling (API key validated against
//!    the store, or the verified TLS client certificate).
//! 3. Failed authentication: the IP alone is charged (and the call refused if that
//!    exceeds the IP's budget), else the auth error is returned; a random API key
//!    therefore costs its sender's IP budget and creates no state of its own.
//!    Success: one check charges the IP and the caller's key (API key id, or the
//!    instance's certificate key) together. With Redis that is one atomic script,
//!    so a refusal by either spends neither; in memory the IP comes first, so a
//!    call refused by its IP never spends the API key's budget.
//!
//! Most calls are decided without waiting ([`Door::admit_now`]): the key is
//! in the authenticator's cache and the count is answered in memory or from
//! this replica's Redis allowance. A call that needs the store or Redis is
//! [`Pending`] at the step that waits, and [`Door::admit_later`] finishes it
//! from there, so no step runs twice.

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{Authenticator, Caller, KeyLookup, remote_address};
use crate::ratelimit::decision::{QuotaState, Verdict};
use crate::ratelimit::key::LimitKey;
use crate::ratelimit::limiter::{Enforcement, RateLimiter};
use crate::ratelimit::response::{refusal_response, write_quota_headers};
use crate::served::Route;

/// The rate limiter and the authenticator, shared by every call.
pub(super) struct Door {
    pub(super) limiter: Arc<RateLimiter>,
    pub(super) authenticator: Arc<Authenticator>,
}

/// What the door decided.
pub(super) enum Admission {
    /// Let the call through as `caller`, with the quota left to report
    /// (none when no key was checked).
    Admit {
        caller: Caller,
        quota: Option<QuotaState>,
    },
    /// Answer it here (a refusal, or the authentication error).
    Answer(http::Response<tonic::body::Body>),
}

/// A call the door could not decide without waiting, and the step that
/// waits.
pub(super) struct Pending {
    route: Route,
    step: Step,
}

enum Step {
    /// Read the API key from the store.
    LookUp { ip_key: LimitKey, lookup: KeyLookup },
    /// Count the call in Redis.
    Count(Counting),
}

/// A count, and what follows it.
struct Counting {
    keys: Keys,
    then: Then,
}

/// What a counted call gets unless the count refuses it.
enum Then {
    /// In, as this caller.
    Admit(Caller),
    /// The authentication error.
    Answer(tonic::Status),
}

/// The keys a call is counted against: the client IP's, then the caller's
/// if it has one (no vector per call).
enum Keys {
    Ip([LimitKey; 1]),
    IpAndCaller([LimitKey; 2]),
}

impl Keys {
    fn as_slice(&self) -> &[LimitKey] {
        match self {
            Keys::Ip(keys) => keys,
            Keys::IpAndCaller(keys) => keys,
        }
    }
}

impl Door {
    /// Decides a call to `path` (routed as `route`) from its headers and
    /// its connection's `extensions`, unless a step must wait.
    pub(super) fn admit_now(
        &self,
        route: Route,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Admission, Pending> {
        let tier = route.tier;
        let limiter = &self.limiter;
        let ip_key = limiter.client_key(remote_ip(extensions), headers);
        if !limiter.settings().shadow
            && let Some(refusal) = limiter.gate(tier, &ip_key)
            && let Enforcement::Refuse(refusal) =
                limiter.enforce(tier, Verdict::Refused(Box::new(refusal)), path)
        {
            return Ok(Admission::Answer(refusal_response(&refusal)));
        }
        // The certificate is parsed only for the methods that use it.
        let peer_key = (route.requirement == Some(crate::auth::Requirement::PeerCertificate))
            .then(|| crate::auth::peer_key_of(extensions))
            .flatten();
        let step = match self
            .authenticator
            .authenticate_now(route.requirement, headers, peer_key)
        {
            Ok(authenticated) => match self.authenticated(route, path, ip_key, authenticated) {
                Ok(admission) => return Ok(admission),
                Err(counting) => Step::Count(counting),
            },
            Err(lookup) => Step::LookUp { ip_key, lookup },
        };
        Err(Pending { route, step })
    }

    /// Finishes deciding a call [`Self::admit_now`] left pending, from the
    /// step that waits.
    pub(super) async fn admit_later(&self, pending: Pending, path: &str) -> Admission {
        let Pending { route, step } = pending;
        let Counting { keys, then } = match step {
            Step::LookUp { ip_key, lookup } => {
                let authenticated = self.authenticator.look_up(lookup).await;
                match self.authenticated(route, path, ip_key, authenticated) {
                    Ok(admission) => return admission,
                    Err(counting) => counting,
                }
            }
            Step::Count(counting) => counting,
        };
        let verdict = self.limiter.count(route.tier, keys.as_slice()).await;
        self.decided(route, path, verdict, then)
    }

    /// After authentication: counts the call against the IP and the
    /// caller's key (gated first), or against the IP alone when
    /// authentication failed; the count is left to the caller when only
    /// Redis can answer it.
    fn authenticated(
        &self,
        route: Route,
        path: &str,
        ip_key: LimitKey,
        authenticated: Result<Caller, tonic::Status>,
    ) -> Result<Admission, Counting> {
        let (keys, then) = match authenticated {
            // Charged to the IP only. Over its budget, the call is refused
            // as any other; within it, the answer is the auth error.
            Err(status) => (Keys::Ip([ip_key]), Then::Answer(status)),
            Ok(caller) => match LimitKey::for_caller(&caller) {
                None => (Keys::Ip([ip_key]), Then::Admit(caller)),
                Some(caller_key) => {
                    if let Some(refusal) = self.limiter.gate(route.tier, &caller_key) {
                        let verdict = Verdict::Refused(Box::new(refusal));
                        return Ok(self.decided(route, path, verdict, Then::Admit(caller)));
                    }
                    (Keys::IpAndCaller([ip_key, caller_key]), Then::Admit(caller))
                }
            },
        };
        match self.limiter.count_now(route.tier, keys.as_slice()) {
            Some(verdict) => Ok(self.decided(route, path, verdict, then)),
            None => Err(Counting { keys, then }),
        }
    }

    /// What a call counted with `verdict` gets.
    fn decided(&self, route: Route, path: &str, verdict: Verdict, then: Then) -> Admission {
        let quota = match self.limiter.enforce(route.tier, verdict, path) {
            Enforcement::Refuse(refusal) => return Admission::Answer(refusal_response(&refusal)),
            Enforcement::Admit(quota) => quota,
        };
        match then {
            Then::Admit(caller) => Admission::Admit { caller, quota },
            Then::Answer(status) => {
                let mut response = status.into_http();
                if let Some(quota) = quota {
                    write_quota_headers(response.headers_mut(), &quota);
                }
                Admission::Answer(response)
            }
        }
    }
}

/// The remote address of the connection (TLS or plaintext).
fn remote_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    remote_address(extensions).map(|address| address.ip())
}
