//! Agent runtime benchmark: spawn-to-RUNNING and spawn-to-COMPLETED of `true`
//! through AgentControl over real gRPC + TLS, beside a bare
//! `tokio::process::Command` spawn+wait of `true` and one local gRPC round
//! trip, in the same run.
//!
//! `cargo run --release --example bench_agents [-- SPAWNS]` (default 200).
//! Uses a SQLite database in a temporary data dir; set
//! `MOSAIC_BENCH_DATABASE_URL=postgres://...` (an empty database) for
//! PostgreSQL.

use std::time::{Duration, Instant};

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::{AgentType, Config, ConfigArgs, FileConfig};
use mosaic_mesh::proto::agent as pb;
use tonic::transport::Channel;

const WARM_UP: usize = 20;

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Median and 99th percentile of `samples`.
fn summarize(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99_index = ((samples.len() as f64) * 0.99).ceil() as usize;
    let p99 = samples[p99_index.saturating_sub(1).min(samples.len() - 1)];
    (median, p99)
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn report(name: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    let (median, p99) = summarize(samples);
    println!(
        "{name:<44} median {:>9.0} µs   p99 {:>9.0} µs",
        micros(median),
        micros(p99)
    );
    (median, p99)
}

/// A spawn+wait of `true` with the options the runtime uses (own process
/// group, working directory, cleared environment, piped output).
async fn agent_like_spawn_and_wait(work_dir: &std::path::Path) -> anyhow::Result<Duration> {
    // The runtime resolves the program in the agent's PATH itself.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let program = std::env::split_paths(&path)
        .map(|directory| directory.join("true"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| anyhow::anyhow!("no `true` in PATH"))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .current_dir(work_dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()?;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "true failed");
    Ok(started.elapsed())
}

/// What an agent's directory costs to make (its directory, working directory
/// and output file, in the data dir): the runtime makes them ahead of the
/// spawns that take them (`agents/spare.rs`), so a spawn no longer waits for
/// this.
fn agent_directory(agents_dir: &std::path::Path, index: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let agent_dir = agents_dir.join(format!("bench-{index}"));
    std::fs::create_dir_all(agent_dir.join("work"))?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent_dir.join("output.log"))?;
    Ok(started.elapsed())
}

/// The one write a spawn makes before it answers: the record, RUNNING with
/// its pid, and its two history steps, in one transaction.
async fn store_write(store: &mosaic_mesh::store::Store) -> anyhow::Result<Duration> {
    use mosaic_mesh::agents::{AgentRecord, AgentState, Origin};
    let now = mosaic_mesh::clock::now_ms();
    let record = AgentRecord {
        id: uuid::Uuid::now_v7().to_string(),
        agent_type: "true".to_owned(),
        state: AgentState::Running,
        state_reason: String::new(),
        prompt: String::new(),
        task_id: String::new(),
        labels: Default::default(),
        origin: Origin::Local,
        runner_id: "bench".to_owned(),
        pid: Some(1),
        exit_code: None,
        signal: None,
        output_tail: Vec::new(),
        output_bytes: 0,
        output_truncated: false,
        timeout_secs: 60,
        created_at_ms: now,
        started_at_ms: Some(now),
        ended_at_ms: None,
        updated_at_ms: now,
    };
    let started = Instant::now();
    store.insert_agent(&record).await?;
    Ok(started.elapsed())
}

async fn bare_spawn_and_wait() -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = tokio::process::Command::new("true").spawn()?.wait().await?;
    anyhow::ensure!(status.success(), "true failed");
    Ok(started.elapsed())
}

