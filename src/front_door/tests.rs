//! The front door on its own, in front of a service that answers OK and
//! says whom it saw: which calls it lets in without waiting, which it
//! answers itself, and that each is recorded once.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::{Layer as _, Service as _};

use super::*;
use crate::auth::Caller;
use crate::metrics::StoreGauges;
use crate::ratelimit::{RateLimitArgs, RateLimitFileConfig, RateLimitSettings};

const GET_JOB: &str = "/mosaic.coordinator.v1.Coordinator/GetJob";

/// A service that counts its calls and answers OK with the caller it was
/// given in `x-caller`.
#[derive(Clone)]
struct Answering {
    served: Arc<AtomicUsize>,
}

type Answered = std::future::Ready<Result<Response, Infallible>>;

impl tower::Service<http::Request<tonic::body::Body>> for Answering {
    type Response = Response;
    type Error = Infallible;
    type Future = Answered;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Answered {
        self.served.fetch_add(1, Ordering::SeqCst);
        let caller = request
            .extensions()
            .get::<Caller>()
            .map_or_else(|| "none".to_owned(), Caller::to_string);
        let response = http::Response::builder()
            .header("grpc-status", "0")
            .header("x-caller", caller)
            .body(tonic::body::Body::empty())
            .expect("a response");
        std::future::ready(Ok(response))
    }
}

/// The front door over [`Answering`].
struct Fixture {
    door: FrontDoor<Answering>,
    served: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    secret: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `coordinator_limit` calls per minute in the Coordinator tier, in memory.
    async fn new(coordinator_limit: u32) -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, key) = crate::auth::testing::store_with_a_key(dir.path()).await;
        let settings = RateLimitSettings::resolve(
            RateLimitFileConfig {
                coordinator_limit: Some(coordinator_limit),
                ..RateLimitFileConfig::default()
            },
            &RateLimitArgs::default(),
            false,
        )
        .expect("valid settings");
        let limiter = Arc::new(RateLimiter::new(settings, None).expect("a memory limiter"));
        let authenticator = Arc::new(Authenticator::new(store, Duration::from_secs(60)));
        let metrics = Arc::new(Metrics::new());
        let served = Arc::new(AtomicUsize::new(0));
        let layer = FrontDoorLayer::new(
            Arc::clone(&limiter),
            authenticator,
            Arc::clone(&metrics),
            AccessLog::Info,
        );
        Fixture {
            door: layer.layer(Answering {
                served: Arc::clone(&served),
            }),
            served,
            metrics,
            limiter,
            secret: key.secret.to_string(),
            _dir: dir,
        }
    }

    fn call(&mut self, path: &str, key: Option<&str>) -> CallFuture<Answered, Infallible> {
        let mut request = http::Request::builder().uri(path);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        self.door
            .call(request.body(tonic::body::Body::empty()).expect("a request"))
    }

    /// The `mosaic_grpc_calls_total` of GetJob with this code, as scraped.
    fn get_job_calls(&self, code: &str) -> u64 {
        let text = self
            .metrics
            .render(&self.limiter.metrics().snapshot(), &StoreGauges::default());
        text.lines()
            .filter(|line| {
                line.starts_with("mosaic_grpc_calls_total{")
                    && line.contains("method=\"GetJob\"")
                    && line.contains(&format!("code=\"{code}\""))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// What a call's future is, before it is polled.
fn kind<F, E>(future: &CallFuture<F, E>) -> &'static str {
    match future {
        CallFuture::Called { .. } => "called",
        CallFuture::Answered { .. } => "answered",
        CallFuture::Waiting { .. } => "waiting",
    }
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_key_is_let_in_without_waiting_and_its_caller_reaches_the_service() {
    let mut fixture = Fixture::new(100).await;
    let secret = fixture.secret.clone();

    let first = fixture.call(GET_JOB, Some(&secret));
    assert_eq!(kind(&first), "waiting", "the key is read from the store");
    let first = first.await.expect("infallible");
    let caller = header(&first, "x-caller").to_owned();
    assert!(caller.starts_with("api_key:"), "the service saw {caller}");
    assert_eq!(header(&first, "x-ratelimit-limit"), "100");

    let second = fixture.call(GET_JOB, Some(&secret));
    assert_eq!(kind(&second), "called", "the key is cached now");
    let second = second.await.expect("infallible");
    assert_eq!(header(&second, "x-caller"), caller);
    assert_eq!(header(&second, "x-ratelimit-remaining"), "98");

    let public = fixture.call("/grpc.health.v1.Health/Check", None);
    assert_eq!(kind(&public), "called");
    let public = public.await.expect("infallible");
    assert_eq!(header(&public, "x-caller"), "anonymous");

    assert_eq!(fixture.served.load(Ordering::SeqCst), 3);
    // Answers with their code in their headers are recorded at once.
    assert_eq!(fixture.get_job_calls("OK"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_and_bad_keys_are_answered_by_the_door_and_counted_once() {
    let mut fixture = Fixture::new(1).await;
    let secret = fixture.secret.clone();

    let unknown = fixture.call(GET_JOB, Some("mosaic_not-a-key"));
    assert_eq!(kind(&unknown), "waiting", "an unknown key is looked up");
    let unknown = unknown.await.expect("infallible");
    assert_eq!(header(&unknown, "grpc-status"), "16");

    // The IP's one call of the minute was spent by the unknown key.
    let refused = fixture.call(GET_JOB, Some(&secret));
    let refused = refused.await.expect("infallible");
    assert_eq!(header(&refused, "grpc-status"), "8");

    // Now the IP is known to be refused: answered before any lookup.
    let again = fixture.call(GET_JOB, Some(&secret));
    assert_eq!(kind(&again), "answered");
    let again = again.await.expect("infallible");
    assert_eq!(header(&again, "grpc-status"), "8");
    assert!(!header(&again, "retry-after").is_empty());

    let missing = fixture.call(GET_JOB, None);
    assert_eq!(kind(&missing), "answered");
    let missing = missing.await.expect("infallible");
    assert_eq!(header(&missing, "grpc-status"), "8");

    assert_eq!(fixture.served.load(Ordering::SeqCst), 0, "no call got in");
    assert_eq!(fixture.get_job_calls("UNAUTHENTICATED"), 1);
    assert_eq!(fixture.get_job_calls("RESOURCE_EXHAUSTED"), 3);
}
