//! `DispatchJob` to a federated peer, between two real daemons over mutual
//! TLS: the agent runs on the peer and the job follows it to its end (also
//! across restarts of either side), a retry with the same idempotency key
//! starts no second agent (also after the peer was unreachable for the
//! spawn), the peer checks the agent type, CancelJob stops the remote agent,
//! and a dispatch to a peer we are not connected with writes nothing.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::Config;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use mosaic_mesh::proto::federation as fed_pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::agents::{AGENT_DEADLINE, Agents};
use crate::support::daemon::with_key;
use crate::support::pair::{Configure, Pair, with_test_agents};

on_both_backends!(
    a_job_dispatched_to_a_peer_follows_the_remote_agent,
    a_remote_dispatch_survives_restarts_and_an_unreachable_peer,
    a_remote_job_learns_its_agents_end_from_one_stream_without_polls,
);

/// A [`Pair`] with A as the coordinator (polling every 100 ms) connected to
/// B (with the test agent types) in workspace `ws`, B granting A everything;
/// and the keys its calls take besides A's admin key. It reads as the Pair
/// it extends.
struct Dispatch {
    pair: Pair,
    webhook_key: String,
    jobs_key: String,
    agents_key_b: String,
}

impl Deref for Dispatch {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

impl DerefMut for Dispatch {
    fn deref_mut(&mut self) -> &mut Pair {
        &mut self.pair
    }
}

fn config_a(config: &mut Config) {
    config.coordinator.remote_agent_poll = Duration::from_millis(100);
}

/// A that would poll a remote agent once a minute: a job that ends sooner
/// learned it from the stream.
fn config_a_slow_polls(config: &mut Config) {
    config.coordinator.remote_agent_poll = Duration::from_secs(60);
}

impl Dispatch {
    async fn new(backend: Backend) -> Dispatch {
        Dispatch::with(backend, config_a).await
    }

    async fn with(backend: Backend, configure_a: Configure) -> Dispatch {
        let pair = Pair::connected(backend, configure_a, with_test_agents).await;
        let (a, b) = (pair.a(), pair.b());
        Dispatch {
            webhook_key: a.api_key(&[Scope::Webhook]).await,
            jobs_key: a.api_key(&[Scope::Coordinator]).await,
            agents_key_b: b.api_key(&[Scope::Agents]).await,
            pair,
        }
    }

