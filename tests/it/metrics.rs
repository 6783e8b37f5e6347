//! The `/metrics` endpoint as a scraper sees it: calls counted by service,
//! method and gRPC code (successful, unauthenticated and rate-limited ones), the
//! duration histogram, the rate limiter's counters, the store gauges and the
//! signed commands in and out.

use std::time::{Duration, Instant};

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::ratelimit::{RateLimitArgs, RateLimitFileConfig, RateLimitSettings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, with_key};

/// A plain HTTP GET of `path`; returns (status line, body).
pub(crate) async fn http_get(address: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the metrics listener");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// The value of the series `series`, written as in the text format
/// (`name{label="value",...}`); the labels may come in any order, as a
/// Prometheus query matches them.
pub(crate) fn value_of(text: &str, series: &str) -> Option<f64> {
    let wanted = parse_series(series)?;
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (line_series, value) = line.rsplit_once(' ')?;
            (parse_series(line_series)? == wanted)
                .then(|| value.trim().parse().ok())
                .flatten()
        })
}

/// The sum of every series named `name`, whatever its labels.
fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (parse_series(series)?.0 == name)
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A series' name and its labels, sorted by name.
fn parse_series(series: &str) -> Option<(String, Vec<(String, String)>)> {
    let Some((name, labels)) = series.split_once('{') else {
        return Some((series.to_owned(), Vec::new()));
    };
    let mut rest = labels.strip_suffix('}')?;
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let (label, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut characters = after.char_indices();
        let end = loop {
            match characters.next()? {
                (_, '\\') => value.push(characters.next()?.1),
                (index, '"') => break index,
                (_, character) => value.push(character),
            }
        };
        pairs.push((label.to_owned(), value));
        rest = after.get(end + 1..)?.trim_start_matches(',');
    }
    pairs.sort();
    Some((name.to_owned(), pairs))
}

/// A daemon on SQLite with the metrics listener on, started with `configure`
/// applied to the test configuration; returns it with its metrics address.
pub(crate) async fn daemon_with_metrics(
    environment: &TestEnvironment,
    configure: impl FnOnce(&mut mosaic_mesh::config::Config),
) -> (crate::support::daemon::TestDaemon, std::net::SocketAddr) {
    let mut config = environment.config();
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    configure(&mut config);
    let daemon = environment.start_with(config).await.expect("daemon");
    let address = metrics_address_of(&daemon).await;
    (daemon, address)
}

