//! Faults under load (issue 9): Redis cut while calls stream in, the daemon
//! SIGKILLed while 50 agents run and jobs are being written, and a peer cut in
//! the middle of a command. Each test is bounded in time; the fault proxy and
//! the daemons are real, as everywhere in `tests/it`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::Config;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::coordinator as coordinator_pb;
use mosaic_mesh::proto::federation as federation_pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::ratelimit::metrics::BreakerGauge;
use mosaic_mesh::ratelimit::{RateLimitArgs, RateLimitFileConfig, RateLimitSettings};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::agents::{Agents, process_is_alive, wait_until_dead, with_agent_types};
use crate::support::binary::{channel_to, mosaicd, spawn_serve_command};
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};
use crate::support::fault_proxy::{Fault, FaultProxy};
use crate::support::redis::{
    delete_keys, free_port, keys_with_prefix, shared_redis_url, unique_prefix,
};

/// Callers in flight at once in the load phases.
const CONCURRENCY: usize = 16;

/// The environment's configuration with Redis at `redis_url` and `[rate_limit]`
/// set to `section`.
fn limited(environment: &TestEnvironment, redis_url: String, section: &str) -> Config {
    let mut config = environment.config();
    config.redis_url = Some(redis_url);
    let file: RateLimitFileConfig = toml::from_str(section).expect("[rate_limit] section");
    config.rate_limit = RateLimitSettings::resolve(file, &RateLimitArgs::default(), true)
        .expect("rate limit settings");
    config
}

/// One health check as client `ip` (127.0.0.1 is a trusted proxy here). `true`
/// if admitted, `false` if refused with RESOURCE_EXHAUSTED; any other outcome
/// (UNAVAILABLE because Redis is gone, say) fails the test.
async fn health_as(channel: tonic::transport::Channel, ip: &str) -> bool {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", ip.parse().expect("header value"));
    match HealthClient::new(channel).check(request).await {
        Ok(_) => true,
        Err(status) if status.code() == Code::ResourceExhausted => false,
        Err(status) => panic!("a limited call got {status:?}, not OK or RESOURCE_EXHAUSTED"),
    }
}

/// `calls` health checks as `ip`, `CONCURRENCY` at a time, spread over
/// `channels` in turn. Returns how many were admitted.
async fn burst(channels: &[tonic::transport::Channel], ip: &str, calls: usize) -> usize {
    futures::stream::iter(0..calls)
        .map(|n| health_as(channels[n % channels.len()].clone(), ip))
        .buffer_unordered(CONCURRENCY)
        .filter(|admitted| futures::future::ready(*admitted))
        .count()
        .await
}

/// The host:port of a `redis://HOST:PORT` URL.
async fn redis_address(url: &str) -> std::net::SocketAddr {
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
        .expect("redis url");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    tokio::net::lookup_host(authority)
        .await
        .expect("resolve redis")
        .next()
        .expect("redis address")
}

