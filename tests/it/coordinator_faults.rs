//! The daemon while PostgreSQL is cut off or stops answering (with the fault
//! proxy): calls fail with UNAVAILABLE within the store's call deadline, the
//! coordinator's Health says NOT_SERVING with the database DOWN,
//! `grpc.health.v1` follows for the server and every service, and all of it
//! recovers when the database does.

use std::time::Duration;

use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use mosaic_mesh::auth::Scope;

use crate::support::Backend;
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};
use crate::support::fault_proxy::{Fault, FaultProxy};

/// `url` with its `host:port` replaced by `address`.
fn through(url: &str, address: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (authority, path) = rest.split_once('/').expect("path");
    let credentials = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"));
    format!(
        "{scheme}://{}{address}/{path}",
        credentials.unwrap_or_default()
    )
}

/// Polls the standard health service until the server (the empty name) and
/// every service report `wanted`.
async fn wait_for_standard_health(
    client: &mut HealthClient<tonic::transport::Channel>,
    wanted: ServingStatus,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for service in std::iter::once("").chain(mosaic_mesh::proto::SERVICE_NAMES) {
        loop {
            let status = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .expect("health check")
                .into_inner()
                .status;
            if status == wanted as i32 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "grpc.health.v1 never said {wanted:?} for {service:?} (last {status})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The `host:port` of PostgreSQL in `url`, resolved.
async fn postgres_address(url: &str) -> std::net::SocketAddr {
    let upstream = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(authority, _)| authority.rsplit('@').next().unwrap_or(authority).to_owned())
        .expect("host:port");
    tokio::net::lookup_host(upstream)
        .await
        .expect("resolve")
        .next()
        .expect("address")
}

/// A daemon whose PostgreSQL is behind a fault proxy, with a 1 s call
/// deadline, and a `coordinator` key. The daemon believes a key it has
/// checked for 5 minutes, so once a call has used it, calls during a fault
/// reach the database for their own work, not for the key.
async fn behind_a_proxy(environment: &TestEnvironment) -> (FaultProxy, TestDaemon, String) {
    let proxy = FaultProxy::start(postgres_address(&environment.database.url).await).await;
    let mut config = environment.config();
    config.database_url = through(&environment.database.url, proxy.address);
    config.storage.call_timeout = Duration::from_secs(1);
    config.auth_cache = Duration::from_secs(300);
    let daemon = environment.start_with(config).await.expect("start");
    let key = daemon.api_key(&[Scope::Coordinator]).await;
    (proxy, daemon, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_health_follows_a_postgres_cut() {
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let proxy = FaultProxy::start(postgres_address(&environment.database.url).await).await;
    let mut config = environment.config();
    config.database_url = through(&environment.database.url, proxy.address);
    let daemon = environment.start_with(config).await.expect("start");
    let channel = daemon.channel().await;
    let mut coordinator = CoordinatorClient::new(channel.clone());
    let mut standard = HealthClient::new(channel);

    let health = coordinator
        .health(pb::HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, i32::from(pb::ServingStatus::Serving));
    wait_for_standard_health(&mut standard, ServingStatus::Serving).await;

    proxy.set(Fault::Cut);
    // A probe is at most a second old: within it the cut is seen, and no
    // call hangs on the database.
    let started = tokio::time::Instant::now();
    let health = loop {
        let call = tokio::time::Instant::now();
        let health = coordinator
            .health(pb::HealthRequest {})
            .await
            .expect("health answers while the database is cut")
            .into_inner();
        assert!(call.elapsed() < Duration::from_secs(5), "no hang");
        if health.status == i32::from(pb::ServingStatus::NotServing) {
            break health;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the cut was not seen: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let database = health.database.expect("database");
    assert_eq!(database.status, i32::from(pb::ComponentStatus::Down));
    assert!(
        !database.detail.contains("postgres@"),
        "no URL in the detail: {}",
        database.detail
    );
    wait_for_standard_health(&mut standard, ServingStatus::NotServing).await;

    proxy.set(Fault::Pass);
    wait_for_standard_health(&mut standard, ServingStatus::Serving).await;
    let started = tokio::time::Instant::now();
    loop {
        let health = coordinator
            .health(pb::HealthRequest {})
            .await
            .expect("health")
            .into_inner();
        if health.status == i32::from(pb::ServingStatus::Serving) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the database's return was not seen: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_stops_answering_fails_calls_within_the_deadline() {
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let (proxy, daemon, key) = behind_a_proxy(&environment).await;
    let channel = daemon.channel().await;
    let mut coordinator = CoordinatorClient::new(channel.clone());
    let mut standard = HealthClient::new(channel);
    let list = || with_key(pb::ListJobsRequest::default(), &key);
    coordinator.list_jobs(list()).await.expect("list jobs");
    wait_for_standard_health(&mut standard, ServingStatus::Serving).await;

    // Packets dropped, no reset: without a deadline the call would wait for
    // the client's own (90 s seen).
    proxy.set(Fault::Blackhole);
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let status = coordinator
            .list_jobs(list())
            .await
            .expect_err("the database does not answer");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "UNAVAILABLE within the 1 s deadline (and the wait for a connection), took {:?}",
            started.elapsed()
        );
    }
    wait_for_standard_health(&mut standard, ServingStatus::NotServing).await;

    // Answers again: SERVING, and calls work (connections that lost bytes to
    // the black hole are closed, not reused).
    proxy.set(Fault::Pass);
    wait_for_standard_health(&mut standard, ServingStatus::Serving).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Err(status) = coordinator.list_jobs(list()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls still fail after the database came back: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..20 {
        coordinator
            .list_jobs(list())
            .await
            .expect("every call works once the database is back");
    }
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_listener_answers_healthz_and_readyz_with_the_database() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let proxy = FaultProxy::start(postgres_address(&environment.database.url).await).await;
    let mut config = environment.config();
    config.database_url = through(&environment.database.url, proxy.address);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    let daemon = environment.start_with(config).await.expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let address = loop {
        if let Some(address) = daemon.metrics.local_address() {
            break address;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no metrics listener"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let status_of = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response.lines().next().unwrap_or_default().to_owned()
    };
    assert_eq!(status_of("/healthz").await, "HTTP/1.1 200 OK");
    assert_eq!(status_of("/readyz").await, "HTTP/1.1 200 OK");
    proxy.set(Fault::Cut);
    assert_eq!(status_of("/healthz").await, "HTTP/1.1 200 OK");
    let started = tokio::time::Instant::now();
    assert_eq!(
        status_of("/readyz").await,
        "HTTP/1.1 503 Service Unavailable"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    proxy.set(Fault::Pass);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status_of("/readyz").await != "HTTP/1.1 200 OK" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready again after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}

/// `GetJob` reads on the connection its concurrent calls share
/// (`store/shared_reads.rs`): when that connection is cut or stops
/// answering, calls fail with UNAVAILABLE within the deadline, and the next
/// calls after the database is back open a new one instead of failing on
/// the old.
#[tokio::test(flavor = "multi_thread")]
async fn get_job_recovers_after_its_shared_connection_is_cut_or_goes_silent() {
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let (proxy, daemon, key) = behind_a_proxy(&environment).await;
    let mut coordinator = CoordinatorClient::new(daemon.channel().await);
    let job = coordinator
        .create_job(with_key(
            pb::CreateJobRequest {
                job_type: "review".to_owned(),
                workspace: "w1".to_owned(),
                ..pb::CreateJobRequest::default()
            },
            &key,
        ))
        .await
        .expect("create a job")
        .into_inner()
        .job
        .expect("the job");
    let get = || {
        with_key(
            pb::GetJobRequest {
                job_id: job.job_id.clone(),
            },
            &key,
        )
    };
    coordinator
        .get_job(get())
        .await
        .expect("read before a fault");

    for fault in [Fault::Cut, Fault::Blackhole] {
        proxy.set(fault);
        let started = tokio::time::Instant::now();
        let status = coordinator
            .get_job(get())
            .await
            .expect_err("the database is gone");
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{fault:?}: {status:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{fault:?}: UNAVAILABLE within the 1 s deadline, took {:?}",
            started.elapsed()
        );

        proxy.set(Fault::Pass);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Err(status) = coordinator.get_job(get()).await {
            assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "{fault:?}: {status:?}"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{fault:?}: reads still fail after the database came back: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..20 {
            let read = coordinator
                .get_job(get())
                .await
                .expect("every read works once the database is back")
                .into_inner()
                .job
                .expect("the job");
            assert_eq!(read.job_id, job.job_id);
        }
    }
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}
