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
//! `cargo build --release --bin mosaicd --examples && target/release/examples/soak`
//! Options: `--duration 10m` (default; humantime, e.g. `30s`), `--peak 10s`
//! (time of the peak measurement), `--rate OPS` (skip the peak measurement),
//! `--markdown` (print only the Markdown section on stdout; progress goes to
//! stderr either way). Exits non-zero if any call failed: every error code is
//! unexpected here (the rate limits are set out of reach).

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
use common::mesh::Mesh;
use common::stats::{human, percentile};
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

struct Options {
    duration: Duration,
    peak: Duration,
    rate: Option<f64>,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        duration: Duration::from_secs(600),
        peak: Duration::from_secs(10),
        rate: None,
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
            "--markdown" => {}
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(
        options.duration > Duration::ZERO,
        "--duration must be positive"
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

/// One RSS reading.
struct Sample {
    at: Duration,
    rss_a: u64,
    rss_b: u64,
    operations_per_second: f64,
    load_average: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let load_before = common::machine::load_average();
    eprintln!("soak: starting daemons A and B");
    let mesh = Mesh::start().await?;
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
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        rss_a: mesh.a.rss_kib().unwrap_or_default(),
        rss_b: mesh.b.rss_kib().unwrap_or_default(),
        operations_per_second: 0.0,
        load_average: common::machine::load_average(),
    }];
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
            samples.push(Sample {
                at: elapsed,
                rss_a: mesh.a.rss_kib().unwrap_or_default(),
                rss_b: mesh.b.rss_kib().unwrap_or_default(),
                operations_per_second: (done - completed_at_last_sample) as f64
                    / window.as_secs_f64().max(1e-9),
                load_average: common::machine::load_average(),
            });
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
    samples.push(Sample {
        at: wall,
        rss_a: mesh.a.rss_kib().unwrap_or_default(),
        rss_b: mesh.b.rss_kib().unwrap_or_default(),
        operations_per_second: (done - completed_at_last_sample) as f64
            / window.as_secs_f64().max(1e-9),
        load_average: common::machine::load_average(),
    });

    let recorder = recorder.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    print_markdown(&Report {
        options: &options,
        rate,
        peak,
        wall,
        issued,
        shed,
        recorder: &recorder,
        samples: &samples,
        load_before: &load_before,
    });
    let failed: u64 = recorder.errors.values().sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} operations failed: {:?}",
        recorder.errors
    );
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
}

fn growth(from: u64, to: u64) -> f64 {
    if from == 0 {
        f64::NAN
    } else {
        100.0 * (to as f64 - from as f64) / from as f64
    }
}

fn print_markdown(report: &Report<'_>) {
    println!("## Soak (issue 9)\n");
    let peak = match report.peak {
        Some(peak) => format!(
            "half the peak of the same mix measured just before ({peak:.0} operations/s with 16 \
             callers over {:?})",
            report.options.peak
        ),
        None => "a rate given with `--rate`".to_owned(),
    };
    println!(
        "Daemons A and B (`mosaicd` processes, SQLite), mixed traffic from one mutual-TLS \
         client to A for {:.0} s at {:.0} operations/s, {peak}. Mix per 10 operations: 4 signed \
         `agent.status` A→B, 2 job lifecycles (CreateJob, UpdateJobStatus, CompleteJob), 2 \
         HMAC-signed webhooks (each a job), 2 health checks (coordinator Health and \
         grpc.health.v1, on A and B). Load average {} at the start, {} at the end.\n",
        report.wall.as_secs_f64(),
        report.rate,
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
        if failed == 0 { "met" } else { "not met" }
    );
    println!("| time | operations/s in the interval | RSS A | RSS B | load average |");
    println!("|---|---|---|---|---|");
    for sample in report.samples {
        println!(
            "| {:.0} s | {:.0} | {} | {} | {} |",
            sample.at.as_secs_f64(),
            sample.operations_per_second,
            mib(sample.rss_a),
            mib(sample.rss_b),
            sample.load_average
        );
    }
    let warm = report.wall.mul_f64(WARM_UP_FRACTION);
    if let (Some(baseline), Some(last)) = (
        report.samples.iter().find(|sample| sample.at >= warm),
        report.samples.last(),
    ) {
        let peak_a = report
            .samples
            .iter()
            .filter(|s| s.at >= warm)
            .map(|s| s.rss_a)
            .max()
            .unwrap_or_default();
        let peak_b = report
            .samples
            .iter()
            .filter(|s| s.at >= warm)
            .map(|s| s.rss_b)
            .max()
            .unwrap_or_default();
        let (growth_a, growth_b) = (
            growth(baseline.rss_a, last.rss_a),
            growth(baseline.rss_b, last.rss_b),
        );
        println!(
            "\nRSS growth after warm-up (from {:.0} s to the end; goal < 10 %): A {growth_a:+.1} % \
             (highest {:+.1} %), B {growth_b:+.1} % (highest {:+.1} %) — **{}**.\n",
            baseline.at.as_secs_f64(),
            growth(baseline.rss_a, peak_a),
            growth(baseline.rss_b, peak_b),
            if growth_a < 10.0 && growth_b < 10.0 {
                "met"
            } else {
                "not met"
            }
        );
    }
}
