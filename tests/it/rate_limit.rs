//! Rate limiting as clients see it: tiers, independent keys, forwarding headers,
//! the refusal details, shared budgets through Redis, and Redis outages.
//!
//! All calls come from 127.0.0.1. Tests that need several client addresses trust
//! 127.0.0.1 as a proxy and name the client in `x-forwarded-for`.

use std::time::Duration;

use futures::StreamExt;
use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::Config;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::federation as federation_pb;
use mosaic_mesh::ratelimit::metrics::BreakerGauge;
use mosaic_mesh::ratelimit::{RateLimitArgs, RateLimitFileConfig, RateLimitSettings};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::Backend;
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};
use crate::support::redis::{
    PrivateRedis, delete_keys, free_port, keys_with_prefix, shared_redis_url, unique_prefix,
};

/// The environment's configuration with `[rate_limit]` set to `section`.
fn limited(environment: &TestEnvironment, redis_url: Option<String>, section: &str) -> Config {
    let mut config = environment.config();
    config.redis_url = redis_url;
    let file: RateLimitFileConfig = toml::from_str(section).expect("[rate_limit] section");
    config.rate_limit =
        RateLimitSettings::resolve(file, &RateLimitArgs::default(), config.redis_url.is_some())
            .expect("rate limit settings");
    config
}

/// Adds `x-forwarded-for: address` to a request.
fn forwarded_for<T>(mut request: tonic::Request<T>, address: &str) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("x-forwarded-for", address.parse().expect("header value"));
    request
}

/// Whether a call got past the limiter. Methods whose issue has not landed answer
/// UNIMPLEMENTED once admitted, and handlers that did land refuse the empty
/// requests sent here with INVALID_ARGUMENT (e.g. HandleWebhook without a
/// source); anything but admission or RESOURCE_EXHAUSTED is a test failure.
fn admitted<T: std::fmt::Debug>(result: &Result<T, tonic::Status>) -> bool {
    match result {
        Ok(_) => true,
        Err(status) if matches!(status.code(), Code::Unimplemented | Code::InvalidArgument) => true,
        Err(status) if status.code() == Code::ResourceExhausted => false,
        Err(status) => panic!("unexpected status: {status:?}"),
    }
}

async fn health_check(
    daemon_channel: tonic::transport::Channel,
    forwarded: Option<&str>,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(address) = forwarded {
        request = forwarded_for(request, address);
    }
    HealthClient::new(daemon_channel).check(request).await
}

async fn get_instance(
    channel: tonic::transport::Channel,
    forwarded: Option<&str>,
) -> Result<tonic::Response<federation_pb::GetInstanceResponse>, tonic::Status> {
    let mut request = tonic::Request::new(federation_pb::GetInstanceRequest {});
    if let Some(address) = forwarded {
        request = forwarded_for(request, address);
    }
    federation_pb::federation_client::FederationClient::new(channel)
        .get_instance(request)
        .await
}

async fn list_agents(
    channel: tonic::transport::Channel,
    key: &str,
    forwarded: &str,
) -> Result<tonic::Response<agent_pb::ListAgentsResponse>, tonic::Status> {
    let request = forwarded_for(
        with_key(agent_pb::ListAgentsRequest::default(), key),
        forwarded,
    );
    agent_pb::agent_control_client::AgentControlClient::new(channel)
        .list_agents(request)
        .await
}

/// How many of `calls` sequential health checks are admitted.
async fn admitted_health_checks(daemon: &TestDaemon, calls: usize) -> usize {
    let channel = daemon.channel().await;
    let mut count = 0;
    for _ in 0..calls {
        if admitted(&health_check(channel.clone(), None).await) {
            count += 1;
        }
    }
    count
}

