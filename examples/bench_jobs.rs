//! Benchmark of the job coordinator: job lifecycles per second over gRPC+TLS
//! with 8 concurrent clients, on PostgreSQL and on SQLite, beside a
//! simple-insert loop (one single-row INSERT per call, through the same store
//! and pool) on the same databases and, on PostgreSQL, `pgbench` running a
//! one-row INSERT script with the same number of clients. Prints the figures
//! and their ratios.
//!
//! A lifecycle is `CreateJob`, `UpdateJobStatus(RUNNING)`, `CompleteJob`: the
//! state machine has no PENDING -> COMPLETED edge, so the issue's
//! "CreateJob + CompleteJob pair" needs the start in between. Each of the
//! three calls is one committed write (the job row, label rows and creation
//! entry, or the guarded update and its history entry). The goal is
//! stated per pair of write calls, so beside the lifecycle ratio the report
//! gives the pairs-equivalent ratio: calls/s / 2 / inserts/s. Two more gRPC
//! measurements show what every call pays before the coordinator's own work:
//! calls refused before the store (with the API-key lookup) and health
//! checks (without it).
//!
//! Run: `cargo run --release --example bench_jobs` (PostgreSQL from
//! `MOSAIC_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`;
//! `BENCH_SECONDS` per measurement, default 5; `BENCH_CLIENTS`, default 8;
//! `pgbench` from `PATH`, skipped when absent).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::{Config, ConfigArgs, FileConfig};
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::store::testing::TestDatabase;
use mosaic_mesh::store::{ApiKeyRecord, Store};
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn authorized<T>(message: T, key: &str) -> BenchResult<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(request)
}

