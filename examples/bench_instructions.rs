//! Instructions per call (issue 23): the user-space instructions each server
//! process runs per call, counted by valgrind's callgrind. Unlike CPU time
//! (`bench_calls`), the count barely moves from run to run whatever else the
//! machine is doing, so it shows a change of a few hundred instructions on the
//! call path where whole-call timing on a small machine cannot. It counts no
//! kernel work (system calls, TCP, the loopback) and no time spent waiting on
//! memory: it guides work on the daemon's own code beside `bench_calls`, not
//! in its place. Valgrind's simulated CPU also lacks some instructions the
//! real one has, so code that picks its path by the CPU runs another path
//! here: ring's SHA-256, for one, runs its AVX code of about a thousand
//! instructions a block where a CPU with the SHA extensions runs a few dozen.
//!
//! The servers are `bench_calls`'s: the bare echo, the echo reading
//! `GetJob`'s row (with tokio-postgres, and through the daemon's `Store`), and
//! two daemons on PostgreSQL with Redis rate limiting, `access_log` `"off"`
//! and `"info"`. Each runs under `valgrind --tool=callgrind
//! --instr-atstart=no`. Per measurement: instrumentation on and the counters
//! zeroed (`callgrind_control`), a fixed number of calls from the clients
//! (closed loop, a mutual-TLS connection each), the counters dumped and
//! instrumentation off. The figure is the dump's total over the calls, less
//! what the process runs idle (its timers and pools, counted once over a few
//! seconds without calls) in as long as the calls took. Rounds repeat every
//! measurement after one uninstrumented warm-up. A daemon under callgrind is
//! given the longest Redis timeout there is, so that its limiter still counts
//! in Redis.
//!
//! `cargo build --release --bin mosaicd --example bench_instructions && target/release/examples/bench_instructions`
//! (`BENCH_CALLS` per measurement, default 2000; `BENCH_CLIENTS`, default 8;
//! `BENCH_ROUNDS`, default 2; `BENCH_CALLGRIND_DIR`, a directory to keep the
//! dumps in for `callgrind_annotate`, default a temporary one;
//! `MOSAIC_TEST_DATABASE_URL`; `BENCH_REDIS_URL`). Markdown on stdout;
//! progress on stderr.

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use common::calls::{Call, Target, counters, load, start_daemon, start_echoes};
use common::daemon::{ClientIdentity, Launcher};
use common::load::describe_errors;
use common::stats::{median, ratio, setting};

/// The daemon's calls measured, by access log.
const DAEMON_CALLS: [(&str, Call); 4] = [
    ("off", Call::GrpcHealth),
    ("off", Call::CoordinatorHealth),
    ("off", Call::GetJob),
    ("info", Call::GetJob),
];

/// A daemon under callgrind runs some fifty times slower than on its own,
/// and its calls to Redis would overrun the default timeout: the limiter
/// would count in memory instead. Redis gets the most time the setting
/// allows.
const SLOW_ENV: [(&str, &str); 1] = [("MOSAIC_RATE_LIMIT_REDIS_TIMEOUT_MS", "10000")];

/// How long each process is watched idle, to take out of its figures what
/// it does without calls (timers, pools) over the time the calls took.
const IDLE: Duration = Duration::from_secs(5);

/// Uninstrumented calls on each server before the first round.
const WARM_UP_CALLS: usize = 200;

/// A call may take this long under instrumentation, at most.
const TIME_LIMIT: Duration = Duration::from_secs(3600);

/// Runs `callgrind_control ARGS PID`.
async fn control(args: &[&str], pid: u32) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .await
        .context("cannot run callgrind_control (it comes with valgrind)")?;
    anyhow::ensure!(
        output.status.success(),
        "callgrind_control {args:?} {pid} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The newest dump of process `pid` in `dir` (`callgrind.PID.N`, the
/// highest N) and the instructions it counted (its `totals:` line).
fn newest_dump(dir: &Path, pid: u32) -> anyhow::Result<(PathBuf, u64)> {
    let prefix = format!("callgrind.{pid}.");
    let newest = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let number: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((number, entry.path()))
        })
        .max()
        .map(|(_, path)| path)
        .with_context(|| format!("no callgrind dump of process {pid} in {}", dir.display()))?;
    let text = std::fs::read_to_string(&newest)?;
    let total = text
        .lines()
        .find_map(|line| line.strip_prefix("totals:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", newest.display()))?;
    Ok((newest, total))
}

/// `calls` calls of `call` on `target` from `clients` clients; all must
/// succeed.
async fn run_calls(
    call: Call,
    target: &Target,
    clients: usize,
    calls: usize,
) -> anyhow::Result<()> {
    let (samples, errors) = load(call, target, clients, calls, TIME_LIMIT).await;
    anyhow::ensure!(
        errors.is_empty() && samples.latencies.len() == calls,
        "{}: {} of {calls} calls answered; failed: {}",
        call.name(),
        samples.latencies.len(),
        describe_errors(&errors)
    );
    Ok(())
}

/// The instructions `pid` runs while `work` runs, instrumented, and how
/// long that took.
async fn count<F: std::future::Future<Output = anyhow::Result<()>>>(
    pid: u32,
    dumps: &Path,
    work: F,
) -> anyhow::Result<(u64, Duration)> {
    control(&["--instr=on"], pid).await?;
    control(&["--zero"], pid).await?;
    let started = std::time::Instant::now();
    work.await?;
    let took = started.elapsed();
    control(&["--dump"], pid).await?;
    control(&["--instr=off"], pid).await?;
    let (dump, total) = newest_dump(dumps, pid)?;
    eprintln!(
        "    {}: {total} instructions in {:.1} s",
        dump.display(),
        took.as_secs_f64()
    );
    Ok((total, took))
}

