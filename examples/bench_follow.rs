//! Following an agent live (issue 19): two `mosaicd` processes A and B
//! peered on loopback; an agent on B prints, and a client follows it either
//! on B itself (AgentControl.WatchAgent, the baseline) or through A
//! (Federation.WatchRemoteAgent: A sends a signed `agent.watch`, B streams
//! signed batches, A verifies each and passes the events on), as the CLI's
//! `agent logs --follow` and `agent logs --peer --follow` do.
//!
//! Throughput: an agent prints LINES lines of 100 characters as fast as it
//! can; the watcher, started with the agent, counts lines and bytes from the
//! first line to the agent's end. Latency: an agent prints its clock (ns)
//! every 10 ms; the watcher subtracts it from its own clock on arrival.
//! Rounds alternate local and remote.
//!
//! `cargo build --release --bin mosaicd --examples && target/release/examples/bench_follow`
//! Options: `--lines N` (default 60000; the output stays below the 8 MiB
//! capture cap, so a watcher that falls behind reads every line back from the
//! journal), `--ticks N` latency lines per round (default 300), `--rounds N`
//! (default 3). SQLite in temporary data dirs; loopback only.

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::daemon::with_key;
use common::mesh::{Mesh, WORKSPACE};
use common::stats::{human, percentile, ratio, verdict};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use tonic::transport::Channel;

/// Goal: remote throughput ÷ local throughput.
const GOAL: f64 = 0.5;

struct Options {
    lines: u64,
    ticks: u64,
    rounds: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        lines: 60_000,
        ticks: 300,
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> anyhow::Result<u64> {
            Ok(args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a number"))?
                .parse()?)
        };
        match arg.as_str() {
            "--lines" => options.lines = number()?,
            "--ticks" => options.ticks = number()?,
            "--rounds" => options.rounds = usize::try_from(number()?)?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(options)
}

/// Where the watch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// WatchAgent on B.
    Local,
    /// WatchRemoteAgent on A.
    Remote,
}

/// The clients of one run.
struct Clients {
    agents_b: agent_pb::agent_control_client::AgentControlClient<Channel>,
    federation_a: pb::federation_client::FederationClient<Channel>,
    key_a: String,
    key_b: String,
    b_id: String,
}

/// A stream of events, whichever way it goes.
enum Events {
    Local(tonic::Streaming<agent_pb::WatchAgentResponse>),
    /// A batch of events per message, and what is left of the last one.
    Remote(
        tonic::Streaming<pb::WatchRemoteAgentResponse>,
        std::collections::VecDeque<agent_pb::WatchAgentResponse>,
    ),
}

impl Events {
    async fn next(&mut self) -> anyhow::Result<Option<agent_pb::WatchAgentResponse>> {
        match self {
            Events::Local(stream) => Ok(stream.message().await?),
            Events::Remote(stream, left) => loop {
                if let Some(event) = left.pop_front() {
                    return Ok(Some(event));
                }
                match stream.message().await? {
                    Some(message) => left.extend(message.events),
                    None => return Ok(None),
                }
            },
        }
    }
}

impl Clients {
    /// Spawns `prompt` on B as A's agent (through A, so both paths may
    /// follow it).
    async fn spawn(&mut self, prompt: &str) -> anyhow::Result<String> {
        let response = self
            .federation_a
            .spawn_remote_agent(with_key(
                pb::SpawnRemoteAgentRequest {
                    peer_instance_id: self.b_id.clone(),
                    workspace: WORKSPACE.to_owned(),
                    message_id: String::new(),
                    spawn: Some(agent_pb::SpawnRequest {
                        agent_type: "sh".to_owned(),
                        prompt: prompt.to_owned(),
                        ..agent_pb::SpawnRequest::default()
                    }),
                },
                &self.key_a,
            ))
            .await?
            .into_inner();
        Ok(response
            .agent
            .ok_or_else(|| anyhow::anyhow!("no agent"))?
            .agent_id)
    }

    /// Every event of `agent_id` from its first, by `path`.
    async fn watch(&mut self, path: Path, agent_id: &str) -> anyhow::Result<Events> {
        Ok(match path {
            Path::Local => Events::Local(
                self.agents_b
                    .watch_agent(with_key(
                        agent_pb::WatchAgentRequest {
                            agent_id: agent_id.to_owned(),
                            include_output: true,
                            from_sequence: Some(1),
                        },
                        &self.key_b,
                    ))
                    .await?
                    .into_inner(),
            ),
            Path::Remote => Events::Remote(
                self.federation_a
                    .watch_remote_agent(with_key(
                        pb::WatchRemoteAgentRequest {
                            peer_instance_id: self.b_id.clone(),
                            workspace: WORKSPACE.to_owned(),
                            agent_id: agent_id.to_owned(),
                            include_output: true,
                            from_sequence: Some(1),
                        },
                        &self.key_a,
                    ))
                    .await?
                    .into_inner(),
                std::collections::VecDeque::new(),
            ),
        })
    }
}