/// Health checks, each as a new throwaway client (so none is refused from the
/// refused-IP cache without asking Redis), until `daemon`'s breaker is closed
/// and ten calls in a row were answered by Redis without an error.
async fn wait_for_redis_limiting(daemon: &TestDaemon) {
    let channel = daemon.channel().await;
    let counters = || daemon.rate_limiter.metrics().snapshot();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut clean_calls = 0;
    let mut client = 0u32;
    while clean_calls < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis-backed limiting did not resume: {:?}",
            counters()
        );
        let before = counters();
        client += 1;
        let ip = format!(
            "10.{}.{}.{}",
            client >> 16 & 255,
            client >> 8 & 255,
            client & 255
        );
        health_as(channel.clone(), &ip).await;
        let after = counters();
        let answered_by_redis = after.breaker == BreakerGauge::Closed
            && after.redis_errors == before.redis_errors
            && after.redis_checks > before.redis_checks
            && after.fallback_checks == before.fallback_checks;
        if answered_by_redis {
            clean_calls += 1;
        } else {
            clean_calls = 0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Two daemons share a Redis budget, each through its own fault proxy. Redis is
/// cut for one of them while calls stream in: limiting never switches off (every
/// call is answered OK or RESOURCE_EXHAUSTED, a fresh client gets exactly the
/// fallback's share), and once the proxy passes again the daemon counts in Redis
/// again, so both daemons together admit exactly the shared limit.
#[tokio::test(flavor = "multi_thread")]
async fn redis_cut_under_load_never_switches_limiting_off_and_sharing_resumes() {
    let url = shared_redis_url();
    let upstream = redis_address(&url).await;
    let prefix = unique_prefix();
    let first_proxy = FaultProxy::start(upstream).await;
    let second_proxy = FaultProxy::start(upstream).await;
    // An hour-long window: nothing refills while the test runs. 20 per client
    // IP in Redis; 20 / 2 replicas = 10 per daemon in the fallback.
    let section = format!(
        "ttl = 3600\nhealth_limit = 20\nreplicas = 2\nstorage = \"redis\"\nredis_prefix = \"{prefix}\"\nredis_timeout_ms = 300\nbreaker_failures = 2\nbreaker_cooldown_ms = 1000\ntrusted_proxies = [\"127.0.0.1\"]\n"
    );
    let first_environment = TestEnvironment::new(Backend::Sqlite).await;
    let second_environment = TestEnvironment::new(Backend::Sqlite).await;
    let proxied = |proxy: &FaultProxy| format!("redis://{}", proxy.address);
    let first = first_environment
        .start_with(limited(&first_environment, proxied(&first_proxy), &section))
        .await
        .expect("first daemon");
    let second = second_environment
        .start_with(limited(
            &second_environment,
            proxied(&second_proxy),
            &section,
        ))
        .await
        .expect("second daemon");
    let first_channel = first.channel().await;
    let both = [first_channel.clone(), second.channel().await];

    // Redis up, under load: the two daemons admit exactly the shared 20.
    assert_eq!(burst(&both, "198.51.100.1", 120).await, 20);
    assert!(
        keys_with_prefix(&url, &prefix)
            .await
            .contains(&format!("{prefix}health:ip:198.51.100.1"))
    );

    // Load on the first daemon from client .2; Redis is cut for it mid-stream.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let channel = first_channel.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut admitted, mut refused) = (0usize, 0usize);
                while !stop.load(Ordering::SeqCst) {
                    if health_as(channel.clone(), "198.51.100.2").await {
                        admitted += 1;
                    } else {
                        refused += 1;
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    first_proxy.set(Fault::Cut);
    // While the cut lasts (and the load goes on), a fresh client gets the
    // fallback's share on this daemon: exactly 10, not unlimited, not zero.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        burst(std::slice::from_ref(&first_channel), "198.51.100.3", 100).await,
        10,
        "the in-memory fallback limits at health_limit / replicas"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut admitted, mut refused) = (0, 0);
    for worker in workers {
        let (worker_admitted, worker_refused) = worker.await.expect("load worker");
        admitted += worker_admitted;
        refused += worker_refused;
    }
    // At most Redis's 20 before the cut plus the fallback's 10 after it.
    assert!(
        (1..=30).contains(&admitted),
        "client .2 admitted {admitted}, refused {refused}"
    );
    assert!(
        refused > 100,
        "the load kept coming and was refused: {refused}"
    );
    let during = first.rate_limiter.metrics().snapshot();
    assert!(during.redis_errors >= 1, "{during:?}");
    assert!(during.fallback_checks >= 10, "{during:?}");
    assert!(
        !keys_with_prefix(&url, &prefix)
            .await
            .contains(&format!("{prefix}health:ip:198.51.100.3")),
        "client .3 was counted only in memory while Redis was cut"
    );
    // The second daemon never lost Redis.
    assert_eq!(second.rate_limiter.metrics().snapshot().redis_errors, 0);

    // Redis back: after the cool-down the first daemon counts in Redis again,
    // and a fresh client is limited to the shared 20 across both daemons (a
    // first daemon still on its fallback would let 10 more through there).
    first_proxy.set(Fault::Pass);
    wait_for_redis_limiting(&first).await;
    let fallback_before = first.rate_limiter.metrics().snapshot().fallback_checks;
    assert_eq!(burst(&both, "198.51.100.4", 120).await, 20);
    assert_eq!(
        first.rate_limiter.metrics().snapshot().fallback_checks,
        fallback_before,
        "every check after the recovery went to Redis"
    );
    assert!(
        keys_with_prefix(&url, &prefix)
            .await
            .contains(&format!("{prefix}health:ip:198.51.100.4"))
    );

    first.stop().await;
    second.stop().await;
    drop((first_proxy, second_proxy));
    delete_keys(&url, &prefix).await;
    first_environment.cleanup().await;
    second_environment.cleanup().await;
}

/// Agents the SIGKILL test starts.
const AGENT_COUNT: usize = 50;
/// Concurrent job writers in the SIGKILL test.
const JOB_WRITERS: usize = 8;

/// The config file of the daemon run as a process: a `sleep` agent type, room
/// for every agent, and limits the test's calls never reach.
const SIGKILL_CONFIG_TOML: &str = r#"
[agents]
max_concurrent = 64
kill_grace_secs = 1
[agents.types.sleep]
command = ["/bin/sleep", "{prompt}"]
timeout_secs = 600
[rate_limit]
global_limit = 1000000
coordinator_limit = 1000000
health_limit = 1000000
webhook_limit = 1000000
federation_limit = 1000000
"#;

/// One CreateJob a writer sent, and whether the daemon acknowledged it.
#[derive(Clone, Debug)]
struct SentJob {
    request: coordinator_pb::CreateJobRequest,
    /// The job id of an OK answer; `None` when the call failed (the daemon died).
    acknowledged: Option<String>,
}

/// The CreateJob request number `number` of writer `writer`: its payload and
/// labels name it, so a stored job can be matched to exactly what was sent.
fn job_request(writer: usize, number: usize) -> coordinator_pb::CreateJobRequest {
    let key = format!("w{writer}-n{number}");
    coordinator_pb::CreateJobRequest {
        job_type: "stress".to_owned(),
        workspace: "kill-test".to_owned(),
        payload_json: serde_json::json!({
            "writer": writer,
            "number": number,
            "padding": "x".repeat(512),
        })
        .to_string(),
        priority: i32::try_from(number % 7).expect("small"),
        labels: [
            ("writer".to_owned(), writer.to_string()),
            ("key".to_owned(), key.clone()),
        ]
        .into(),
        idempotency_key: key,
    }
}

/// Writes jobs one after another until a call fails (the daemon was killed) or
/// `stop` is set; returns every request sent with its outcome.
async fn write_jobs(
    channel: tonic::transport::Channel,
    key: String,
    writer: usize,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<SentJob> {
    let mut client = coordinator_pb::coordinator_client::CoordinatorClient::new(channel);
    let mut sent = Vec::new();
    for number in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let request = job_request(writer, number);
        let outcome = client.create_job(with_key(request.clone(), &key)).await;
        let acknowledged_id = match outcome {
            Ok(response) => {
                let response = response.into_inner();
                assert!(response.created, "a first CreateJob creates: {response:?}");
                acknowledged.fetch_add(1, Ordering::SeqCst);
                Some(response.job.expect("job").job_id)
            }
            Err(_) => None,
        };
        let failed = acknowledged_id.is_none();
        sent.push(SentJob {
            request,
            acknowledged: acknowledged_id,
        });
        if failed {
            break;
        }
    }
    sent
}

/// Every job in the daemon, through ListJobs pages.
async fn all_jobs(channel: tonic::transport::Channel, key: &str) -> Vec<coordinator_pb::Job> {
    let mut client = coordinator_pb::coordinator_client::CoordinatorClient::new(channel);
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(with_key(
                coordinator_pb::ListJobsRequest {
                    page_size: 500,
                    page_token: page_token.clone(),
                    ..coordinator_pb::ListJobsRequest::default()
                },
                key,
            ))
            .await
            .expect("list jobs")
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return jobs;
        }
        page_token = page.next_page_token;
    }
}

