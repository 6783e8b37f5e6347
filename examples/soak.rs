//! Soak test (issue 9): mixed traffic against two peered `mosaicd` processes at
//! half the measured peak, for a configurable time, reporting failed calls by
//! gRPC code and the daemons' resident memory over time.
//!
//! The load generator is a real gRPC client over mutual TLS talking to daemon A:
//! signed `agent.status` commands to B (GetRemoteAgent), job lifecycles
//! (CreateJob, UpdateJobStatus RUNNING, CompleteJob), signed webhook deliveries
//! (HandleWebhook with an HMAC-SHA256 signature) and health checks (the
//! coordinator's Health and grpc.health.v1 on A and on B), in the ratio
//! 4 : 2 : 2 : 2. First a closed loop of 16 callers measures the peak of that
//! mix; then an open loop issues operations at half of it (`--rate` overrides).
//!
//! The daemons keep ended jobs and webhook deliveries for a short retention
//! (`--retention`), so their databases reach a steady state within the run;
//! agents keep the default retention (the one agent's status is read all
//! along).
//!
//! `cargo build --release --bin mosaicd --examples && target/release/examples/soak`
//! Options: `--duration 10m` (default; humantime, e.g. `30s`), `--peak 10s`
//! (time of the peak measurement), `--rate OPS` (skip the peak measurement),
//! `--database sqlite|postgres` (default sqlite; PostgreSQL databases are made
//! on the server named by `MOSAIC_TEST_DATABASE_URL`), `--retention 2m`
//! (default: a fifth of the duration, from 10 s to 2 min), `--markdown`
//! (print only the Markdown section on stdout; progress goes to stderr either
//! way).
//!
//! Exits non-zero when a goal is not met: any failed call (every error code
//! is unexpected here, the rate limits are set out of reach); resident memory
//! of either daemon growing 10 % or more after the warm-up; the SQLite WAL
//! passing its bound; the database growing faster than the rows it keeps; or
//! more ended jobs kept than the retention allows.

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{WEBHOOK_SECRET, WEBHOOK_SOURCE, with_key};
use common::load::{closed_loop, code_name, describe_errors};
use common::machine::mib;
use common::mesh::{Mesh, MeshOptions};
use common::stats::{human, percentile};
use common::storage::{StorageProbe, StorageReading};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// Most operations in flight in the open loop; past it an operation is shed
/// (counted, not sent) rather than queued without bound.
const MAX_IN_FLIGHT: usize = 256;
/// The share of the run before the RSS baseline is taken.
const WARM_UP_FRACTION: f64 = 0.2;
/// Largest resident memory growth after the warm-up, in percent.
const RSS_GROWTH_GOAL: f64 = 10.0;
/// How much faster than the rows it keeps a SQLite database may grow: pruned
/// rows' pages are free at once and reused by the next writes.
const SQLITE_GROWTH_SLACK: f64 = 1.25;
/// The same for PostgreSQL, where an updated or deleted row stays until
/// autovacuum reaches its table (in a 10-minute soak the jobs table held two
/// dead rows per live one before its first autovacuum).
const POSTGRES_GROWTH_SLACK: f64 = 1.5;
/// Bytes a database may grow regardless of its rows (a few pages per table).
const DATABASE_GROWTH_FLOOR: u64 = 4 * 1024 * 1024;
/// The daemons' pruning interval (`storage.prune_interval_secs`).
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);
/// How often the SQLite WAL's length is read.
const WAL_READ_INTERVAL: Duration = Duration::from_millis(50);

struct Options {
    duration: Duration,
    peak: Duration,
    rate: Option<f64>,
    postgres: bool,
    retention: Option<Duration>,
}

