//! Memory benchmark (issue 9): resident memory (VmRSS from /proc/PID/status) of
//! a `mosaicd serve` process, idle and with 10 000 agents recorded. The agents
//! are real: `true` spawned 10 000 times through AgentControl.Spawn by a gRPC
//! client over mutual TLS (8 concurrent callers), each run to completion, so
//! the daemon holds what a busy day leaves behind (records in SQLite, the
//! runtime's bookkeeping, output files). The 1 M rate-limit keys figure comes
//! from `bench_ratelimit` (in that benchmark's own process).
//!
//! `cargo build --release --bin mosaicd --examples && target/release/examples/bench_memory`
//! Options: `--agents N` (default 10000), `--markdown` (print only the Markdown
//! section on stdout; progress goes to stderr either way).

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::daemon::{ClientIdentity, PreparedDaemon, with_key};
use common::load::{closed_loop, describe_errors};
use common::machine::mib;
use common::stats::ratio;
use mosaic_mesh::proto::agent as pb;

const CALLERS: usize = 8;
/// The whole spawn phase stops after this, whatever the count reached.
const TIME_LIMIT: Duration = Duration::from_secs(600);

fn agents_option() -> anyhow::Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut agents = 10_000;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agents" => {
                agents = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--agents needs a number"))?
                    .parse()?;
            }
            "--markdown" => {}
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(agents)
}

/// Waits for the RSS to settle a moment, then reads it.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    common::machine::rss_kib(pid).ok_or_else(|| anyhow::anyhow!("cannot read VmRSS of {pid}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let agents = agents_option()?;
    let load_before = common::machine::load_average();
    eprintln!("bench_memory: starting mosaicd");
    let daemon = PreparedDaemon::new("bench-memory")?.serve("").await?;
    let client = ClientIdentity::new().await?;
    let control = pb::agent_control_client::AgentControlClient::new(daemon.channel(&client).await?);
    let key = daemon.api_key().to_owned();

    let started_rss = settled_rss(daemon.pid).await?;
    // Warm the paths (TLS session, pools, auth cache) without recording agents.
    let probe = {
        let key = key.clone();
        move |mut client: pb::agent_control_client::AgentControlClient<
            tonic::transport::Channel,
        >| {
            let request = with_key(
                pb::GetAgentRequest {
                    agent_id: "no-such-agent".to_owned(),
                },
                &key,
            );
            async move {
                match client.get_agent(request).await {
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
                    Err(status) => Err(status),
                    Ok(_) => Ok(()),
                }
            }
        }
    };
    let (_, errors) = closed_loop(CALLERS, 2_000, TIME_LIMIT, control.clone(), probe).await;
    anyhow::ensure!(errors.is_empty(), "warm-up failed: {errors:?}");
    let idle_rss = settled_rss(daemon.pid).await?;

    eprintln!("spawning `true` {agents} times");
    let spawn = {
        let key = key.clone();
        move |mut client: pb::agent_control_client::AgentControlClient<
            tonic::transport::Channel,
        >| {
            let request = with_key(
                pb::SpawnRequest {
                    agent_type: "true".to_owned(),
                    ..pb::SpawnRequest::default()
                },
                &key,
            );
            async move { client.spawn(request).await.map(|_| ()) }
        }
    };
    let mut checkpoints = Vec::new();
    let mut spawned = 0;
    let mut all_errors = common::load::Errors::new();
    let mut spawn_wall = Duration::ZERO;
    let step = agents.div_ceil(4).max(1);
    while spawned < agents && spawn_wall < TIME_LIMIT {
        let batch = step.min(agents - spawned);
        let (samples, errors) = closed_loop(
            CALLERS,
            batch,
            TIME_LIMIT - spawn_wall,
            control.clone(),
            spawn.clone(),
        )
        .await;
        spawned += samples.latencies.len();
        spawn_wall += samples.wall;
        for (code, count) in errors {
            *all_errors.entry(code).or_default() += count;
        }
        let rss = common::machine::rss_kib(daemon.pid).unwrap_or_default();
        eprintln!("{spawned} agents, RSS {}", mib(rss));
        checkpoints.push((spawned, rss));
    }
    // Every `true` has ended and been recorded once the list shows no RUNNING one.
    let mut listing = control.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let running = listing
            .list_agents(with_key(
                pb::ListAgentsRequest {
                    state: pb::AgentState::Running as i32,
                    ..pb::ListAgentsRequest::default()
                },
                &key,
            ))
            .await?
            .into_inner()
            .agents
            .len();
        if running == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let loaded_rss = settled_rss(daemon.pid).await?;

    println!("## Memory (issue 9)\n");
    println!(
        "VmRSS of the `mosaicd serve` process (a separate process, SQLite, default \
         settings apart from generous rate limits), read from /proc/PID/status. \"Idle\" is \
         after start-up and 2,000 warm-up calls (GetAgent over mutual TLS); the agents are \
         {spawned} real spawns of `true` through AgentControl.Spawn ({CALLERS} concurrent \
         callers, {:.0} spawns/s), all run to completion before the last reading. Load \
         average {load_before} at the start, {} at the end.\n",
        spawned as f64 / spawn_wall.as_secs_f64().max(1e-9),
        common::machine::load_average()
    );
    println!("| state | RSS | ÷ idle |");
    println!("|---|---|---|");
    println!(
        "| just started | {} | {:.2} |",
        mib(started_rss),
        ratio(started_rss as f64, idle_rss as f64)
    );
    println!("| idle (baseline) | {} | 1.00 |", mib(idle_rss));
    for (count, rss) in &checkpoints {
        println!(
            "| while spawning, {count} agents | {} | {:.2} |",
            mib(*rss),
            ratio(*rss as f64, idle_rss as f64)
        );
    }
    println!(
        "| **{spawned} agents recorded, all ended** | **{}** | **{:.2}** |",
        mib(loaded_rss),
        ratio(loaded_rss as f64, idle_rss as f64)
    );
    let per_agent = (loaded_rss.saturating_sub(idle_rss) as f64 * 1024.0) / spawned.max(1) as f64;
    println!(
        "\nGrowth per recorded agent: {per_agent:.0} B. Failed spawns: {}.\n",
        describe_errors(&all_errors)
    );
    daemon.stop().await;
    anyhow::ensure!(
        spawned == agents,
        "only {spawned} of {agents} agents within the time limit"
    );
    Ok(())
}
