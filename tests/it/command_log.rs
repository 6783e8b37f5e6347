//! The command audit log and safe retries, between real daemons over mutual
//! TLS: a remote spawn retried by message id makes one agent, both sides log
//! every command with its outcome (refusals are in tests/it/commands.rs), a
//! peer that is down is logged, and old message ids are pruned after twice the
//! clock window.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::federation::Federation;
use mosaic_mesh::identity::{IdentityManager, InstanceProfile, MasterKeySource};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::store::SeenMessage;
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::agents::Agents;
use crate::support::daemon::{TestEnvironment, with_key};
use crate::support::pair::{Pair, with_test_agents};

on_both_backends!(
    a_remote_spawn_retried_by_message_id_makes_one_agent,
    both_sides_log_every_command_newest_first_with_filters_and_pages,
    a_command_to_a_peer_that_is_down_is_logged_unavailable,
    a_reply_that_does_not_verify_is_not_believed,
    message_ids_are_kept_twice_the_clock_window_then_pruned,
    remote_calls_without_an_active_connection_say_why,
);

/// The [`Pair`] connected in `ws` (B with the test agent types, granting A
/// everything) and an agents client for B; it reads as the Pair it extends.
struct Remote {
    pair: Pair,
    agents_b: Agents,
}

impl Deref for Remote {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

impl DerefMut for Remote {
    fn deref_mut(&mut self) -> &mut Pair {
        &mut self.pair
    }
}

impl Remote {
    async fn new(backend: Backend) -> Remote {
        let pair = Pair::connected(backend, |_| {}, with_test_agents).await;
        let b = pair.b();
        let agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
        Remote { pair, agents_b }
    }

    async fn spawn(
        &self,
        message_id: &str,
        prompt: &str,
    ) -> Result<pb::SpawnRemoteAgentResponse, tonic::Status> {
        self.admin_a
            .client
            .clone()
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
                &self.admin_a.key,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn status(&self, agent_id: &str) -> Result<agent_pb::Agent, tonic::Status> {
        self.admin_a
            .client
            .clone()
            .get_remote_agent(with_key(
                pb::GetRemoteAgentRequest {
                    peer_instance_id: self.b_id.clone(),
                    workspace: String::new(),
                    agent_id: agent_id.to_owned(),
                },
                &self.admin_a.key,
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
        self.pair.finish().await;
    }
}

/// The command log of `admin`'s daemon, read with `key`.
async fn log_of(
    admin: &Admin,
    key: &str,
    request: pb::ListCommandLogRequest,
) -> Result<pb::ListCommandLogResponse, tonic::Status> {
    admin
        .client
        .clone()
        .list_command_log(with_key(request, key))
        .await
        .map(tonic::Response::into_inner)
}

/// The whole command log of `admin`'s daemon, read with its admin key.
async fn whole_log(admin: &Admin) -> Vec<pb::CommandLogEntry> {
    log_of(admin, &admin.key, pb::ListCommandLogRequest::default())
        .await
        .expect("command log")
        .entries
}

async fn a_remote_spawn_retried_by_message_id_makes_one_agent(backend: Backend) {
    let mut pair = Remote::new(backend).await;
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
    let log_before = whole_log(&pair.admin_b).await;
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
    assert_eq!(whole_log(&pair.admin_b).await, log_before);

    // A holds one outbound entry for the id; B logged the run and the retry.
    let outbound: Vec<_> = whole_log(&pair.admin_a)
        .await
        .into_iter()
        .filter(|entry| entry.message_id == message_id)
        .collect();
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0].outcome, "ok");
    assert_eq!(outbound[0].direction(), pb::CommandDirection::Outbound);
    assert!(outbound[0].detail.contains(&agent.agent_id), "{outbound:?}");
    let inbound = whole_log(&pair.admin_b).await;
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
    let pair = Remote::new(backend).await;
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
    pair.admin_a
        .client
        .clone()
        .kill_remote_agent(with_key(
            pb::KillRemoteAgentRequest {
                peer_instance_id: pair.b_id.clone(),
                workspace: "ws".to_owned(),
                agent_id: agent.agent_id.clone(),
                reason: "done".to_owned(),
            },
            &pair.admin_a.key,
        ))
        .await
        .expect("kill");

    let expected = [
        ("agent.kill", "ok"),
        ("agent.status", "NOT_FOUND"),
        ("agent.status", "ok"),
        ("agent.spawn", "ok"),
    ];
    let sent = whole_log(&pair.admin_a).await;
    let received = whole_log(&pair.admin_b).await;
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
        &pair.admin_b,
        &pair.admin_b.key,
        only(pb::CommandDirection::Outbound, ""),
    )
    .await
    .expect("log");
    assert!(none.entries.is_empty(), "{none:?}");
    let by_peer = log_of(
        &pair.admin_b,
        &pair.admin_b.key,
        only(pb::CommandDirection::Inbound, &pair.a_id),
    )
    .await
    .expect("log");
    assert_eq!(by_peer.entries.len(), 4);
    let other_peer = log_of(
        &pair.admin_b,
        &pair.admin_b.key,
        only(pb::CommandDirection::Unspecified, "someone-else"),
    )
    .await
    .expect("log");
    assert!(other_peer.entries.is_empty());