impl Options {
    /// The retention of ended jobs and deliveries the daemons are given.
    fn retention(&self) -> Duration {
        self.retention.unwrap_or_else(|| {
            (self.duration / 5).clamp(Duration::from_secs(10), Duration::from_secs(120))
        })
    }
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        duration: Duration::from_secs(600),
        peak: Duration::from_secs(10),
        rate: None,
        postgres: false,
        retention: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--duration" => options.duration = humantime::parse_duration(&value()?)?,
            "--peak" => options.peak = humantime::parse_duration(&value()?)?,
            "--rate" => options.rate = Some(value()?.parse()?),
            "--database" => {
                options.postgres = match value()?.as_str() {
                    "sqlite" => false,
                    "postgres" => true,
                    other => anyhow::bail!("--database {other}: expected sqlite or postgres"),
                }
            }
            "--retention" => options.retention = Some(humantime::parse_duration(&value()?)?),
            "--markdown" => {}
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(
        options.duration > Duration::ZERO,
        "--duration must be positive"
    );
    anyhow::ensure!(
        options.retention() >= Duration::from_secs(1),
        "--retention must be at least 1 s"
    );
    Ok(options)
}

/// The kinds of operation in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Status,
    Job,
    Webhook,
    Health,
}

impl Operation {
    /// Weighted round robin: 4 status, 2 jobs, 2 webhooks, 2 health in every 10.
    fn nth(n: u64) -> Operation {
        match n % 10 {
            0 | 3 | 6 | 8 => Operation::Status,
            1 | 5 => Operation::Job,
            2 | 7 => Operation::Webhook,
            _ => Operation::Health,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Status => "signed agent.status A→B",
            Operation::Job => "job lifecycle (3 calls)",
            Operation::Webhook => "signed webhook",
            Operation::Health => "health",
        }
    }
}

/// Everything an operation needs; cheap to clone.
#[derive(Clone)]
struct Clients {
    federation: FederationClient<Channel>,
    coordinator: CoordinatorClient<Channel>,
    health_a: HealthClient<Channel>,
    health_b: HealthClient<Channel>,
    key: Arc<str>,
    b_id: Arc<str>,
    agent_id: Arc<str>,
    counter: Arc<AtomicU64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl Clients {
    async fn run(mut self, operation: Operation) -> Result<(), tonic::Status> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        match operation {
            Operation::Status => {
                self.federation
                    .get_remote_agent(with_key(
                        pb::GetRemoteAgentRequest {
                            peer_instance_id: self.b_id.to_string(),
                            workspace: String::new(),
                            agent_id: self.agent_id.to_string(),
                        },
                        &self.key,
                    ))
                    .await?;
            }
            Operation::Job => {
                let job = self
                    .coordinator
                    .create_job(with_key(
                        coordinator_pb::CreateJobRequest {
                            job_type: "soak".to_owned(),
                            payload_json: format!("{{\"n\":{n}}}"),
                            ..coordinator_pb::CreateJobRequest::default()
                        },
                        &self.key,
                    ))
                    .await?
                    .into_inner()
                    .job
                    .ok_or_else(|| tonic::Status::internal("CreateJob returned no job"))?;
                self.coordinator
                    .update_job_status(with_key(
                        coordinator_pb::UpdateJobStatusRequest {
                            job_id: job.job_id.clone(),
                            state: coordinator_pb::JobState::Running.into(),
                            message: String::new(),
                        },
                        &self.key,
                    ))
                    .await?;
                self.coordinator
                    .complete_job(with_key(
                        coordinator_pb::CompleteJobRequest {
                            job_id: job.job_id,
                            result_json: "{\"ok\":true}".to_owned(),
                        },
                        &self.key,
                    ))
                    .await?;
            }
            Operation::Webhook => {
                let body = format!("{{\"action\":\"opened\",\"n\":{n}}}").into_bytes();
                let secret =
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
                let signature =
                    format!("sha256={}", hex(ring::hmac::sign(&secret, &body).as_ref()));
                self.coordinator
                    .handle_webhook(with_key(
                        coordinator_pb::HandleWebhookRequest {
                            source: WEBHOOK_SOURCE.to_owned(),
                            event_type: "pull_request".to_owned(),
                            delivery_id: uuid::Uuid::new_v4().to_string(),
                            body,
                            signature,
                            headers: Default::default(),
                        },
                        &self.key,
                    ))
                    .await?;
            }
            Operation::Health => {
                if n.is_multiple_of(2) {
                    self.coordinator
                        .health(coordinator_pb::HealthRequest {})
                        .await?;
                }
                let checker = if n % 4 < 2 {
                    &mut self.health_a
                } else {
                    &mut self.health_b
                };
                checker
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await?;
            }
        }
        Ok(())
    }
}

