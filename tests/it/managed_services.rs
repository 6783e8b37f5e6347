//! What a production deployment needs of its managed services: Redis (or
//! Valkey) over TLS (`rediss://`), checked against the operator's CA.
//! (TLS to PostgreSQL is tested in `store/postgres_tls.rs`.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::ratelimit::Storage;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::support::Backend;
use crate::support::daemon::TestEnvironment;
use crate::support::redis::free_port;

/// A `redis-server` of our own serving TLS only, on a certificate for
/// `localhost` that a CA of the test's signed. Killed when dropped.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a CA (`ca.pem`) and a certificate it signed for localhost
/// (`server.pem`, `server.key`) into `dir`.
fn certificates(dir: &Path) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("server params")
        .signed_by(&server_key, &issuer)
        .expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), server.pem()).expect("write");
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).expect("write");
}

impl TlsRedis {
    async fn start(dir: &Path) -> TlsRedis {
        let port = free_port();
        let path = |name: &str| dir.join(name).display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &path("server.pem")])
            .args(["--tls-key-file", &path("server.key")])
            .args(["--tls-ca-cert-file", &path("ca.pem")])
            .args(["--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server with TLS on {port} did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TlsRedis { port, child }
    }
}

/// Coordinator/Health's Redis component of a daemon limiting through
/// `redis_url`, trusting `ca_file`: the first one that is OK, or the last
/// of five probes (a second apart: the first probe after the start also
/// opens the pool's TLS connection, which a busy machine may not finish
/// within the probe's 50 ms).
async fn redis_health(
    environment: &TestEnvironment,
    redis_url: &str,
    ca_file: Option<&Path>,
) -> pb::ComponentHealth {
    let mut config = environment.config();
    config.redis_url = Some(redis_url.to_owned());
    config.rate_limit.storage = Storage::Redis;
    config.rate_limit.redis_prefix = crate::support::redis::unique_prefix();
    config.rate_limit.redis_ca_file = ca_file.map(Path::to_path_buf);
    let daemon = environment.start_with(config).await.expect("daemon");
    let mut client = CoordinatorClient::new(daemon.channel().await);
    let mut probes = 0;
    let health = loop {
        let health = client
            .health(pb::HealthRequest {})
            .await
            .expect("health")
            .into_inner()
            .redis
            .expect("redis");
        probes += 1;
        if health.status == i32::from(pb::ComponentStatus::Ok) || probes == 5 {
            break health;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    };
    daemon.stop().await;
    health
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rediss_url_is_served_over_tls_checked_against_the_operators_ca() {
    let dir = tempfile::tempdir().expect("temporary directory");
    certificates(dir.path());
    let redis = TlsRedis::start(dir.path()).await;
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = dir.path().join("ca.pem");

    let health = redis_health(&environment, &url, Some(&ca)).await;
    assert_eq!(
        health.status,
        i32::from(pb::ComponentStatus::Ok),
        "{health:?}"
    );
    // The system's roots do not know the test's CA: the server is refused.
    let health = redis_health(&environment, &url, None).await;
    assert_eq!(
        health.status,
        i32::from(pb::ComponentStatus::Down),
        "{health:?}"
    );
    // Plain redis:// to a TLS-only port does not pass either.
    let health = redis_health(
        &environment,
        &format!("redis://localhost:{}", redis.port),
        None,
    )
    .await;
    assert_eq!(
        health.status,
        i32::from(pb::ComponentStatus::Down),
        "{health:?}"
    );
    environment.cleanup().await;
}
