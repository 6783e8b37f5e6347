//! The server's front door: one tower layer in front of every service that
//! times and records each call (`crate::metrics::call_record`: its count,
//! duration and log line), rate-limits it, authenticates it and rate-limits
//! it again (`admission`), before any handler runs.
//!
//! One layer, not one per concern: each call's path is looked up once, the
//! caller the log line names is the one admission found, and a call decided
//! without waiting (the key cached, the count in memory or in this replica's
//! Redis allowance) is passed to the service from `FrontDoor::call`
//! itself, with no future of the door's own beyond [`CallFuture`]. Only a
//! call that waits for the store or Redis gets a boxed future.

mod admission;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use self::admission::{Admission, Door};
use crate::auth::Authenticator;
use crate::metrics::Metrics;
use crate::metrics::call_record::CallStart;
use crate::metrics::settings::AccessLog;
use crate::ratelimit::RateLimiter;
use crate::ratelimit::decision::QuotaState;
use crate::ratelimit::response::write_quota_headers;

/// See the module documentation.
#[derive(Clone)]
pub struct FrontDoorLayer {
    shared: Arc<Shared>,
}

/// What every call's door shares.
struct Shared {
    door: Door,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
}

impl FrontDoorLayer {
    /// A front door limiting with `limiter`, authenticating with
    /// `authenticator`, recording calls in `metrics` and writing their log
    /// line at `access_log`.
    pub fn new(
        limiter: Arc<RateLimiter>,
        authenticator: Arc<Authenticator>,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                door: Door {
                    limiter,
                    authenticator,
                },
                metrics,
                access_log,
            }),
        }
    }
}

impl<S> tower::Layer<S> for FrontDoorLayer {
    type Service = FrontDoor<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FrontDoor {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// See [`FrontDoorLayer`].
#[derive(Clone)]
pub struct FrontDoor<S> {
    inner: S,
    shared: Arc<Shared>,
}

type Response = http::Response<tonic::body::Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for FrontDoor<S>
where
    S: tower::Service<http::Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = CallFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let shared = &self.shared;
        let path = request.uri().path();
        let method = crate::served::lookup(path);
        let route = crate::served::Route::of(method, path);
        let mut start = CallStart::new(
            &shared.metrics,
            shared.access_log,
            method,
            path,
            request.extensions(),
        );
        match shared
            .door
            .admit_now(route, path, request.headers(), request.extensions())
        {
            Ok(Admission::Answer(response)) => CallFuture::Answered {
                response: Some(start.finish(response)),
            },
            Ok(Admission::Admit { caller, quota }) => {
                start.set_caller(&caller);
                request.extensions_mut().insert(caller);
                // The service driven to readiness is called here, as tower
                // asks, so no clone of it is made.
                CallFuture::Called {
                    called: self.inner.call(request),
                    finish: Some(Finish { start, quota }),
                }
            }
            Err(pending) => {
                // The clone that was driven to readiness is the one to call
                // (tower's rule), later.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(shared);
                CallFuture::Waiting {
                    waiting: Box::pin(async move {
                        let path = request.uri().path();
                        match shared.door.admit_later(pending, path).await {
                            Admission::Answer(response) => Ok(start.finish(response)),
                            Admission::Admit { caller, quota } => {
                                start.set_caller(&caller);
                                request.extensions_mut().insert(caller);
                                let response = inner.call(request).await?;
                                Ok(Finish { start, quota }.finish(response))
                            }
                        }
                    }),
                }
            }
        }
    }
}

/// What is left to do with an admitted call's response.
pub struct Finish {
    start: CallStart,
    /// The quota left, for the `x-ratelimit-*` headers.
    quota: Option<QuotaState>,
}

impl Finish {
    fn finish(self, mut response: Response) -> Response {
        if let Some(quota) = &self.quota {
            write_quota_headers(response.headers_mut(), quota);
        }
        self.start.finish(response)
    }
}

pin_project_lite::pin_project! {
    /// The future of one call through the front door.
    #[project = CallFutureProjection]
    pub enum CallFuture<F, E> {
        /// Admitted without waiting: the service's own future.
        Called {
            #[pin]
            called: F,
            finish: Option<Finish>,
        },
        /// Answered by the door without waiting (a refusal, an
        /// authentication error).
        Answered { response: Option<Response> },
        /// Waiting for the store or Redis before it is decided.
        Waiting { waiting: BoxFuture<Result<Response, E>> },
    }
}

impl<F, E> Future for CallFuture<F, E>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallFutureProjection::Called { called, finish } => {
                let response = std::task::ready!(called.poll(context))?;
                Poll::Ready(Ok(match finish.take() {
                    Some(finish) => finish.finish(response),
                    // Polled again after it was ready: tower's contract
                    // forbids it; the response passes through untouched.
                    None => response,
                }))
            }
            CallFutureProjection::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            CallFutureProjection::Waiting { waiting } => waiting.as_mut().poll(context),
        }
    }
}
