//! Benchmark for peering: envelope sealing and checking in memory, then a signed
//! ping round trip and a connection handshake between two daemons on loopback
//! over real mutual TLS (SQLite). Run with
//! `cargo run --release --example bench_peering`.

use std::time::{Duration, Instant};

use mosaic_mesh::config::{Config, ConfigArgs, FileConfig};
use mosaic_mesh::federation::ConnectRequest;
use mosaic_mesh::federation::envelope::{self, Routing, TrustedKey};
use mosaic_mesh::federation::state::OperatorAction;
use mosaic_mesh::identity::InstanceKey;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::server::Shared;

const ENVELOPES: usize = 5_000;
const PINGS: usize = 1_000;
const HANDSHAKES: usize = 50;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let count = u32::try_from(samples.len()).unwrap_or(u32::MAX).max(1);
    let at = |fraction: f64| samples[((samples.len() as f64 - 1.0) * fraction) as usize];
    println!(
        "{name:<40} n={:<6} mean={:>9.1?} p50={:>9.1?} p99={:>9.1?}",
        samples.len(),
        total / count,
        at(0.5),
        at(0.99)
    );
}

async fn start(dir: &std::path::Path, name: &str) -> anyhow::Result<(Shared, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let args = ConfigArgs {
        data_dir: Some(dir.to_path_buf()),
        listen: Some(address),
        name: Some(name.to_owned()),
        public_url: Some(format!("https://{address}")),
        ..ConfigArgs::default()
    };
    let mut config = Config::resolve(FileConfig::default(), &args)?;
    // The production tiers (100 calls a minute per key) would measure the
    // limiter, not this path; the in-memory limiter stays in the path.
    let generous = mosaic_mesh::ratelimit::RateLimitFileConfig {
        global_limit: Some(100_000_000),
        federation_limit: Some(100_000_000),
        health_limit: Some(100_000_000),
        ..Default::default()
    };
    config.rate_limit =
        mosaic_mesh::ratelimit::RateLimitSettings::resolve(generous, &Default::default(), false)?;
    // Pings are driven by the benchmark, not the background loop.
    config.federation.ping_interval = Duration::from_secs(3600);
    let shared = mosaic_mesh::server::prepare(&config).await?;
    let serving = shared.clone();
    tokio::spawn(async move {
        let _ = mosaic_mesh::server::serve(listener, serving, std::future::pending()).await;
    });
    Ok((shared, format!("https://{address}")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mosaic_mesh::tls::install_default_provider();

    // In memory: seal (serialise + sign) and parse + check + verify.
    let key = InstanceKey::generate()?;
    let trusted = [TrustedKey {
        key: key.public_key().clone(),
        valid_until_ms: None,
    }];
    let mut seal_times = Vec::with_capacity(ENVELOPES);
    let mut open_times = Vec::with_capacity(ENVELOPES);
    for _ in 0..ENVELOPES {
        let now = mosaic_mesh::clock::now_ms();
        let routing = Routing {
            sender_instance_id: "sender",
            recipient_instance_id: "receiver",
            workspace: "ws",
            now_ms: now,
            lifetime_ms: 60_000,
        };
        let started = Instant::now();
        let sealed = envelope::seal(
            &pb::PingPayload {
                header: Some(envelope::new_header(&routing, key.public_key().key_id())),
            },
            &key,
        )?;
        seal_times.push(started.elapsed());
        let started = Instant::now();
        let parsed = envelope::parse::<pb::PingPayload>(Some(&sealed))?;
        parsed.check_recipient("receiver")?;
        let signing = parsed.check_key(&trusted, key.public_key(), now)?;
        parsed.check_time(now, 300_000)?;
        parsed.verify_signature(&signing)?;
        open_times.push(started.elapsed());
    }
    summary("envelope seal (encode + P-256 sign)", seal_times);
    summary("envelope open (parse + checks + verify)", open_times);

    // Two daemons over real mTLS.
    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let (a, _) = start(dir_a.path(), "bench-a").await?;
    let (b, url_b) = start(dir_b.path(), "bench-b").await?;
    let b_id = b.identity.current().instance_id.clone();

    let mut handshake_times = Vec::with_capacity(HANDSHAKES);
    for index in 0..HANDSHAKES {
        let started = Instant::now();
        a.federation
            .connect_peer(ConnectRequest {
                url: url_b.clone(),
                workspace: format!("ws-{index}"),
                expected_fingerprint: None,
                granted_capabilities: Vec::new(),
                requested_capabilities: Vec::new(),
            })
            .await?;
        handshake_times.push(started.elapsed());
    }
    summary("ConnectPeer (first contact + request)", handshake_times);

    let inbound = b
        .store
        .find_open_connection("ws-0", &a.identity.current().instance_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no inbound connection"))?;
    let started = Instant::now();
    b.federation
        .operator_action(&inbound.id, OperatorAction::Accept, &[], "")
        .await?;
    summary("AcceptConnection (incl. notice)", vec![started.elapsed()]);
    let outbound = a
        .store
        .find_open_connection("ws-0", &b_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no outbound connection"))?;

    // Warm the channel, then time sequential signed pings.
    a.federation.ping(&outbound).await?;
    let mut ping_times = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let started = Instant::now();
        a.federation.ping(&outbound).await?;
        ping_times.push(started.elapsed());
    }
    summary("signed ping round trip (mTLS, SQLite)", ping_times);
    Ok(())
}
