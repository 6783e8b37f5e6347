//! The command audit log and safe retries, between real daemons over mutual
//! TLS: a remote spawn retried by message id makes one agent, both sides log
//! every command with its outcome (refusals are in tests/it/commands.rs), a
//! peer that is down is logged, and old message ids are pruned after twice the
//! clock window.

use std::sync::Arc;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::federation::Federation;
use mosaic_mesh::identity::{IdentityManager, InstanceProfile, MasterKeySource};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::store::SeenMessage;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::admin::{Admin, connect_and_accept};
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};

on_both_backends!(
    a_remote_spawn_retried_by_message_id_makes_one_agent,
    both_sides_log_every_command_newest_first_with_filters_and_pages,
    a_command_to_a_peer_that_is_down_is_logged_unavailable,
    a_reply_that_does_not_verify_is_not_believed,
    message_ids_are_kept_twice_the_clock_window_then_pruned,
    remote_calls_without_an_active_connection_say_why,
);

const ALL: &[&str] = &["agent.spawn", "agent.status", "agent.kill"];

/// Daemon A connected to daemon B (with the test agent types) in `ws`, B
/// granting A everything.
struct Pair {
    environments: [TestEnvironment; 2],
    a: TestDaemon,
    b: TestDaemon,
    client_a: FederationClient<Channel>,
    client_b: FederationClient<Channel>,
    key_a: String,
    key_b: String,
    a_id: String,
    b_id: String,
    agents_b: Agents,
}

impl Pair {
    async fn new(backend: Backend) -> Pair {
        let environments = [
            TestEnvironment::new(backend).await,
            TestEnvironment::new(backend).await,
        ];
        let a = environments[0].start_peer(0, |_| {}).await;
        let b = environments[1]
            .start_peer(0, |config| *config = with_agent_types(config.clone()))
            .await;
        let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
        let a_id = admin_a.instance().await.instance_id;
        let b_id = admin_b.instance().await.instance_id;
        connect_and_accept(&admin_a, &admin_b, &b, "ws", ALL).await;
        let agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
        Pair {
            client_a: FederationClient::new(a.channel().await),
            client_b: FederationClient::new(b.channel().await),
            key_a: a.api_key(&[Scope::Admin]).await,
            key_b: b.api_key(&[Scope::Admin]).await,
            environments,
            a,
            b,
            a_id,
            b_id,
            agents_b,
        }
    }