async fn tiers_trip_at_their_own_limits(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let config = limited(
        &environment,
        None,
        "ttl = 3600\nwebhook_limit = 3\nhealth_limit = 5\nglobal_limit = 4\ncoordinator_limit = 50\n",
    );
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;
    let webhook_key = daemon.api_key(&[Scope::Webhook]).await;

    let mut coordinator =
        coordinator_pb::coordinator_client::CoordinatorClient::new(channel.clone());
    let mut webhook_results = Vec::new();
    for _ in 0..4 {
        let result = coordinator
            .handle_webhook(with_key(
                coordinator_pb::HandleWebhookRequest::default(),
                &webhook_key,
            ))
            .await;
        webhook_results.push(admitted(&result));
    }
    assert_eq!(
        webhook_results,
        [true, true, true, false],
        "webhook tier: 3"
    );

    let mut default_results = Vec::new();
    for _ in 0..5 {
        default_results.push(admitted(&get_instance(channel.clone(), None).await));
    }
    assert_eq!(
        default_results,
        [true, true, true, true, false],
        "default tier: 4"
    );

    // With the default tier spent, a tool's reflection query still passes:
    // it counts in the health tier.
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        )
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    assert!(
        admitted(&reflection),
        "reflection does not share the default tier"
    );

    let mut health_results = Vec::new();
    for _ in 0..5 {
        health_results.push(admitted(&health_check(channel.clone(), None).await));
    }
    assert_eq!(
        health_results,
        [true, true, true, true, false],
        "health tier: 5, one spent by the reflection query"
    );
    // Coordinator/Health is in the health tier too, so it is already spent.
    let coordinator_health = coordinator
        .health(coordinator_pb::HealthRequest::default())
        .await;
    assert!(
        !admitted(&coordinator_health),
        "Coordinator/Health shares the health tier"
    );

    // A method the server does not serve is limited at the default tier too.
    let mut unknown = tonic::client::Grpc::new(channel.clone());
    unknown.ready().await.expect("ready");
    let result: Result<tonic::Response<()>, tonic::Status> = unknown
        .unary(
            tonic::Request::new(()),
            "/unknown.v1.Nothing/Call".parse().expect("path"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_eq!(
        result.expect_err("refused").code(),
        Code::ResourceExhausted,
        "unknown methods share the default tier"
    );

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tiers_trip_at_their_own_limits_on_sqlite() {
    tiers_trip_at_their_own_limits(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tiers_trip_at_their_own_limits_on_postgres() {
    tiers_trip_at_their_own_limits(Backend::Postgres).await;
}

async fn client_ips_and_api_keys_are_independent(backend: Backend, redis: bool) {
    let environment = TestEnvironment::new(backend).await;
    let prefix = unique_prefix();
    let section = format!(
        "ttl = 3600\nglobal_limit = 2\ntrusted_proxies = [\"127.0.0.1\"]\nstorage = \"{}\"\nredis_prefix = \"{prefix}\"\nredis_timeout_ms = 2000\n",
        if redis { "redis" } else { "memory" }
    );
    let redis_url = redis.then(shared_redis_url);
    let config = limited(&environment, redis_url.clone(), &section);
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;
    let key = daemon.api_key(&[Scope::Agents]).await;

    // IP A spends its budget.
    for _ in 0..2 {
        assert!(admitted(
            &get_instance(channel.clone(), Some("203.0.113.1")).await
        ));
    }
    let refused = get_instance(channel.clone(), Some("203.0.113.1"))
        .await
        .expect_err("IP A is spent");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let subject = &refused
        .get_details_quota_failure()
        .expect("quota failure")
        .violations[0]
        .subject;
    assert_eq!(subject, "ip:203.0.113.1");

    // IP B is untouched.
    assert!(admitted(
        &get_instance(channel.clone(), Some("203.0.113.2")).await
    ));

    // A request refused by its IP limit does not spend its API-key budget: the key
    // is refused five times from spent IP A...
    for _ in 0..5 {
        let refused = list_agents(channel.clone(), &key, "203.0.113.1")
            .await
            .expect_err("refused by IP A");
        let subject = &refused
            .get_details_quota_failure()
            .expect("quota failure")
            .violations[0]
            .subject;
        assert_eq!(subject, "ip:203.0.113.1");
    }
    // ...and still has its whole budget of 2 from fresh IP C.
    assert!(admitted(
        &list_agents(channel.clone(), &key, "203.0.113.3").await
    ));
    assert!(admitted(
        &list_agents(channel.clone(), &key, "203.0.113.3").await
    ));
    // From fresh IP D the key itself is now spent: the refusal names the key.
    let refused = list_agents(channel.clone(), &key, "203.0.113.4")
        .await
        .expect_err("the key is spent");
    let subject = &refused
        .get_details_quota_failure()
        .expect("quota failure")
        .violations[0]
        .subject;
    assert!(subject.starts_with("api_key:"), "{subject}");
    assert!(
        !subject.contains(&key),
        "the bucket is named by id, never the key"
    );
    // The call refused by the key did not spend IP D (all or nothing on Redis; in
    // memory the IP is checked first, so IP D paid one call for it).
    let ip_d_left = if redis { 2 } else { 1 };
    for _ in 0..ip_d_left {
        assert!(admitted(
            &get_instance(channel.clone(), Some("203.0.113.4")).await
        ));
    }
    assert!(!admitted(
        &get_instance(channel.clone(), Some("203.0.113.4")).await
    ));

    daemon.stop().await;
    if let Some(url) = redis_url {
        delete_keys(&url, &prefix).await;
    }
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ips_and_api_keys_are_independent_on_sqlite() {
    client_ips_and_api_keys_are_independent(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ips_and_api_keys_are_independent_on_postgres() {
    client_ips_and_api_keys_are_independent(Backend::Postgres, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ips_and_api_keys_are_independent_with_redis_on_sqlite() {
    client_ips_and_api_keys_are_independent(Backend::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ips_and_api_keys_are_independent_with_redis_on_postgres() {
    client_ips_and_api_keys_are_independent(Backend::Postgres, true).await;
}

async fn random_api_keys_cost_the_ip_and_create_no_state(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let config = limited(&environment, None, "ttl = 3600\nglobal_limit = 3\n");
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;
    let mut codes = Vec::new();
    for attempt in 0..6 {
        let request = with_key(
            agent_pb::ListAgentsRequest::default(),
            &format!("mosaic_not-a-real-key-{attempt}"),
        );
        let status = agent_pb::agent_control_client::AgentControlClient::new(channel.clone())
            .list_agents(request)
            .await
            .expect_err("refused");
        codes.push(status.code());
    }
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::ResourceExhausted,
            Code::ResourceExhausted,
        ],
        "bad keys spend the IP's budget, then are refused before any lookup"
    );
    // Only the IP has state: six random keys created none.
    assert_eq!(daemon.rate_limiter.prune(), 1);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_api_keys_cost_the_ip_and_create_no_state_on_sqlite() {
    random_api_keys_cost_the_ip_and_create_no_state(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_api_keys_cost_the_ip_and_create_no_state_on_postgres() {
    random_api_keys_cost_the_ip_and_create_no_state(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_forwarding_headers_from_untrusted_peers_are_ignored() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    // No trusted proxies: 127.0.0.1 is the client whatever the headers say.
    let config = limited(&environment, None, "ttl = 3600\nhealth_limit = 2\n");
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;
    let mut results = Vec::new();
    for n in 1..=4 {
        let address = format!("198.51.100.{n}");
        results.push(admitted(
            &health_check(channel.clone(), Some(&address)).await,
        ));
    }
    assert_eq!(results, [true, true, false, false]);
    let refused = health_check(channel.clone(), Some("198.51.100.9"))
        .await
        .expect_err("refused");
    let subject = &refused
        .get_details_quota_failure()
        .expect("quota failure")
        .violations[0]
        .subject;
    assert_eq!(subject, "ip:127.0.0.1");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_carry_readable_details_and_every_response_carries_quota_headers() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    // Two per second: the wait after the burst is at most half a second.
    let config = limited(&environment, None, "ttl = 1\nhealth_limit = 2\n");
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;

    let first = health_check(channel.clone(), None).await.expect("admitted");
    let metadata = first.metadata();
    assert_eq!(metadata.get("x-ratelimit-limit").expect("limit"), "2");
    assert_eq!(
        metadata.get("x-ratelimit-remaining").expect("remaining"),
        "1"
    );
    assert!(metadata.get("x-ratelimit-reset").is_some());

    // A streaming response carries them in its headers too.
    let watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch admitted");
    assert_eq!(
        watch
            .metadata()
            .get("x-ratelimit-remaining")
            .expect("remaining"),
        "0"
    );
    let mut stream = watch.into_inner();
    assert!(stream.next().await.is_some(), "the stream serves");
    drop(stream);

    let refused = health_check(channel.clone(), None)
        .await
        .expect_err("third call in the second is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let retry_delay = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry_delay > Duration::ZERO && retry_delay <= Duration::from_millis(500),
        "{retry_delay:?}"
    );
    let violations = refused
        .get_details_quota_failure()
        .expect("QuotaFailure")
        .violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].subject, "ip:127.0.0.1");
    assert!(
        violations[0].description.contains("health"),
        "{violations:?}"
    );
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "RATE_LIMITED");
    assert_eq!(
        info.metadata.get("tier").map(String::as_str),
        Some("health")
    );

    let metadata = refused.metadata();
    assert_eq!(
        metadata.get("retry-after").expect("retry-after"),
        "1",
        "a wait under a second still says 1, never 0"
    );
    let pushback: u64 = metadata
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!((1..=500).contains(&pushback), "{pushback}");
    assert_eq!(
        metadata.get("x-ratelimit-remaining").expect("remaining"),
        "0"
    );
    assert_eq!(metadata.get("x-ratelimit-limit").expect("limit"), "2");
    assert!(
        refused.message().contains("health"),
        "{}",
        refused.message()
    );

    let counters = daemon.rate_limiter.metrics().snapshot();
    assert_eq!(counters.allowed, 2);
    assert_eq!(counters.refused, 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_logs_and_refuses_nothing() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let config = limited(
        &environment,
        None,
        "ttl = 3600\nhealth_limit = 2\nshadow = true\n",
    );
    let daemon = environment.start_with(config).await.expect("daemon");
    let channel = daemon.channel().await;
    for _ in 0..5 {
        let response = health_check(channel.clone(), None).await.expect("admitted");
        assert!(response.metadata().get("x-ratelimit-remaining").is_some());
    }
    let counters = daemon.rate_limiter.metrics().snapshot();
    assert_eq!(counters.allowed, 2);
    assert_eq!(counters.shadow_refused, 3);
    assert_eq!(counters.refused, 0);
    daemon.stop().await;
}

/// Two daemons (on SQLite) whose health tier shares `health_limit` calls per
/// `ttl` seconds in Redis, under a prefix of their own.
struct SharingRedis {
    url: String,
    prefix: String,
    daemons: [TestDaemon; 2],
    channels: [tonic::transport::Channel; 2],
    _environments: [TestEnvironment; 2],
}

impl SharingRedis {
    async fn start(ttl: u64, health_limit: u32) -> SharingRedis {
        let url = shared_redis_url();
        let prefix = unique_prefix();
        let section = format!(
            "ttl = {ttl}\nhealth_limit = {health_limit}\nstorage = \"redis\"\nredis_prefix = \"{prefix}\"\nredis_timeout_ms = 5000\n"
        );
        let environments = [
            TestEnvironment::new(Backend::Sqlite).await,
            TestEnvironment::new(Backend::Sqlite).await,
        ];
        let [one, two] = &environments;
        let first = one
            .start_with(limited(one, Some(url.clone()), &section))
            .await
            .expect("first daemon");
        let second = two
            .start_with(limited(two, Some(url.clone()), &section))
            .await
            .expect("second daemon");
        let channels = [first.channel().await, second.channel().await];
        SharingRedis {
            url,
            prefix,
            daemons: [first, second],
            channels,
            _environments: environments,
        }
    }

    /// Every check of either daemon was answered by Redis.
    fn assert_redis_answered(&self) {
        for daemon in &self.daemons {
            let counters = daemon.rate_limiter.metrics().snapshot();
            assert_eq!(
                counters.redis_errors, 0,
                "every check was answered by redis"
            );
            assert_eq!(counters.fallback_checks, 0);
        }
    }

    /// Stops both daemons and deletes the prefix's keys.
    async fn stop(self) {
        for daemon in self.daemons {
            daemon.stop().await;
        }
        delete_keys(&self.url, &self.prefix).await;
        assert!(keys_with_prefix(&self.url, &self.prefix).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_sharing_redis_admit_exactly_the_limit() {
    // An hour-long window: nothing refills while the test runs.
    let pair = SharingRedis::start(3600, 100).await;
    let calls = (0..300).map(|n| health_check(pair.channels[n % 2].clone(), None));
    let results = futures::future::join_all(calls).await;
    let admitted_count = results.iter().filter(|result| admitted(result)).count();
    assert_eq!(admitted_count, 100, "300 calls on one key limited to 100");
    pair.assert_redis_answered();
    assert_eq!(
        keys_with_prefix(&pair.url, &pair.prefix).await,
        [format!("{}health:ip:127.0.0.1", pair.prefix)]
    );
    pair.stop().await;
}

/// A key far below its limit costs one Redis check per batch of calls (each
/// check spends a few calls ahead for the replica that made it), and two
/// daemons sharing Redis still never admit more than the limit: the calls
/// held ahead cost at most a batch per daemon of early refusals.
#[tokio::test(flavor = "multi_thread")]
async fn calls_far_below_the_limit_share_a_redis_check_and_replicas_stay_within_it() {
    // 6000 a minute earn back 100 a second: a batch of a tenth of that, 10.
    let limit = 6_000;
    let pair = SharingRedis::start(60, limit).await;
    let checks = || {
        pair.daemons
            .iter()
            .map(|daemon| daemon.rate_limiter.metrics().snapshot().redis_checks)
            .sum::<u64>()
    };
    let started = std::time::Instant::now();

    // Far below the limit: 200 calls, four at a time, on both daemons. One
    // check per call would be 200; a batch of 10 makes it about 10 per daemon
    // (more while concurrent calls find no allowance yet).
    let mut admitted_count = 0;
    for round in 0..50 {
        let calls = (0..4).map(|n| health_check(pair.channels[(round + n) % 2].clone(), None));
        for result in futures::future::join_all(calls).await {
            admitted_count += usize::from(admitted(&result));
        }
    }
    assert_eq!(admitted_count, 200, "200 calls of 6000 are all admitted");
    let below = checks();
    assert!(
        below <= 120,
        "{below} Redis checks for 200 calls far below the limit"
    );

    // Past the limit: 8000 more calls, 40 at a time.
    for round in 0..200 {
        let calls = (0..40).map(|n| health_check(pair.channels[(round + n) % 2].clone(), None));
        for result in futures::future::join_all(calls).await {
            admitted_count += usize::from(admitted(&result));
        }
    }
    // GCRA earns a call back every 10 ms: the limit plus what the test's
    // duration earned back, and never more.
    let earned = started.elapsed().as_millis() / 10 + 1;
    let most = limit as usize + usize::try_from(earned).expect("earned");
    assert!(
        admitted_count <= most && admitted_count >= limit as usize * 8 / 10,
        "{admitted_count} of 8200 calls admitted on a limit of {limit} a minute shared by two \
         daemons (at most {most}: the limit and what the test's duration earned back)"
    );
    pair.assert_redis_answered();
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_falls_back_to_a_share_of_the_limit_and_recovers() {
    let mut redis = PrivateRedis::start().await;
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let timeout = Duration::from_millis(250);
    let section = format!(
        "ttl = 3600\nhealth_limit = 20\nreplicas = 2\nstorage = \"redis\"\nredis_timeout_ms = {}\nbreaker_failures = 2\nbreaker_cooldown_ms = 3000\n",
        timeout.as_millis()
    );
    let daemon = environment
        .start_with(limited(&environment, Some(redis.url()), &section))
        .await
        .expect("daemon");
    let channel = daemon.channel().await;
    let counters = || daemon.rate_limiter.metrics().snapshot();

    // Redis up: five calls counted in Redis.
    assert_eq!(admitted_health_checks(&daemon, 5).await, 5);
    assert_eq!(counters().redis_checks, 5);
    assert_eq!(keys_with_prefix(&redis.url(), "mosaic:rl:").await.len(), 1);

    // Redis hangs: the first two calls wait out the timeout and open the breaker.
    redis.freeze();
    for _ in 0..2 {
        health_check(channel.clone(), None)
            .await
            .expect("fallback admits");
    }
    assert_eq!(counters().redis_errors, 2);
    assert_eq!(counters().breaker, BreakerGauge::Open);

    // With the breaker open, calls no longer pay the timeout, and the fallback
    // allows 20 / 2 = 10 in all (two were spent above).
    let started = tokio::time::Instant::now();
    let mut admitted_while_open = 0;
    for _ in 0..20 {
        if admitted(&health_check(channel.clone(), None).await) {
            admitted_while_open += 1;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(
        admitted_while_open, 8,
        "limited at the fallback rate, never unlimited"
    );
    assert_eq!(
        counters().redis_errors,
        2,
        "redis was not called while open"
    );
    assert!(
        elapsed < timeout * 4,
        "20 calls took {elapsed:?}; each would take {timeout:?} if it waited for redis"
    );

    // Redis comes back (empty). After the cool-down one probe finds it, and
    // limiting is shared again: the Redis budget of 20 applies, not the fallback's 10.
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if admitted(&health_check(channel.clone(), None).await) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis-backed limiting did not resume: {:?}",
            counters()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counters().breaker, BreakerGauge::Closed);
    assert_eq!(
        admitted_health_checks(&daemon, 25).await,
        19,
        "the probe took one of Redis's 20"
    );
    assert_eq!(keys_with_prefix(&redis.url(), "mosaic:rl:").await.len(), 1);

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_starts_and_limits_with_redis_down() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let config = limited(
        &environment,
        Some(nowhere),
        "ttl = 3600\nhealth_limit = 3\nstorage = \"redis\"\n",
    );
    let daemon = environment
        .start_with(config)
        .await
        .expect("starts without redis");
    assert_eq!(admitted_health_checks(&daemon, 6).await, 3);
    let counters = daemon.rate_limiter.metrics().snapshot();
    assert!(counters.redis_errors >= 1, "{counters:?}");
    assert!(counters.fallback_checks >= 6, "{counters:?}");
    daemon.stop().await;
}

/// A TLS channel presenting a fresh client certificate (the server is not
/// verified: this test is about what the server does with the client's key).
async fn channel_with_client_certificate(
    daemon: &TestDaemon,
) -> (tonic::transport::Channel, mosaic_mesh::identity::PublicKey) {
    use crate::support::tls::AnyServer;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let certificate = rcgen::CertificateParams::new(vec!["peer.test".to_owned()])
        .expect("params")
        .self_signed(&key_pair)
        .expect("certificate");
    let spki =
        mosaic_mesh::identity::certificate::spki_of_certificate(certificate.der()).expect("spki");
    let public_key = mosaic_mesh::identity::PublicKey::from_spki_der(&spki).expect("p-256 key");
    let provider = mosaic_mesh::tls::crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
        )
        .expect("client certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let channel = mosaic_mesh::tls::connect_channel(
        &daemon.url(),
        Some(std::sync::Arc::new(config)),
        mosaic_mesh::tls::ChannelTimeouts::default(),
    )
    .await
    .expect("connect with a client certificate");
    (channel, public_key)
}

async fn ping(
    channel: tonic::transport::Channel,
    forwarded: &str,
) -> Result<tonic::Response<federation_pb::PingResponse>, tonic::Status> {
    let request = forwarded_for(
        tonic::Request::new(federation_pb::PingRequest::default()),
        forwarded,
    );
    federation_pb::federation_client::FederationClient::new(channel)
        .ping(request)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn federated_instances_are_limited_by_their_certificate_key() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let config = limited(
        &environment,
        None,
        "ttl = 3600\nfederation_limit = 2\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    let daemon = environment.start_with(config).await.expect("daemon");
    let (first_peer, first_key) = channel_with_client_certificate(&daemon).await;
    let (second_peer, _) = channel_with_client_certificate(&daemon).await;

    // One instance from three addresses: its own budget of 2 follows it.
    assert!(admitted(&ping(first_peer.clone(), "203.0.113.1").await));
    assert!(admitted(&ping(first_peer.clone(), "203.0.113.2").await));
    let refused = ping(first_peer.clone(), "203.0.113.3")
        .await
        .expect_err("the instance is spent");
    let subject = &refused
        .get_details_quota_failure()
        .expect("quota failure")
        .violations[0]
        .subject;
    assert_eq!(subject, &format!("instance:{}", first_key.key_id()));
    assert!(
        refused
            .get_details_quota_failure()
            .expect("quota failure")
            .violations[0]
            .description
            .contains("federation")
    );

    // Another instance, from the same address as the first call, is untouched.
    assert!(admitted(&ping(second_peer.clone(), "203.0.113.3").await));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_script_is_exact_and_all_or_nothing() {
    use mosaic_mesh::ratelimit::redis::RedisLimiter;
    use mosaic_mesh::ratelimit::tiers::TierLimits;
    use mosaic_mesh::ratelimit::{LimitKey, Tier, Verdict};

    let url = shared_redis_url();
    let prefix = unique_prefix();
    let limiter =
        RedisLimiter::new(&url, None, &prefix, Duration::from_secs(5)).expect("redis limiter");
    let limits = TierLimits::new(Duration::from_secs(3600), Tier::ALL.map(|tier| (tier, 5)))
        .expect("limits");
    let ip = LimitKey::for_ip("192.0.2.10".parse().expect("ip"));
    let api_key = LimitKey::ApiKey("key-1".into());

    for expected_remaining in (0..5).rev() {
        let (verdict, granted) = limiter
            .check(&limits, Tier::Webhook, std::slice::from_ref(&ip), 1)
            .await
            .expect("redis");
        let Verdict::Admitted(state) = verdict else {
            panic!("refused inside the burst: {verdict:?}");
        };
        assert_eq!(granted, 1);
        assert_eq!(state.remaining, expected_remaining);
        assert_eq!(state.limit, 5);
    }
    let (verdict, granted) = limiter
        .check(&limits, Tier::Webhook, &[api_key.clone(), ip.clone()], 3)
        .await
        .expect("redis");
    assert_eq!(granted, 0);
    let Verdict::Refused(refusal) = verdict else {
        panic!("call 6 of 5 admitted: {verdict:?}");
    };
    assert_eq!(refusal.key, ip, "the spent key is named");
    // One interval is 3600 s / 5 = 720 s; Redis's clock moved a little since.
    assert!(
        refusal.retry_after <= Duration::from_secs(720)
            && refusal.retry_after > Duration::from_secs(710),
        "{:?}",
        refusal.retry_after
    );
    // The refusal by the IP spent nothing of the API key.
    // Asked for calls ahead, a bucket spends as many as it can spare: 3 of
    // the 5, then the 2 left (the call and one more), then none.
    for (wanted, granted_then, remaining) in [(3, 3, 2), (3, 2, 0)] {
        let (verdict, granted) = limiter
            .check(
                &limits,
                Tier::Webhook,
                std::slice::from_ref(&api_key),
                wanted,
            )
            .await
            .expect("redis");
        assert_eq!(granted, granted_then);
        assert!(
            matches!(verdict, Verdict::Admitted(state) if state.remaining == remaining),
            "{verdict:?}"
        );
    }
    let (verdict, granted) = limiter
        .check(&limits, Tier::Webhook, std::slice::from_ref(&api_key), 3)
        .await
        .expect("redis");
    assert!(
        matches!(verdict, Verdict::Refused(_)) && granted == 0,
        "{verdict:?}"
    );
    // Buckets expire when whole again; the TAT is stored exactly (µs integers).
    let stored = keys_with_prefix(&url, &prefix).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    delete_keys(&url, &prefix).await;
}

#[test]
fn zero_or_nonsense_settings_stop_the_daemon_at_start_with_the_variable_named() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("MOSAIC_RATE_LIMIT_TTL", "0"),
        ("MOSAIC_RATE_LIMIT_WEBHOOK_LIMIT", "0"),
        ("MOSAIC_RATE_LIMIT_HEALTH_LIMIT", "many"),
        ("MOSAIC_RATE_LIMIT_STORAGE", "disk"),
        ("MOSAIC_RATE_LIMIT_STORAGE", "redis"),
        ("MOSAIC_RATE_LIMIT_SHADOW", "perhaps"),
        ("MOSAIC_RATE_LIMIT_TRUSTED_PROXIES", "10.0.0.0/40"),
    ];
    for (variable, value) in cases {
        let mut command = std::process::Command::new(crate::support::daemon::mosaicd_binary());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MOSAIC_") {
                command.env_remove(name);
            }
        }
        let output = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .env("MOSAIC_LOG", "warn")
            .env(variable, value)
            .output()
            .expect("run mosaicd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{variable}={value}: {stderr}"
        );
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_with_default_settings_reports_the_default_tiers() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    // An empty section: the production defaults (the test builder raises them).
    let daemon = environment
        .start_with(limited(&environment, None, ""))
        .await
        .expect("daemon");
    let channel = daemon.channel().await;
    let health = health_check(channel.clone(), None).await.expect("health");
    assert_eq!(
        health.metadata().get("x-ratelimit-limit").expect("limit"),
        "300"
    );
    assert_eq!(
        health
            .metadata()
            .get("x-ratelimit-remaining")
            .expect("left"),
        "299"
    );
    let instance = get_instance(channel.clone(), None).await.expect("instance");
    assert_eq!(
        instance.metadata().get("x-ratelimit-limit").expect("limit"),
        "100"
    );
    let reset: u64 = instance
        .metadata()
        .get("x-ratelimit-reset")
        .expect("reset")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert_eq!(
        reset, 1,
        "one call of 100 a minute comes back in 0.6 s, rounded up"
    );
    daemon.stop().await;
}