    async fn coordinator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.a().channel().await)
    }

    fn request(&self, agent_type: &str, prompt: &str, key: &str) -> pb::DispatchJobRequest {
        pb::DispatchJobRequest {
            job_type: "remote-work".to_owned(),
            agent_type: agent_type.to_owned(),
            prompt: prompt.to_owned(),
            peer_instance_id: self.b_id.clone(),
            idempotency_key: key.to_owned(),
            labels: [("team".to_owned(), "infra".to_owned())].into(),
            ..pb::DispatchJobRequest::default()
        }
    }

    async fn dispatch(
        &self,
        request: pb::DispatchJobRequest,
    ) -> Result<pb::DispatchJobResponse, tonic::Status> {
        self.coordinator()
            .await
            .dispatch_job(with_key(request, &self.webhook_key))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn job(&self, job_id: &str) -> pb::Job {
        self.coordinator()
            .await
            .get_job(with_key(
                pb::GetJobRequest {
                    job_id: job_id.to_owned(),
                },
                &self.jobs_key,
            ))
            .await
            .expect("GetJob")
            .into_inner()
            .job
            .expect("job")
    }

    async fn jobs(&self) -> Vec<pb::Job> {
        self.coordinator()
            .await
            .list_jobs(with_key(
                pb::ListJobsRequest {
                    page_size: 1000,
                    ..pb::ListJobsRequest::default()
                },
                &self.jobs_key,
            ))
            .await
            .expect("ListJobs")
            .into_inner()
            .jobs
    }

    /// Polls the job until it has ended.
    async fn ended(&self, job_id: &str) -> pb::Job {
        let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
        loop {
            let job = self.job(job_id).await;
            if matches!(
                job.state(),
                pb::JobState::Completed | pb::JobState::Failed | pb::JobState::Cancelled
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job_id} did not end: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agents_b(&self) -> Agents {
        Agents::new(self.b().channel().await, self.agents_key_b.clone())
    }

    async fn agents_on_b(&self) -> Vec<agent_pb::Agent> {
        self.agents_b()
            .await
            .list(agent_pb::ListAgentsRequest::default())
            .await
            .expect("list")
            .agents
    }

    /// A's outbound command log entries with `message_id`.
    async fn sent_by_a(&self, message_id: &str) -> Vec<fed_pb::CommandLogEntry> {
        let mut client = FederationClient::new(self.a().channel().await);
        let mut found = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_command_log(with_key(
                    fed_pb::ListCommandLogRequest {
                        direction: fed_pb::CommandDirection::Outbound as i32,
                        page_size: 500,
                        page_token: page_token.clone(),
                        ..fed_pb::ListCommandLogRequest::default()
                    },
                    &self.admin_a.key,
                ))
                .await
                .expect("ListCommandLog")
                .into_inner();
            found.extend(
                page.entries
                    .into_iter()
                    .filter(|entry| entry.message_id == message_id),
            );
            if page.next_page_token.is_empty() {
                return found;
            }
            page_token = page.next_page_token;
        }
    }

    /// A's outbound command types, one per entry, oldest first.
    async fn sent_types(&self) -> Vec<String> {
        let mut client = FederationClient::new(self.a().channel().await);
        let page = client
            .list_command_log(with_key(
                fed_pb::ListCommandLogRequest {
                    direction: fed_pb::CommandDirection::Outbound as i32,
                    page_size: 500,
                    ..fed_pb::ListCommandLogRequest::default()
                },
                &self.admin_a.key,
            ))
            .await
            .expect("ListCommandLog")
            .into_inner();
        page.entries
            .into_iter()
            .rev()
            .map(|entry| entry.command_type)
            .collect()
    }

    /// A dispatch while B is down: UNAVAILABLE (or DEADLINE_EXCEEDED), and
    /// the job is left PENDING without agent. Returns the job's id.
    async fn dispatch_while_b_is_down(&self, prompt: &str, key: &str) -> String {
        let status = self
            .dispatch(self.request("sh", prompt, key))
            .await
            .expect_err("B is down");
        assert!(
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{status:?}"
        );
        let pending: Vec<pb::Job> = self
            .jobs()
            .await
            .into_iter()
            .filter(|job| job.state() == pb::JobState::Pending)
            .collect();
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].agent_id.is_empty());
        pending[0].job_id.clone()
    }

    async fn finish(self) {
        self.pair.finish().await;
    }
}

fn result_of(job: &pb::Job) -> serde_json::Value {
    serde_json::from_str(&job.result_json).expect("result_json is JSON")
}