/// Checks that `job` is whole: exactly what `request` asked for, with its
/// creation in the history.
async fn assert_whole(
    client: &mut coordinator_pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    key: &str,
    job: &coordinator_pb::Job,
    request: &coordinator_pb::CreateJobRequest,
) {
    assert_eq!(job.job_type, request.job_type, "{job:?}");
    assert_eq!(job.workspace, request.workspace, "{job:?}");
    assert_eq!(job.payload_json, request.payload_json, "{job:?}");
    assert_eq!(job.priority, request.priority, "{job:?}");
    assert_eq!(job.labels, request.labels, "{job:?}");
    assert_eq!(job.idempotency_key, request.idempotency_key, "{job:?}");
    assert_eq!(
        job.state,
        coordinator_pb::JobState::Pending as i32,
        "{job:?}"
    );
    let history = client
        .get_job_history(with_key(
            coordinator_pb::GetJobHistoryRequest {
                job_id: job.job_id.clone(),
            },
            key,
        ))
        .await
        .expect("history")
        .into_inner()
        .entries;
    assert_eq!(history.len(), 1, "only the creation: {history:?}");
    assert_eq!(history[0].sequence, 1);
    assert_eq!(
        history[0].to_state,
        coordinator_pb::JobState::Pending as i32
    );
}