/// The `/metrics` body, after checking the answer is 200.
pub(crate) async fn scrape(address: std::net::SocketAddr) -> String {
    let (status, body) = http_get(address, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

async fn scrape_counts_calls_by_code(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let mut config = environment.config();
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    let file: RateLimitFileConfig = toml::from_str("health_limit = 2\n").expect("section");
    config.rate_limit = RateLimitSettings::resolve(file, &RateLimitArgs::default(), false)
        .expect("rate limit settings");
    let daemon = environment.start_with(config).await.expect("daemon");
    let metrics_address = metrics_address_of(&daemon).await;
    let channel = daemon.channel().await;
    let key = daemon.api_key(&[Scope::Agents]).await;

    let mut agents = agent_pb::agent_control_client::AgentControlClient::new(channel.clone());
    agents
        .list_agents(with_key(agent_pb::ListAgentsRequest::default(), &key))
        .await
        .expect("List with a key");
    let unauthenticated = agents
        .list_agents(agent_pb::ListAgentsRequest::default())
        .await
        .expect_err("List without a key");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let coordinator_key = daemon.api_key(&[Scope::Coordinator]).await;
    mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient::new(channel.clone())
        .create_job(with_key(
            mosaic_mesh::proto::coordinator::CreateJobRequest {
                job_type: "metrics".to_owned(),
                workspace: "w".to_owned(),
                payload_json: "{}".to_owned(),
                ..Default::default()
            },
            &coordinator_key,
        ))
        .await
        .expect("create a job");
    let mut health = HealthClient::new(channel);
    let mut codes = Vec::new();
    for _ in 0..3 {
        let result = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        codes.push(
            result
                .map(|_| Code::Ok)
                .unwrap_or_else(|status| status.code()),
        );
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::ResourceExhausted]);

    // Unary calls are recorded when their body ends, which may trail the
    // client's answer slightly: poll until all six are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = http_get(metrics_address, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let recorded = value_of(
            &body,
            "mosaic_grpc_calls_total{service=\"grpc.health.v1.Health\",method=\"Check\",code=\"RESOURCE_EXHAUSTED\"}",
        );
        if recorded == Some(1.0) || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let agents_list = "service=\"mosaic.agent.v1.AgentControl\",method=\"ListAgents\"";
    assert_eq!(
        value_of(
            &body,
            &format!("mosaic_grpc_calls_total{{{agents_list},code=\"OK\"}}")
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value_of(
            &body,
            &format!("mosaic_grpc_calls_total{{{agents_list},code=\"UNAUTHENTICATED\"}}")
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value_of(
            &body,
            "mosaic_grpc_calls_total{service=\"grpc.health.v1.Health\",method=\"Check\",code=\"OK\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value_of(
            &body,
            &format!("mosaic_grpc_call_duration_seconds_count{{{agents_list}}}")
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value_of(
            &body,
            &format!("mosaic_grpc_call_duration_seconds_bucket{{{agents_list},le=\"+Inf\"}}")
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value_of(&body, "mosaic_rate_limit_refused_total{tier=\"health\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(
        sum_of(&body, "mosaic_rate_limit_allowed_total") >= 3.0,
        "{body}"
    );
    assert_eq!(
        value_of(&body, "mosaic_rate_limit_breaker_state{state=\"closed\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(body.contains("# TYPE mosaic_agents gauge"), "{body}");
    assert_eq!(
        value_of(&body, "mosaic_jobs{state=\"PENDING\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(body.contains("# TYPE mosaic_peers gauge"), "{body}");
    // The WAL's series exist on SQLite only.
    assert_eq!(
        value_of(&body, "mosaic_sqlite_wal_truncations_total").is_some(),
        backend == Backend::Sqlite,
        "{body}"
    );

    let (not_found, _) = http_get(metrics_address, "/other").await;
    assert_eq!(not_found, "HTTP/1.1 404 Not Found");

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_counts_calls_by_code_on_sqlite() {
    scrape_counts_calls_by_code(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_counts_calls_by_code_on_postgres() {
    scrape_counts_calls_by_code(Backend::Postgres).await;
}

/// The metrics listener's address once `serve` has bound it (in its own task).
async fn metrics_address_of(daemon: &crate::support::daemon::TestDaemon) -> std::net::SocketAddr {
    let bound_by = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(address) = daemon.metrics.local_address() {
            return address;
        }
        assert!(Instant::now() < bound_by, "metrics listener never bound");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Signed commands are counted on both sides by direction and outcome.
#[tokio::test(flavor = "multi_thread")]
async fn signed_commands_are_counted_in_and_out_by_outcome() {
    use mosaic_mesh::proto::federation as pb;
    use pb::federation_client::FederationClient;

    use crate::support::admin::{Admin, connect_and_accept};
    let environments = [
        TestEnvironment::new(Backend::Sqlite).await,
        TestEnvironment::new(Backend::Sqlite).await,
    ];
    let with_metrics = |config: &mut mosaic_mesh::config::Config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    };
    let a = environments[0].start_peer(0, with_metrics).await;
    let b = environments[1]
        .start_peer(0, |config| {
            *config = crate::support::agents::with_agent_types(config.clone());
            with_metrics(config);
        })
        .await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let b_id = admin_b.instance().await.instance_id;
    connect_and_accept(
        &admin_a,
        &admin_b,
        &b,
        "ws",
        &["agent.spawn", "agent.status"],
    )
    .await;
    let key = a.api_key(&[Scope::Admin]).await;
    let mut client = FederationClient::new(a.channel().await);
    client
        .spawn_remote_agent(with_key(
            pb::SpawnRemoteAgentRequest {
                peer_instance_id: b_id.clone(),
                spawn: Some(agent_pb::SpawnRequest {
                    agent_type: "sh".to_owned(),
                    prompt: "true".to_owned(),
                    ..agent_pb::SpawnRequest::default()
                }),
                ..pb::SpawnRemoteAgentRequest::default()
            },
            &key,
        ))
        .await
        .expect("remote spawn");
    for _ in 0..2 {
        let status = client
            .get_remote_agent(with_key(
                pb::GetRemoteAgentRequest {
                    peer_instance_id: b_id.clone(),
                    workspace: String::new(),
                    agent_id: "no-such-agent".to_owned(),
                },
                &key,
            ))
            .await
            .expect_err("unknown agent");
        assert_eq!(status.code(), Code::NotFound);
    }
    for (daemon, direction) in [(&a, "out"), (&b, "in")] {
        let (_, body) = http_get(metrics_address_of(daemon).await, "/metrics").await;
        assert!(
            body.contains("# TYPE mosaic_commands_total counter"),
            "{body}"
        );
        assert_eq!(
            value_of(
                &body,
                &format!("mosaic_commands_total{{direction=\"{direction}\",outcome=\"ok\"}}")
            ),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            value_of(
                &body,
                &format!(
                    "mosaic_commands_total{{direction=\"{direction}\",outcome=\"NOT_FOUND\"}}"
                )
            ),
            Some(2.0),
            "{body}"
        );
    }
    drop((a, b));
    for environment in environments {
        environment.cleanup().await;
    }
}

/// The standard process series and the build series, as a dashboard reads them.
#[tokio::test(flavor = "multi_thread")]
async fn process_and_build_series_describe_the_running_daemon() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, address) = daemon_with_metrics(&environment, |_| {}).await;
    let body = scrape(address).await;

    let series = |name: &str| value_of(&body, name).unwrap_or_else(|| panic!("{name}: {body}"));
    let resident = series("process_resident_memory_bytes");
    assert!(resident > 1_000_000.0, "{resident} bytes resident");
    assert!(series("process_virtual_memory_bytes") >= resident);
    let open_fds = series("process_open_fds");
    assert!(open_fds >= 3.0, "{open_fds} open descriptors");
    assert!(series("process_max_fds") >= open_fds);
    assert!(series("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let started = series("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "started at {started}, now {now}"
    );
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter"),
        "{body}"
    );

    assert_eq!(
        value_of(
            &body,
            &format!(
                "mosaic_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{body}"
    );

    daemon.stop().await;
    environment.cleanup().await;
}

/// On a daemon with no agents, jobs or peers every state's gauge reads 0, and
/// every rate-limit tier's counters exist, so that alerts and dashboards see 0
/// rather than no data.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_daemon_shows_every_state_and_tier_at_zero() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, address) = daemon_with_metrics(&environment, |_| {}).await;
    let body = scrape(address).await;

    for state in [
        "SPAWNING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "KILLED",
        "TIMED_OUT",
    ] {
        assert_eq!(
            value_of(&body, &format!("mosaic_agents{{state=\"{state}\"}}")),
            Some(0.0),
            "agents {state}: {body}"
        );
    }
    for state in ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"] {
        assert_eq!(
            value_of(&body, &format!("mosaic_jobs{{state=\"{state}\"}}")),
            Some(0.0),
            "jobs {state}: {body}"
        );
    }
    for state in ["pending", "active", "suspended", "disconnected", "rejected"] {
        for reachable in ["true", "false"] {
            assert_eq!(
                value_of(
                    &body,
                    &format!("mosaic_peers{{state=\"{state}\",reachable=\"{reachable}\"}}")
                ),
                Some(0.0),
                "peers {state} {reachable}: {body}"
            );
        }
    }
    for tier in ["webhook", "coordinator", "health", "federation", "default"] {
        assert_eq!(
            value_of(
                &body,
                &format!("mosaic_rate_limit_refused_total{{tier=\"{tier}\"}}")
            ),
            Some(0.0),
            "refused in {tier}: {body}"
        );
    }

    daemon.stop().await;
    environment.cleanup().await;
}

/// A call refused by the rate limit is counted in its method's tier, and only
/// there; calls let through are counted in theirs.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_call_is_counted_under_its_tier() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, address) = daemon_with_metrics(&environment, |config| {
        let file: RateLimitFileConfig = toml::from_str("health_limit = 1\n").expect("section");
        config.rate_limit = RateLimitSettings::resolve(file, &RateLimitArgs::default(), false)
            .expect("rate limit settings");
    })
    .await;
    let channel = daemon.channel().await;
    let key = daemon.api_key(&[Scope::Agents]).await;
    agent_pb::agent_control_client::AgentControlClient::new(channel.clone())
        .list_agents(with_key(agent_pb::ListAgentsRequest::default(), &key))
        .await
        .expect("List with a key");
    let mut health = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: String::new(),
    };
    health
        .check(request())
        .await
        .expect("the first health check");
    let refused = health.check(request()).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let body = scrape(address).await;
    let counter = |name: &str, tier: &str| {
        value_of(&body, &format!("{name}{{tier=\"{tier}\"}}"))
            .unwrap_or_else(|| panic!("{name} of {tier}: {body}"))
    };
    assert_eq!(counter("mosaic_rate_limit_refused_total", "health"), 1.0);
    assert_eq!(counter("mosaic_rate_limit_allowed_total", "health"), 1.0);
    assert_eq!(counter("mosaic_rate_limit_refused_total", "default"), 0.0);
    assert_eq!(counter("mosaic_rate_limit_allowed_total", "default"), 1.0);
    assert_eq!(
        counter("mosaic_rate_limit_allowed_total", "coordinator"),
        0.0
    );

    daemon.stop().await;
    environment.cleanup().await;
}

/// A unary call of `path` with an empty message; its gRPC code.
async fn call_made_up(channel: tonic::transport::Channel, path: &'static str, key: &str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the channel is ready");
    let request = if key.is_empty() {
        tonic::Request::new(())
    } else {
        with_key((), key)
    };
    grpc.unary::<(), (), _>(
        request,
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map_or_else(|status| status.code(), |_| Code::Ok)
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_add_no_series_of_their_own() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, address) = daemon_with_metrics(&environment, |_| {}).await;
    let channel = daemon.channel().await;
    let key = daemon.api_key(&[Scope::Agents]).await;
    // Refused before any handler (no key), and unimplemented (a key): a
    // scanner trying names must not grow the label set either way.
    let federation = "/mosaic.federation.v1.Federation/MadeUpByAScanner";
    let agents = "/mosaic.agent.v1.AgentControl/MadeUpByAClient";
    let stranger = "/scanner.v1.Probe/MadeUpEntirely";
    assert_eq!(
        call_made_up(channel.clone(), federation, "").await,
        Code::Unauthenticated
    );
    assert_eq!(
        call_made_up(channel.clone(), agents, &key).await,
        Code::Unimplemented
    );
    assert_eq!(
        call_made_up(channel.clone(), stranger, "").await,
        Code::Unimplemented
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = scrape(address).await;
        let recorded = sum_of(&body, "mosaic_grpc_call_duration_seconds_count");
        if recorded >= 3.0 || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!body.contains("MadeUp"), "{body}");
    for (service, code) in [
        ("mosaic.federation.v1.Federation", "UNAUTHENTICATED"),
        ("mosaic.agent.v1.AgentControl", "UNIMPLEMENTED"),
        ("unknown", "UNIMPLEMENTED"),
    ] {
        assert_eq!(
            value_of(
                &body,
                &format!(
                    "mosaic_grpc_calls_total{{service=\"{service}\",method=\"unknown\",code=\"{code}\"}}"
                )
            ),
            Some(1.0),
            "{service} {code}: {body}"
        );
    }

    daemon.stop().await;
    environment.cleanup().await;
}