/// What the open loop records.
#[derive(Default)]
struct Recorder {
    latencies: BTreeMap<Operation, Vec<Duration>>,
    errors: BTreeMap<(Operation, &'static str), u64>,
}

/// One RSS and storage reading.
struct Sample {
    at: Duration,
    rss_a: u64,
    rss_b: u64,
    operations_per_second: f64,
    load_average: String,
    storage_a: StorageReading,
    storage_b: StorageReading,
}

/// Both daemons' databases, and the longest WAL seen of each.
struct Storage {
    a: StorageProbe,
    b: StorageProbe,
    largest_wal: Arc<[AtomicU64; 2]>,
}

impl Storage {
    fn of(mesh: &Mesh) -> Storage {
        Storage {
            a: StorageProbe::of(&mesh.a.prepared.database_url()),
            b: StorageProbe::of(&mesh.b.prepared.database_url()),
            largest_wal: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// Reads both WALs every `WAL_READ_INTERVAL` until the task is aborted.
    fn watch_wal(&self) -> tokio::task::JoinHandle<()> {
        let (a, b, largest) = (
            self.a.clone(),
            self.b.clone(),
            Arc::clone(&self.largest_wal),
        );
        tokio::spawn(async move {
            loop {
                largest[0].fetch_max(a.wal_bytes(), Ordering::Relaxed);
                largest[1].fetch_max(b.wal_bytes(), Ordering::Relaxed);
                tokio::time::sleep(WAL_READ_INTERVAL).await;
            }
        })
    }

    async fn sample(
        &self,
        mesh: &Mesh,
        at: Duration,
        operations_per_second: f64,
    ) -> anyhow::Result<Sample> {
        Ok(Sample {
            at,
            rss_a: mesh.a.rss_kib().unwrap_or_default(),
            rss_b: mesh.b.rss_kib().unwrap_or_default(),
            operations_per_second,
            load_average: common::machine::load_average(),
            storage_a: self.a.read().await?,
            storage_b: self.b.read().await?,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let load_before = common::machine::load_average();
    eprintln!("soak: starting daemons A and B");
    let retention = options.retention().as_secs().max(1);
    let mesh = Mesh::start_with(MeshOptions {
        postgres: options.postgres,
        extra_toml: format!(
            "[storage]\njob_retention_secs = {retention}\nwebhook_delivery_retention_secs = {retention}\nprune_interval_secs = {}\n",
            PRUNE_INTERVAL.as_secs()
        ),
    })
    .await?;
    let storage = Storage::of(&mesh);
    let wal_watch = storage.watch_wal();
    let key: Arc<str> = Arc::from(mesh.a.api_key());
    let mut federation = mesh.federation_a().await?;
    let agent = federation
        .spawn_remote_agent(with_key(
            pb::SpawnRemoteAgentRequest {
                peer_instance_id: mesh.b_id().to_owned(),
                spawn: Some(agent_pb::SpawnRequest {
                    agent_type: "true".to_owned(),
                    ..agent_pb::SpawnRequest::default()
                }),
                ..pb::SpawnRemoteAgentRequest::default()
            },
            &key,
        ))
        .await?
        .into_inner()
        .agent
        .ok_or_else(|| anyhow::anyhow!("no agent"))?;
    let channel_a = mesh.a.channel(&mesh.client).await?;
    let clients = Clients {
        federation,
        coordinator: CoordinatorClient::new(channel_a.clone()),
        health_a: HealthClient::new(channel_a),
        health_b: HealthClient::new(mesh.b.channel(&mesh.client).await?),
        key,
        b_id: Arc::from(mesh.b_id()),
        agent_id: Arc::from(agent.agent_id.as_str()),
        counter: Arc::new(AtomicU64::new(0)),
    };

    let (rate, peak) = match options.rate {
        Some(rate) => (rate, None),
        None => {
            eprintln!("measuring the peak of the mix for {:?}", options.peak);
            let mix = |clients: Clients| {
                let operation = Operation::nth(clients.counter.load(Ordering::Relaxed));
                clients.run(operation)
            };
            let (samples, errors) =
                closed_loop(16, usize::MAX, options.peak, clients.clone(), mix).await;
            anyhow::ensure!(
                errors.is_empty(),
                "calls failed while measuring the peak: {}",
                describe_errors(&errors)
            );
            let peak = samples.throughput();
            (peak / 2.0, Some(peak))
        }
    };
    eprintln!(
        "soaking at {rate:.0} operations/s for {:?}",
        options.duration
    );

    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let completed = Arc::new(AtomicU64::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let sample_every = (options.duration / 20).max(Duration::from_secs(1));
    let mut samples = vec![storage.sample(&mesh, Duration::ZERO, 0.0).await?];
    let mut next_sample = sample_every;
    let mut completed_at_last_sample = 0;
    let mut issued: u64 = 0;
    let mut shed: u64 = 0;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= options.duration {
            break;
        }
        let owed = (rate * elapsed.as_secs_f64()) as u64;
        while issued < owed {
            let operation = Operation::nth(issued);
            issued += 1;
            let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() else {
                shed += 1;
                continue;
            };
            let clients = clients.clone();
            let recorder = Arc::clone(&recorder);
            let completed = Arc::clone(&completed);
            tokio::spawn(async move {
                let call_started = Instant::now();
                let outcome = clients.run(operation).await;
                let latency = call_started.elapsed();
                completed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut recorder) = recorder.lock() {
                    match outcome {
                        Ok(()) => recorder
                            .latencies
                            .entry(operation)
                            .or_default()
                            .push(latency),
                        Err(status) => {
                            *recorder
                                .errors
                                .entry((operation, code_name(status.code())))
                                .or_default() += 1;
                        }
                    }
                }
                drop(permit);
            });
        }
        if elapsed >= next_sample {
            let done = completed.load(Ordering::Relaxed);
            let window = elapsed.saturating_sub(samples.last().map_or(Duration::ZERO, |s| s.at));
            let rate = (done - completed_at_last_sample) as f64 / window.as_secs_f64().max(1e-9);
            samples.push(storage.sample(&mesh, elapsed, rate).await?);
            completed_at_last_sample = done;
            let last = samples
                .last()
                .map(|s| (s.rss_a, s.rss_b))
                .unwrap_or_default();
            eprintln!(
                "{:>5.0} s: {done} operations done, RSS A {} B {}",
                elapsed.as_secs_f64(),
                mib(last.0),
                mib(last.1)
            );
            next_sample += sample_every;
        }
    }
    // Let the calls in flight finish (each has the channel's 30 s deadline).
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        semaphore.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    let wall = started.elapsed();
    // The last reading, once the traffic has stopped.
    let done = completed.load(Ordering::Relaxed);
    let window = wall.saturating_sub(samples.last().map_or(Duration::ZERO, |s| s.at));
    let rate_at_end = (done - completed_at_last_sample) as f64 / window.as_secs_f64().max(1e-9);
    samples.push(storage.sample(&mesh, wall, rate_at_end).await?);
    wal_watch.abort();
    let wal_holds = [
        WalHolds::scrape(&mesh.a).await,
        WalHolds::scrape(&mesh.b).await,
    ];
    let largest_wal = [
        storage.largest_wal[0].load(Ordering::Relaxed),
        storage.largest_wal[1].load(Ordering::Relaxed),
    ];

    let missed = {
        let recorder = recorder.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let report = Report {
            options: &options,
            rate,
            peak,
            wall,
            issued,
            shed,
            recorder: &recorder,
            samples: &samples,
            load_before: &load_before,
            largest_wal,
            wal_holds,
        };
        print_markdown(&report);
        report.goals_missed()
    };
    mesh.cleanup().await?;
    anyhow::ensure!(missed.is_empty(), "goals not met: {}", missed.join("; "));
    Ok(())
}

struct Report<'a> {
    options: &'a Options,
    rate: f64,
    peak: Option<f64>,
    wall: Duration,
    issued: u64,
    shed: u64,
    recorder: &'a Recorder,
    samples: &'a [Sample],
    load_before: &'a str,
    /// The longest WAL seen of A and B (SQLite).
    largest_wal: [u64; 2],
    /// A's and B's checkpointer holds, from their `/metrics` (SQLite).
    wal_holds: [Option<WalHolds>; 2],
}

/// How often and how long a daemon's checkpointer held its queries back to
/// empty the WAL, as its `/metrics` says.
#[derive(Debug, Clone, Copy)]
struct WalHolds {
    truncations: f64,
    held_seconds: f64,
    longest_seconds: f64,
}

impl WalHolds {
    /// `None` when the daemon has no WAL series (PostgreSQL) or cannot be
    /// scraped.
    async fn scrape(daemon: &common::daemon::Daemon) -> Option<WalHolds> {
        let text = daemon.scrape_metrics().await.ok()?;
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        };
        Some(WalHolds {
            truncations: value("mosaic_sqlite_wal_truncations_total")?,
            held_seconds: value("mosaic_sqlite_wal_hold_seconds_total")?,
            longest_seconds: value("mosaic_sqlite_wal_longest_hold_seconds")?,
        })
    }

    fn describe(&self, wall: Duration) -> String {
        format!(
            "{:.0} holds, {:.1} ms on average, {:.1} ms at most, {:.2} % of the run",
            self.truncations,
            1e3 * self.held_seconds / self.truncations.max(1.0),
            1e3 * self.longest_seconds,
            100.0 * self.held_seconds / wall.as_secs_f64().max(1e-9)
        )
    }
}

fn growth(from: u64, to: u64) -> f64 {
    if from == 0 {
        f64::NAN
    } else {
        100.0 * (to as f64 - from as f64) / from as f64
    }
}

fn met(goal: bool) -> &'static str {
    if goal { "met" } else { "not met" }
}

/// How one database grew from the steady sample to the end.
struct DatabaseGrowth {
    from: StorageReading,
    to: StorageReading,
    /// The most the database may hold at the end: its size at the steady
    /// sample scaled by the rows kept, with the backend's slack and
    /// `DATABASE_GROWTH_FLOOR`.
    allowed_bytes: u64,
}

impl DatabaseGrowth {
    fn of(from: StorageReading, to: StorageReading, slack: f64) -> DatabaseGrowth {
        let rows_ratio = (to.rows as f64 / from.rows.max(1) as f64).max(1.0);
        let allowed_bytes =
            (from.database_bytes as f64 * rows_ratio * slack) as u64 + DATABASE_GROWTH_FLOOR;
        DatabaseGrowth {
            from,
            to,
            allowed_bytes,
        }
    }