/// Lines and bytes per second from the first line to the agent's end.
struct Throughput {
    lines: u64,
    bytes: u64,
    wall: Duration,
}

async fn throughput(clients: &mut Clients, path: Path, lines: u64) -> anyhow::Result<Throughput> {
    let agent_id = clients
        .spawn(&format!("sleep 0.3; seq -f '%0100g' 1 {lines}"))
        .await?;
    let mut events = clients.watch(path, &agent_id).await?;
    let (mut seen, mut bytes, mut first) = (0, 0, None);
    while let Some(event) = events.next().await? {
        if let Some(agent_pb::watch_agent_response::Event::OutputLine(line)) = event.event {
            first.get_or_insert_with(Instant::now);
            seen += 1;
            bytes += line.line.len() as u64 + 1;
        }
    }
    let wall = first.map_or(Duration::ZERO, |first| first.elapsed());
    anyhow::ensure!(seen == lines, "{path:?}: {seen} of {lines} lines");
    Ok(Throughput {
        lines: seen,
        bytes,
        wall,
    })
}

/// Time from a line written on B to its arrival, one sample per line.
async fn latency(clients: &mut Clients, path: Path, ticks: u64) -> anyhow::Result<Vec<Duration>> {
    let agent_id = clients
        .spawn(&format!(
            "sleep 0.3; for i in $(seq 1 {ticks}); do date +%s%N; sleep 0.01; done"
        ))
        .await?;
    let mut events = clients.watch(path, &agent_id).await?;
    let mut samples = Vec::new();
    while let Some(event) = events.next().await? {
        if let Some(agent_pb::watch_agent_response::Event::OutputLine(line)) = event.event {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let written: u128 = line.line.trim().parse()?;
            let nanos = u64::try_from(now.saturating_sub(written)).unwrap_or(u64::MAX);
            samples.push(Duration::from_nanos(nanos));
        }
    }
    anyhow::ensure!(
        samples.len() as u64 == ticks,
        "{path:?}: {} of {ticks} lines",
        samples.len()
    );
    Ok(samples)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    mosaic_mesh::tls::install_default_provider();
    let mesh = Mesh::start().await?;
    let mut clients = Clients {
        agents_b: agent_pb::agent_control_client::AgentControlClient::new(
            mesh.b.channel(&mesh.client).await?,
        ),
        federation_a: mesh.federation_a().await?,
        key_a: mesh.a.api_key().to_owned(),
        key_b: mesh.b.api_key().to_owned(),
        b_id: mesh.b_id().to_owned(),
    };
    // Warm up both paths (channels, the peer's connection, the page cache).
    for path in [Path::Local, Path::Remote] {
        throughput(&mut clients, path, 1000).await?;
    }
    let mut totals = [(0u64, 0u64, Duration::ZERO), (0, 0, Duration::ZERO)];
    let mut delays = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        for (index, path) in [Path::Local, Path::Remote].into_iter().enumerate() {
            let measured = throughput(&mut clients, path, options.lines).await?;
            eprintln!(
                "round {round} {path:?}: {} lines in {}",
                measured.lines,
                human(measured.wall)
            );
            totals[index].0 += measured.lines;
            totals[index].1 += measured.bytes;
            totals[index].2 += measured.wall;
            delays[index].extend(latency(&mut clients, path, options.ticks).await?);
        }
    }
    mesh.cleanup().await?;

    let rate = |(lines, bytes, wall): (u64, u64, Duration)| {
        let seconds = wall.as_secs_f64().max(1e-9);
        (lines as f64 / seconds, bytes as f64 / seconds / 1e6)
    };
    let (local, remote) = (rate(totals[0]), rate(totals[1]));
    let share = ratio(remote.0, local.0);
    println!(
        "## Following an agent live (issue 19)\n\n\
         {} rounds of {} lines of 100 characters, and {} lines 10 ms apart for the latency; \
         SQLite; loopback; mutual TLS. Local: WatchAgent on B. Remote: WatchRemoteAgent on A \
         (signed `agent.watch`, signed batches verified by A).\n",
        options.rounds, options.lines, options.ticks
    );
    println!("| path | lines/s | MB/s | line → watcher p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    for (name, (lines, megabytes), samples) in [
        ("local WatchAgent on B", local, &delays[0]),
        ("remote through A", remote, &delays[1]),
    ] {
        println!(
            "| {name} | {lines:.0} | {megabytes:.1} | {} | {} |",
            human(percentile(samples, 0.5)),
            human(percentile(samples, 0.99))
        );
    }
    println!(
        "\nRemote ÷ local throughput: {share:.2} (goal ≥ {GOAL}: {}).",
        verdict(share >= GOAL)
    );
    Ok(())
}
