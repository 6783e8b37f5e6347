//! Benchmark for replicas of one instance run as `mosaicd serve` processes
//! (issue 18): the takeover of a SIGKILLed replica's agents, KillAgent and
//! WatchAgent through a replica that does not supervise the agent against
//! through its owner. `cargo build --release --bin mosaicd --example
//! bench_replica_routing`, then run it with `MOSAIC_TEST_DATABASE_URL` set (a
//! new database on that server per instance).

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use common::daemon::{free_port, mosaicd_binary, with_key};
use common::stats::{human, percentile, ratio, verdict};
use mosaic_mesh::proto::agent as pb;
use mosaic_mesh::store::testing::TestDatabase;
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};
use pb::agent_control_client::AgentControlClient;
use pb::watch_agent_response::Event;
use rustix::process::{Pid, Signal, kill_process_group};
use tonic::Streaming;
use tonic::transport::Channel;

/// `[replicas] lease_secs` (the minimum).
const LEASE_SECS: u64 = 3;
/// Takeover rounds, and the agents of the killed replica in each.
const ROUNDS: usize = 5;
const TAKEOVER_AGENTS: usize = 10;
/// Timed kills, half through each replica (plus one untimed first call each).
const KILLS: usize = 200;
/// Kills timed one at a time once the previous one settled, half through
/// each replica (the first of each path included).
const SETTLED_KILLS: usize = 100;
/// Output lines of the watched agent.
const LINES: usize = 300;
const LIMIT: u64 = 1_000_000_000;

type Client = AgentControlClient<Channel>;
type Latencies = Vec<Duration>;

/// A `mosaicd serve` process, killed when dropped (before its data dir goes).
struct Replica {
    child: tokio::process::Child,
    client: Client,
    /// The client's channel, for calls to other services.
    channel: Channel,
    _data_dir: tempfile::TempDir,
}

/// One instance: its replicas (dropped first), its database and master key,
/// and an API key with scope `agents`.
struct Instance {
    replicas: Vec<Replica>,
    database: TestDatabase,
    master_key: String,
    key: String,
}

impl Instance {
    /// `count` replicas on a new database, and an API key made once the
    /// first has migrated it.
    async fn start(count: usize) -> anyhow::Result<Instance> {
        let database = TestDatabase::postgres()
            .await
            .context("create a database (is MOSAIC_TEST_DATABASE_URL reachable?)")?;
        let master_key = mosaic_mesh::identity::MasterKey::generate()?;
        let mut instance = Instance {
            replicas: Vec::new(),
            database,
            master_key: master_key.to_base64().to_string(),
            key: String::new(),
        };
        for _ in 0..count {
            let replica = instance.replica().await?;
            instance.replicas.push(replica);
        }
        let store = mosaic_mesh::store::Store::connect(&instance.database.url).await?;
        let scopes = [mosaic_mesh::auth::Scope::Agents];
        let created = mosaic_mesh::auth::create_api_key(&store, "bench", &scopes).await?;
        instance.key = created.secret.to_string();
        Ok(instance)
    }

