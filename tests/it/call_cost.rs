//! The cost of a call (issue "The cost of a call"): no call opens a
//! connection of its own to Redis or the database; anonymous health checks
//! are answered from a probe shared by the calls of one second; calls are
//! served on serving threads of their own.

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::ratelimit::Storage;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, with_key};
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

/// `mosaicd serve` on a new data dir with `server_toml` in its `[server]`
/// section; its log is left to the caller.
async fn serve_with(
    server_toml: &str,
) -> (
    tempfile::TempDir,
    tokio::process::Child,
    String,
    crate::support::binary::LogLines,
) {
    let dir = tempfile::tempdir().expect("data dir");
    let config = dir.path().join("mosaic.toml");
    std::fs::write(
        &config,
        format!("[server]\n{server_toml}\n\n[rate_limit]\nglobal_limit = 1000000\nhealth_limit = 1000000\n"),
    )
    .expect("write the config");
    let mut command = crate::support::binary::mosaicd(dir.path());
    command.arg("--config").arg(&config);
    let (child, address, lines) = crate::support::binary::spawn_serve_with_log(command).await;
    (dir, child, address, lines)
}

/// `calls` standard health checks on one connection, all within 60 s.
async fn health_checks(address: &str, dir: &std::path::Path, calls: usize) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(crate::support::binary::channel_to(address, dir).await);
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for call in 0..calls {
            health
                .check(HealthCheckRequest::default())
                .await
                .unwrap_or_else(|status| panic!("health call {call}: {status:?}"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{calls} health checks did not finish within 60 s"));
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_never_wait_for_a_log_nobody_reads() {
    // The daemon's stderr is a pipe nobody reads after start: it fills after
    // a few hundred call lines. Calls go on, the log's queue takes the lines.
    let (dir, mut child, address, lines) = serve_with("").await;
    health_checks(&address, dir.path(), 3000).await;
    child.kill().await.expect("stop the daemon");
    drop(lines);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_call_log_line_follows_server_access_log() {
    for (level, expected_lines) in [("info", 20), ("debug", 0), ("off", 0)] {
        let (dir, mut child, address, mut lines) =
            serve_with(&format!("access_log = \"{level}\"")).await;
        health_checks(&address, dir.path(), 20).await;
        // A clean stop: what is queued is written before the process ends.
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
            .expect("the daemon's pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = child.wait().await.expect("wait for the daemon");
        assert!(status.success(), "the daemon exited with {status}");
        let mut call_lines = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("mosaic_mesh::access") && line.contains("rpc.method=Check") {
                assert!(
                    line.contains("client=127.0.0.1:"),
                    "the caller's address: {line}"
                );
                call_lines += 1;
            }
        }
        assert_eq!(call_lines, expected_lines, "access_log = {level:?}");
    }
}

/// The open connections of serving thread `thread`, by `/metrics`.
async fn open_on_thread(metrics: std::net::SocketAddr, thread: usize) -> f64 {
    let body = crate::metrics::scrape(metrics).await;
    crate::metrics::value_of(
        &body,
        &format!("mosaic_serving_thread_connections{{thread=\"{thread}\"}}"),
    )
    .unwrap_or_else(|| panic!("no gauge for serving thread {thread}: {body}"))
}

/// Each connection goes to the serving thread with the fewest open, every
/// thread answers its calls (a `GetJob` reading PostgreSQL on the thread's
/// own read connection), and a closed connection leaves its thread's count.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_spread_over_the_serving_threads_and_leave_them_when_closed() {
    let environment = TestEnvironment::new(Backend::Postgres).await;
    let (daemon, metrics) = crate::metrics::daemon_with_metrics(&environment, |config| {
        config.serving_threads = 2;
    })
    .await;
    let key = daemon.api_key(&[Scope::Coordinator]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(CoordinatorClient::new(daemon.channel().await));
    }
    let job = clients[0]
        .create_job(with_key(
            pb::CreateJobRequest {
                job_type: "review".to_owned(),
                workspace: "w1".to_owned(),
                payload_json: "{}".to_owned(),
                ..pb::CreateJobRequest::default()
            },
            &key,
        ))
        .await
        .expect("create a job")
        .into_inner()
        .job
        .expect("the job");
    for (index, client) in clients.iter_mut().enumerate() {
        for _ in 0..3 {
            let found = client
                .get_job(with_key(
                    pb::GetJobRequest {
                        job_id: job.job_id.clone(),
                    },
                    &key,
                ))
                .await
                .unwrap_or_else(|status| panic!("GetJob on connection {index}: {status:?}"))
                .into_inner();
            assert_eq!(found.job.expect("the job").job_id, job.job_id);
        }
    }
    assert_eq!(open_on_thread(metrics, 0).await, 2.0);
    assert_eq!(open_on_thread(metrics, 1).await, 2.0);

    drop(clients);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let open = (
            open_on_thread(metrics, 0).await,
            open_on_thread(metrics, 1).await,
        );
        if open == (0.0, 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections still counted open 10 s after they closed: {open:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    environment.cleanup().await;
}
