//! The calls whose cost issue 23 measures, and the servers that answer them:
//! a `mosaicd` on a new PostgreSQL database with Redis rate limiting, the
//! bare echo beside it, and the echo reading `GetJob`'s row (the floor of a
//! call that reads the database). Shared by `bench_calls` (CPU time) and
//! `bench_instructions` (instructions).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::store::testing::TestDatabase;
use prost::Message as _;
use tonic::transport::Channel;

use super::daemon::{ClientIdentity, Daemon, Launcher, PreparedDaemon, with_key};
use super::echo::{self, EchoMessage, EchoProcess};
use super::load::{Errors, closed_loop};
use super::stats::Samples;

/// A call measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    /// The bare echo: the baseline.
    Echo,
    /// The echo reading `GetJob`'s row with tokio-postgres.
    EchoRawRead,
    /// The echo reading `GetJob`'s row through the daemon's `Store`.
    EchoStoreRead,
    /// `grpc.health.v1.Health/Check`.
    GrpcHealth,
    /// `Coordinator/Health`, no API key.
    CoordinatorHealth,
    /// `Coordinator/GetJob` of one job, with a cached key.
    GetJob,
    /// `Coordinator/CreateJob`.
    CreateJob,
}

impl Call {
    /// The call as the reports name it.
    pub fn name(self) -> &'static str {
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
pub struct Pool {
    channels: Arc<Vec<Channel>>,
    size: usize,
    next: Arc<AtomicUsize>,
}

impl Pool {
    /// The first `size` of `channels`.
    pub fn new(channels: Arc<Vec<Channel>>, size: usize) -> Pool {
        let size = size.clamp(1, channels.len());
        let next = Arc::new(AtomicUsize::new(0));
        Pool {
            channels,
            size,
            next,
        }
    }

    /// The next connection.
    pub fn take(&self) -> Channel {
        self.channels[self.next.fetch_add(1, Ordering::Relaxed) % self.size].clone()
    }
}

/// A process to measure and how to call it.
pub struct Target {
    /// Its process id.
    pub pid: u32,
    /// Connections to it.
    pub channels: Arc<Vec<Channel>>,
    /// The API key (daemons only).
    pub key: String,
    /// The job `GetJob` reads (daemons only).
    pub job_id: String,
    /// What an echo call sends (echo servers only).
    pub echo: EchoMessage,
}

/// The job every `CreateJob` makes.
pub fn create_request() -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        job_type: "bench".to_owned(),
        workspace: "bench".to_owned(),
        payload_json: "{\"n\":1}".to_owned(),
        ..pb::CreateJobRequest::default()
    }
}

/// One `call` on `channel`: `key` and `job_id` for the daemon's calls,
/// `message` for the echo's.
pub async fn make(
    call: Call,
    channel: Channel,
    key: &str,
    job_id: String,
    message: EchoMessage,
) -> Result<(), tonic::Status> {
    match call {
        Call::Echo | Call::EchoRawRead | Call::EchoStoreRead => {
            let mut client = tonic::client::Grpc::new(channel);
            echo::call(&mut client, message).await.map(drop)
        }
        Call::GrpcHealth => {
            let request = tonic_health::pb::HealthCheckRequest::default();
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            client.check(request).await.map(drop)
        }
        Call::CoordinatorHealth => CoordinatorClient::new(channel)
            .health(pb::HealthRequest {})
            .await
            .map(drop),
        Call::GetJob => {
            let request = with_key(pb::GetJobRequest { job_id }, key);
            CoordinatorClient::new(channel)
                .get_job(request)
                .await
                .map(drop)
        }
        Call::CreateJob => {
            let request = with_key(create_request(), key);
            CoordinatorClient::new(channel)
                .create_job(request)
                .await
                .map(drop)
        }
    }
}