/// The daemon as a process on `backend`: 50 `sleep` agents run and eight
/// writers create jobs when it is SIGKILLed. After a restart on the same data
/// dir and database: no agent is shown RUNNING (each orphan is FAILED with
/// "daemon restarted" and its process is gone, as ARCHITECTURE.md says), every
/// acknowledged job is there exactly as sent, every stored job is whole, and a
/// retry of each unanswered CreateJob with its idempotency key leaves exactly
/// one job per key.
async fn sigkill_with_agents_running_and_jobs_being_written(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let data_dir = environment.data_dir.path().to_path_buf();
    let config_file = data_dir.join("mosaic.toml");
    std::fs::write(&config_file, SIGKILL_CONFIG_TOML).expect("write config");
    let command = || {
        let mut command = mosaicd(&data_dir);
        command
            .arg("--config")
            .arg(&config_file)
            .arg("--database-url")
            .arg(&environment.database.url);
        command
    };
    let created = command()
        .args([
            "apikey",
            "create",
            "--name",
            "stress",
            "--scope",
            "agents,coordinator",
            "--json",
        ])
        .output()
        .expect("apikey create");
    assert!(created.status.success(), "{created:?}");
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).expect("json");
    let key = created["key"].as_str().expect("key").to_owned();

    let (mut first_run, address) = spawn_serve_command(command()).await;
    let channel = channel_to(&address, &data_dir).await;
    let spawned: Vec<agent_pb::Agent> = futures::stream::iter(0..AGENT_COUNT)
        .map(|_| {
            let mut agents = Agents::new(channel.clone(), key.clone());
            async move { agents.spawn("sleep", "300").await.expect("spawn") }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    let pids: Vec<u32> = spawned
        .iter()
        .map(|agent| {
            assert_eq!(agent.state, agent_pb::AgentState::Running as i32);
            agent.pid.expect("pid")
        })
        .collect();

    // Writers create jobs; the daemon is SIGKILLed while they are at it.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..JOB_WRITERS)
        .map(|writer| {
            tokio::spawn(write_jobs(
                channel.clone(),
                key.clone(),
                writer,
                Arc::clone(&stop),
                Arc::clone(&acknowledged),
            ))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acknowledged.load(Ordering::SeqCst) < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writers got 200 jobs acknowledged within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first_run.start_kill().expect("SIGKILL the daemon");
    first_run.wait().await.expect("the daemon is gone");
    let mut sent = Vec::new();
    for writer in writers {
        let writer_sent = tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("a writer notices the dead daemon within 30 s")
            .expect("writer");
        assert!(
            writer_sent
                .last()
                .is_some_and(|job| job.acknowledged.is_none()),
            "each writer was cut off mid-stream"
        );
        sent.extend(writer_sent);
    }
    stop.store(true, Ordering::SeqCst);
    // The daemon died without a word to its agents: they still run.
    assert!(pids.iter().all(|pid| process_is_alive(*pid)));

    let (mut second_run, address) = spawn_serve_command(command()).await;
    let channel = channel_to(&address, &data_dir).await;
    let mut agents = Agents::new(channel.clone(), key.clone());
    for agent in &spawned {
        let settled = agents.get(&agent.agent_id).await.expect("get");
        assert_eq!(
            settled.state,
            agent_pb::AgentState::Failed as i32,
            "{settled:?}"
        );
        assert!(
            settled.state_reason.contains("daemon restarted"),
            "{settled:?}"
        );
        assert!(settled.ended_at.is_some(), "{settled:?}");
    }
    for pid in &pids {
        wait_until_dead(*pid).await;
    }
    let running = agents
        .list(agent_pb::ListAgentsRequest {
            state: agent_pb::AgentState::Running as i32,
            page_size: 500,
            ..agent_pb::ListAgentsRequest::default()
        })
        .await
        .expect("list");
    assert!(running.agents.is_empty(), "{running:?}");

    // No acknowledged job lost, no job half-written.
    let mut client = coordinator_pb::coordinator_client::CoordinatorClient::new(channel.clone());
    let by_key: BTreeMap<&str, &SentJob> = sent
        .iter()
        .map(|job| (job.request.idempotency_key.as_str(), job))
        .collect();
    let stored = all_jobs(channel.clone(), &key).await;
    let acknowledged_count = sent.iter().filter(|job| job.acknowledged.is_some()).count();
    assert!(acknowledged_count >= 200);
    assert!(
        stored.len() >= acknowledged_count && stored.len() <= sent.len(),
        "{} stored, {acknowledged_count} acknowledged, {} sent",
        stored.len(),
        sent.len()
    );
    for job in &stored {
        let sent_job = by_key
            .get(job.idempotency_key.as_str())
            .unwrap_or_else(|| panic!("a job nobody sent: {job:?}"));
        if let Some(id) = &sent_job.acknowledged {
            assert_eq!(&job.job_id, id);
        }
        assert_whole(&mut client, &key, job, &sent_job.request).await;
    }
    for sent_job in &sent {
        if let Some(id) = &sent_job.acknowledged {
            assert!(
                stored.iter().any(|job| &job.job_id == id),
                "acknowledged job {id} was lost"
            );
        }
    }
    // Retrying each unanswered call with its idempotency key makes the job at
    // most once: one job per key sent.
    for sent_job in sent.iter().filter(|job| job.acknowledged.is_none()) {
        let response = client
            .create_job(with_key(sent_job.request.clone(), &key))
            .await
            .expect("retry")
            .into_inner();
        let job = response.job.expect("job");
        let was_stored = stored.iter().any(|stored| stored.job_id == job.job_id);
        assert_eq!(response.created, !was_stored, "{job:?}");
        assert_whole(&mut client, &key, &job, &sent_job.request).await;
    }
    assert_eq!(all_jobs(channel, &key).await.len(), sent.len());

    second_run.start_kill().expect("stop the daemon");
    second_run.wait().await.expect("the daemon is gone");
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_with_agents_running_and_jobs_being_written_on_postgres() {
    sigkill_with_agents_running_and_jobs_being_written(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_with_agents_running_and_jobs_being_written_on_sqlite() {
    sigkill_with_agents_running_and_jobs_being_written(Backend::Sqlite).await;
}

/// The outbound entries of A's command log for `message_id`.
async fn outbound_entries(
    client: &mut FederationClient<tonic::transport::Channel>,
    key: &str,
    message_id: &str,
) -> Vec<federation_pb::CommandLogEntry> {
    client
        .list_command_log(with_key(
            federation_pb::ListCommandLogRequest {
                direction: federation_pb::CommandDirection::Outbound as i32,
                ..federation_pb::ListCommandLogRequest::default()
            },
            key,
        ))
        .await
        .expect("command log")
        .into_inner()
        .entries
        .into_iter()
        .filter(|entry| entry.message_id == message_id)
        .collect()
}

/// A sends a remote spawn to B through a fault proxy that holds each chunk
/// back; as soon as B has run it (its inbound log shows the message id) the
/// proxy cuts the connection, so B's signed reply never arrives. The caller
/// gets UNAVAILABLE or DEADLINE_EXCEEDED within its deadline, A's log records
/// that outcome, and a retry with the same message id (proxy passing again)
/// gets the agent B made the first time: there is no second agent.
async fn peer_cut_mid_command(backend: Backend) {
    let environments = [
        TestEnvironment::new(backend).await,
        TestEnvironment::new(backend).await,
    ];
    // B's port is chosen first, so the proxy can target it and B can name the
    // proxy as its public URL: A reaches B only through the proxy.
    let b_port = free_port();
    let proxy = FaultProxy::start(([127, 0, 0, 1], b_port).into()).await;
    let a = environments[0].start_peer(0, |_| {}).await;
    let b = environments[1]
        .start_peer(b_port, |config| {
            *config = with_agent_types(config.clone());
            config.instance.public_url = format!("https://{}", proxy.address);
        })
        .await;
    let call_timeout = a.config.federation.call_timeout;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let b_id = admin_b.instance().await.instance_id;
    let outbound = admin_a
        .connect(
            &format!("https://{}", proxy.address),
            "ws",
            "",
            &["agent.spawn"],
        )
        .await
        .expect("connect through the proxy");
    let inbound = admin_b.open_in("ws").await;
    admin_b
        .accept(&inbound.connection_id, &["agent.spawn", "agent.status"])
        .await
        .expect("accept");
    admin_a
        .wait_for_state(
            &outbound.connection_id,
            federation_pb::ConnectionState::Active,
        )
        .await;
    let mut client_a = FederationClient::new(a.channel().await);
    let mut client_b = FederationClient::new(b.channel().await);
    let key_a = a.api_key(&[Scope::Admin]).await;
    let key_b = b.api_key(&[Scope::Admin]).await;
    let mut agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
    let message_id = uuid::Uuid::new_v4().to_string();
    let request = federation_pb::SpawnRemoteAgentRequest {
        peer_instance_id: b_id.clone(),
        workspace: String::new(),
        message_id: message_id.clone(),
        spawn: Some(agent_pb::SpawnRequest {
            agent_type: "sh".to_owned(),
            prompt: "sleep 30".to_owned(),
            ..agent_pb::SpawnRequest::default()
        }),
    };

    proxy.set(Fault::Delay(Duration::from_millis(700)));
    let started = tokio::time::Instant::now();
    let call = tokio::spawn({
        let mut client_a = client_a.clone();
        let request = with_key(request.clone(), &key_a);
        async move { client_a.spawn_remote_agent(request).await }
    });
    // Cut as soon as B has run the command, while its reply is held back.
    let deadline = started + call_timeout;
    loop {
        let inbound = client_b
            .list_command_log(with_key(
                federation_pb::ListCommandLogRequest::default(),
                &key_b,
            ))
            .await
            .expect("B's command log")
            .into_inner()
            .entries;
        if inbound.iter().any(|entry| entry.message_id == message_id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never received the command"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.set(Fault::Cut);
    let status = call
        .await
        .expect("the call task")
        .expect_err("the reply was cut off");
    let elapsed = started.elapsed();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        elapsed <= call_timeout + Duration::from_secs(1),
        "answered after {elapsed:?}, past the {call_timeout:?} deadline"
    );
    // B ran it; A logged the failure under the message id.
    let spawned_on_b = agents_b
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .agents;
    assert_eq!(spawned_on_b.len(), 1, "{spawned_on_b:?}");
    let logged = outbound_entries(&mut client_a, &key_a, &message_id).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].command_type, "agent.spawn");
    assert_eq!(
        logged[0].outcome,
        mosaic_mesh::error::code_name(status.code()),
        "{logged:?}"
    );

    // The retry re-sends the same signed command; B answers from its stored
    // result, so it is the same agent and there is still one.
    proxy.set(Fault::Pass);
    let retried = tokio::time::timeout(
        Duration::from_secs(20),
        client_a.spawn_remote_agent(with_key(request.clone(), &key_a)),
    )
    .await
    .expect("the retry answers")
    .expect("the retry succeeds")
    .into_inner();
    assert_eq!(retried.message_id, message_id);
    assert_eq!(
        retried.agent.expect("agent").agent_id,
        spawned_on_b[0].agent_id
    );
    let after_retry = agents_b
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .agents;
    assert_eq!(after_retry.len(), 1, "no second agent: {after_retry:?}");
    let logged = outbound_entries(&mut client_a, &key_a, &message_id).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].outcome, "ok", "{logged:?}");

    agents_b
        .kill(&spawned_on_b[0].agent_id, "")
        .await
        .expect("kill");
    a.stop().await;
    b.stop().await;
    drop(proxy);
    for environment in environments {
        environment.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_cut_mid_command_on_postgres() {
    peer_cut_mid_command(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_cut_mid_command_on_sqlite() {
    peer_cut_mid_command(Backend::Sqlite).await;
}
