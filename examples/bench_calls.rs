//! The cost of a call (issue 23, item 3): daemon CPU per call, read from /proc
//! (the `mosaicd` process's utime + stime before and after each measurement),
//! and throughput, at 8 and 32 concurrent clients (a mutual-TLS connection
//! each, closed loop), for `grpc.health.v1.Health/Check`, `Coordinator/Health`
//! (no API key), `Coordinator/CreateJob` and `Coordinator/GetJob` of one job (a
//! `coordinator`-scope API key, cached by the daemon), beside a bare tonic
//! unary echo over the same TLS in a process of its own (the baseline), and
//! the floor of a call that reads PostgreSQL: the same echo reading GetJob's
//! row before each answer, once with tokio-postgres directly (a prepared
//! statement on one pipelined connection) and once through the daemon's
//! `Store`. Two
//! daemons, each on a new PostgreSQL database with Redis rate limiting (its own
//! prefix, limits that never refuse), log filter `info`: `[server] access_log`
//! `"off"` and the default `"info"` (a line per call to a file). Rounds
//! alternate all measurements; medians of the rounds are shown, with the CPU of
//! the `redis-server` and `postgres` processes per call in the same windows.
//! Within a round the reads run forward in odd rounds and backward in even
//! ones, and the writes (`CreateJob`) come last.
//!
//! `cargo build --release --bin mosaicd --example bench_calls && target/release/examples/bench_calls`
//! (`BENCH_SECONDS` per measurement, default 3; `BENCH_ROUNDS`, default 3;
//! `MOSAIC_TEST_DATABASE_URL`; `BENCH_REDIS_URL`, default
//! `redis://127.0.0.1:6379`; `BENCH_ONLY`, to measure only some calls while
//! profiling: comma-separated parts of `ACCESS_LOG:Call`, e.g.
//! `-:Echo,off:GetJob`). Markdown on stdout; progress on stderr, with each
//! measurement as it is made (µs per call, calls/s).

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use common::daemon::{ClientIdentity, Daemon, PreparedDaemon, with_key};
use common::echo::{self, EchoMessage, EchoProcess};
use common::load::{Errors, closed_loop, describe_errors};
use common::stats::{Samples, median, ratio, setting, verdict};
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::store::testing::TestDatabase;
use prost::Message as _;
use tonic::transport::Channel;

const CLIENTS: [usize; 2] = [8, 32];
const ACCESS_LOGS: [&str; 2] = ["off", "info"];
const WARM_UP: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Call {
    Echo,
    EchoRawRead,
    EchoStoreRead,
    GrpcHealth,
    CoordinatorHealth,
    GetJob,
    CreateJob,
}

const DAEMON_CALLS: [Call; 4] = [
    Call::GrpcHealth,
    Call::CoordinatorHealth,
    Call::GetJob,
    Call::CreateJob,
];
const CHEAP_CALLS: [Call; 3] = [Call::GrpcHealth, Call::CoordinatorHealth, Call::GetJob];

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Echo => "bare echo (baseline)",
            Call::EchoRawRead => "echo + one PostgreSQL read (tokio-postgres)",
            Call::EchoStoreRead => "echo + one PostgreSQL read (the daemon's `Store`)",
            Call::GrpcHealth => "`grpc.health.v1.Health/Check`",
            Call::CoordinatorHealth => "`Coordinator/Health`",
            Call::GetJob => "`Coordinator/GetJob`",
            Call::CreateJob => "`Coordinator/CreateJob`",
        }
    }
}

/// Connections; each call takes the next in turn, so N callers on the first N
/// connections keep about one call in flight on each.
#[derive(Clone)]
struct Pool {
    channels: Arc<Vec<Channel>>,
    size: usize,
    next: Arc<AtomicUsize>,
}

impl Pool {
    fn new(channels: Arc<Vec<Channel>>, size: usize) -> Pool {
        let size = size.clamp(1, channels.len());
        let next = Arc::new(AtomicUsize::new(0));
        Pool {
            channels,
            size,
            next,
        }
    }

    fn take(&self) -> Channel {
        self.channels[self.next.fetch_add(1, Ordering::Relaxed) % self.size].clone()
    }
}

/// A process to measure and how to call it.
struct Target {
    pid: u32,
    channels: Arc<Vec<Channel>>,
    key: String,
    job_id: String,
    echo: EchoMessage,
}

/// One measurement, or the medians of several.
#[derive(Clone, Copy, Default)]
struct Figures {
    calls_per_second: f64,
    cpu_us: f64,
    servers_us: f64,
}

/// CPU time so far of every Redis and PostgreSQL server process.
fn servers_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| matches!(comm.trim(), "redis-server" | "postgres"))
        })
        .filter_map(common::machine::cpu_time)
        .sum()
}

