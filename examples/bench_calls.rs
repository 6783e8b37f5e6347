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
use std::time::Duration;

use anyhow::Context as _;
use common::calls::{Call, Target, counters, load, start_daemon, start_echoes};
use common::daemon::{ClientIdentity, Launcher};
use common::load::{Errors, describe_errors};
use common::stats::{median, ratio, setting, verdict};

const CLIENTS: [usize; 2] = [8, 32];
const ACCESS_LOGS: [&str; 2] = ["off", "info"];
const WARM_UP: Duration = Duration::from_millis(500);

const DAEMON_CALLS: [Call; 4] = [
    Call::GrpcHealth,
    Call::CoordinatorHealth,
    Call::GetJob,
    Call::CreateJob,
];
const CHEAP_CALLS: [Call; 3] = [Call::GrpcHealth, Call::CoordinatorHealth, Call::GetJob];

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

/// `call` on `target` from `callers` clients for `window`.
async fn measure(
    call: Call,
    target: &Target,
    callers: usize,
    window: Duration,
) -> anyhow::Result<(Figures, Errors)> {
    let (cpu_before, servers_before) = (cpu(target.pid)?, servers_cpu());
    let (samples, errors) = load(call, target, callers, usize::MAX, window).await;
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

type Results = BTreeMap<(usize, &'static str, Call), Vec<Figures>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::echo::run_if_echo_server().await?;
    let window = Duration::from_secs_f64(setting("BENCH_SECONDS", 3.0_f64));
    let rounds = setting("BENCH_ROUNDS", 3.0_f64).max(1.0) as usize;
    let machine = common::machine::description();
    let connections = CLIENTS.into_iter().max().unwrap_or(1);
    eprintln!("bench_calls: starting the echo server and two daemons");
    let identity = ClientIdentity::new().await?;
    let launcher = Launcher::default();
    let mut servers = Vec::new();
    for access_log in ACCESS_LOGS {
        let server = start_daemon(&launcher, access_log, &[], &identity, connections).await?;
        servers.push((access_log, server));
    }
    // The echo, and the floor of a GetJob that reads the database: the
    // echo, reading the first daemon's job from its database before each
    // answer.
    let (_, database, first) = &servers[0].1;
    let echoes = start_echoes(&launcher, &identity, connections, first, database).await?;
    let mut plan = Vec::new();
    for (call, target, _) in &echoes {
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

    let daemons: Vec<_> = servers
        .iter()
        .map(|(access_log, (daemon, _, _))| (*access_log, daemon))
        .collect();
    let counters = counters(&daemons).await?;
    print_report(&results, &machine, window, rounds, &counters);
    for (_, (daemon, database, _)) in servers {
        daemon.stop().await;
        let _ = database.cleanup().await;
    }
    anyhow::ensure!(failed.is_empty(), "failed calls: {}", failed.join("; "));
    Ok(())
}

fn print_report(results: &Results, machine: &str, window: Duration, rounds: usize, counters: &str) {
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
    println!("Counters at the end: {counters}.");
}
