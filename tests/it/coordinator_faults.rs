//! The coordinator while PostgreSQL is cut off (with the fault proxy): its
//! Health says NOT_SERVING with the database DOWN, `grpc.health.v1` follows,
//! and both recover when the database does.

use std::time::Duration;

use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::Backend;
use crate::support::daemon::TestEnvironment;
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

/// Polls the standard health service until the coordinator reports `wanted`.
async fn wait_for_standard_health(
    client: &mut HealthClient<tonic::transport::Channel>,
    wanted: ServingStatus,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: "mosaic.coordinator.v1.Coordinator".to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        if status == wanted as i32 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "grpc.health.v1 never said {wanted:?} (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_health_follows_a_postgres_cut() {
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let upstream = environment
        .database
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(authority, _)| authority.rsplit('@').next().unwrap_or(authority).to_owned())
        .expect("host:port");
    let upstream: std::net::SocketAddr = tokio::net::lookup_host(upstream)
        .await
        .expect("resolve")
        .next()
        .expect("address");
    let proxy = FaultProxy::start(upstream).await;
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
    let started = tokio::time::Instant::now();
    let health = coordinator
        .health(pb::HealthRequest {})
        .await
        .expect("health answers while the database is cut")
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    assert_eq!(health.status, i32::from(pb::ServingStatus::NotServing));
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
    let health = coordinator
        .health(pb::HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, i32::from(pb::ServingStatus::Serving));
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}
