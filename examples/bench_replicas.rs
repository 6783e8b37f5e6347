//! Benchmark for replicas of one instance (issue 17): how long a key rotation
//! made through one replica takes to reach another. Two daemons in this process on one PostgreSQL database (named by
//! `MOSAIC_TEST_DATABASE_URL`) with one master key, each serving on its own
//! loopback port. Run with `cargo run --release --example bench_replicas`.

use std::time::{Duration, Instant};

use mosaic_mesh::config::{Config, ConfigArgs, FileConfig};
use mosaic_mesh::identity::MasterKey;
use mosaic_mesh::server::Shared;
use mosaic_mesh::store::testing::TestDatabase;

/// Rotations measured.
const ROTATIONS: usize = 5;

async fn start(
    dir: &std::path::Path,
    database_url: &str,
    master_key: &str,
) -> anyhow::Result<Shared> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let args = ConfigArgs {
        data_dir: Some(dir.to_path_buf()),
        database_url: Some(database_url.to_owned()),
        listen: Some(address),
        name: Some("replicated".to_owned()),
        public_url: Some(format!("https://{address}")),
        ..ConfigArgs::default()
    };
    let mut config = Config::resolve(FileConfig::default(), &args)?;
    config.master_key = Some(mosaic_mesh::config::Secret(zeroize::Zeroizing::new(
        master_key.to_owned(),
    )));
    let shared = mosaic_mesh::server::prepare(&config).await?;
    let serving = shared.clone();
    tokio::spawn(async move {
        let _ = mosaic_mesh::server::serve(listener, serving, std::future::pending()).await;
    });
    Ok(shared)
}

/// Rotates through `a` and returns how long `b` took to use the new key.
async fn rotation_reaches(a: &Shared, b: &Shared) -> anyhow::Result<Duration> {
    let rotated = a.identity.rotate(Duration::from_secs(3600)).await?;
    let started = Instant::now();
    let new_key = rotated.public_key().clone();
    while *b.identity.current().public_key() != new_key {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the rotation did not reach the other replica within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started.elapsed())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mosaic_mesh::tls::install_default_provider();
    let database = TestDatabase::postgres().await?;
    let master_key = MasterKey::generate()?.to_base64().to_string();
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start(dir_a.path(), &database.url, &master_key).await?;
    let b = start(dir_b.path(), &database.url, &master_key).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut notified = Vec::with_capacity(ROTATIONS);
    for _ in 0..ROTATIONS {
        notified.push(rotation_reaches(&a, &b).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("## Replicas: a rotation reaching another replica\n");
    println!(
        "Two daemons of one instance on one PostgreSQL database, {ROTATIONS} rotations through A, \
         the time until B signs and serves with the new key (`IdentityManager::current`, which \
         the TLS resolver reads on each handshake).\n"
    );
    println!("| path | median | min | max |");
    println!("|---|---|---|---|");
    let row = |name: &str, samples: &[Duration]| {
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        println!(
            "| {name} | {:.1?} | {min:.1?} | {max:.1?} |",
            median(samples.to_vec())
        );
    };
    row("notification (LISTEN/NOTIFY)", &notified);
    println!(
        "\nGoal: within 5 s — **{}**; without the notification (its connection lost), the \
         check every {} s bounds it.",
        if median(notified.clone()) <= Duration::from_secs(5) {
            "met"
        } else {
            "not met"
        },
        mosaic_mesh::replicas::identity::CHECK_EVERY.as_secs()
    );
    drop((a, b));
    database.cleanup().await?;
    Ok(())
}
