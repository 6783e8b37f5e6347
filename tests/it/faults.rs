//! Faults between the daemon and its dependencies, made with the fault proxy.

use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::federation as pb;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, with_key};
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

#[tokio::test(flavor = "multi_thread")]
async fn postgres_cut_gives_unavailable_quickly_and_recovers() {
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
    let admin = daemon.api_key(&[Scope::Admin]).await;
    let mut client = pb::federation_client::FederationClient::new(daemon.channel().await);
    let rotate = || {
        with_key(
            pb::RotateKeysRequest {
                grace_period_seconds: Some(60),
            },
            &admin,
        )
    };
    client
        .rotate_keys(rotate())
        .await
        .expect("works before the cut");
    let key_before_cut = client
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("identity")
        .into_inner()
        .instance
        .expect("instance")
        .key_id;

    proxy.set(Fault::Cut);
    let started = tokio::time::Instant::now();
    let status = client
        .rotate_keys(rotate())
        .await
        .expect_err("database is cut");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "no hang: {:?}",
        started.elapsed()
    );
    // The daemon itself stays up and answers what needs no database.
    let during = client
        .get_instance(pb::GetInstanceRequest {})
        .await
        .expect("identity needs no database")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        during.key_id, key_before_cut,
        "nothing rotated during the cut"
    );

    proxy.set(Fault::Pass);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.rotate_keys(rotate()).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "recovers after the cut"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    daemon.stop().await;
    drop(proxy);
    environment.cleanup().await;
}