    /// Starts a replica on a new data dir and waits (at most 30 s) until it
    /// answers a health check over TLS.
    async fn replica(&self) -> anyhow::Result<Replica> {
        let data_dir = tempfile::tempdir()?;
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let url = &self.database.url;
        let config = data_dir.path().join("mosaic.toml");
        std::fs::write(
            &config,
            format!(
                r#"listen = "{address}"
database_url = "{url}"
rate_limit = {{ global_limit = {LIMIT}, webhook_limit = {LIMIT}, coordinator_limit = {LIMIT}, health_limit = {LIMIT}, federation_limit = {LIMIT} }}
instance = {{ name = "replicated", public_url = "https://127.0.0.1:9" }}
replicas = {{ lease_secs = {LEASE_SECS} }}
agents = {{ max_concurrent = 256, kill_grace_secs = 1, types = {{ sh = {{ command = ["/bin/sh", "-c", "{{prompt}}"] }} }} }}
"#
            ),
        )?;
        let log = data_dir.path().join("daemon.log");
        let mut command = tokio::process::Command::new(mosaicd_binary()?);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MOSAIC_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("MOSAIC_LOG", "warn")
            .env("MOSAIC_MASTER_KEY", &self.master_key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        let mut child = command.spawn().context("cannot start mosaicd serve")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::bail!("a replica exited with {status}: {log}");
            }
            if let Ok(channel) = connect(address, data_dir.path()).await {
                let check = tonic_health::pb::HealthCheckRequest::default();
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                if health.check(check).await.is_ok() {
                    let client = AgentControlClient::new(channel.clone());
                    let _data_dir = data_dir;
                    return Ok(Replica {
                        child,
                        client,
                        channel,
                        _data_dir,
                    });
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "a replica did not serve in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every replica and drops the database.
    async fn stop(mut self) -> anyhow::Result<()> {
        for replica in &mut self.replicas {
            replica.child.kill().await?;
        }
        self.replicas.clear();
        Ok(self.database.cleanup().await?)
    }
}

/// A TLS channel to `address`, pinning the key of the certificate the
/// replica wrote into `data_dir`.
async fn connect(address: SocketAddr, data_dir: &Path) -> anyhow::Result<Channel> {
    use rustls_pki_types::pem::PemObject as _;
    let path = mosaic_mesh::config::certificate_path(data_dir);
    let der = rustls_pki_types::CertificateDer::from_pem_file(&path)?;
    let spki = mosaic_mesh::identity::certificate::spki_of_certificate(&der)
        .context("a certificate without a key")?;
    let key = mosaic_mesh::identity::PublicKey::from_spki_der(&spki)?;
    let tls = mosaic_mesh::tls::pinned_client_config(ServerPin::PublicKey(key))?;
    let url = format!("https://{address}");
    let timeouts = ChannelTimeouts::default();
    Ok(mosaic_mesh::tls::connect_channel(&url, Some(Arc::new(tls)), timeouts).await?)
}

/// Process groups of agents (an agent's pid is its group's id); whatever
/// still runs of them is killed when dropped.
#[derive(Default)]
struct AgentGroups(Vec<u32>);

impl AgentGroups {
    /// Kills every group whose leader still runs; returns how many did.
    fn kill_all(&mut self) -> usize {
        let mut alive = 0;
        for pid in self.0.drain(..).filter(|pid| leads_its_group(*pid)) {
            alive += 1;
            if let Some(group) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(group, Signal::KILL);
            }
        }
        alive
    }
}

impl Drop for AgentGroups {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// True while process `pid` runs (is not a zombie) and leads its group.
fn leads_its_group(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rfind(')').map_or("", |end| &stat[end + 1..]);
    // After the name: state, parent pid, process group.
    let fields: Vec<&str> = after_name.split_whitespace().take(3).collect();
    fields.len() == 3 && !matches!(fields[0], "Z" | "X") && fields[2] == pid.to_string()
}

async fn get(client: &mut Client, key: &str, agent_id: &str) -> anyhow::Result<pb::Agent> {
    let agent_id = agent_id.to_owned();
    let response = client.get_agent(with_key(pb::GetAgentRequest { agent_id }, key));
    let agent = response.await?.into_inner().agent;
    agent.context("GetAgent without an agent")
}

/// Spawns `prompt` on `sh`, waits until it runs and records its group.
async fn spawn(
    client: &mut Client,
    key: &str,
    prompt: &str,
    groups: &mut AgentGroups,
) -> anyhow::Result<String> {
    let mut request = pb::SpawnRequest::default();
    (request.agent_type, request.prompt) = ("sh".to_owned(), prompt.to_owned());
    let response = client.spawn(with_key(request, key)).await?;
    let agent = response.into_inner().agent;
    let mut agent = agent.context("Spawn without an agent")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.state != pb::AgentState::Running as i32 || agent.pid.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the agent never ran: {agent:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        agent = get(client, key, &agent.agent_id).await?;
    }
    groups.0.extend(agent.pid);
    Ok(agent.agent_id)
}

/// Per round, from the SIGKILL until the first and the last agent read
/// FAILED; and how many agent processes outlived their replica.
async fn takeover(groups: &mut AgentGroups) -> anyhow::Result<(Vec<[Duration; 2]>, usize)> {
    let mut instance = Instance::start(3).await?;
    let key = instance.key.clone();
    let (mut rounds, mut survivors) = (Vec::new(), 0);
    for round in 0..ROUNDS {
        if round > 0 {
            instance.replicas[0] = instance.replica().await?;
        }
        let mut owner = instance.replicas[0].client.clone();
        let mut pending = Vec::new();
        for _ in 0..TAKEOVER_AGENTS {
            pending.push(spawn(&mut owner, &key, "sleep 600", groups).await?);
        }
        let killed = Instant::now();
        instance.replicas[0].child.kill().await?;
        let mut observer = instance.replicas[1].client.clone();
        let mut first = None;
        loop {
            let mut still = Vec::new();
            for agent_id in pending {
                let agent = get(&mut observer, &key, &agent_id).await?;
                if agent.state == pb::AgentState::Failed as i32 {
                    let reason = &agent.state_reason;
                    anyhow::ensure!(reason.starts_with("runner lost"), "FAILED: {reason:?}");
                    first.get_or_insert_with(|| killed.elapsed());
                } else {
                    still.push(agent_id);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            anyhow::ensure!(killed.elapsed().as_secs() < 60, "no takeover in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let last = killed.elapsed();
        rounds.push([first.unwrap_or(last), last]);
        survivors += groups.kill_all();
    }
    instance.stop().await?;
    Ok((rounds, survivors))
}

/// `count` agents `sleep 600` spawned through `client`.
async fn sleepers(
    client: &mut Client,
    key: &str,
    count: usize,
    groups: &mut AgentGroups,
) -> anyhow::Result<Vec<String>> {
    let mut agents = Vec::with_capacity(count);
    for _ in 0..count {
        agents.push(spawn(client, key, "sleep 600", groups).await?);
    }
    Ok(agents)
}

/// How long one KillAgent of `agent_id` through `client` takes.
async fn timed_kill(client: &mut Client, key: &str, agent_id: &str) -> anyhow::Result<Duration> {
    let (agent_id, reason) = (agent_id.to_owned(), "bench".to_owned());
    let request = with_key(pb::KillAgentRequest { agent_id, reason }, key);
    let started = Instant::now();
    client.kill_agent(request).await?;
    Ok(started.elapsed())
}

/// KillAgent through replica 0 (the owner) and replica 1, alternating, each
/// call once the previous kill has settled (its agent reads KILLED and 20 ms
/// have passed): the routing's own cost, without the previous kill's process
/// exit and database write running beside it.
async fn settled_kills(
    instance: &Instance,
    groups: &mut AgentGroups,
) -> anyhow::Result<[Latencies; 2]> {
    let key = &instance.key;
    let mut clients = [0, 1].map(|index| instance.replicas[index].client.clone());
    let agents = sleepers(&mut clients[0], key, SETTLED_KILLS, groups).await?;
    let mut samples = [Vec::new(), Vec::new()];
    for (index, agent_id) in agents.iter().enumerate() {
        samples[index % 2].push(timed_kill(&mut clients[index % 2], key, agent_id).await?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(&mut clients[0], key, &agents[index]).await?.state
            != pb::AgentState::Killed as i32
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} never read KILLED",
                agents[index]
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(samples)
}

/// KillAgent through replica 0 (the owner) and replica 1, alternating: each
/// path's call times, its first call first; then GetAgent (a database read,
/// nothing forwarded) through replica 1, for reference.
async fn kills(instance: &Instance, groups: &mut AgentGroups) -> anyhow::Result<[Latencies; 3]> {
    let key = &instance.key;
    let mut clients = [0, 1].map(|index| instance.replicas[index].client.clone());
    let agents = sleepers(&mut clients[0], key, KILLS + 2, groups).await?;
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for (index, agent_id) in agents.iter().enumerate() {
        samples[index % 2].push(timed_kill(&mut clients[index % 2], key, agent_id).await?);
    }
    // Every agent ends KILLED (read through the replica that did not run it).
    let deadline = Instant::now() + Duration::from_secs(20);
    for agent_id in &agents {
        while get(&mut clients[1], key, agent_id).await?.state != pb::AgentState::Killed as i32 {
            anyhow::ensure!(Instant::now() < deadline, "{agent_id} never read KILLED");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for agent_id in &agents[..KILLS / 2] {
        let started = Instant::now();
        get(&mut clients[1], key, agent_id).await?;
        samples[2].push(started.elapsed());
    }
    Ok(samples)
}

/// `grpc.health.v1` Check through replica 1: a call that does nothing, the
/// least any call to a replica costs.
async fn bare_calls(instance: &Instance) -> anyhow::Result<Latencies> {
    let channel = instance.replicas[1].channel.clone();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut samples = Vec::new();
    for _ in 0..KILLS / 2 {
        let started = Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Per output line: now − the time the line says it was printed.
async fn collect(mut stream: Streaming<pb::WatchAgentResponse>) -> anyhow::Result<Latencies> {
    let mut latencies = Vec::new();
    while let Some(message) = stream.message().await? {
        if let Some(Event::OutputLine(line)) = message.event {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let printed: u128 = line.line.trim().parse().context("a line without a time")?;
            let nanos = u64::try_from(now.saturating_sub(printed)).unwrap_or(u64::MAX);
            latencies.push(Duration::from_nanos(nanos));
        }
    }
    Ok(latencies)
}

/// Watches an agent of replica 0 through replica 1 and through replica 0,
/// both streams open before its first line.
async fn watches(instance: &Instance, groups: &mut AgentGroups) -> anyhow::Result<Vec<Latencies>> {
    let key = &instance.key;
    let prompt = format!(
        "sleep 1; i=0; while [ $i -lt {LINES} ]; do date +%s%N; i=$((i+1)); sleep 0.01; done"
    );
    let mut owner = instance.replicas[0].client.clone();
    let agent_id = spawn(&mut owner, key, &prompt, groups).await?;
    let mut tasks = Vec::new();
    for index in [1, 0] {
        let mut request = pb::WatchAgentRequest::default();
        (request.agent_id, request.include_output) = (agent_id.clone(), true);
        let request = with_key(request, key);
        let mut client = instance.replicas[index].client.clone();
        let stream = client.watch_agent(request).await?.into_inner();
        let limit = Duration::from_secs(60);
        tasks.push(tokio::spawn(tokio::time::timeout(limit, collect(stream))));
    }
    let mut watched = Vec::new();
    for task in tasks {
        watched.push(task.await?.context("a watch did not end within 60 s")??);
    }
    Ok(watched)
}

/// `p50 | p99` of `samples`.
fn p50_p99(samples: &[Duration]) -> String {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    format!("{} | {}", human(p50), human(p99))
}

async fn run(groups: &mut AgentGroups) -> anyhow::Result<()> {
    let (rounds, survivors) = takeover(groups).await?;
    let bound = Duration::from_secs(LEASE_SECS) * 4 / 3;
    println!("### Takeover of a SIGKILLed replica's agents\n");
    println!(
        "3 replicas, `lease_secs = {LEASE_SECS}`; replica 0 runs {TAKEOVER_AGENTS} agents \
         `sleep 600` and is SIGKILLed; GetAgent on replica 1 every 20 ms until each reads \
         FAILED (\"runner lost\"). {ROUNDS} rounds, a new replica 0 (new data dir) each.\n"
    );
    println!("| from the SIGKILL until | median | min | max |\n|---|---|---|---|");
    for (name, which) in [("the first agent reads FAILED", 0), ("the last", 1)] {
        let samples: Vec<Duration> = rounds.iter().map(|round| round[which]).collect();
        let [p50, min, max] = [0.5, 0.0, 1.0].map(|at| percentile(&samples, at));
        println!("| {name} | {p50:.2?} | {min:.2?} | {max:.2?} |");
    }
    let lasts: Vec<Duration> = rounds.iter().map(|round| round[1]).collect();
    let worst = percentile(&lasts, 1.0);
    let each: Vec<String> = lasts.iter().map(|last| format!("{last:.2?}")).collect();
    println!(
        "\nLast agent per round: {}. Agent processes still running after their replica's \
         SIGKILL: {survivors} of {} (the bench kills them). Goal: within the lease + a third \
         ({bound:.1?}) — {} (slowest round {worst:.2?}).\n",
        each.join(", "),
        ROUNDS * TAKEOVER_AGENTS,
        verdict(worst <= bound),
    );

    let instance = Instance::start(2).await?;
    let [mut owner, mut other, reads] = kills(&instance, groups).await?;
    let [settled_owner, settled_other] = settled_kills(&instance, groups).await?;
    let bare = bare_calls(&instance).await?;
    let watched = watches(&instance, groups).await?;
    instance.stop().await?;

    println!("### KillAgent through a replica that does not run the agent\n");
    println!(
        "2 replicas; {} agents `sleep 600` on replica 0, killed alternately through replica 0 \
         (owner) and replica 1 (forwards to replica 0 over mutual TLS), one call at a time on \
         one long-lived channel per replica; the first call of each path is left out of the \
         percentiles. For reference: GetAgent through the non-owner (one database read).\n",
        KILLS + 2
    );
    println!("| path | calls | p50 | p99 | first call |\n|---|---|---|---|---|");
    let firsts = [owner.remove(0), other.remove(0)];
    for (name, samples, first) in [("owner", &owner, 0), ("non-owner", &other, 1)] {
        let (calls, times, first) = (samples.len(), p50_p99(samples), human(firsts[first]));
        println!("| through the {name} | {calls} | {times} | {first} |");
    }
    let times = p50_p99(&reads);
    println!(
        "| GetAgent through the non-owner (reference) | {} | {times} | |",
        reads.len()
    );
    let medians = [&other, &owner].map(|samples| percentile(samples, 0.5).as_secs_f64());
    let kill_ratio = ratio(medians[0], medians[1]);
    println!(
        "\nRatio of medians (non-owner ÷ owner): {kill_ratio:.2}. Goal ≤ 2 — {}.\n",
        verdict(kill_ratio <= 2.0)
    );

    println!(
        "The same alternation, each call once the previous kill has settled (its agent reads \
         KILLED, then 20 ms), so the previous kill's process exit and database write do not run \
         beside it:\n"
    );
    println!("| path | calls | p50 | p99 |\n|---|---|---|---|");
    for (name, samples) in [("owner", &settled_owner), ("non-owner", &settled_other)] {
        println!(
            "| through the {name} | {} | {} |",
            samples.len(),
            p50_p99(samples)
        );
    }
    let medians =
        [&settled_other, &settled_owner].map(|samples| percentile(samples, 0.5).as_secs_f64());
    let settled_ratio = ratio(medians[0], medians[1]);
    println!(
        "\nRatio of medians, settled (non-owner ÷ owner): {settled_ratio:.2}. Goal ≤ 2 — {}.\n",
        verdict(settled_ratio <= 2.0)
    );
    // A replica that does not run the agent must make a call of its own to
    // the one that does, which costs what the owner's kill costs, on top of
    // the call it answers (at least a bare call); to know where to send it,
    // it reads the agent (as a GetAgent does) unless its id said so.
    let owner_kill = percentile(&settled_owner, 0.5);
    let floors = [
        (
            "a GetAgent through the non-owner (a call and the read of the agent)",
            &reads,
        ),
        (
            "a bare call (`grpc.health.v1` Check) through the non-owner",
            &bare,
        ),
    ];
    println!(
        "| floor for a forwarded kill: the owner's settled kill + | p50 | ratio to the owner's |\n|---|---|---|"
    );
    for (name, samples) in floors {
        let floor = owner_kill + percentile(samples, 0.5);
        let floor_ratio = ratio(floor.as_secs_f64(), owner_kill.as_secs_f64());
        println!("| {name} | {} | {floor_ratio:.2} |", human(floor));
    }
    println!();

    println!("### WatchAgent output across replicas\n");
    println!(
        "An agent of replica 0 prints `date +%s%N` {LINES} times, 10 ms apart; two watches with \
         output, through replica 1 and through replica 0, open before its first line. Per \
         line: the time it arrived − the time it printed.\n"
    );
    println!("| watch | lines | p50 | p99 |\n|---|---|---|---|");
    let names = ["replica 1 (cross-replica)", "replica 0 (owner)"];
    for (name, lines) in names.iter().zip(&watched) {
        println!("| through {name} | {} | {} |", lines.len(), p50_p99(lines));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mosaic_mesh::tls::install_default_provider();
    println!("## Replicas: any replica acts on any agent (issue 18)\n");
    println!("Machine: {}.\n", common::machine::description());
    let mut groups = AgentGroups::default();
    let result = run(&mut groups).await;
    let leaked = groups.kill_all();
    if leaked > 0 {
        eprintln!("killed {leaked} agent process groups still running at the end");
    }
    result
}