fn cpu(pid: u32) -> anyhow::Result<Duration> {
    common::machine::cpu_time(pid).with_context(|| format!("no CPU time for process {pid}"))
}

fn create_request() -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        job_type: "bench".to_owned(),
        workspace: "bench".to_owned(),
        payload_json: "{\"n\":1}".to_owned(),
        ..pb::CreateJobRequest::default()
    }
}

/// `call` on `target` from `callers` clients for `window`.
async fn measure(
    call: Call,
    target: &Target,
    callers: usize,
    window: Duration,
) -> anyhow::Result<(Figures, Errors)> {
    let pool = Pool::new(Arc::clone(&target.channels), callers);
    let (key, job_id) = (target.key.clone(), target.job_id.clone());
    let message = target.echo.clone();
    let (cpu_before, servers_before) = (cpu(target.pid)?, servers_cpu());
    let (samples, errors): (Samples, Errors) =
        closed_loop(callers, usize::MAX, window, pool, move |pool: Pool| {
            let (channel, key, job_id) = (pool.take(), key.clone(), job_id.clone());
            let (message, mut jobs) = (message.clone(), CoordinatorClient::new(channel.clone()));
            async move {
                match call {
                    Call::Echo | Call::EchoRawRead | Call::EchoStoreRead => {
                        let mut client = tonic::client::Grpc::new(channel);
                        echo::call(&mut client, message).await.map(drop)
                    }
                    Call::GrpcHealth => {
                        let request = tonic_health::pb::HealthCheckRequest::default();
                        let mut client =
                            tonic_health::pb::health_client::HealthClient::new(channel);
                        client.check(request).await.map(drop)
                    }
                    Call::CoordinatorHealth => jobs.health(pb::HealthRequest {}).await.map(drop),
                    Call::GetJob => {
                        let request = with_key(pb::GetJobRequest { job_id }, &key);
                        jobs.get_job(request).await.map(drop)
                    }
                    Call::CreateJob => {
                        let request = with_key(create_request(), &key);
                        jobs.create_job(request).await.map(drop)
                    }
                }
            }
        })
        .await;
    let cpu_used = cpu(target.pid)?.saturating_sub(cpu_before);
    let servers_used = servers_cpu().saturating_sub(servers_before);
    let calls = samples.latencies.len().max(1) as f64;
    let figures = Figures {
        calls_per_second: samples.throughput(),
        cpu_us: cpu_used.as_secs_f64() * 1e6 / calls,
        servers_us: servers_used.as_secs_f64() * 1e6 / calls,
    };
    Ok((figures, errors))
}

/// A daemon on a new PostgreSQL database with Redis rate limiting and
/// `access_log`, `connections` connections to it, a coordinator-scope key and
/// one job.
async fn start_daemon(
    access_log: &str,
    identity: &ClientIdentity,
    connections: usize,
) -> anyhow::Result<(Daemon, TestDatabase, Target)> {
    let redis_url =
        std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let database = TestDatabase::postgres().await?;
    let prepared = PreparedDaemon::on(&format!("calls-{access_log}"), Some(database.url.clone()))?;
    let prefix = format!("bench_calls:{}:{access_log}:", std::process::id());
    let extra = format!("[server]\naccess_log = \"{access_log}\"\n");
    // Appended TOML cannot reopen `[rate_limit]` or the root keys the base
    // config writes, so these settings go in as variables.
    let limits = ["GLOBAL", "WEBHOOK", "COORDINATOR", "HEALTH", "FEDERATION"]
        .map(|tier| format!("MOSAIC_RATE_LIMIT_{tier}_LIMIT"));
    let mut env = vec![
        ("MOSAIC_LOG", "info"),
        ("MOSAIC_REDIS_URL", redis_url.as_str()),
        ("MOSAIC_RATE_LIMIT_STORAGE", "redis"),
        ("MOSAIC_RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
    ];
    // Limits that never refuse.
    env.extend(limits.iter().map(|name| (name.as_str(), "100000000")));
    let daemon = prepared.serve_with_env(&extra, &env).await?;
    let store = mosaic_mesh::store::Store::connect(&database.url).await?;
    let scopes = [mosaic_mesh::auth::Scope::Coordinator];
    let key = mosaic_mesh::auth::create_api_key(&store, "bench-calls", &scopes).await?;
    let key = key.secret.to_string();
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(daemon.channel(identity).await?);
    }
    let job = CoordinatorClient::new(channels[0].clone())
        .create_job(with_key(create_request(), &key))
        .await?
        .into_inner()
        .job
        .context("CreateJob returned no job")?;
    let target = Target {
        pid: daemon.pid,
        channels: Arc::new(channels),
        key,
        job_id: job.job_id,
        echo: EchoMessage::default(),
    };
    Ok((daemon, database, target))
}

