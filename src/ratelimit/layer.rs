//! The server's front door: one tower layer that rate-limits, authenticates and
//! rate-limits again, before any handler runs.
//!
//! Order, per call:
//! 1. The client IP is known from the connection (or a trusted proxy's header);
//!    if that IP is known to be refused in the method's tier, the call is refused
//!    here — no database lookup, no Redis round trip.
//! 2. The existing [`Authenticator`] decides who is calling (API key validated
//!    against the store, or the verified TLS client certificate).
//! 3. Failed authentication: the IP alone is charged (and the call refused if that
//!    exceeds the IP's budget), else the auth error is returned; a random API key
//!    therefore costs its sender's IP budget and creates no state of its own.
//!    Success: one check charges the IP and the caller's key (API key id, or the
//!    instance's certificate key) together. With Redis that is one atomic script,
//!    so a refusal by either spends neither; in memory the IP comes first, so a
//!    call refused by its IP never spends the API key's budget.
//!
//! Both checks live in one layer because the second depends on the first and on
//! the authentication between them; two layers would have to pass half-finished
//! state through request extensions.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::decision::{QuotaState, Verdict};
use super::key::LimitKey;
use super::limiter::{Enforcement, RateLimiter};
use super::response::{refusal_response, write_quota_headers};
use crate::auth::{Authenticator, CallerSlot, remote_address};

/// See the module documentation.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
    authenticator: Arc<Authenticator>,
}

impl RateLimitLayer {
    /// A front door limiting with `limiter` and authenticating with `authenticator`.
    pub fn new(limiter: Arc<RateLimiter>, authenticator: Arc<Authenticator>) -> Self {
        Self {
            limiter,
            authenticator,
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: Arc::clone(&self.limiter),
            authenticator: Arc::clone(&self.authenticator),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
    authenticator: Arc<Authenticator>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RateLimitService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness is the one to call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = Arc::clone(&self.limiter);
        let authenticator = Arc::clone(&self.authenticator);
        Box::pin(async move {
            // A shared reference to the request's path, not a copy.
            let path_and_query = request.uri().path_and_query().cloned();
            let path = path_and_query
                .as_ref()
                .map_or("", http::uri::PathAndQuery::path);
            let route = crate::served::route(path);
            let tier = route.tier;
            let ip_key = limiter.client_key(remote_ip(request.extensions()), request.headers());

            if !limiter.settings().shadow
                && let Some(refusal) = limiter.gate(tier, &ip_key)
                && let Enforcement::Refuse(refusal) =
                    limiter.enforce(tier, Verdict::Refused(Box::new(refusal)), path)
            {
                return Ok(refusal_response(&refusal));
            }

            // The certificate is parsed only for the methods that use it.
            let peer_key = (route.requirement == Some(crate::auth::Requirement::PeerCertificate))
                .then(|| crate::auth::peer_key_of(request.extensions()))
                .flatten();
            let caller = match authenticator
                .authenticate(route.requirement, request.headers(), peer_key)
                .await
            {
                Ok(caller) => caller,
                Err(status) => {
                    // Charged to the IP only. Over its budget, the call is refused
                    // as any other; within it, the answer is the auth error.
                    let ip_only = std::slice::from_ref(&ip_key);
                    let verdict = match limiter.count_in_memory(tier, ip_only) {
                        Some(verdict) => verdict,
                        None => limiter.count(tier, ip_only).await,
                    };
                    let state = match limiter.enforce(tier, verdict, path) {
                        Enforcement::Refuse(refusal) => return Ok(refusal_response(&refusal)),
                        Enforcement::Admit(state) => state,
                    };
                    let mut response = status.into_http();
                    if let Some(state) = state {
                        write_quota_headers(response.headers_mut(), &state);
                    }
                    return Ok(response);
                }
            };

            // The IP's key, then the caller's if it has one (no vector per call).
            let both;
            let keys: &[LimitKey] = match LimitKey::for_caller(&caller) {
                Some(caller_key) => {
                    both = [ip_key, caller_key];
                    &both
                }
                None => std::slice::from_ref(&ip_key),
            };
            let verdict = match keys.get(1).and_then(|key| limiter.gate(tier, key)) {
                Some(refusal) => Verdict::Refused(Box::new(refusal)),
                None => match limiter.count_in_memory(tier, keys) {
                    Some(verdict) => verdict,
                    None => limiter.count(tier, keys).await,
                },
            };
            let state: Option<QuotaState> = match limiter.enforce(tier, verdict, path) {
                Enforcement::Refuse(refusal) => return Ok(refusal_response(&refusal)),
                Enforcement::Admit(state) => state,
            };
            if let Some(slot) = request.extensions().get::<CallerSlot>() {
                slot.set(&caller);
            }
            request.extensions_mut().insert(caller);
            let mut response = inner.call(request).await?;
            if let Some(state) = state {
                write_quota_headers(response.headers_mut(), &state);
            }
            Ok(response)
        })
    }
}

/// The remote address of the connection (TLS or plaintext).
fn remote_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    remote_address(extensions).map(|address| address.ip())
}