    // Pages of three then one, in the same order as the whole list.
    let first = log_of(
        &pair.admin_a,
        &pair.admin_a.key,
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
        &pair.admin_a,
        &pair.admin_a.key,
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
        &pair.admin_a,
        &pair.admin_a.key,
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
        &pair.admin_a,
        &pair.admin_a.key,
        pb::ListCommandLogRequest {
            direction: 42,
            ..pb::ListCommandLogRequest::default()
        },
    )
    .await
    .expect_err("unknown direction");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // The log is an admin view: an agents-only key cannot read it.
    let agents_key = pair.a().api_key(&[Scope::Agents]).await;
    let status = log_of(
        &pair.admin_a,
        &agents_key,
        pb::ListCommandLogRequest::default(),
    )
    .await
    .expect_err("scope");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    pair.finish().await;
}

async fn a_command_to_a_peer_that_is_down_is_logged_unavailable(backend: Backend) {
    let mut pair = Remote::new(backend).await;
    pair.stop_b().await;
    let started = std::time::Instant::now();
    let status = pair
        .admin_a
        .client
        .clone()
        .get_remote_agent(with_key(
            pb::GetRemoteAgentRequest {
                peer_instance_id: pair.b_id.clone(),
                workspace: String::new(),
                agent_id: "any".to_owned(),
            },
            &pair.admin_a.key,
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
    let sent = whole_log(&pair.admin_a).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].command_type, "agent.status");
    assert_eq!(
        sent[0].outcome,
        mosaic_mesh::error::code_name(status.code()),
        "{sent:?}"
    );
    pair.finish().await;
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
    let mut pair = Remote::new(backend).await;
    let (mut client_a, key_a) = (pair.admin_a.client.clone(), pair.admin_a.key.clone());
    let b_id = pair.b_id.clone();
    // B stops; a stand-in with B's own key and certificate takes its port.
    let (b_address, b_config) = (pair.b().address, pair.b().config.clone());
    pair.stop_b().await;
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
    let sent = whole_log(&pair.admin_a).await;
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
    pair.finish().await;
}

async fn remote_calls_without_an_active_connection_say_why(backend: Backend) {
    let pair = Pair::start(backend, |_| {}, |_| {}).await;
    let b_id = pair.b_id.clone();
    let (mut client_a, key_a) = (pair.admin_a.client.clone(), pair.admin_a.key.clone());
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
    pair.admin_a
        .connect(&pair.b().url(), "ws", "", &[])
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
    assert!(whole_log(&pair.admin_a).await.is_empty());
    pair.finish().await;
}