    fn met(&self) -> bool {
        self.to.database_bytes <= self.allowed_bytes
    }
}

impl Report<'_> {
    /// The first sample after the warm-up: the RSS baseline.
    fn warm(&self) -> Option<&Sample> {
        let warm = self.wall.mul_f64(WARM_UP_FRACTION);
        self.samples.iter().find(|sample| sample.at >= warm)
    }

    /// The first sample after the warm-up once the rows kept can be steady:
    /// the retention has passed and a pruning has run since.
    fn steady(&self) -> Option<&Sample> {
        let steady = (self.options.retention() + 2 * PRUNE_INTERVAL)
            .max(self.wall.mul_f64(WARM_UP_FRACTION));
        self.samples.iter().find(|sample| sample.at >= steady)
    }

    /// RSS growth of A and B after the warm-up, in percent.
    fn rss_growth(&self) -> Option<(f64, f64)> {
        let (baseline, last) = (self.warm()?, self.samples.last()?);
        Some((
            growth(baseline.rss_a, last.rss_a),
            growth(baseline.rss_b, last.rss_b),
        ))
    }

    /// The WAL bound the daemons run with (the default).
    fn wal_bound(&self) -> u64 {
        mosaic_mesh::store::StorageSettings::default().sqlite_wal_max_bytes
    }