/// A counter's value in Prometheus text.
fn metric<'a>(text: &'a str, name: &str) -> &'a str {
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '));
    value.unwrap_or("?").trim()
}

type Results = BTreeMap<(usize, &'static str, Call), Vec<Figures>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    echo::run_if_echo_server().await?;
    let window = Duration::from_secs_f64(setting("BENCH_SECONDS", 3.0_f64));
    let rounds = setting("BENCH_ROUNDS", 3.0_f64).max(1.0) as usize;
    let machine = common::machine::description();
    let connections = CLIENTS.into_iter().max().unwrap_or(1);
    eprintln!("bench_calls: starting the echo server and two daemons");
    let identity = ClientIdentity::new().await?;
    let echo_process = EchoProcess::start(None).await?;
    let mut servers = Vec::new();
    for access_log in ACCESS_LOGS {
        let server = start_daemon(access_log, &identity, connections).await?;
        servers.push((access_log, server));
    }
    // The echo carries as many bytes each way as a GetJob.
    let (_, _, first) = &servers[0].1;
    let get_job = pb::GetJobRequest {
        job_id: first.job_id.clone(),
    };
    let job = CoordinatorClient::new(first.channels[0].clone())
        .get_job(with_key(get_job.clone(), &first.key))
        .await?
        .into_inner();
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let key = echo_process.key.clone();
        channels.push(identity.channel(&echo_process.url, key).await?);
    }
    let echo_target = Target {
        pid: echo_process.pid,
        channels: Arc::new(channels),
        key: String::new(),
        job_id: String::new(),
        echo: EchoMessage {
            payload: vec![0x5a; get_job.encoded_len()],
            reply_bytes: u32::try_from(job.encoded_len())?,
        },
    };
    // The floor of a GetJob that reads the database: the echo, reading the
    // first daemon's job from its database before each answer.
    let (_, database, _) = &servers[0].1;
    let mut reading_targets = Vec::new();
    for (mode, call) in echo::READ_MODES
        .into_iter()
        .zip([Call::EchoRawRead, Call::EchoStoreRead])
    {
        let process = EchoProcess::reading(mode, &database.url, &first.job_id).await?;
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(identity.channel(&process.url, process.key.clone()).await?);
        }
        let target = Target {
            pid: process.pid,
            channels: Arc::new(channels),
            key: String::new(),
            job_id: String::new(),
            echo: echo_target.echo.clone(),
        };
        reading_targets.push((call, target, process));
    }
    let mut plan = vec![("-", Call::Echo, &echo_target)];
    for (call, target, _) in &reading_targets {
        plan.push(("-", *call, target));
    }
    for (access_log, (_, _, target)) in &servers {
        plan.extend(DAEMON_CALLS.map(|call| (*access_log, call, target)));
    }
    // The writes last in every round: a measurement made just after
    // thousands of inserts shares the machine with what PostgreSQL does
    // about them (WAL, vacuum), which the reads before them are spared.
    plan.sort_by_key(|(_, call, _)| *call == Call::CreateJob);

    // To profile one call: only the measurements named (rows not measured
    // print NaN).
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        plan.retain(|(log, call, _)| {
            let name = format!("{log}:{call:?}");
            only.split(',').any(|part| name.contains(part))
        });
    }
    eprintln!("warming up");
    for (_, call, target) in &plan {
        measure(*call, target, connections, WARM_UP).await?;
    }
    let mut results = Results::new();
    let mut failed = Vec::new();
    for callers in CLIENTS {
        for round in 1..=rounds {
            eprintln!("{callers} clients, round {round}/{rounds}");
            // The reads forward in odd rounds and backward in even ones
            // (the writes always last), so that no measurement always
            // follows the same one and a drift over a round cancels out.
            let (reads, writes) = plan.split_at(
                plan.iter()
                    .position(|(_, call, _)| *call == Call::CreateJob)
                    .unwrap_or(plan.len()),
            );
            let backward = round % 2 == 0;
            let reads: Vec<_> = if backward {
                reads.iter().rev().collect()
            } else {
                reads.iter().collect()
            };
            for (log, call, target) in reads.into_iter().chain(writes) {
                let (figures, errors) = measure(*call, target, callers, window).await?;
                eprintln!(
                    "  {log} {call:?}: {:.1} µs/call, {:.0} calls/s",
                    figures.cpu_us, figures.calls_per_second
                );
                results
                    .entry((callers, log, *call))
                    .or_default()
                    .push(figures);
                if !errors.is_empty() {
                    let errors = describe_errors(&errors);
                    failed.push(format!("{} ({log}, {callers}): {errors}", call.name()));
                }
            }
        }
    }

    let mut counters = Vec::new();
    for (access_log, (daemon, _, _)) in &servers {
        let text = daemon.scrape_metrics().await?;
        counters.push(format!(
            "access_log {access_log}: Redis checks {}, fallback checks {}, log lines dropped {}",
            metric(&text, "mosaic_rate_limit_redis_checks_total"),
            metric(&text, "mosaic_rate_limit_fallback_checks_total"),
            metric(&text, "mosaic_log_lines_dropped_total"),
        ));
    }
    print_report(&results, &machine, window, rounds, &counters);
    for (_, (daemon, database, _)) in servers {
        daemon.stop().await;
        let _ = database.cleanup().await;
    }
    anyhow::ensure!(failed.is_empty(), "failed calls: {}", failed.join("; "));
    Ok(())
}