async fn a_job_dispatched_to_a_peer_follows_the_remote_agent(backend: Backend) {
    let pair = Dispatch::new(backend).await;

    // The agent runs on B for A, in the connection's workspace, and the job
    // on A completes with B's agent's exit code and output.
    let dispatched = pair
        .dispatch(pair.request("sh", "echo hello-from-b", "remote-once"))
        .await
        .expect("dispatch");
    assert!(dispatched.created);
    let job = dispatched.job.expect("job");
    assert_eq!(job.state(), pb::JobState::Running);
    assert_eq!(job.agent_id, dispatched.agent_id);
    assert_eq!(job.peer_instance_id, pair.b_id);
    assert_eq!(job.workspace, "ws");
    let on_b = pair.agents_on_b().await;
    assert_eq!(on_b.len(), 1);
    let agent = &on_b[0];
    assert_eq!(agent.agent_id, dispatched.agent_id);
    assert_eq!(agent.task_id, job.job_id);
    assert_eq!(agent.labels["team"], "infra");
    let origin = agent.origin.as_ref().expect("origin");
    assert_eq!(origin.kind(), agent_pb::AgentOriginKind::Peer);
    assert_eq!(origin.instance_id, pair.a_id);
    assert_eq!(origin.workspace, "ws");

    let ended = pair.ended(&job.job_id).await;
    assert_eq!(ended.state(), pb::JobState::Completed, "{ended:?}");
    let result = result_of(&ended);
    assert_eq!(result["agent_id"], dispatched.agent_id);
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["output_tail"], serde_json::json!(["hello-from-b"]));

    // A retry with the same key returns the same job and agent; B still has
    // one agent, and A sent the spawn once under the job's message id.
    let again = pair
        .dispatch(pair.request("sh", "echo hello-from-b", "remote-once"))
        .await
        .expect("retry");
    assert!(!again.created);
    assert_eq!(again.agent_id, dispatched.agent_id);
    assert_eq!(again.job.expect("job").job_id, job.job_id);
    assert_eq!(pair.agents_on_b().await.len(), 1);
    let spawns = pair.sent_by_a(&format!("dispatch-{}", job.job_id)).await;
    assert_eq!(spawns.len(), 1, "{spawns:?}");
    assert_eq!(spawns[0].command_type, "agent.spawn");
    assert_eq!(spawns[0].outcome, "ok");

    // A failing agent fails the job, naming the agent, the peer and the code.
    let failing = pair
        .dispatch(pair.request("sh", "echo oops; exit 3", ""))
        .await
        .expect("dispatch");
    let ended = pair.ended(&failing.job.expect("job").job_id).await;
    assert_eq!(ended.state(), pb::JobState::Failed, "{ended:?}");
    for part in [failing.agent_id.as_str(), pair.b_id.as_str(), "exit code 3"] {
        assert!(ended.error.contains(part), "{part} in {}", ended.error);
    }

    // B checks the agent type: its refusal comes back with its code and
    // message, and the job (committed before B was asked) is FAILED with it.
    let status = pair
        .dispatch(pair.request("no-such-type", "true", "bad-type"))
        .await
        .expect_err("unknown agent type on B");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("no-such-type"), "{status:?}");
    let refused = pair
        .dispatch(pair.request("no-such-type", "true", "bad-type"))
        .await
        .expect("the retry returns the failed job");
    assert!(!refused.created);
    assert!(refused.agent_id.is_empty());
    let refused = refused.job.expect("job");
    assert_eq!(refused.state(), pb::JobState::Failed);
    assert!(refused.error.contains("no-such-type"), "{}", refused.error);
    assert_eq!(pair.agents_on_b().await.len(), 2);

    // No connection with the named peer (or not in that workspace): NOT_FOUND,
    // and no job is written.
    let jobs_before = pair.jobs().await.len();
    let mut stranger = pair.request("sh", "true", "");
    stranger.peer_instance_id = "no-such-peer".to_owned();
    let mut elsewhere = pair.request("sh", "true", "");
    elsewhere.workspace = "other-ws".to_owned();
    let mut bad_labels = pair.request("sh", "true", "");
    bad_labels.labels.insert(String::new(), "x".to_owned());
    for (request, code) in [
        (stranger, Code::NotFound),
        (elsewhere, Code::NotFound),
        (bad_labels, Code::InvalidArgument),
    ] {
        let status = pair.dispatch(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
    }
    assert_eq!(pair.jobs().await.len(), jobs_before);
    assert_eq!(pair.agents_on_b().await.len(), 2);

    // Cancelling the job stops the agent on B.
    let long = pair
        .dispatch(pair.request("sh", "sleep 30", ""))
        .await
        .expect("dispatch");
    let cancelled = pair
        .coordinator()
        .await
        .cancel_job(with_key(
            pb::CancelJobRequest {
                job_id: long.job.expect("job").job_id,
                reason: "no longer needed".to_owned(),
            },
            &pair.jobs_key,
        ))
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    pair.agents_b()
        .await
        .wait_for_state(&long.agent_id, agent_pb::AgentState::Killed)
        .await;
    assert_eq!(
        pair.job(&cancelled.job_id).await.state(),
        pb::JobState::Cancelled
    );

    // Once the connection is suspended, a new dispatch is refused with
    // nothing written, and a retry still returns its job.
    pair.admin_a
        .suspend(pair.connection_on_a())
        .await
        .expect("suspend");
    let jobs_before = pair.jobs().await.len();
    let status = pair
        .dispatch(pair.request("sh", "true", ""))
        .await
        .expect_err("no ACTIVE connection");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(pair.jobs().await.len(), jobs_before);
    let retried = pair
        .dispatch(pair.request("sh", "echo hello-from-b", "remote-once"))
        .await
        .expect("a retry returns its job");
    assert!(!retried.created);
    assert_eq!(retried.agent_id, dispatched.agent_id);
    pair.finish().await;
}