    /// How much faster than its rows the database may grow on this backend.
    fn growth_slack(&self) -> f64 {
        if self.options.postgres {
            POSTGRES_GROWTH_SLACK
        } else {
            SQLITE_GROWTH_SLACK
        }
    }

    /// A's and B's database growth over the steady part of the run.
    fn database_growth(&self) -> Option<[DatabaseGrowth; 2]> {
        let (from, to) = (self.steady()?, self.samples.last()?);
        if std::ptr::eq(from, to) {
            return None;
        }
        let slack = self.growth_slack();
        Some([
            DatabaseGrowth::of(from.storage_a, to.storage_a, slack),
            DatabaseGrowth::of(from.storage_b, to.storage_b, slack),
        ])
    }

    /// The most ended jobs a daemon may keep at the end: those that ended
    /// within the retention and two pruning intervals, at the rate jobs
    /// ended over the run, with half again for bursts.
    fn ended_jobs_allowed(&self) -> u64 {
        let jobs_ended = self
            .recorder
            .latencies
            .get(&Operation::Job)
            .map_or(0, Vec::len) as f64;
        let per_second = jobs_ended / self.wall.as_secs_f64().max(1e-9);
        let window = (self.options.retention() + 2 * PRUNE_INTERVAL).as_secs_f64();
        (per_second * window * 1.5) as u64 + 100
    }