/// `call` on `target` from `clients` clients (closed loops, each call on the
/// next of the first `clients` connections), `requests` calls in all or
/// until `time_limit`, whichever comes first.
pub async fn load(
    call: Call,
    target: &Target,
    clients: usize,
    requests: usize,
    time_limit: std::time::Duration,
) -> (Samples, Errors) {
    let pool = Pool::new(Arc::clone(&target.channels), clients);
    let (key, job_id) = (target.key.clone(), target.job_id.clone());
    let message = target.echo.clone();
    closed_loop(clients, requests, time_limit, pool, move |pool: Pool| {
        let (channel, key, job_id) = (pool.take(), key.clone(), job_id.clone());
        let message = message.clone();
        async move { make(call, channel, &key, job_id, message).await }
    })
    .await
}

/// A daemon under `launcher` on a new PostgreSQL database with Redis rate
/// limiting (`BENCH_REDIS_URL`, default `redis://127.0.0.1:6379`; its own
/// prefix; limits that never refuse) and `access_log`, and the variables
/// `extra_env`; `connections` connections to it, a coordinator-scope key and
/// one job.
pub async fn start_daemon(
    launcher: &Launcher,
    access_log: &str,
    extra_env: &[(&str, &str)],
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
    env.extend(extra_env.iter().copied());
    let daemon = prepared.serve_under(launcher, &extra, &env).await?;
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

/// The echo servers under `launcher`, each with `connections` connections:
/// the bare echo ([`Call::Echo`]), then the two that read `daemon`'s job
/// from `database` before each answer ([`Call::EchoRawRead`],
/// [`Call::EchoStoreRead`]). Each echo carries as many bytes each way as a
/// `GetJob` of that job.
pub async fn start_echoes(
    launcher: &Launcher,
    identity: &ClientIdentity,
    connections: usize,
    daemon: &Target,
    database: &TestDatabase,
) -> anyhow::Result<Vec<(Call, Target, EchoProcess)>> {
    let get_job = pb::GetJobRequest {
        job_id: daemon.job_id.clone(),
    };
    let job = CoordinatorClient::new(daemon.channels[0].clone())
        .get_job(with_key(get_job.clone(), &daemon.key))
        .await?
        .into_inner();
    let message = EchoMessage {
        payload: vec![0x5a; get_job.encoded_len()],
        reply_bytes: u32::try_from(job.encoded_len())?,
    };
    let mut echoes = Vec::new();
    for (call, mode) in [
        (Call::Echo, None),
        (Call::EchoRawRead, Some(echo::READ_MODES[0])),
        (Call::EchoStoreRead, Some(echo::READ_MODES[1])),
    ] {
        let process = match mode {
            None => EchoProcess::start(launcher, None).await?,
            Some(mode) => {
                EchoProcess::reading(launcher, mode, &database.url, &daemon.job_id).await?
            }
        };
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(identity.channel(&process.url, process.key.clone()).await?);
        }
        let target = Target {
            pid: process.pid,
            channels: Arc::new(channels),
            key: String::new(),
            job_id: String::new(),
            echo: message.clone(),
        };
        echoes.push((call, target, process));
    }
    Ok(echoes)
}

/// A counter's value in Prometheus text.
fn metric<'a>(text: &'a str, name: &str) -> &'a str {
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '));
    value.unwrap_or("?").trim()
}

/// The rate limiter's and the log's counters of each daemon, for the end of
/// a report: Redis checks, checks counted in memory because Redis did not
/// answer, log lines dropped.
pub async fn counters(daemons: &[(&str, &Daemon)]) -> anyhow::Result<String> {
    let mut counters = Vec::new();
    for (access_log, daemon) in daemons {
        let text = daemon.scrape_metrics().await?;
        counters.push(format!(
            "access_log {access_log}: Redis checks {}, fallback checks {}, log lines dropped {}",
            metric(&text, "mosaic_rate_limit_redis_checks_total"),
            metric(&text, "mosaic_rate_limit_fallback_checks_total"),
            metric(&text, "mosaic_log_lines_dropped_total"),
        ));
    }
    Ok(counters.join("; "))
}