/// The instructions a second `pid` runs with no calls.
async fn idle_rate(pid: u32, dumps: &Path) -> anyhow::Result<f64> {
    let (total, took) = count(pid, dumps, async {
        tokio::time::sleep(IDLE).await;
        Ok(())
    })
    .await?;
    Ok(total as f64 / took.as_secs_f64())
}

/// The instructions `target`'s process runs per call over `calls` calls,
/// less what it runs idle (`idle` a second) in as long.
async fn measure(
    call: Call,
    target: &Target,
    clients: usize,
    calls: usize,
    idle: f64,
    dumps: &Path,
) -> anyhow::Result<f64> {
    let work = run_calls(call, target, clients, calls);
    let (total, took) = count(target.pid, dumps, work).await?;
    Ok((total as f64 - idle * took.as_secs_f64()).max(0.0) / calls as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::echo::run_if_echo_server().await?;
    let calls = setting("BENCH_CALLS", 2000.0_f64).max(1.0) as usize;
    let clients = setting("BENCH_CLIENTS", 8.0_f64).max(1.0) as usize;
    let rounds = setting("BENCH_ROUNDS", 2.0_f64).max(1.0) as usize;
    let valgrind = std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .context("valgrind is needed: install it (Debian: apt install valgrind)")?;
    let valgrind = String::from_utf8_lossy(&valgrind.stdout).trim().to_owned();
    let temporary = tempfile::tempdir()?;
    let dumps = match std::env::var_os("BENCH_CALLGRIND_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => temporary.path().to_owned(),
    };
    std::fs::create_dir_all(&dumps)?;
    let launcher = Launcher {
        prefix: vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--quiet".to_owned(),
            "--instr-atstart=no".to_owned(),
            format!("--callgrind-out-file={}/callgrind.%p", dumps.display()),
        ],
        startup: Duration::from_secs(300),
    };
    eprintln!("bench_instructions: starting two daemons and three echo servers under callgrind");
    let identity = ClientIdentity::new().await?;
    let mut daemons = Vec::new();
    for access_log in ["off", "info"] {
        daemons.push((
            access_log,
            start_daemon(&launcher, access_log, &SLOW_ENV, &identity, clients).await?,
        ));
    }
    let (_, (_, database, first)) = &daemons[0];
    let echoes = start_echoes(&launcher, &identity, clients, first, database).await?;
    let mut plan: Vec<(&str, Call, &Target)> = echoes
        .iter()
        .map(|(call, target, _)| ("-", *call, target))
        .collect();
    for (log, call) in DAEMON_CALLS {
        if let Some((_, (_, _, target))) = daemons.iter().find(|(access_log, _)| *access_log == log)
        {
            plan.push((log, call, target));
        }
    }
    eprintln!("warming up ({WARM_UP_CALLS} calls each, uninstrumented)");
    for (_, call, target) in &plan {
        run_calls(*call, target, clients, WARM_UP_CALLS).await?;
    }
    eprintln!("each process idle for {} s", IDLE.as_secs());
    let mut idle = BTreeMap::new();
    for (_, _, target) in &plan {
        if let std::collections::btree_map::Entry::Vacant(entry) = idle.entry(target.pid) {
            entry.insert(idle_rate(target.pid, &dumps).await?);
        }
    }
    let mut results: BTreeMap<(&str, Call), Vec<f64>> = BTreeMap::new();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        for (log, call, target) in &plan {
            let idle = idle.get(&target.pid).copied().unwrap_or(0.0);
            let per_call = measure(*call, target, clients, calls, idle, &dumps).await?;
            eprintln!("  {log} {call:?}: {per_call:.0} instructions/call");
            results.entry((log, *call)).or_default().push(per_call);
        }
    }
    print_report(&results, &plan, &valgrind, calls, clients, rounds);
    let running: Vec<_> = daemons
        .iter()
        .map(|(access_log, (daemon, _, _))| (*access_log, daemon))
        .collect();
    println!("\nCounters at the end: {}.", counters(&running).await?);
    for (_, (daemon, database, _)) in daemons {
        daemon.stop().await;
        let _ = database.cleanup().await;
    }
    Ok(())
}

fn print_report(
    results: &BTreeMap<(&str, Call), Vec<f64>>,
    plan: &[(&str, Call, &Target)],
    valgrind: &str,
    calls: usize,
    clients: usize,
    rounds: usize,
) {
    let figures = |log: &str, call: Call| results.get(&(log, call)).cloned().unwrap_or_default();
    let middle = |log: &str, call: Call| median(figures(log, call));
    let echo = middle("-", Call::Echo);
    println!(
        "Machine: {}; {valgrind} (callgrind); {calls} calls per measurement from {clients} clients, {rounds} rounds, medians compared; what each process runs idle in as long is taken out.\n",
        common::machine::description()
    );
    println!("| call | access log | instructions per call, by round | × echo |");
    println!("|---|---|---|---|");
    for (log, call, _) in plan {
        let shown: Vec<String> = figures(log, *call)
            .iter()
            .map(|count| format!("{count:.0}"))
            .collect();
        println!(
            "| {} | {log} | {} | {:.2} |",
            call.name(),
            shown.join(", "),
            ratio(middle(log, *call), echo)
        );
    }
    let floor = middle("-", Call::EchoStoreRead);
    println!();
    for log in ["off", "info"] {
        let get_job = middle(log, Call::GetJob);
        println!(
            "- `GetJob`, access_log {log}: {get_job:.0} instructions per call, {:.2}× the echo's {echo:.0}; {:.0} beyond the echo reading the same row through the `Store` ({floor:.0}), which 2× the echo leaves {:.0} for.",
            ratio(get_job, echo),
            get_job - floor,
            2.0 * echo - floor
        );
    }
}