fn print_report(
    results: &Results,
    machine: &str,
    window: Duration,
    rounds: usize,
    counters: &[String],
) {
    let get = |callers: usize, log: &'static str, call: Call| {
        let rounds = results
            .get(&(callers, log, call))
            .map_or(&[][..], Vec::as_slice);
        let median_of = |field: fn(&Figures) -> f64| median(rounds.iter().map(field).collect());
        Figures {
            calls_per_second: median_of(|figures| figures.calls_per_second),
            cpu_us: median_of(|figures| figures.cpu_us),
            servers_us: median_of(|figures| figures.servers_us),
        }
    };
    println!(
        "Machine: {machine}; at the end: {}.",
        common::machine::load_average()
    );
    println!(
        "{:.1} s per measurement after {} ms of warm-up, {rounds} rounds, medians shown.\n",
        window.as_secs_f64(),
        WARM_UP.as_millis()
    );
    let mut goals = Vec::new();
    for callers in CLIENTS {
        let echo = get(callers, "-", Call::Echo);
        println!("{callers} clients:\n");
        println!(
            "| call | access log | calls/s | daemon CPU µs/call | × echo | Redis + PostgreSQL CPU µs/call |"
        );
        println!("|---|---|---|---|---|---|");
        let row = |call: Call, log: &str, figures: Figures| {
            println!(
                "| {} | {log} | {:.0} | {:.1} | {:.2} | {:.1} |",
                call.name(),
                figures.calls_per_second,
                figures.cpu_us,
                ratio(figures.cpu_us, echo.cpu_us),
                figures.servers_us
            );
        };
        row(Call::Echo, "-", echo);
        for call in [Call::EchoRawRead, Call::EchoStoreRead] {
            row(call, "-", get(callers, "-", call));
        }
        for log in ACCESS_LOGS {
            for call in DAEMON_CALLS {
                row(call, log, get(callers, log, call));
            }
            let cheap =
                CHEAP_CALLS.map(|call| (call, ratio(get(callers, log, call).cpu_us, echo.cpu_us)));
            let shown: Vec<String> = cheap
                .iter()
                .map(|(call, times)| format!("{} {times:.2}×", call.name()))
                .collect();
            goals.push(format!(
                "- cheap calls ≤ 2× the echo's daemon CPU per call ({:.1} µs), {callers} clients, access_log {log}: {} ({})",
                echo.cpu_us,
                verdict(cheap.iter().all(|(_, times)| *times <= 2.0)),
                shown.join(", ")
            ));
            let floor_us = get(callers, "-", Call::EchoRawRead).cpu_us;
            let floor = ratio(floor_us, echo.cpu_us);
            let store_floor = ratio(get(callers, "-", Call::EchoStoreRead).cpu_us, echo.cpu_us);
            let get_job_us = get(callers, log, Call::GetJob).cpu_us;
            let get_job = ratio(get_job_us, echo.cpu_us);
            // What 2× the echo leaves beyond the read, and what GetJob
            // spends there: the key's check, the count, the row's decoding,
            // the answer's encoding and the call's record.
            let headroom_us = 2.0 * echo.cpu_us - floor_us;
            goals.push(format!(
                "- `GetJob`'s floor, {callers} clients, access_log {log}: GetJob {get_job:.2}× echo; echo + one PostgreSQL read {floor:.2}× with tokio-postgres, {store_floor:.2}× through the `Store`: the 2× goal is {} for a GetJob that reads the database. 2× the echo leaves {headroom_us:.1} µs per call beyond the read; GetJob spends {:.1} µs there",
                if floor > 2.0 { "out of reach" } else { "within reach" },
                get_job_us - floor_us
            ));
            let throughput = ratio(
                get(callers, log, Call::CoordinatorHealth).calls_per_second,
                get(callers, log, Call::GrpcHealth).calls_per_second,
            );
            goals.push(format!(
                "- `Coordinator/Health` ≥ 0.8× the throughput of `grpc.health.v1`, {callers} clients, access_log {log}: {} ({throughput:.2}×)",
                verdict(throughput >= 0.8)
            ));
        }
        println!();
    }
    println!("Goals:\n\n{}\n", goals.join("\n"));
    println!("Counters at the end: {}.", counters.join("; "));
}
