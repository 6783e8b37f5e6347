//! The cost of a call (issue "The cost of a call"): no call opens a
//! connection of its own to Redis or the database; anonymous health checks
//! are answered from a probe shared by the calls of one second.

use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::ratelimit::Storage;

use crate::support::Backend;
use crate::support::daemon::TestEnvironment;
use crate::support::redis::PrivateRedis;

/// Connections the Redis server has accepted since it started.
async fn connections_received(redis: &PrivateRedis) -> u64 {
    let mut connection = crate::support::redis::connection(&redis.url())
        .await
        .expect("connect to the private redis");
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut connection)
        .await
        .expect("INFO stats");
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_health_checks_open_no_redis_connection_of_their_own() {
    let redis = PrivateRedis::start().await;
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let mut config = environment.config();
    config.redis_url = Some(redis.url());
    config.rate_limit.storage = Storage::Redis;
    let daemon = environment.start_with(config).await.expect("daemon");
    let mut client = CoordinatorClient::new(daemon.channel().await);
    let before = connections_received(&redis).await;
    for call in 0..1000 {
        let health = client
            .health(pb::HealthRequest {})
            .await
            .unwrap_or_else(|status| panic!("health call {call}: {status:?}"))
            .into_inner();
        assert_eq!(
            health.redis.expect("redis").status,
            i32::from(pb::ComponentStatus::Ok),
            "call {call}"
        );
    }
    // Our own INFO connection counts one; the daemon's pool holds at most 4.
    let opened = connections_received(&redis).await - before - 1;
    assert!(
        opened <= 4,
        "1000 health checks opened {opened} Redis connections"
    );
    daemon.stop().await;
    environment.cleanup().await;
}