    async fn spawn(
        &mut self,
        message_id: &str,
        prompt: &str,
    ) -> Result<pb::SpawnRemoteAgentResponse, tonic::Status> {
        self.client_a
            .spawn_remote_agent(with_key(
                pb::SpawnRemoteAgentRequest {
                    peer_instance_id: self.b_id.clone(),
                    workspace: String::new(),
                    message_id: message_id.to_owned(),
                    spawn: Some(agent_pb::SpawnRequest {
                        agent_type: "sh".to_owned(),
                        prompt: prompt.to_owned(),
                        labels: [("team", "infra"), ("run", "7")]
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        ..agent_pb::SpawnRequest::default()
                    }),
                },
                &self.key_a,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn status(&mut self, agent_id: &str) -> Result<agent_pb::Agent, tonic::Status> {
        self.client_a
            .get_remote_agent(with_key(
                pb::GetRemoteAgentRequest {
                    peer_instance_id: self.b_id.clone(),
                    workspace: String::new(),
                    agent_id: agent_id.to_owned(),
                },
                &self.key_a,
            ))
            .await
            .map(|response| response.into_inner().agent.expect("agent"))
    }

    async fn agents_on_b(&mut self) -> Vec<agent_pb::Agent> {
        self.agents_b
            .list(agent_pb::ListAgentsRequest::default())
            .await
            .expect("list")
            .agents
    }

    async fn finish(self) {
        drop(self.a);
        drop(self.b);
        for environment in self.environments {
            environment.cleanup().await;
        }
    }
}

async fn log_of(
    client: &mut FederationClient<Channel>,
    key: &str,
    request: pb::ListCommandLogRequest,
) -> Result<pb::ListCommandLogResponse, tonic::Status> {
    client
        .list_command_log(with_key(request, key))
        .await
        .map(tonic::Response::into_inner)
}

async fn whole_log(client: &mut FederationClient<Channel>, key: &str) -> Vec<pb::CommandLogEntry> {
    log_of(client, key, pb::ListCommandLogRequest::default())
        .await
        .expect("command log")
        .entries
}

async fn a_remote_spawn_retried_by_message_id_makes_one_agent(backend: Backend) {
    let mut pair = Pair::new(backend).await;
    let message_id = uuid::Uuid::new_v4().to_string();
    let first = pair.spawn(&message_id, "sleep 30").await.expect("spawn");
    assert_eq!(first.message_id, message_id);
    let agent = first.agent.expect("agent");
    // The retry re-sends the same signed bytes: B answers from its stored
    // result, and no second agent starts.
    let again = pair.spawn(&message_id, "sleep 30").await.expect("retry");
    assert_eq!(again.agent.expect("agent").agent_id, agent.agent_id);
    assert_eq!(pair.agents_on_b().await.len(), 1);

    // The same id for another request is refused, and nothing is sent.
    let log_before = whole_log(&mut pair.client_b, &pair.key_b).await;
    let status = pair
        .spawn(&message_id, "sleep 31")
        .await
        .expect_err("another request under a used id");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // A malformed id is refused before anything is signed or sent.
    let status = pair
        .spawn("not a message id", "sleep 30")
        .await
        .expect_err("malformed id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(pair.agents_on_b().await.len(), 1);
    assert_eq!(whole_log(&mut pair.client_b, &pair.key_b).await, log_before);

    // A holds one outbound entry for the id; B logged the run and the retry.
    let outbound: Vec<_> = whole_log(&mut pair.client_a, &pair.key_a)
        .await
        .into_iter()
        .filter(|entry| entry.message_id == message_id)
        .collect();
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0].outcome, "ok");
    assert_eq!(outbound[0].direction(), pb::CommandDirection::Outbound);
    assert!(outbound[0].detail.contains(&agent.agent_id), "{outbound:?}");
    let inbound = whole_log(&mut pair.client_b, &pair.key_b).await;
    assert_eq!(inbound.len(), 2, "{inbound:?}");
    assert!(inbound.iter().all(|entry| entry.message_id == message_id
        && entry.outcome == "ok"
        && entry.command_type == "agent.spawn"
        && entry.sender_instance_id == pair.a_id));
    assert!(
        inbound[0].detail.starts_with("identical retry"),
        "{inbound:?}"
    );
    pair.finish().await;
}

async fn both_sides_log_every_command_newest_first_with_filters_and_pages(backend: Backend) {
    let mut pair = Pair::new(backend).await;
    let agent = pair
        .spawn("", "sleep 30")
        .await
        .expect("spawn")
        .agent
        .expect("agent");
    pair.status(&agent.agent_id).await.expect("status");
    let status = pair
        .status("no-such-agent")
        .await
        .expect_err("unknown agent");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    pair.client_a
        .kill_remote_agent(with_key(
            pb::KillRemoteAgentRequest {
                peer_instance_id: pair.b_id.clone(),
                workspace: "ws".to_owned(),
                agent_id: agent.agent_id.clone(),
                reason: "done".to_owned(),
            },
            &pair.key_a,
        ))
        .await
        .expect("kill");

    let expected = [
        ("agent.kill", "ok"),
        ("agent.status", "NOT_FOUND"),
        ("agent.status", "ok"),
        ("agent.spawn", "ok"),
    ];
    let sent = whole_log(&mut pair.client_a, &pair.key_a).await;
    let received = whole_log(&mut pair.client_b, &pair.key_b).await;
    for (entries, direction) in [
        (&sent, pb::CommandDirection::Outbound),
        (&received, pb::CommandDirection::Inbound),
    ] {
        let seen: Vec<_> = entries
            .iter()
            .map(|entry| (entry.command_type.as_str(), entry.outcome.as_str()))
            .collect();
        assert_eq!(seen, expected, "{entries:?}");
        for entry in entries {
            assert_eq!(entry.direction(), direction);
            assert_eq!(entry.sender_instance_id, pair.a_id);
            assert_eq!(entry.recipient_instance_id, pair.b_id);
            assert_eq!(entry.workspace, "ws");
            assert!(entry.issued_at.is_some() && entry.recorded_at.is_some());
        }
    }
    // Both sides name the same messages.
    let ids = |entries: &[pb::CommandLogEntry]| {
        entries
            .iter()
            .map(|entry| entry.message_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&sent), ids(&received));

    // Filters.
    let only = |direction: pb::CommandDirection, peer: &str| pb::ListCommandLogRequest {
        direction: direction as i32,
        peer_instance_id: peer.to_owned(),
        ..pb::ListCommandLogRequest::default()
    };
    let none = log_of(
        &mut pair.client_b,
        &pair.key_b,
        only(pb::CommandDirection::Outbound, ""),
    )
    .await
    .expect("log");
    assert!(none.entries.is_empty(), "{none:?}");
    let by_peer = log_of(
        &mut pair.client_b,
        &pair.key_b,
        only(pb::CommandDirection::Inbound, &pair.a_id),
    )
    .await
    .expect("log");
    assert_eq!(by_peer.entries.len(), 4);
    let other_peer = log_of(
        &mut pair.client_b,
        &pair.key_b,
        only(pb::CommandDirection::Unspecified, "someone-else"),
    )
    .await
    .expect("log");
    assert!(other_peer.entries.is_empty());

    // Pages of three then one, in the same order as the whole list.
    let first = log_of(
        &mut pair.client_a,
        &pair.key_a,
        pb::ListCommandLogRequest {
            page_size: 3,
            ..pb::ListCommandLogRequest::default()
        },
    )
    .await
    .expect("page 1");
    assert_eq!(first.entries.len(), 3);
    assert!(!first.next_page_token.is_empty());
    let second = log_of(
        &mut pair.client_a,
        &pair.key_a,
        pb::ListCommandLogRequest {
            page_size: 3,
            page_token: first.next_page_token.clone(),
            ..pb::ListCommandLogRequest::default()
        },
    )
    .await
    .expect("page 2");
    assert_eq!(second.entries.len(), 1);
    assert!(second.next_page_token.is_empty());
    let paged: Vec<_> = first.entries.into_iter().chain(second.entries).collect();
    assert_eq!(paged, sent);
    // A token is bound to its filters; a bad direction is refused.
    let status = log_of(
        &mut pair.client_a,
        &pair.key_a,
        pb::ListCommandLogRequest {
            workspace: "other".to_owned(),
            page_token: first.next_page_token,
            ..pb::ListCommandLogRequest::default()
        },
    )
    .await
    .expect_err("token of other filters");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = log_of(
        &mut pair.client_a,
        &pair.key_a,
        pb::ListCommandLogRequest {
            direction: 42,
            ..pb::ListCommandLogRequest::default()
        },
    )
    .await
    .expect_err("unknown direction");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The log is an admin view: an agents-only key cannot read it.
    let agents_key = pair.a.api_key(&[Scope::Agents]).await;
    let status = log_of(
        &mut pair.client_a,
        &agents_key,
        pb::ListCommandLogRequest::default(),
    )
    .await
    .expect_err("scope");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    pair.finish().await;
}

async fn a_command_to_a_peer_that_is_down_is_logged_unavailable(backend: Backend) {
    let Pair {
        environments,
        a,
        b,
        mut client_a,
        key_a,
        b_id,
        ..
    } = Pair::new(backend).await;
    b.stop().await;
    let started = std::time::Instant::now();
    let status = client_a
        .get_remote_agent(with_key(
            pb::GetRemoteAgentRequest {
                peer_instance_id: b_id,
                workspace: String::new(),
                agent_id: "any".to_owned(),
            },
            &key_a,
        ))
        .await
        .expect_err("down");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "within the deadline"
    );
    let sent = whole_log(&mut client_a, &key_a).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].command_type, "agent.status");
    assert_eq!(
        sent[0].outcome,
        mosaic_mesh::error::code_name(status.code()),
        "{sent:?}"
    );
    drop(a);
    for environment in environments {
        environment.cleanup().await;
    }
}

