//! The job coordinator as its callers meet it: the state machine over gRPC,
//! idempotent creation, racing terminal changes, watch streams, webhooks,
//! listing, health and restarts, on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::config::{Secret, WebhookSource};
use mosaic_mesh::coordinator::webhook::sign;
use mosaic_mesh::proto::coordinator as pb;
use mosaic_mesh::proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};

/// A client with a `coordinator` key.
struct Jobs {
    client: CoordinatorClient<Channel>,
    key: String,
}

impl Jobs {
    async fn connect(daemon: &TestDaemon) -> Jobs {
        Jobs {
            client: CoordinatorClient::new(daemon.channel().await),
            key: daemon.api_key(&[Scope::Coordinator]).await,
        }
    }

    async fn create(&mut self, job_type: &str) -> pb::Job {
        self.create_with(pb::CreateJobRequest {
            job_type: job_type.to_owned(),
            workspace: "w1".to_owned(),
            payload_json: "{\"n\":1}".to_owned(),
            ..pb::CreateJobRequest::default()
        })
        .await
        .expect("create job")
        .job
        .expect("job")
    }

    async fn create_with(
        &mut self,
        request: pb::CreateJobRequest,
    ) -> Result<pb::CreateJobResponse, tonic::Status> {
        self.client
            .create_job(with_key(request, &self.key))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn get(&mut self, job_id: &str) -> pb::Job {
        self.client
            .get_job(with_key(
                pb::GetJobRequest {
                    job_id: job_id.to_owned(),
                },
                &self.key,
            ))
            .await
            .expect("get job")
            .into_inner()
            .job
            .expect("job")
    }

    async fn history(&mut self, job_id: &str) -> Vec<pb::JobHistoryEntry> {
        self.client
            .get_job_history(with_key(
                pb::GetJobHistoryRequest {
                    job_id: job_id.to_owned(),
                },
                &self.key,
            ))
            .await
            .expect("history")
            .into_inner()
            .entries
    }

    async fn set_state(
        &mut self,
        job_id: &str,
        state: pb::JobState,
    ) -> Result<pb::Job, tonic::Status> {
        self.client
            .update_job_status(with_key(
                pb::UpdateJobStatusRequest {
                    job_id: job_id.to_owned(),
                    state: state.into(),
                    message: format!("to {state:?}"),
                },
                &self.key,
            ))
            .await
            .map(|response| response.into_inner().job.expect("job"))
    }

    async fn progress(&mut self, job_id: &str, progress: u32) -> Result<pb::Job, tonic::Status> {
        self.client
            .update_job_progress(with_key(
                pb::UpdateJobProgressRequest {
                    job_id: job_id.to_owned(),
                    progress,
                    message: format!("at {progress}"),
                },
                &self.key,
            ))
            .await
            .map(|response| response.into_inner().job.expect("job"))
    }

    async fn complete(
        &mut self,
        job_id: &str,
        result_json: &str,
    ) -> Result<pb::Job, tonic::Status> {
        self.client
            .complete_job(with_key(
                pb::CompleteJobRequest {
                    job_id: job_id.to_owned(),
                    result_json: result_json.to_owned(),
                },
                &self.key,
            ))
            .await
            .map(|response| response.into_inner().job.expect("job"))
    }

    async fn fail(&mut self, job_id: &str, error: &str) -> Result<pb::Job, tonic::Status> {
        self.client
            .fail_job(with_key(
                pb::FailJobRequest {
                    job_id: job_id.to_owned(),
                    error: error.to_owned(),
                },
                &self.key,
            ))
            .await
            .map(|response| response.into_inner().job.expect("job"))
    }

    async fn cancel(&mut self, job_id: &str) -> Result<pb::Job, tonic::Status> {
        self.client
            .cancel_job(with_key(
                pb::CancelJobRequest {
                    job_id: job_id.to_owned(),
                    reason: "not needed".to_owned(),
                },
                &self.key,
            ))
            .await
            .map(|response| response.into_inner().job.expect("job"))
    }

    async fn list(
        &mut self,
        request: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse, tonic::Status> {
        self.client
            .list_jobs(with_key(request, &self.key))
            .await
            .map(tonic::Response::into_inner)
    }
}

fn assert_code<T: std::fmt::Debug>(outcome: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    match outcome {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            status
        }
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).expect("known state")
}

async fn the_state_machine_holds_over_grpc(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;

    let job = jobs.create("review").await;
    assert_eq!(state(&job), pb::JobState::Pending);
    assert_eq!(job.created_by, "test key");
    assert_eq!(job.payload_json, "{\"n\":1}");
    let id = job.job_id.clone();

    // Illegal from PENDING: complete, progress. Nothing changes.
    let status = assert_code(jobs.complete(&id, "").await, Code::FailedPrecondition);
    assert!(status.message().contains("PENDING"), "{status:?}");
    assert_code(jobs.progress(&id, 10).await, Code::FailedPrecondition);
    assert_code(
        jobs.set_state(&id, pb::JobState::Pending).await,
        Code::InvalidArgument,
    );
    assert_eq!(jobs.get(&id).await, job);

    // PENDING -> RUNNING; progress forward, equal, backward, out of range.
    let running = jobs
        .set_state(&id, pb::JobState::Running)
        .await
        .expect("start");
    assert_eq!(state(&running), pb::JobState::Running);
    assert!(running.started_at.is_some());
    assert_code(
        jobs.set_state(&id, pb::JobState::Running).await,
        Code::FailedPrecondition,
    );
    assert_eq!(jobs.progress(&id, 30).await.expect("30").progress, 30);
    let same = jobs.progress(&id, 30).await.expect("30 again");
    assert_eq!(same.progress_message, "at 30");
    let status = assert_code(jobs.progress(&id, 29).await, Code::FailedPrecondition);
    assert!(status.message().contains("never goes back"), "{status:?}");
    assert_code(jobs.progress(&id, 101).await, Code::InvalidArgument);
    assert_code(jobs.complete(&id, "{broken").await, Code::InvalidArgument);
    assert_eq!(jobs.get(&id).await.progress, 30);

    // RUNNING -> COMPLETED; then nothing more.
    let completed = jobs.complete(&id, "{\"ok\":true}").await.expect("complete");
    assert_eq!(state(&completed), pb::JobState::Completed);
    assert_eq!(completed.progress, 100);
    assert_eq!(completed.result_json, "{\"ok\":true}");
    assert!(completed.ended_at.is_some());
    for outcome in [
        jobs.fail(&id, "late").await,
        jobs.cancel(&id).await,
        jobs.set_state(&id, pb::JobState::Running).await,
        jobs.progress(&id, 100).await,
    ] {
        assert_code(outcome, Code::FailedPrecondition);
    }
    assert_eq!(jobs.get(&id).await, completed);

    let history = jobs.history(&id).await;
    let steps: Vec<(i32, i32, u32)> = history
        .iter()
        .map(|entry| (entry.from_state, entry.to_state, entry.progress))
        .collect();
    let pending = i32::from(pb::JobState::Pending);
    let running_state = i32::from(pb::JobState::Running);
    assert_eq!(
        steps,
        vec![
            (0, pending, 0),
            (pending, running_state, 0),
            (running_state, running_state, 30),
            (running_state, running_state, 30),
            (running_state, i32::from(pb::JobState::Completed), 100),
        ]
    );
    assert_eq!(
        history
            .iter()
            .map(|entry| entry.sequence)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(history.iter().all(|entry| entry.actor == "test key"));

    // PENDING -> FAILED, PENDING -> CANCELLED, RUNNING -> CANCELLED, RUNNING -> FAILED.
    let failed = jobs.create("review").await;
    let failed = jobs.fail(&failed.job_id, "no worker").await.expect("fail");
    assert_eq!(
        (state(&failed), failed.error.as_str()),
        (pb::JobState::Failed, "no worker")
    );
    let cancelled = jobs.create("review").await;
    assert_eq!(
        state(&jobs.cancel(&cancelled.job_id).await.expect("cancel")),
        pb::JobState::Cancelled
    );
    let running = jobs.create("review").await;
    jobs.set_state(&running.job_id, pb::JobState::Running)
        .await
        .expect("start");
    assert_eq!(
        state(&jobs.cancel(&running.job_id).await.expect("cancel")),
        pb::JobState::Cancelled
    );
    let running = jobs.create("review").await;
    jobs.set_state(&running.job_id, pb::JobState::Running)
        .await
        .expect("start");
    let failed = jobs
        .set_state(&running.job_id, pb::JobState::Failed)
        .await
        .expect("fail through UpdateJobStatus");
    assert_eq!(failed.error, "to Failed");

    // Unknown and empty ids.
    assert_code(jobs.fail("no-such-job", "x").await, Code::NotFound);
    assert_code(jobs.cancel("").await, Code::InvalidArgument);

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_state_machine_holds_over_grpc_on_sqlite() {
    the_state_machine_holds_over_grpc(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_state_machine_holds_over_grpc_on_postgres() {
    the_state_machine_holds_over_grpc(Backend::Postgres).await;
}

async fn bad_input_is_refused_and_creates_nothing(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let refusals = [
        pb::CreateJobRequest::default(),
        pb::CreateJobRequest {
            job_type: "review".to_owned(),
            payload_json: "{not json".to_owned(),
            ..pb::CreateJobRequest::default()
        },
        pb::CreateJobRequest {
            job_type: "review".to_owned(),
            payload_json: format!("\"{}\"", "x".repeat(300 * 1024)),
            ..pb::CreateJobRequest::default()
        },
        pb::CreateJobRequest {
            job_type: "x".repeat(500),
            ..pb::CreateJobRequest::default()
        },
        pb::CreateJobRequest {
            job_type: "review".to_owned(),
            labels: [(String::new(), "v".to_owned())].into(),
            ..pb::CreateJobRequest::default()
        },
    ];
    for request in refusals {
        assert_code(jobs.create_with(request).await, Code::InvalidArgument);
    }
    assert_code(
        jobs.list(pb::ListJobsRequest {
            page_token: "garbage".to_owned(),
            ..pb::ListJobsRequest::default()
        })
        .await,
        Code::InvalidArgument,
    );
    let listed = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("list");
    assert!(listed.jobs.is_empty(), "{listed:?}");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_creates_nothing_on_sqlite() {
    bad_input_is_refused_and_creates_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_creates_nothing_on_postgres() {
    bad_input_is_refused_and_creates_nothing(Backend::Postgres).await;
}

async fn create_is_idempotent_by_field_metadata_and_under_races(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let request = pb::CreateJobRequest {
        job_type: "deploy".to_owned(),
        idempotency_key: "deploy-42".to_owned(),
        ..pb::CreateJobRequest::default()
    };
    let first = jobs.create_with(request.clone()).await.expect("first");
    assert!(first.created);
    let again = jobs.create_with(request).await.expect("retry");
    assert!(!again.created);
    assert_eq!(again.job, first.job);

    // The same key in metadata.
    let mut with_metadata = with_key(
        pb::CreateJobRequest {
            job_type: "deploy".to_owned(),
            ..pb::CreateJobRequest::default()
        },
        &jobs.key,
    );
    with_metadata
        .metadata_mut()
        .insert("idempotency-key", "deploy-42".parse().expect("value"));
    let by_metadata = jobs
        .client
        .create_job(with_metadata)
        .await
        .expect("metadata key")
        .into_inner();
    assert!(!by_metadata.created);
    assert_eq!(by_metadata.job, first.job);

    // Eight concurrent creates with a fresh key make one job.
    let mut racers = Vec::new();
    for _ in 0..8 {
        let mut client = jobs.client.clone();
        let request = with_key(
            pb::CreateJobRequest {
                job_type: "deploy".to_owned(),
                idempotency_key: "raced".to_owned(),
                ..pb::CreateJobRequest::default()
            },
            &jobs.key,
        );
        racers.push(tokio::spawn(async move {
            client
                .create_job(request)
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::BTreeSet::new();
    for racer in racers {
        let response = racer.await.expect("join").expect("create");
        created += usize::from(response.created);
        ids.insert(response.job.expect("job").job_id);
    }
    assert_eq!((created, ids.len()), (1, 1));
    let listed = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.jobs.len(), 2);

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_is_idempotent_by_field_metadata_and_under_races_on_sqlite() {
    create_is_idempotent_by_field_metadata_and_under_races(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_is_idempotent_by_field_metadata_and_under_races_on_postgres() {
    create_is_idempotent_by_field_metadata_and_under_races(Backend::Postgres).await;
}

async fn racing_complete_and_fail_give_one_winner(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    // Separate connections, so the two calls really run side by side.
    let other_channel = daemon.channel().await;
    for round in 0..10 {
        let job = jobs.create("race").await;
        jobs.set_state(&job.job_id, pb::JobState::Running)
            .await
            .expect("start");
        let mut completer = jobs.client.clone();
        let mut failer = CoordinatorClient::new(other_channel.clone());
        let complete = with_key(
            pb::CompleteJobRequest {
                job_id: job.job_id.clone(),
                result_json: "{}".to_owned(),
            },
            &jobs.key,
        );
        let fail = with_key(
            pb::FailJobRequest {
                job_id: job.job_id.clone(),
                error: "lost".to_owned(),
            },
            &jobs.key,
        );
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let completing = tokio::spawn({
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                completer.complete_job(complete).await.map(|_| ())
            }
        });
        let failing = tokio::spawn(async move {
            barrier.wait().await;
            failer.fail_job(fail).await.map(|_| ())
        });
        let completed = completing.await.expect("join");
        let failed = failing.await.expect("join");
        let final_job = jobs.get(&job.job_id).await;
        match (&completed, &failed) {
            (Ok(()), Err(status)) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "round {round}");
                assert_eq!(state(&final_job), pb::JobState::Completed);
            }
            (Err(status), Ok(())) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "round {round}");
                assert_eq!(state(&final_job), pb::JobState::Failed);
            }
            other => panic!("round {round}: expected one winner, got {other:?}"),
        }
        // Created, started, and one terminal change: the loser left no trace.
        assert_eq!(jobs.history(&job.job_id).await.len(), 3, "round {round}");
    }
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_complete_and_fail_give_one_winner_on_sqlite() {
    racing_complete_and_fail_give_one_winner(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_complete_and_fail_give_one_winner_on_postgres() {
    racing_complete_and_fail_give_one_winner(Backend::Postgres).await;
}

async fn watch_streams_every_change_until_the_job_ends(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let job = jobs.create("watched").await;
    let id = job.job_id.clone();
    jobs.set_state(&id, pb::JobState::Running)
        .await
        .expect("start");

    let mut stream = jobs
        .client
        .watch_job(with_key(
            pb::WatchJobRequest { job_id: id.clone() },
            &jobs.key,
        ))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first").expect("a message");
    assert_eq!(
        state(first.job.as_ref().expect("job")),
        pb::JobState::Running
    );
    assert_eq!(first.entry.as_ref().expect("entry").sequence, 2);

    jobs.progress(&id, 50).await.expect("progress");
    jobs.progress(&id, 80).await.expect("progress");
    jobs.complete(&id, "{\"done\":1}").await.expect("complete");

    let mut seen = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = stream.message().await.expect("stream") {
            seen.push(message);
        }
    })
    .await;
    assert!(collected.is_ok(), "the stream did not end after COMPLETED");
    let sequences: Vec<u64> = seen
        .iter()
        .map(|message| message.entry.as_ref().expect("entry").sequence)
        .collect();
    assert_eq!(sequences, [3, 4, 5]);
    let progresses: Vec<u32> = seen
        .iter()
        .map(|message| message.entry.as_ref().expect("entry").progress)
        .collect();
    assert_eq!(progresses, [50, 80, 100]);
    let last = seen.last().expect("last").job.as_ref().expect("job");
    assert_eq!(state(last), pb::JobState::Completed);

    // An ended job: one message, then the end.
    let mut ended = jobs
        .client
        .watch_job(with_key(
            pb::WatchJobRequest { job_id: id.clone() },
            &jobs.key,
        ))
        .await
        .expect("watch")
        .into_inner();
    let only = ended.message().await.expect("first").expect("a message");
    assert_eq!(only.entry.expect("entry").sequence, 5);
    assert!(ended.message().await.expect("end").is_none());

    let status = jobs
        .client
        .watch_job(with_key(
            pb::WatchJobRequest {
                job_id: "missing".to_owned(),
            },
            &jobs.key,
        ))
        .await
        .expect_err("unknown job");
    assert_eq!(status.code(), Code::NotFound);

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_every_change_until_the_job_ends_on_sqlite() {
    watch_streams_every_change_until_the_job_ends(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_every_change_until_the_job_ends_on_postgres() {
    watch_streams_every_change_until_the_job_ends(Backend::Postgres).await;
}

const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";

async fn webhook_daemon(environment: &TestEnvironment) -> TestDaemon {
    let mut config = environment.config();
    config.coordinator.webhooks.insert(
        "github".to_owned(),
        WebhookSource {
            secret: Some(Secret(zeroize::Zeroizing::new(WEBHOOK_SECRET.to_owned()))),
            job_type: None,
            workspace: "w-hooks".to_owned(),
            events: BTreeMap::from([
                ("pull_request".to_owned(), "review".to_owned()),
                ("ping".to_owned(), String::new()),
            ]),
        },
    );
    config.coordinator.webhooks.insert(
        "unsigned".to_owned(),
        WebhookSource {
            secret: None,
            job_type: Some("chat".to_owned()),
            workspace: String::new(),
            events: BTreeMap::new(),
        },
    );
    environment.start_with(config).await.expect("daemon starts")
}

fn delivery(
    event_type: &str,
    delivery_id: &str,
    body: &[u8],
    signature: String,
) -> pb::HandleWebhookRequest {
    pb::HandleWebhookRequest {
        source: "github".to_owned(),
        event_type: event_type.to_owned(),
        delivery_id: delivery_id.to_owned(),
        body: body.to_vec(),
        signature,
        headers: [("x-github-event".to_owned(), event_type.to_owned())].into(),
    }
}

async fn webhooks_check_signatures_map_events_and_drop_redeliveries(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = webhook_daemon(&environment).await;
    let webhook_key = daemon.api_key(&[Scope::Webhook]).await;
    let mut jobs = Jobs::connect(&daemon).await;
    let mut client = CoordinatorClient::new(daemon.channel().await);
    let body = br#"{"action":"opened","number":7}"#;
    let good = sign(WEBHOOK_SECRET.as_bytes(), body);

    let first = client
        .handle_webhook(with_key(
            delivery("pull_request", "d-1", body, good.clone()),
            &webhook_key,
        ))
        .await
        .expect("signed delivery")
        .into_inner();
    assert!(!first.duplicate);
    let job = first.job.expect("a job");
    assert_eq!(job.job_type, "review");
    assert_eq!(job.workspace, "w-hooks");
    assert_eq!(job.created_by, "webhook:github");
    let payload: serde_json::Value = serde_json::from_str(&job.payload_json).expect("json");
    assert_eq!(payload["body"]["number"], 7);
    assert_eq!(payload["headers"]["x-github-event"], "pull_request");

    // The same delivery again: the same job, nothing new.
    let again = client
        .handle_webhook(with_key(
            delivery("pull_request", "d-1", body, good.clone()),
            &webhook_key,
        ))
        .await
        .expect("redelivery")
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.job.expect("job").job_id, job.job_id);

    // Wrong, missing, and malformed signatures; a body changed after signing.
    for signature in [
        sign(b"another secret", body),
        String::new(),
        "sha256=nothex".to_owned(),
    ] {
        let status = client
            .handle_webhook(with_key(
                delivery("pull_request", "d-2", body, signature),
                &webhook_key,
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains(WEBHOOK_SECRET));
    }
    let status = client
        .handle_webhook(with_key(
            delivery(
                "pull_request",
                "d-2",
                br#"{"action":"closed","number":7}"#,
                good,
            ),
            &webhook_key,
        ))
        .await
        .expect_err("tampered body");
    assert_eq!(status.code(), Code::Unauthenticated);

    // Unlisted events get the default type; ignored events make no job.
    let push = br#"{"ref":"main"}"#;
    let pushed = client
        .handle_webhook(with_key(
            delivery("push", "d-3", push, sign(WEBHOOK_SECRET.as_bytes(), push)),
            &webhook_key,
        ))
        .await
        .expect("push")
        .into_inner();
    assert_eq!(pushed.job.expect("job").job_type, "github.push");
    let ping = br#"{}"#;
    let pinged = client
        .handle_webhook(with_key(
            delivery("ping", "d-4", ping, sign(WEBHOOK_SECRET.as_bytes(), ping)),
            &webhook_key,
        ))
        .await
        .expect("ping")
        .into_inner();
    assert!(pinged.job.is_none() && !pinged.duplicate);

    // A source without a secret takes unsigned deliveries; unknown sources
    // and non-JSON bodies are refused.
    let unsigned = client
        .handle_webhook(with_key(
            pb::HandleWebhookRequest {
                source: "unsigned".to_owned(),
                event_type: "message".to_owned(),
                body: b"{\"text\":\"hi\"}".to_vec(),
                ..pb::HandleWebhookRequest::default()
            },
            &webhook_key,
        ))
        .await
        .expect("unsigned source")
        .into_inner();
    assert_eq!(unsigned.job.expect("job").job_type, "chat");
    for request in [
        pb::HandleWebhookRequest {
            source: "gitlab".to_owned(),
            ..pb::HandleWebhookRequest::default()
        },
        pb::HandleWebhookRequest::default(),
        pb::HandleWebhookRequest {
            source: "unsigned".to_owned(),
            body: b"not json".to_vec(),
            ..pb::HandleWebhookRequest::default()
        },
    ] {
        let status = client
            .handle_webhook(with_key(request, &webhook_key))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    // Scopes: a coordinator key cannot deliver webhooks; a webhook key cannot
    // use the job API.
    let status = client
        .handle_webhook(with_key(
            delivery("push", "d-9", push, String::new()),
            &jobs.key,
        ))
        .await
        .expect_err("wrong scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .get_job(with_key(
            pb::GetJobRequest {
                job_id: job.job_id.clone(),
            },
            &webhook_key,
        ))
        .await
        .expect_err("wrong scope");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Three jobs in all: the pull request, the push, the unsigned message.
    let listed = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.jobs.len(), 3, "{listed:?}");

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_check_signatures_map_events_and_drop_redeliveries_on_sqlite() {
    webhooks_check_signatures_map_events_and_drop_redeliveries(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_check_signatures_map_events_and_drop_redeliveries_on_postgres() {
    webhooks_check_signatures_map_events_and_drop_redeliveries(Backend::Postgres).await;
}

async fn concurrent_redeliveries_make_one_job(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = webhook_daemon(&environment).await;
    let webhook_key = daemon.api_key(&[Scope::Webhook]).await;
    let client = CoordinatorClient::new(daemon.channel().await);
    let body = br#"{"number":1}"#;
    let signature = sign(WEBHOOK_SECRET.as_bytes(), body);
    let mut racers = Vec::new();
    for _ in 0..6 {
        let mut client = client.clone();
        let request = with_key(
            delivery("pull_request", "same-delivery", body, signature.clone()),
            &webhook_key,
        );
        racers.push(tokio::spawn(async move {
            client
                .handle_webhook(request)
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut firsts = 0;
    let mut ids = std::collections::BTreeSet::new();
    for racer in racers {
        let response = racer.await.expect("join").expect("delivery");
        firsts += usize::from(!response.duplicate);
        ids.insert(response.job.expect("job").job_id);
    }
    assert_eq!((firsts, ids.len()), (1, 1));
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_redeliveries_make_one_job_on_sqlite() {
    concurrent_redeliveries_make_one_job(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_redeliveries_make_one_job_on_postgres() {
    concurrent_redeliveries_make_one_job(Backend::Postgres).await;
}

async fn list_filters_and_pages(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let mut created = Vec::new();
    for index in 0..7 {
        let response = jobs
            .create_with(pb::CreateJobRequest {
                job_type: if index % 2 == 0 { "even" } else { "odd" }.to_owned(),
                workspace: "w1".to_owned(),
                labels: [("index".to_owned(), index.to_string())].into(),
                ..pb::CreateJobRequest::default()
            })
            .await
            .expect("create");
        created.push(response.job.expect("job").job_id);
    }
    jobs.set_state(&created[0], pb::JobState::Running)
        .await
        .expect("start");

    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list(pb::ListJobsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..pb::ListJobsRequest::default()
            })
            .await
            .expect("page");
        assert!(page.jobs.len() <= 3);
        paged.extend(page.jobs.into_iter().map(|job| job.job_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(paged, newest_first);

    let evens = jobs
        .list(pb::ListJobsRequest {
            job_type: "even".to_owned(),
            ..pb::ListJobsRequest::default()
        })
        .await
        .expect("list");
    assert_eq!(evens.jobs.len(), 4);
    let running = jobs
        .list(pb::ListJobsRequest {
            state: pb::JobState::Running.into(),
            ..pb::ListJobsRequest::default()
        })
        .await
        .expect("list");
    assert_eq!(
        running
            .jobs
            .iter()
            .map(|job| &job.job_id)
            .collect::<Vec<_>>(),
        [&created[0]]
    );
    let labelled = jobs
        .list(pb::ListJobsRequest {
            labels: [("index".to_owned(), "5".to_owned())].into(),
            workspace: "w1".to_owned(),
            ..pb::ListJobsRequest::default()
        })
        .await
        .expect("list");
    assert_eq!(
        labelled
            .jobs
            .iter()
            .map(|job| &job.job_id)
            .collect::<Vec<_>>(),
        [&created[5]]
    );
    // A token is only good for the filters it was made with.
    let first_page = jobs
        .list(pb::ListJobsRequest {
            page_size: 1,
            ..pb::ListJobsRequest::default()
        })
        .await
        .expect("list");
    assert_code(
        jobs.list(pb::ListJobsRequest {
            page_size: 1,
            job_type: "odd".to_owned(),
            page_token: first_page.next_page_token,
            ..pb::ListJobsRequest::default()
        })
        .await,
        Code::InvalidArgument,
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_and_pages_on_sqlite() {
    list_filters_and_pages(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_and_pages_on_postgres() {
    list_filters_and_pages(Backend::Postgres).await;
}

async fn a_restart_keeps_jobs_and_history(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let job = jobs.create("durable").await;
    jobs.set_state(&job.job_id, pb::JobState::Running)
        .await
        .expect("start");
    let before = jobs.progress(&job.job_id, 60).await.expect("progress");
    let history_before = jobs.history(&job.job_id).await;
    let key = jobs.key.clone();
    daemon.stop().await;

    let daemon = environment.start().await;
    let mut jobs = Jobs {
        client: CoordinatorClient::new(daemon.channel().await),
        key,
    };
    assert_eq!(jobs.get(&job.job_id).await, before);
    assert_eq!(jobs.history(&job.job_id).await, history_before);
    let completed = jobs
        .complete(&job.job_id, "")
        .await
        .expect("complete after restart");
    assert_eq!(state(&completed), pb::JobState::Completed);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_jobs_and_history_on_sqlite() {
    a_restart_keeps_jobs_and_history(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_jobs_and_history_on_postgres() {
    a_restart_keeps_jobs_and_history(Backend::Postgres).await;
}

async fn health_reports_each_component(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut client = CoordinatorClient::new(daemon.channel().await);
    let health = client
        .health(pb::HealthRequest {})
        .await
        .expect("health needs no key")
        .into_inner();
    assert_eq!(health.status, i32::from(pb::ServingStatus::Serving));
    let database = health.database.expect("database");
    assert_eq!(database.status, i32::from(pb::ComponentStatus::Ok));
    assert!(database.latency_ms.is_some());
    assert_eq!(
        health.redis.expect("redis").status,
        i32::from(pb::ComponentStatus::NotConfigured)
    );
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        health.agent_runtime.expect("agent runtime").status,
        i32::from(pb::ComponentStatus::NotConfigured)
    );
    daemon.stop().await;

    // With Redis configured: reachable is OK; unreachable is DOWN, DEGRADED.
    let reachable = std::env::var("MOSAIC_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    for (url, component, verdict) in [
        (
            reachable.as_str(),
            pb::ComponentStatus::Ok,
            pb::ServingStatus::Serving,
        ),
        (
            "redis://127.0.0.1:1",
            pb::ComponentStatus::Down,
            pb::ServingStatus::Degraded,
        ),
    ] {
        let mut config = environment.config();
        config.redis_url = Some(url.to_owned());
        config.rate_limit.storage = mosaic_mesh::ratelimit::Storage::Redis;
        config.rate_limit.redis_prefix = crate::support::redis::unique_prefix();
        let daemon = environment.start_with(config).await.expect("daemon");
        let health = CoordinatorClient::new(daemon.channel().await)
            .health(pb::HealthRequest {})
            .await
            .expect("health")
            .into_inner();
        let redis = health.redis.expect("redis");
        assert_eq!(redis.status, i32::from(component), "{url}: {redis:?}");
        assert_eq!(health.status, i32::from(verdict), "{url}");
        daemon.stop().await;
    }
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_each_component_on_sqlite() {
    health_reports_each_component(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_each_component_on_postgres() {
    health_reports_each_component(Backend::Postgres).await;
}

/// Runs `mosaicd job ARGS` against `daemon` with `key`; returns the exit code
/// and stdout.
async fn job_cli(daemon: &TestDaemon, key: &str, args: &[&str]) -> (i32, String) {
    let mut command = tokio::process::Command::new(crate::support::daemon::mosaicd_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOSAIC_") {
            command.env_remove(name);
        }
    }
    let output = command
        .arg("--data-dir")
        .arg(&daemon.data_dir)
        .args(["--server", &daemon.url(), "--api-key", key, "job"])
        .args(args)
        .env("MOSAIC_LOG", "warn")
        .output()
        .await
        .expect("run mosaicd");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn json_of(output: &(i32, String)) -> serde_json::Value {
    assert_eq!(output.0, 0, "mosaicd failed: {}", output.1);
    serde_json::from_str(&output.1).expect("json output")
}

async fn the_job_cli_drives_a_job_through_its_life(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let key = daemon.api_key(&[Scope::Coordinator]).await;
    let created = json_of(
        &job_cli(
            &daemon,
            &key,
            &[
                "create",
                "--type",
                "review",
                "--workspace",
                "w1",
                "--payload",
                "{\"pr\":3}",
                "--label",
                "team=red",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(created["state"], "PENDING");
    assert_eq!(created["created"], true);
    assert_eq!(created["labels"]["team"], "red");
    let id = created["job_id"].as_str().expect("id").to_owned();

    let running = json_of(&job_cli(&daemon, &key, &["status", &id, "running", "--json"]).await);
    assert_eq!(running["state"], "RUNNING");
    let progressed = json_of(
        &job_cli(
            &daemon,
            &key,
            &["progress", &id, "40", "--message", "halfway", "--json"],
        )
        .await,
    );
    assert_eq!(progressed["progress"], 40);
    // Backwards progress is refused: exit code 4 (refused), nothing printed.
    let (code, stdout) = job_cli(&daemon, &key, &["progress", &id, "10", "--json"]).await;
    assert_eq!((code, stdout.as_str()), (4, ""));
    let completed = json_of(
        &job_cli(
            &daemon,
            &key,
            &["complete", &id, "--result", "{\"ok\":1}", "--json"],
        )
        .await,
    );
    assert_eq!(completed["state"], "COMPLETED");
    assert_eq!(
        job_cli(&daemon, &key, &["fail", &id, "--error", "late"])
            .await
            .0,
        4
    );
    assert_eq!(job_cli(&daemon, &key, &["cancel", &id]).await.0, 4);

    let fetched = json_of(&job_cli(&daemon, &key, &["get", &id, "--json"]).await);
    assert_eq!(fetched["result_json"], "{\"ok\":1}");
    let history = json_of(&job_cli(&daemon, &key, &["history", &id, "--json"]).await);
    assert_eq!(history["entries"].as_array().map(Vec::len), Some(4));
    assert_eq!(history["entries"][3]["to_state"], "COMPLETED", "{history}");
    assert_eq!(history["next_page_token"], "", "{history}");
    let listed = json_of(
        &job_cli(
            &daemon,
            &key,
            &[
                "list",
                "--state",
                "completed",
                "--label",
                "team=red",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(listed["jobs"][0]["job_id"], id.as_str());

    // Watching an ended job prints its latest change and exits 0.
    let (code, stdout) = job_cli(&daemon, &key, &["watch", &id, "--json"]).await;
    assert_eq!(code, 0);
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one json line");
    assert_eq!(line["entry"]["to_state"], "COMPLETED");

    // Not found is exit code 3; a wrong key is 4; a bad payload is 4.
    assert_eq!(job_cli(&daemon, &key, &["get", "missing"]).await.0, 3);
    assert_eq!(job_cli(&daemon, "mosaic_wrong", &["get", &id]).await.0, 4);
    let (code, _) = job_cli(&daemon, &key, &["create", "--type", "x", "--payload", "{"]).await;
    assert_eq!(code, 4);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_cli_drives_a_job_through_its_life_on_sqlite() {
    the_job_cli_drives_a_job_through_its_life(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_cli_drives_a_job_through_its_life_on_postgres() {
    the_job_cli_drives_a_job_through_its_life(Backend::Postgres).await;
}

async fn shutdown_ends_watch_streams_with_unavailable(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let mut jobs = Jobs::connect(&daemon).await;
    let job = jobs.create("long").await;
    let mut stream = jobs
        .client
        .watch_job(with_key(
            pb::WatchJobRequest {
                job_id: job.job_id.clone(),
            },
            &jobs.key,
        ))
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("first").expect("a message");
    // The drain grace is 10 s; an open watch must not hold it that long.
    let stopping = tokio::spawn(daemon.stop());
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends promptly");
    let status = ended.expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the daemon stops promptly")
        .expect("join");
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_watch_streams_with_unavailable_on_sqlite() {
    shutdown_ends_watch_streams_with_unavailable(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_watch_streams_with_unavailable_on_postgres() {
    shutdown_ends_watch_streams_with_unavailable(Backend::Postgres).await;
}

fn dispatch_request(prompt: &str, key: &str) -> pb::DispatchJobRequest {
    pb::DispatchJobRequest {
        job_type: "agent-work".to_owned(),
        workspace: "w1".to_owned(),
        agent_type: "sh".to_owned(),
        prompt: prompt.to_owned(),
        idempotency_key: key.to_owned(),
        ..pb::DispatchJobRequest::default()
    }
}

/// Watches the job until its stream ends; returns the job as it ended.
async fn job_when_ended(jobs: &mut Jobs, job_id: &str) -> pb::Job {
    let mut stream = jobs
        .client
        .watch_job(with_key(
            pb::WatchJobRequest {
                job_id: job_id.to_owned(),
            },
            &jobs.key,
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    let ended = tokio::time::timeout(crate::support::agents::AGENT_DEADLINE, async {
        while let Some(message) = stream.message().await.expect("stream") {
            last = message.job;
        }
    })
    .await;
    assert!(ended.is_ok(), "job {job_id} did not end: {last:?}");
    last.expect("at least one message")
}

async fn dispatch_runs_a_real_agent_and_the_job_follows_it(backend: Backend) {
    use mosaic_mesh::proto::agent as agent_pb;
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment
        .start_with(crate::support::agents::agent_config(&environment))
        .await
        .expect("daemon");
    let webhook_key = daemon.api_key(&[Scope::Webhook]).await;
    let mut jobs = Jobs::connect(&daemon).await;
    let mut agents = crate::support::agents::Agents::new(
        daemon.channel().await,
        daemon.api_key(&[Scope::Agents]).await,
    );
    let mut client = CoordinatorClient::new(daemon.channel().await);
    let runtime = client
        .health(pb::HealthRequest {})
        .await
        .expect("health")
        .into_inner()
        .agent_runtime
        .expect("agent runtime");
    assert_eq!(
        runtime.status,
        i32::from(pb::ComponentStatus::Ok),
        "{runtime:?}"
    );

    // A successful agent completes its job, with its output in the result.
    let dispatched = client
        .dispatch_job(with_key(
            dispatch_request("echo hello-from-agent", ""),
            &webhook_key,
        ))
        .await
        .expect("dispatch")
        .into_inner();
    assert!(dispatched.created);
    let job = dispatched.job.expect("job");
    assert_eq!(job.agent_id, dispatched.agent_id);
    assert_eq!(job.created_by, "test key");
    let ended = job_when_ended(&mut jobs, &job.job_id).await;
    assert_eq!(state(&ended), pb::JobState::Completed, "{ended:?}");
    let result: serde_json::Value = serde_json::from_str(&ended.result_json).expect("json");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(
        result["output_tail"],
        serde_json::json!(["hello-from-agent"])
    );
    let agent = agents.get(&dispatched.agent_id).await.expect("agent");
    assert_eq!(agent.task_id, job.job_id);
    let history = jobs.history(&job.job_id).await;
    assert_eq!(history[1].actor, "system");
    assert!(history[1].message.contains(&dispatched.agent_id));

    // A failing agent fails its job.
    let failing = client
        .dispatch_job(with_key(dispatch_request("exit 3", ""), &webhook_key))
        .await
        .expect("dispatch")
        .into_inner();
    let ended = job_when_ended(&mut jobs, &failing.job.expect("job").job_id).await;
    assert_eq!(state(&ended), pb::JobState::Failed);
    assert!(ended.error.contains("exit code 3"), "{}", ended.error);

    // The same idempotency key twice: one job, one agent.
    let first = client
        .dispatch_job(with_key(
            dispatch_request("true", "dispatch-once"),
            &webhook_key,
        ))
        .await
        .expect("dispatch")
        .into_inner();
    let again = client
        .dispatch_job(with_key(
            dispatch_request("true", "dispatch-once"),
            &webhook_key,
        ))
        .await
        .expect("retry")
        .into_inner();
    assert!(first.created && !again.created);
    assert_eq!(again.agent_id, first.agent_id);
    assert_eq!(
        again.job.expect("job").job_id,
        first.job.expect("job").job_id
    );
    let all_agents = agents
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list agents");
    assert_eq!(all_agents.agents.len(), 3);

    // Refusals leave no job behind.
    let jobs_before = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .jobs
        .len();
    let mut unknown_type = dispatch_request("true", "");
    unknown_type.agent_type = "no-such-type".to_owned();
    let mut remote = dispatch_request("true", "");
    remote.peer_instance_id = "some-peer".to_owned();
    for (request, code) in [
        (unknown_type, Code::InvalidArgument),
        (remote, Code::NotFound),
        (
            pb::DispatchJobRequest {
                agent_type: "sh".to_owned(),
                ..pb::DispatchJobRequest::default()
            },
            Code::InvalidArgument,
        ),
    ] {
        let status = client
            .dispatch_job(with_key(request, &webhook_key))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
    }
    let status = client
        .dispatch_job(with_key(dispatch_request("true", ""), &jobs.key))
        .await
        .expect_err("wrong scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    let jobs_after = jobs
        .list(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .jobs
        .len();
    assert_eq!(jobs_after, jobs_before);

    // Cancelling a dispatched job stops its agent.
    let long = client
        .dispatch_job(with_key(dispatch_request("sleep 30", ""), &webhook_key))
        .await
        .expect("dispatch")
        .into_inner();
    let cancelled = jobs
        .cancel(&long.job.expect("job").job_id)
        .await
        .expect("cancel");
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    agents
        .wait_for_state(&long.agent_id, agent_pb::AgentState::Killed)
        .await;
    assert_eq!(
        state(&jobs.get(&cancelled.job_id).await),
        pb::JobState::Cancelled
    );

    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_runs_a_real_agent_and_the_job_follows_it_on_sqlite() {
    dispatch_runs_a_real_agent_and_the_job_follows_it(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_runs_a_real_agent_and_the_job_follows_it_on_postgres() {
    dispatch_runs_a_real_agent_and_the_job_follows_it(Backend::Postgres).await;
}

async fn a_dispatched_job_is_not_left_running_after_a_restart(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let config = crate::support::agents::agent_config(&environment);
    let daemon = environment
        .start_with(config.clone())
        .await
        .expect("daemon");
    let webhook_key = daemon.api_key(&[Scope::Webhook]).await;
    let key = daemon.api_key(&[Scope::Coordinator]).await;
    let dispatched = CoordinatorClient::new(daemon.channel().await)
        .dispatch_job(with_key(dispatch_request("sleep 30", ""), &webhook_key))
        .await
        .expect("dispatch")
        .into_inner();
    let job_id = dispatched.job.expect("job").job_id;
    daemon.stop().await;

    let daemon = environment
        .start_with(config)
        .await
        .expect("daemon restarts");
    let mut jobs = Jobs {
        client: CoordinatorClient::new(daemon.channel().await),
        key,
    };
    let ended = job_when_ended(&mut jobs, &job_id).await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:?}");
    assert!(
        ended.error.contains(&dispatched.agent_id),
        "{}",
        ended.error
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatched_job_is_not_left_running_after_a_restart_on_sqlite() {
    a_dispatched_job_is_not_left_running_after_a_restart(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatched_job_is_not_left_running_after_a_restart_on_postgres() {
    a_dispatched_job_is_not_left_running_after_a_restart(Backend::Postgres).await;
}

async fn a_start_ends_running_jobs_whose_agents_ended_while_down(backend: Backend) {
    use mosaic_mesh::agents::{AgentRecord, AgentState, Origin};
    use mosaic_mesh::coordinator::state::{JobChange, JobState, creation_entry, write_of};
    use mosaic_mesh::store::{JobGuard, JobRecord};

    // As a crash leaves them: a RUNNING job whose agent ended (FAILED) while
    // no daemon followed it.
    let environment = TestEnvironment::new(backend).await;
    let store = environment.store().await;
    let now = mosaic_mesh::clock::now_ms();
    let agent = AgentRecord {
        id: "agent-ended-while-down".to_owned(),
        agent_type: "sh".to_owned(),
        state: AgentState::Failed,
        state_reason: "the daemon was gone".to_owned(),
        prompt: "sleep 30".to_owned(),
        task_id: "job-left-running".to_owned(),
        labels: BTreeMap::new(),
        origin: Origin::Local,
        runner_id: "an-earlier-run".to_owned(),
        pid: None,
        exit_code: None,
        signal: Some(9),
        output_tail: Vec::new(),
        output_bytes: 0,
        output_truncated: false,
        timeout_secs: 60,
        created_at_ms: now,
        started_at_ms: Some(now),
        ended_at_ms: Some(now),
        updated_at_ms: now,
    };
    store.insert_agent(&agent).await.expect("insert agent");
    let pending =
        JobRecord::new_pending("job-left-running".to_owned(), "agent-work".to_owned(), now);
    store
        .insert_job(&pending, &creation_entry(&pending, "test"))
        .await
        .expect("insert job");
    let attach = JobChange::AttachAgent {
        agent_id: agent.id.clone(),
        peer_instance_id: String::new(),
    };
    let guard = JobGuard {
        job_id: &pending.id,
        state: JobState::Pending,
        version: Some(1),
    };
    let running = store
        .write_job_change(&guard, &write_of(&attach, "system", now))
        .await
        .expect("update");
    assert!(running.is_some());

    let daemon = environment
        .start_with(crate::support::agents::agent_config(&environment))
        .await
        .expect("daemon");
    let mut jobs = Jobs::connect(&daemon).await;
    let ended = job_when_ended(&mut jobs, "job-left-running").await;
    assert_eq!(state(&ended), pb::JobState::Failed, "{ended:?}");
    assert!(
        ended.error.contains("the daemon was gone"),
        "{}",
        ended.error
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_ends_running_jobs_whose_agents_ended_while_down_on_sqlite() {
    a_start_ends_running_jobs_whose_agents_ended_while_down(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_ends_running_jobs_whose_agents_ended_while_down_on_postgres() {
    a_start_ends_running_jobs_whose_agents_ended_while_down(Backend::Postgres).await;
}