async fn a_remote_dispatch_survives_restarts_and_an_unreachable_peer(backend: Backend) {
    let mut pair = Dispatch::new(backend).await;

    // A restarts while B's agent runs: the new A follows the agent again and
    // the job completes with it.
    let dispatched = pair
        .dispatch(pair.request("sh", "sleep 2; echo done-after-restart", ""))
        .await
        .expect("dispatch");
    let job_id = dispatched.job.expect("job").job_id;
    pair.stop_a().await;
    pair.start_a().await;
    let ended = pair.ended(&job_id).await;
    assert_eq!(ended.state(), pb::JobState::Completed, "{ended:?}");
    assert_eq!(
        result_of(&ended)["output_tail"],
        serde_json::json!(["done-after-restart"])
    );

    // B goes away while its agent runs, and B's shutdown stops the agent.
    // The stream may carry that end before B is gone; if it did not, the job
    // stays RUNNING while B cannot be reached and ends once B is back. Either
    // way it ends as B's agent did.
    let dispatched = pair
        .dispatch(pair.request("sh", "sleep 30", ""))
        .await
        .expect("dispatch");
    let job_id = dispatched.job.expect("job").job_id;
    pair.stop_b().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let while_away = pair.job(&job_id).await.state();
    assert!(
        matches!(while_away, pb::JobState::Running | pb::JobState::Failed),
        "{while_away:?}"
    );
    pair.start_b().await;
    let ended = pair.ended(&job_id).await;
    let agent = pair
        .agents_b()
        .await
        .get(&dispatched.agent_id)
        .await
        .expect("B's agent");
    assert_ne!(agent.state(), agent_pb::AgentState::Running);
    assert_eq!(ended.state(), pb::JobState::Failed, "{ended:?} {agent:?}");
    assert!(
        ended.error.contains(&dispatched.agent_id) && ended.error.contains(&pair.b_id),
        "{}",
        ended.error
    );

    // B cannot be reached for the spawn: the call says so and the job stays
    // PENDING without agent; A sends the same signed spawn again until B is
    // back, and B starts one agent; a retry with the same key finds it.
    let agents_before = pair.agents_on_b().await.len();
    pair.stop_b().await;
    let job_id = pair
        .dispatch_while_b_is_down("echo late", "while-b-is-down")
        .await;
    pair.start_b().await;
    let ended = pair.ended(&job_id).await;
    assert_eq!(ended.state(), pb::JobState::Completed, "{ended:?}");
    assert_eq!(
        result_of(&ended)["output_tail"],
        serde_json::json!(["late"])
    );
    let again = pair
        .dispatch(pair.request("sh", "echo late", "while-b-is-down"))
        .await
        .expect("retry once B is back");
    assert!(!again.created);
    assert_eq!(again.job.expect("job").job_id, job_id);
    assert_eq!(again.agent_id, result_of(&ended)["agent_id"]);
    assert_eq!(pair.agents_on_b().await.len(), agents_before + 1);
    let spawns = pair.sent_by_a(&format!("dispatch-{job_id}")).await;
    assert_eq!(
        spawns.len(),
        1,
        "one log entry per signed spawn: {spawns:?}"
    );
    assert_eq!(spawns[0].outcome, "ok");

    // The same, with A restarting before B is back: the new A sends the
    // logged spawn again by itself.
    pair.stop_b().await;
    let job_id = pair
        .dispatch_while_b_is_down("echo after-both-restarts", "while-a-restarts")
        .await;
    pair.stop_a().await;
    pair.start_b().await;
    pair.start_a().await;
    let ended = pair.ended(&job_id).await;
    assert_eq!(ended.state(), pb::JobState::Completed, "{ended:?}");
    assert_eq!(
        result_of(&ended)["output_tail"],
        serde_json::json!(["after-both-restarts"])
    );
    assert_eq!(pair.agents_on_b().await.len(), agents_before + 2);
    pair.finish().await;
}

/// A polls only once a minute, yet its job ends within seconds of its agent
/// on B: the end came through the `agent.watch` stream. A's command log for
/// the job is the spawn and one watch, with no status poll.
async fn a_remote_job_learns_its_agents_end_from_one_stream_without_polls(backend: Backend) {
    let pair = Dispatch::with(backend, config_a_slow_polls).await;
    let dispatched = pair
        .dispatch(pair.request("sh", "sleep 1; echo streamed-end", ""))
        .await
        .expect("dispatch");
    let job = dispatched.job.expect("job");
    assert_eq!(job.state(), pb::JobState::Running);
    let started = tokio::time::Instant::now();
    let ended = pair.ended(&job.job_id).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the end arrived by the stream, not by a poll a minute later"
    );
    assert_eq!(ended.state(), pb::JobState::Completed, "{ended:?}");
    let result = result_of(&ended);
    assert_eq!(result["output_tail"], serde_json::json!(["streamed-end"]));
    // Written behind the stream's end; give the entry a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let sent = loop {
        let sent = pair.sent_types().await;
        if sent.len() >= 2 || tokio::time::Instant::now() > deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sent, ["agent.spawn", "agent.watch"], "{sent:?}");
    pair.finish().await;
}