async fn message_ids_are_kept_twice_the_clock_window_then_pruned(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let store = environment.store().await;
    let config = environment.config();
    let data_dir = tempfile::tempdir().expect("temporary dir");
    let identity = IdentityManager::load_or_create(
        store.clone(),
        &MasterKeySource {
            environment_value: None,
            key_file: data_dir.path().join("master.key"),
        },
        &InstanceProfile {
            name: "pruner".to_owned(),
            public_url: "https://127.0.0.1:1".to_owned(),
            capabilities: mosaic_mesh::config::default_capabilities(),
            metadata: Default::default(),
        },
    )
    .await
    .expect("identity");
    let window_ms = i64::try_from(config.federation.clock_window.as_millis()).expect("window");
    let seen_at = 1_900_000_000_000_i64;
    let now = Arc::new(std::sync::atomic::AtomicI64::new(seen_at));
    let clock = {
        let now = Arc::clone(&now);
        Arc::new(move || now.load(std::sync::atomic::Ordering::SeqCst))
    };
    let federation = Federation::with_clock(
        store.clone(),
        Arc::new(identity),
        config.federation.clone(),
        config.max_message_bytes,
        clock,
    );
    let seen = SeenMessage {
        sender_instance_id: "peer".to_owned(),
        message_id: "m-1".to_owned(),
        payload_digest: vec![1; 32],
        reply: None,
        seen_at_ms: seen_at,
    };
    store.insert_seen_message(&seen).await.expect("record");
    let remembered = |store: mosaic_mesh::store::Store| async move {
        store
            .find_seen_message("peer", "m-1")
            .await
            .expect("find")
            .is_some()
    };
    // Still inside twice the window: kept (a replay is still refused).
    now.store(seen_at + 2 * window_ms, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(federation.prune().await.expect("prune"), 0);
    assert!(remembered(store.clone()).await);
    // Past it: forgotten (the clock check alone refuses it now).
    now.store(
        seen_at + 2 * window_ms + 1,
        std::sync::atomic::Ordering::SeqCst,
    );
    assert_eq!(federation.prune().await.expect("prune"), 1);
    assert!(!remembered(store.clone()).await);
    drop(federation);
    environment.cleanup().await;
}

async fn a_reply_that_does_not_verify_is_not_believed(backend: Backend) {
    use crate::support::fake_peer::{self, FORGED_AGENT_ID, Reply};
    let Pair {
        environments,
        a,
        b,
        mut client_a,
        key_a,
        b_id,
        ..
    } = Pair::new(backend).await;
    // B stops; a stand-in with B's own key and certificate takes its port.
    let (b_address, b_config) = (b.address, b.config.clone());
    b.stop().await;
    let b_identity = mosaic_mesh::server::prepare(&b_config)
        .await
        .expect("B's identity")
        .identity;
    let stranger = crate::support::peer::TestPeer::new("stranger")
        .await
        .current();
    let mode = Arc::new(std::sync::Mutex::new(Reply::Honest));
    let listener = crate::support::daemon::bind_loopback(b_address.port()).await;
    let stand_in = fake_peer::serve(listener, b_identity, stranger, Arc::clone(&mode));
    let mut ask = async |reply: Reply| {
        *mode.lock().expect("mode") = reply;
        client_a
            .get_remote_agent(with_key(
                pb::GetRemoteAgentRequest {
                    peer_instance_id: b_id.clone(),
                    workspace: String::new(),
                    agent_id: "any".to_owned(),
                },
                &key_a,
            ))
            .await
    };
    // The control: an honest reply is believed, so the refusals below are
    // about the tampering alone.
    let honest = ask(Reply::Honest).await.expect("honest reply");
    assert_eq!(
        honest.into_inner().agent.expect("agent").agent_id,
        FORGED_AGENT_ID
    );
    for reply in [
        Reply::FlippedSignature,
        Reply::SignedByAnotherKey,
        Reply::AnswersAnotherMessage,
    ] {
        let status = ask(reply).await.expect_err("tampered reply");
        assert_eq!(status.code(), Code::Internal, "{reply:?}: {status:?}");
        assert!(
            !status.message().contains(FORGED_AGENT_ID),
            "nothing of the reply is passed on: {status:?}"
        );
    }
    // A's log records each outcome, the refused replies as INTERNAL.
    let sent = whole_log(&mut client_a, &key_a).await;
    let outcomes: Vec<_> = sent.iter().map(|entry| entry.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["INTERNAL", "INTERNAL", "INTERNAL", "ok"],
        "{sent:?}"
    );
    assert!(
        sent.iter()
            .take(3)
            .all(|entry| entry.detail.contains("failed verification")),
        "{sent:?}"
    );
    stand_in.abort();
    drop(a);
    for environment in environments {
        environment.cleanup().await;
    }
}

async fn remote_calls_without_an_active_connection_say_why(backend: Backend) {
    let environments = [
        TestEnvironment::new(backend).await,
        TestEnvironment::new(backend).await,
    ];
    let a = environments[0].start_peer(0, |_| {}).await;
    let b = environments[1].start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let b_id = admin_b.instance().await.instance_id;
    let key_a = a.api_key(&[Scope::Admin]).await;
    let mut client_a = FederationClient::new(a.channel().await);
    let ask = |peer: &str, workspace: &str| {
        with_key(
            pb::GetRemoteAgentRequest {
                peer_instance_id: peer.to_owned(),
                workspace: workspace.to_owned(),
                agent_id: "any".to_owned(),
            },
            &key_a,
        )
    };
    // Never connected: NOT_FOUND, with or without a workspace.
    for workspace in ["", "ws"] {
        let status = client_a
            .get_remote_agent(ask(&b_id, workspace))
            .await
            .expect_err("no connection");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // Asked but not yet accepted: FAILED_PRECONDITION naming the state.
    admin_a
        .connect(&b.url(), "ws", "", &[])
        .await
        .expect("connect");
    for workspace in ["", "ws"] {
        let status = client_a
            .get_remote_agent(ask(&b_id, workspace))
            .await
            .expect_err("pending");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("PENDING"), "{status:?}");
    }
    // Another workspace is still NOT_FOUND; an empty peer id is invalid.
    let status = client_a
        .get_remote_agent(ask(&b_id, "other"))
        .await
        .expect_err("other workspace");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client_a
        .get_remote_agent(ask("", ""))
        .await
        .expect_err("no peer");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing was sent, so nothing was logged.
    assert!(whole_log(&mut client_a, &key_a).await.is_empty());
    drop((a, b));
    for environment in environments {
        environment.cleanup().await;
    }
}