/// One client's loop: whole lifecycles until `deadline`.
async fn lifecycles(
    mut client: CoordinatorClient<tonic::transport::Channel>,
    key: String,
    deadline: tokio::time::Instant,
    done: Arc<AtomicU64>,
) -> BenchResult<()> {
    while tokio::time::Instant::now() < deadline {
        let job = client
            .create_job(authorized(
                pb::CreateJobRequest {
                    job_type: "bench".to_owned(),
                    workspace: "bench".to_owned(),
                    payload_json: "{\"n\":1}".to_owned(),
                    ..pb::CreateJobRequest::default()
                },
                &key,
            )?)
            .await?
            .into_inner()
            .job
            .ok_or("no job")?;
        client
            .update_job_status(authorized(
                pb::UpdateJobStatusRequest {
                    job_id: job.job_id.clone(),
                    state: pb::JobState::Running.into(),
                    message: String::new(),
                },
                &key,
            )?)
            .await?;
        client
            .complete_job(authorized(
                pb::CompleteJobRequest {
                    job_id: job.job_id,
                    result_json: "{\"ok\":true}".to_owned(),
                },
                &key,
            )?)
            .await?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// One client's loop of calls refused before they reach the store
/// (`GetJob` with an empty id is INVALID_ARGUMENT) until `deadline`: what
/// every call pays before the coordinator's own work (TLS, HTTP/2, the
/// API-key check, rate limiting, the handler's dispatch).
async fn refused_calls(
    mut client: CoordinatorClient<tonic::transport::Channel>,
    key: String,
    deadline: tokio::time::Instant,
    done: Arc<AtomicU64>,
) -> BenchResult<()> {
    while tokio::time::Instant::now() < deadline {
        let refused = client
            .get_job(authorized(pb::GetJobRequest::default(), &key)?)
            .await;
        match refused {
            Err(status) if status.code() == tonic::Code::InvalidArgument => {}
            other => return Err(format!("expected INVALID_ARGUMENT, got {other:?}").into()),
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// One client's loop of `grpc.health.v1.Health/Check` calls, which need no
/// API key and read no table, until `deadline`: the refused calls above less
/// the API-key lookup.
async fn health_checks(
    channel: tonic::transport::Channel,
    deadline: tokio::time::Instant,
    done: Arc<AtomicU64>,
) -> BenchResult<()> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    while tokio::time::Instant::now() < deadline {
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// What each gRPC client does in a measurement.
#[derive(Clone, Copy)]
enum Workload {
    /// Whole job lifecycles; counts lifecycles.
    Lifecycles,
    /// Calls refused before the store; counts calls.
    Refused,
    /// Health checks without an API key; counts calls.
    Health,
}

/// `workload` units per second against a daemon on `database_url`.
async fn grpc_per_second(
    database_url: &str,
    workload: Workload,
    clients: u64,
    seconds: u64,
) -> BenchResult<f64> {
    let data_dir = tempfile::tempdir()?;
    let args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: Some(database_url.to_owned()),
        listen: Some("127.0.0.1:0".parse()?),
        name: Some("bench".to_owned()),
        ..ConfigArgs::default()
    };
    let mut config = Config::resolve(FileConfig::default(), &args)?;
    // The production tiers (100 calls a minute per key) would measure the
    // limiter, not the coordinator; the in-memory limiter stays in the path.
    let generous = mosaic_mesh::ratelimit::RateLimitFileConfig {
        global_limit: Some(100_000_000),
        coordinator_limit: Some(100_000_000),
        health_limit: Some(100_000_000),
        ..Default::default()
    };
    config.rate_limit =
        mosaic_mesh::ratelimit::RateLimitSettings::resolve(generous, &Default::default(), false)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let shared = mosaic_mesh::server::prepare(&config).await?;
    let server_key = shared.identity.current().public_key().clone();
    let key = mosaic_mesh::auth::create_api_key(&shared.store, "bench", &[Scope::Coordinator])
        .await?
        .secret
        .to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mosaic_mesh::server::serve(listener, shared, async {
        let _ = stopped.await;
    }));

    let tls = Arc::new(mosaic_mesh::tls::pinned_client_config(
        ServerPin::PublicKey(server_key),
    )?);
    let url = format!("https://{address}");
    let done = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..clients {
        // One connection per client, as separate processes would have.
        let channel =
            mosaic_mesh::tls::connect_channel(&url, Some(tls.clone()), ChannelTimeouts::default())
                .await?;
        let client = CoordinatorClient::new(channel.clone());
        workers.push(match workload {
            Workload::Lifecycles => {
                tokio::spawn(lifecycles(client, key.clone(), deadline, done.clone()))
            }
            Workload::Refused => {
                tokio::spawn(refused_calls(client, key.clone(), deadline, done.clone()))
            }
            Workload::Health => tokio::spawn(health_checks(channel, deadline, done.clone())),
        });
    }
    for worker in workers {
        worker.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(());
    server.await??;
    Ok(rate)
}

/// Lifecycles per second through the coordinator's engine directly: the same
/// transactions without gRPC, TLS, authentication and rate limiting.
async fn engine_lifecycles_per_second(
    database_url: &str,
    clients: u64,
    seconds: u64,
) -> BenchResult<f64> {
    use mosaic_mesh::coordinator::jobs::{Jobs, NewJob};
    use mosaic_mesh::coordinator::state::JobChange;
    let store = Store::connect(database_url).await?;
    store.run_migrations().await?;
    let config = Config::resolve(FileConfig::default(), &ConfigArgs::default())?;
    let state = mosaic_mesh::coordinator::CoordinatorState::default();
    let jobs = Jobs::new(store, &state, &config.coordinator);
    let done = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..clients {
        let jobs = jobs.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let new_job = NewJob {
                    job_type: "bench".to_owned(),
                    workspace: "bench".to_owned(),
                    payload_json: "{\"n\":1}".to_owned(),
                    ..NewJob::default()
                };
                let (job, _) = jobs.create(new_job, "bench").await?;
                let start = JobChange::Start {
                    message: String::new(),
                };
                jobs.change(&job.id, start, "bench").await?;
                let complete = JobChange::Complete {
                    result_json: "{\"ok\":true}".to_owned(),
                };
                jobs.change(&job.id, complete, "bench").await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            BenchResult::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Single-row INSERTs per second through the store, `clients` at a time.
async fn inserts_per_second(database_url: &str, clients: u64, seconds: u64) -> BenchResult<f64> {
    let store = Store::connect(database_url).await?;
    store.run_migrations().await?;
    let done = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for worker in 0..clients {
        let store = store.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut index = 0u64;
            while tokio::time::Instant::now() < deadline {
                index += 1;
                let record = ApiKeyRecord {
                    id: format!("bench-{worker}-{index}"),
                    name: "bench".to_owned(),
                    key_hash: format!("{worker}-{index}").into_bytes(),
                    prefix: "bench".to_owned(),
                    scopes: vec!["coordinator".to_owned()],
                    created_at_ms: 0,
                    last_used_at_ms: None,
                    revoked_at_ms: None,
                };
                store.insert_api_key(&record).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            BenchResult::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Transactions per second of `pgbench` running a one-row INSERT script
/// (prepared statements, as diesel uses) with `clients` clients against the
/// PostgreSQL database at `database_url`: the reference, beside the
/// diesel loop above. `None` when `pgbench` is not installed.
async fn pgbench_inserts_per_second(
    database_url: &str,
    clients: u64,
    seconds: u64,
) -> BenchResult<Option<f64>> {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut connection = AsyncPgConnection::establish(database_url).await?;
    diesel::sql_query(
        "CREATE TABLE pgbench_inserts (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, \
         created_at_ms BIGINT NOT NULL)",
    )
    .execute(&mut connection)
    .await?;
    drop(connection);
    let script_dir = tempfile::tempdir()?;
    let script = script_dir.path().join("insert.sql");
    std::fs::write(
        &script,
        "INSERT INTO pgbench_inserts (name, created_at_ms) VALUES ('bench', 0);\n",
    )?;
    let output = tokio::process::Command::new("pgbench")
        .args(["--no-vacuum", "--protocol=prepared"])
        .arg(format!("--client={clients}"))
        .arg("--jobs=2")
        .arg(format!("--time={seconds}"))
        .arg(format!("--file={}", script.display()))
        .arg(database_url)
        .output()
        .await;
    let output = match output {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    // "tps = 1234.567890 (without initial connection time)"
    let tps = stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("tps = "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|number| number.parse::<f64>().ok())
        .next_back()
        .ok_or_else(|| format!("no tps line in the pgbench output: {stdout}"))?;
    Ok(Some(tps))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BenchResult<()> {
    mosaic_mesh::tls::install_default_provider();
    let seconds = setting("BENCH_SECONDS", 5);
    let clients = setting("BENCH_CLIENTS", 8);
    println!("bench_jobs: {clients} concurrent clients, {seconds} s per measurement");

    let mut rows = Vec::new();
    let mut pgbench = Ok(None);
    for backend in ["postgres", "sqlite"] {
        let sqlite_dir = tempfile::tempdir()?;
        let mut databases = Vec::new();
        // One database per measurement: each daemon keeps its identity,
        // sealed with a key from its own data directory, in the database.
        for _ in 0..5 {
            databases.push(if backend == "postgres" {
                TestDatabase::postgres().await?
            } else {
                TestDatabase::sqlite(sqlite_dir.path())
            });
        }
        println!("{backend}: gRPC lifecycles, engine lifecycles, inserts ...");
        // A measurement that fails is reported in its row, not fatal: the
        // others still say something.
        let lifecycles =
            grpc_per_second(&databases[0].url, Workload::Lifecycles, clients, seconds).await;
        let refused = grpc_per_second(&databases[3].url, Workload::Refused, clients, seconds).await;
        let health = grpc_per_second(&databases[4].url, Workload::Health, clients, seconds).await;
        let engine = engine_lifecycles_per_second(&databases[1].url, clients, seconds).await;
        let inserts = inserts_per_second(&databases[2].url, clients, seconds).await;
        if backend == "postgres" {
            println!("postgres: pgbench ...");
            pgbench = pgbench_inserts_per_second(&databases[2].url, clients, seconds).await;
        }
        for database in databases {
            database.cleanup().await?;
        }
        rows.push((backend, lifecycles, engine, inserts, refused, health));
    }

    println!();
    println!(
        "{:<9} {:>12} {:>9} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "backend",
        "lifecycles/s",
        "calls/s",
        "inserts/s",
        "lc ratio",
        "pair ratio",
        "engine lc/s",
        "engine lc"
    );
    let mut failures = Vec::new();
    let mut floors = Vec::new();
    // The baseline is the simple-insert rate on PostgreSQL; the table
    // holds each backend to its own, and the SQLite pairs are set against
    // PostgreSQL's below as well.
    let mut postgres_inserts = f64::NAN;
    let mut sqlite_pairs = f64::NAN;
    for (backend, lifecycles, engine, inserts, refused, health) in rows {
        let mut figure = |name: &str, result: BenchResult<f64>| match result {
            Ok(value) => value,
            Err(error) => {
                failures.push(format!("{backend} {name}: {error}"));
                f64::NAN
            }
        };
        let lifecycles = figure("gRPC lifecycles", lifecycles);
        let engine = figure("engine lifecycles", engine);
        let inserts = figure("inserts", inserts);
        floors.push((
            backend,
            figure("refused calls", refused),
            figure("health checks", health),
            lifecycles * 3.0,
        ));
        let calls = lifecycles * 3.0;
        match backend {
            "postgres" => postgres_inserts = inserts,
            _ => sqlite_pairs = calls / 2.0,
        }
        println!(
            "{:<9} {:>12.0} {:>9.0} {:>10.0} {:>10.3} {:>10.3} {:>12.0} {:>10.3}",
            backend,
            lifecycles,
            calls,
            inserts,
            lifecycles / inserts,
            calls / 2.0 / inserts,
            engine,
            engine / inserts
        );
    }
    for (backend, refused, health, calls) in floors {
        // Each client runs one call at a time, so a call's wall time is
        // clients / rate; the difference is the coordinator's own work.
        let per_call_us = |rate: f64| clients as f64 / rate * 1e6;
        println!(
            "{backend:<9} per call at {clients} clients: job call {:.0} us, refused before store {:.0} us ({refused:.0}/s), health check {:.0} us ({health:.0}/s)",
            per_call_us(calls),
            per_call_us(refused),
            per_call_us(health),
        );
    }
    println!(
        "sqlite    pairs/s / PostgreSQL's diesel inserts/s: {:.3}",
        sqlite_pairs / postgres_inserts
    );
    match pgbench {
        Ok(Some(tps)) => println!(
            "pgbench   one-row INSERT, {clients} clients: {tps:.0} tps (sqlite pairs/s / pgbench tps: {:.3})",
            sqlite_pairs / tps
        ),
        Ok(None) => println!("pgbench   not installed; skipped"),
        Err(error) => failures.push(format!("pgbench: {error}")),
    }
    for failure in &failures {
        println!("failed: {failure}");
    }
    println!();
    println!("lifecycle = CreateJob + UpdateJobStatus(RUNNING) + CompleteJob over gRPC+TLS,");
    println!("each call one committed write; calls/s = 3 x lifecycles/s.");
    println!("inserts/s = single-row INSERTs through the same store pool, same concurrency.");
    println!("lc ratio = lifecycles/s / inserts/s.");
    println!("pair ratio = calls/s / 2 / inserts/s (the issue's CreateJob+CompleteJob pair).");
    println!("engine lc/s = the same lifecycles through coordinator::jobs::Jobs directly");
    println!("(no gRPC, TLS, authentication or rate limiting); engine lc = its lc ratio.");
    println!("refused before store = GetJob with an empty id (INVALID_ARGUMENT) over gRPC+TLS:");
    println!("TLS, HTTP/2, the API-key lookup and rate limiting, no job work. health check =");
    println!("grpc.health.v1 Check: the same without an API key. Per call = clients / rate.");
    Ok(())
}