    /// What a run is judged on, each goal that was not met in a few words.
    fn goals_missed(&self) -> Vec<String> {
        let mut missed = Vec::new();
        let failed: u64 = self.recorder.errors.values().sum();
        if failed > 0 {
            missed.push(format!("{failed} operations failed"));
        }
        if let Some((a, b)) = self.rss_growth()
            && !(a < RSS_GROWTH_GOAL && b < RSS_GROWTH_GOAL)
        {
            missed.push(format!(
                "RSS grew A {a:+.1} %, B {b:+.1} % after warm-up (goal < {RSS_GROWTH_GOAL} %)"
            ));
        }
        let bound = self.wal_bound();
        for (daemon, largest) in ["A", "B"].iter().zip(self.largest_wal) {
            if largest > bound {
                missed.push(format!(
                    "{daemon}'s WAL reached {} (bound {})",
                    mib(largest / 1024),
                    mib(bound / 1024)
                ));
            }
        }
        if let Some(growths) = self.database_growth() {
            for (daemon, grown) in ["A", "B"].iter().zip(&growths) {
                if !grown.met() {
                    missed.push(format!(
                        "{daemon}'s database grew to {} with {} rows kept (at most {} for them)",
                        mib(grown.to.database_bytes / 1024),
                        grown.to.rows,
                        mib(grown.allowed_bytes / 1024)
                    ));
                }
            }
        }
        let allowed = self.ended_jobs_allowed();
        if let Some(last) = self.samples.last() {
            for (daemon, kept) in [("A", last.storage_a), ("B", last.storage_b)] {
                if self.steady().is_some() && kept.ended_jobs > allowed {
                    missed.push(format!(
                        "{daemon} kept {} ended jobs (retention allows about {allowed})",
                        kept.ended_jobs
                    ));
                }
            }
        }
        missed
    }
}

fn print_markdown(report: &Report<'_>) {
    println!("## Soak\n");
    let peak = match report.peak {
        Some(peak) => format!(
            "half the peak of the same mix measured just before ({peak:.0} operations/s with 16 \
             callers over {:?})",
            report.options.peak
        ),
        None => "a rate given with `--rate`".to_owned(),
    };
    println!(
        "Daemons A and B (`mosaicd` processes, {}), mixed traffic from one mutual-TLS \
         client to A for {:.0} s at {:.0} operations/s, {peak}. Mix per 10 operations: 4 signed \
         `agent.status` A→B, 2 job lifecycles (CreateJob, UpdateJobStatus, CompleteJob), 2 \
         HMAC-signed webhooks (each a job), 2 health checks (coordinator Health and \
         grpc.health.v1, on A and B). Ended jobs and webhook deliveries are kept {} s, pruned \
         every {} s. Load average {} at the start, {} at the end.\n",
        if report.options.postgres {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        report.wall.as_secs_f64(),
        report.rate,
        report.options.retention().as_secs(),
        PRUNE_INTERVAL.as_secs(),
        report.load_before,
        common::machine::load_average()
    );
    let done: usize = report.recorder.latencies.values().map(Vec::len).sum();
    let failed: u64 = report.recorder.errors.values().sum();
    println!("| operation | done | p50 | p99 | failed (by code) |");
    println!("|---|---|---|---|---|");
    for operation in [
        Operation::Status,
        Operation::Job,
        Operation::Webhook,
        Operation::Health,
    ] {
        let latencies = report
            .recorder
            .latencies
            .get(&operation)
            .cloned()
            .unwrap_or_default();
        let errors: Vec<String> = report
            .recorder
            .errors
            .iter()
            .filter(|((kind, _), _)| *kind == operation)
            .map(|((_, code), count)| format!("{code} ×{count}"))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} |",
            operation.name(),
            latencies.len(),
            human(percentile(&latencies, 0.5)),
            human(percentile(&latencies, 0.99)),
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(", ")
            }
        );
    }
    println!(
        "\n{done} operations done, {failed} failed, {} shed by the generator (more than \
         {MAX_IN_FLIGHT} in flight) of {} issued. Goal: no unexpected error — **{}**.\n",
        report.shed,
        report.issued,
        met(failed == 0)
    );
    println!(
        "| time | operations/s in the interval | RSS A | RSS B | database A | rows A | ended jobs A | database B | rows B | load average |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for sample in report.samples {
        println!(
            "| {:.0} s | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            sample.at.as_secs_f64(),
            sample.operations_per_second,
            mib(sample.rss_a),
            mib(sample.rss_b),
            mib(sample.storage_a.database_bytes / 1024),
            sample.storage_a.rows,
            sample.storage_a.ended_jobs,
            mib(sample.storage_b.database_bytes / 1024),
            sample.storage_b.rows,
            sample.load_average
        );
    }
    if let (Some(baseline), Some((growth_a, growth_b))) = (report.warm(), report.rss_growth()) {
        let highest = |rss: fn(&Sample) -> u64| {
            let peak = report
                .samples
                .iter()
                .filter(|s| s.at >= baseline.at)
                .map(rss)
                .max()
                .unwrap_or_default();
            growth(rss(baseline), peak)
        };
        println!(
            "\nRSS growth after warm-up (from {:.0} s to the end; goal < {RSS_GROWTH_GOAL} %): \
             A {growth_a:+.1} % (highest {:+.1} %), B {growth_b:+.1} % (highest {:+.1} %) — **{}**.",
            baseline.at.as_secs_f64(),
            highest(|s| s.rss_a),
            highest(|s| s.rss_b),
            met(growth_a < RSS_GROWTH_GOAL && growth_b < RSS_GROWTH_GOAL)
        );
    }
    if !report.options.postgres {
        let bound = report.wal_bound();
        let [a, b] = report.largest_wal;
        println!(
            "\nLongest SQLite WAL (read every {} ms; goal: within its bound of {}): A {}, B {} — **{}**.",
            WAL_READ_INTERVAL.as_millis(),
            mib(bound / 1024),
            mib(a / 1024),
            mib(b / 1024),
            met(a <= bound && b <= bound)
        );
        for (daemon, holds) in ["A", "B"].iter().zip(report.wal_holds) {
            if let Some(holds) = holds {
                println!(
                    "Queries held back while {daemon}'s WAL was emptied: {}.",
                    holds.describe(report.wall)
                );
            }
        }
    }
    match (report.steady(), report.database_growth()) {
        (Some(steady), Some([a, b])) => {
            let line = |grown: &DatabaseGrowth| {
                format!(
                    "{} with {} rows → {} with {} rows (at most {})",
                    mib(grown.from.database_bytes / 1024),
                    grown.from.rows,
                    mib(grown.to.database_bytes / 1024),
                    grown.to.rows,
                    mib(grown.allowed_bytes / 1024)
                )
            };
            println!(
                "\nDatabase growth from {:.0} s (retention and a pruning past) to the end; goal: \
                 no faster than the rows kept (×{} + {}): A {}, B {} — **{}**.",
                steady.at.as_secs_f64(),
                report.growth_slack(),
                mib(DATABASE_GROWTH_FLOOR / 1024),
                line(&a),
                line(&b),
                met(a.met() && b.met())
            );
        }
        _ => println!(
            "\nDatabase growth: not judged, the run is shorter than the retention and two prunings."
        ),
    }
    if report.steady().is_some()
        && let Some(last) = report.samples.last()
    {
        let allowed = report.ended_jobs_allowed();
        println!(
            "\nEnded jobs kept at the end (goal: at most about {allowed}, those of the last {} s): \
             A {}, B {} — **{}**.\n",
            (report.options.retention() + 2 * PRUNE_INTERVAL).as_secs(),
            last.storage_a.ended_jobs,
            last.storage_b.ended_jobs,
            met(last.storage_a.ended_jobs <= allowed && last.storage_b.ended_jobs <= allowed)
        );
    }
}