/// Spawns `true` and follows it to its end; returns (to RUNNING, to COMPLETED).
async fn spawn_true(
    client: &mut pb::agent_control_client::AgentControlClient<Channel>,
    key: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let agent = client
        .spawn(with_key(
            pb::SpawnRequest {
                agent_type: "true".to_owned(),
                ..pb::SpawnRequest::default()
            },
            key,
        ))
        .await?
        .into_inner()
        .agent
        .unwrap_or_default();
    let to_running = started.elapsed();
    anyhow::ensure!(
        agent.state == pb::AgentState::Running as i32,
        "spawn returned {agent:?}"
    );
    let mut stream = client
        .watch_agent(with_key(
            pb::WatchAgentRequest {
                agent_id: agent.agent_id.clone(),
                include_output: false,
                from_sequence: None,
            },
            key,
        ))
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(pb::watch_agent_response::Event::StateChange(change)) = message.event
            && change.to_state == pb::AgentState::Completed as i32
        {
            return Ok((to_running, started.elapsed()));
        }
    }
    anyhow::bail!("agent {} ended otherwise", agent.agent_id)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let spawns: usize = std::env::args()
        .nth(1)
        .map(|text| text.parse())
        .transpose()?
        .unwrap_or(200);
    mosaic_mesh::tls::install_default_provider();
    let data_dir = tempfile::tempdir()?;
    let args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: std::env::var("MOSAIC_BENCH_DATABASE_URL").ok(),
        listen: Some("127.0.0.1:0".parse()?),
        name: Some("bench".to_owned()),
        ..ConfigArgs::default()
    };
    let mut config: Config = Config::resolve(FileConfig::default(), &args)?;
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
    config
        .agents
        .types
        .insert("true".to_owned(), AgentType::new(&["true"]));
    config.agents.max_concurrent = 64;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let shared = mosaic_mesh::server::prepare(&config).await?;
    let backend = shared.store.backend();
    let store = shared.store.clone();
    let work_dir = data_dir.path().join("bench-work");
    std::fs::create_dir_all(&work_dir)?;
    // Beside the daemon's own agent directories, on the same disk.
    let directories = data_dir.path().join("bench-agents");
    let key = mosaic_mesh::auth::create_api_key(&shared.store, "bench", &[Scope::Agents])
        .await?
        .secret
        .to_string();
    let public_key = shared.identity.current().public_key().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mosaic_mesh::server::serve(listener, shared, async {
        let _ = stopped.await;
    }));

    let tls = std::sync::Arc::new(mosaic_mesh::tls::pinned_client_config(
        mosaic_mesh::tls::ServerPin::PublicKey(public_key),
    )?);
    let channel = mosaic_mesh::tls::connect_channel(
        &format!("https://{address}"),
        Some(tls),
        mosaic_mesh::tls::ChannelTimeouts::default(),
    )
    .await?;
    let mut client = pb::agent_control_client::AgentControlClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);

    println!(
        "bench_agents: {spawns} sequential samples each after {WARM_UP} warm-up, {backend:?}, gRPC over TLS on loopback\n"
    );
    // Interleave the measurements so machine noise hits all of them alike.
    let mut bare = Vec::new();
    let mut round_trip = Vec::new();
    let mut health_trip = Vec::new();
    let mut to_running = Vec::new();
    let mut to_completed = Vec::new();
    let mut agent_like = Vec::new();
    let mut writes = Vec::new();
    let mut directory = Vec::new();
    for iteration in 0..WARM_UP + spawns {
        let bare_sample = bare_spawn_and_wait().await?;

        let started = Instant::now();
        let status = client
            .get_agent(with_key(
                pb::GetAgentRequest {
                    agent_id: "no-such-agent".to_owned(),
                },
                &key,
            ))
            .await
            .expect_err("unknown agent");
        anyhow::ensure!(status.code() == tonic::Code::NotFound, "{status:?}");
        let round_trip_sample = started.elapsed();

        let started = Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        let health_sample = started.elapsed();

        let (running_sample, completed_sample) = spawn_true(&mut client, &key).await?;
        let agent_like_sample = agent_like_spawn_and_wait(&work_dir).await?;
        let writes_sample = store_write(&store).await?;
        let directory_sample = agent_directory(&directories, iteration)?;
        if iteration >= WARM_UP {
            bare.push(bare_sample);
            round_trip.push(round_trip_sample);
            health_trip.push(health_sample);
            to_running.push(running_sample);
            to_completed.push(completed_sample);
            agent_like.push(agent_like_sample);
            writes.push(writes_sample);
            directory.push(directory_sample);
        }
    }

    let (bare_median, bare_p99) = report("bare tokio spawn+wait of `true`", &mut bare);
    let (trip_median, trip_p99) =
        report("gRPC round trip (GetAgent, API key auth)", &mut round_trip);
    report("gRPC round trip (Health, no auth)", &mut health_trip);
    let (running_median, running_p99) = report("Spawn → RUNNING (`true`)", &mut to_running);
    let (completed_median, completed_p99) = report(
        "Spawn → COMPLETED (`true`, via WatchAgent)",
        &mut to_completed,
    );

    println!("\nwhere the time goes:");
    report(
        "spawn+wait with the agent's process options",
        &mut agent_like,
    );
    report("store: the RUNNING record with its history", &mut writes);
    report(
        "agent directory + output file (made ahead, not in Spawn)",
        &mut directory,
    );

    let baseline_median = bare_median + trip_median;
    let baseline_p99 = bare_p99 + trip_p99;
    println!(
        "\nbaseline = bare spawn+wait + one authenticated round trip: median {:.0} µs, p99 {:.0} µs",
        micros(baseline_median),
        micros(baseline_p99)
    );
    let ratio = |value: Duration, base: Duration| value.as_secs_f64() / base.as_secs_f64();
    println!(
        "ratio Spawn → RUNNING   / baseline: median {:.2}  p99 {:.2}   (aim ≤ 1.5: one spawn, one round trip)",
        ratio(running_median, baseline_median),
        ratio(running_p99, baseline_p99)
    );
    println!(
        "ratio Spawn → COMPLETED / baseline: median {:.2}  p99 {:.2}   (also WatchAgent and the end's commit)",
        ratio(completed_median, baseline_median),
        ratio(completed_p99, baseline_p99)
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}
