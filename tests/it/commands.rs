//! Signed commands received from a peer (ExecuteCommand) over real mutual TLS:
//! a hand-made peer with its own key sends well-formed and hostile envelopes;
//! each refusal is checked for its status AND for having changed nothing.

use mosaic_mesh::auth::Scope;
use mosaic_mesh::clock::{now_ms, timestamp_from_ms};
use mosaic_mesh::federation::envelope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};
use crate::support::pair::{ALL, Pair, with_test_agents};
use crate::support::peer::TestPeer;

on_both_backends!(
    a_spawn_retried_with_the_same_bytes_makes_one_agent,
    a_reused_message_id_with_other_bytes_is_already_exists,
    a_replayed_status_read_gets_the_stored_result,
    status_and_kill_of_a_local_agent_are_not_found,
    a_capability_not_granted_is_permission_denied,
    a_flipped_signature_bit_is_unauthenticated,
    an_unknown_command_type_is_invalid_argument,
    a_suspended_connection_is_failed_precondition,
    a_command_for_another_instance_is_permission_denied,
    a_command_without_a_client_certificate_is_unauthenticated,
    a_peer_without_a_connection_is_refused_as_a_stranger,
    a_command_in_another_workspace_is_refused_as_from_a_stranger,
    empty_and_garbage_payloads_and_signatures_are_invalid_argument,
    stale_future_and_expired_commands_are_deadline_exceeded,
    an_oversized_prompt_is_an_invalid_argument_result,
    the_peer_kills_its_own_agent,
    three_daemons_spawn_watch_kill_and_suspend,
    a_peer_that_is_down_is_unavailable_within_the_deadline,
    a_command_signed_with_another_key_is_unauthenticated,
    a_pending_connection_is_permission_denied,
    a_disconnected_connection_is_refused_as_from_a_stranger,
    a_rotated_out_key_after_its_grace_is_unauthenticated,
    a_message_over_the_transport_limit_is_resource_exhausted,
    refusals_of_the_connected_peer_are_logged_and_a_strangers_are_not,
    a_message_id_the_operator_may_choose_is_one_the_peer_accepts,
);

/// Daemon B with the test agent types, a hand-made peer connected to it in
/// workspace `ws` (ACTIVE, with `grants`), and what the tests need.
struct Setup {
    environment: TestEnvironment,
    daemon: TestDaemon,
    peer: TestPeer,
    client: FederationClient<Channel>,
    admin: FederationClient<Channel>,
    admin_key: String,
    agents: Agents,
    daemon_id: String,
    connection_id: String,
}

impl Setup {
    async fn new(backend: Backend, grants: &[&str]) -> Setup {
        let mut setup = Setup::requested(backend, |_| {}).await;
        setup.accept(grants).await;
        setup
    }

    /// The peer has asked for a connection that is still PENDING.
    async fn requested(
        backend: Backend,
        configure: impl FnOnce(&mut mosaic_mesh::config::Config),
    ) -> Setup {
        let environment = TestEnvironment::new(backend).await;
        let daemon = environment
            .start_peer(0, |config| {
                *config = with_agent_types(config.clone());
                configure(config);
            })
            .await;
        let admin_key = daemon.api_key(&[Scope::Admin]).await;
        let mut admin = FederationClient::new(daemon.channel().await);
        let instance = admin
            .get_instance(pb::GetInstanceRequest {})
            .await
            .expect("instance")
            .into_inner()
            .instance
            .expect("instance");
        let peer = TestPeer::new("peer").await;
        let mut client = FederationClient::new(peer.channel_to(&daemon).await);
        let request = peer.connection_request(&instance.instance_id, "ws");
        let sealed = envelope::seal(&request, peer.current().as_ref()).expect("seal");
        let reply = client
            .request_connection(pb::RequestConnectionRequest {
                envelope: Some(sealed),
            })
            .await
            .expect("connection request")
            .into_inner()
            .envelope
            .expect("reply");
        let reply = pb::ConnectionReplyPayload::decode(reply.payload.as_slice()).expect("reply");
        let agents = Agents::new(
            daemon.channel().await,
            daemon.api_key(&[Scope::Agents]).await,
        );
        Setup {
            environment,
            daemon,
            peer,
            client,
            admin,
            admin_key,
            agents,
            daemon_id: instance.instance_id,
            connection_id: reply.connection_id,
        }
    }

    async fn accept(&mut self, grants: &[&str]) {
        self.admin
            .accept_connection(with_key(
                pb::AcceptConnectionRequest {
                    connection_id: self.connection_id.clone(),
                    granted_capabilities: grants.iter().map(|g| (*g).to_owned()).collect(),
                    accept_new_key_for_known_instance: false,
                },
                &self.admin_key,
            ))
            .await
            .expect("accept");
    }

    /// The daemon's command log, newest first.
    async fn log(&mut self) -> Vec<pb::CommandLogEntry> {
        self.admin
            .list_command_log(with_key(
                pb::ListCommandLogRequest::default(),
                &self.admin_key,
            ))
            .await
            .expect("command log")
            .into_inner()
            .entries
    }

    fn command(&self, command: pb::command_payload::Command) -> pb::CommandPayload {
        let key_id = self.peer.current().public_key().key_id();
        pb::CommandPayload {
            header: Some(self.peer.header(&self.daemon_id, "ws", key_id)),
            command: Some(command),
        }
    }

    fn seal(&self, payload: &pb::CommandPayload) -> pb::SignedEnvelope {
        envelope::seal(payload, self.peer.current().as_ref()).expect("seal")
    }

    async fn send(
        &mut self,
        sealed: pb::SignedEnvelope,
    ) -> Result<pb::SignedEnvelope, tonic::Status> {
        self.client
            .execute_command(pb::ExecuteCommandRequest {
                envelope: Some(sealed),
            })
            .await
            .map(|response| response.into_inner().envelope.expect("envelope"))
    }

    async fn agent_count(&mut self) -> usize {
        self.agents
            .list(agent_pb::ListAgentsRequest::default())
            .await
            .expect("list")
            .agents
            .len()
    }

    async fn finish(self) {
        drop(self.daemon);
        self.environment.cleanup().await;
    }
}

fn spawn_command(prompt: &str) -> pb::command_payload::Command {
    pb::command_payload::Command::AgentSpawn(pb::AgentSpawnCommand {
        spawn: Some(agent_pb::SpawnRequest {
            agent_type: "sh".to_owned(),
            prompt: prompt.to_owned(),
            ..agent_pb::SpawnRequest::default()
        }),
    })
}

fn result_of(sealed: &pb::SignedEnvelope) -> pb::CommandResultPayload {
    pb::CommandResultPayload::decode(sealed.payload.as_slice()).expect("command result")
}

fn refused(outcome: Result<pb::SignedEnvelope, tonic::Status>) -> tonic::Status {
    match outcome {
        Ok(reply) => panic!("expected a refusal, got {:?}", result_of(&reply)),
        Err(status) => status,
    }
}

async fn a_spawn_retried_with_the_same_bytes_makes_one_agent(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let sealed = setup.seal(&setup.command(spawn_command("sleep 30")));
    let first = setup.send(sealed.clone()).await.expect("spawn");
    let again = setup.send(sealed).await.expect("retry");
    assert_eq!(first, again, "the retry gets the stored signed result");
    let Some(pb::command_result_payload::Outcome::Agent(agent)) = result_of(&first).outcome else {
        panic!("expected an agent: {:?}", result_of(&first));
    };
    assert_eq!(setup.agent_count().await, 1, "one agent, not two");
    // The peer sees its own agent.
    let status = setup.seal(&setup.command(pb::command_payload::Command::AgentStatus(
        pb::AgentStatusCommand {
            agent_id: agent.agent_id.clone(),
        },
    )));
    let reply = result_of(&setup.send(status).await.expect("status"));
    assert!(
        matches!(reply.outcome, Some(pb::command_result_payload::Outcome::Agent(ref seen)) if seen.agent_id == agent.agent_id),
        "{reply:?}"
    );
    setup
        .agents
        .kill(&agent.agent_id, "test over")
        .await
        .expect("kill");
    setup.finish().await;
}

async fn a_reused_message_id_with_other_bytes_is_already_exists(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let first = setup.command(spawn_command("true"));
    setup.send(setup.seal(&first)).await.expect("spawn");
    let mut other = setup.command(spawn_command("echo other"));
    other.header = first.header.clone();
    let status = refused(setup.send(setup.seal(&other)).await);
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(setup.agent_count().await, 1, "no second agent");
    setup.finish().await;
}

/// A read is not looked up before it runs (only spawns and kills are), but its
/// replay is still caught when its message id is recorded: identical bytes get
/// the stored signed result, even after the agent changed, and other bytes
/// under the same id are ALREADY_EXISTS.
async fn a_replayed_status_read_gets_the_stored_result(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let spawned = setup
        .send(setup.seal(&setup.command(spawn_command("sleep 30"))))
        .await
        .expect("spawn");
    let Some(pb::command_result_payload::Outcome::Agent(agent)) = result_of(&spawned).outcome
    else {
        panic!("expected an agent: {:?}", result_of(&spawned));
    };
    let status = setup.command(pb::command_payload::Command::AgentStatus(
        pb::AgentStatusCommand {
            agent_id: agent.agent_id.clone(),
        },
    ));
    let sealed = setup.seal(&status);
    let first = setup.send(sealed.clone()).await.expect("status");
    let Some(pb::command_result_payload::Outcome::Agent(seen)) = result_of(&first).outcome else {
        panic!("expected the agent: {:?}", result_of(&first));
    };
    assert_eq!(seen.state, agent_pb::AgentState::Running as i32);

    setup
        .agents
        .kill(&agent.agent_id, "changed since the read")
        .await
        .expect("kill");
    setup
        .agents
        .wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
        .await;
    let again = setup.send(sealed).await.expect("replay");
    assert_eq!(first, again, "the replay gets the stored signed result");

    let mut other = setup.command(pb::command_payload::Command::AgentList(
        pb::AgentListCommand::default(),
    ));
    other.header = status.header.clone();
    let refusal = refused(setup.send(setup.seal(&other)).await);
    assert_eq!(refusal.code(), Code::AlreadyExists, "{refusal:?}");

    // A fresh read sees the change.
    let fresh = setup
        .send(
            setup.seal(&setup.command(pb::command_payload::Command::AgentStatus(
                pb::AgentStatusCommand {
                    agent_id: agent.agent_id.clone(),
                },
            ))),
        )
        .await
        .expect("fresh status");
    let Some(pb::command_result_payload::Outcome::Agent(now)) = result_of(&fresh).outcome else {
        panic!("expected the agent: {:?}", result_of(&fresh));
    };
    assert_eq!(now.state, agent_pb::AgentState::Killed as i32);
    setup.finish().await;
}

async fn status_and_kill_of_a_local_agent_are_not_found(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let local = setup
        .agents
        .spawn("sh", "sleep 30")
        .await
        .expect("local spawn");
    for command in [
        pb::command_payload::Command::AgentStatus(pb::AgentStatusCommand {
            agent_id: local.agent_id.clone(),
        }),
        pb::command_payload::Command::AgentKill(pb::AgentKillCommand {
            agent_id: local.agent_id.clone(),
            reason: "not yours".to_owned(),
        }),
    ] {
        let reply = result_of(
            &setup
                .send(setup.seal(&setup.command(command)))
                .await
                .expect("reply"),
        );
        let Some(pb::command_result_payload::Outcome::Error(error)) = reply.outcome else {
            panic!("expected an error: {reply:?}");
        };
        assert_eq!(error.code, Code::NotFound as i32, "{error:?}");
    }
    let still = setup.agents.get(&local.agent_id).await.expect("get");
    assert_ne!(
        still.state,
        agent_pb::AgentState::Killed as i32,
        "not killed"
    );
    setup
        .agents
        .kill(&local.agent_id, "test over")
        .await
        .expect("kill");
    setup.finish().await;
}

async fn a_capability_not_granted_is_permission_denied(backend: Backend) {
    let mut setup = Setup::new(backend, &["agent.status"]).await;
    let status = refused(
        setup
            .send(setup.seal(&setup.command(spawn_command("true"))))
            .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_flipped_signature_bit_is_unauthenticated(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let mut sealed = setup.seal(&setup.command(spawn_command("true")));
    sealed.signature[5] ^= 0x01;
    let status = refused(setup.send(sealed.clone()).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Nor is the message id burnt: the genuine message still runs.
    sealed.signature[5] ^= 0x01;
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.send(sealed).await.expect("the genuine message");
    setup.finish().await;
}

async fn an_unknown_command_type_is_invalid_argument(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let mut payload = setup.command(spawn_command("true"));
    payload.command = None;
    let status = refused(setup.send(setup.seal(&payload)).await);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_suspended_connection_is_failed_precondition(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    setup
        .admin
        .suspend_connection(with_key(
            pb::SuspendConnectionRequest {
                connection_id: setup.connection_id.clone(),
                ..pb::SuspendConnectionRequest::default()
            },
            &setup.admin_key,
        ))
        .await
        .expect("suspend");
    let status = refused(
        setup
            .send(setup.seal(&setup.command(spawn_command("true"))))
            .await,
    );
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_command_for_another_instance_is_permission_denied(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let mut payload = setup.command(spawn_command("true"));
    if let Some(header) = payload.header.as_mut() {
        header.recipient_instance_id = "someone-else".to_owned();
    }
    let status = refused(setup.send(setup.seal(&payload)).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_command_without_a_client_certificate_is_unauthenticated(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let sealed = setup.seal(&setup.command(spawn_command("true")));
    let status = FederationClient::new(setup.daemon.channel().await)
        .execute_command(pb::ExecuteCommandRequest {
            envelope: Some(sealed),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

/// Strangers learn nothing (tests/it/strangers.rs has every state).
async fn a_peer_without_a_connection_is_refused_as_a_stranger(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let stranger = TestPeer::new("stranger").await;
    let payload = pb::CommandPayload {
        header: Some(stranger.header(
            &setup.daemon_id,
            "ws",
            stranger.current().public_key().key_id(),
        )),
        command: Some(spawn_command("true")),
    };
    let sealed = envelope::seal(&payload, stranger.current().as_ref()).expect("seal");
    let status = FederationClient::new(stranger.channel_to(&setup.daemon).await)
        .execute_command(pb::ExecuteCommandRequest {
            envelope: Some(sealed),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), envelope::STRANGER_MESSAGE);
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

/// The peer's key is not the key of a connection in the workspace it names:
/// there it is a stranger.
async fn a_command_in_another_workspace_is_refused_as_from_a_stranger(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let mut payload = setup.command(spawn_command("true"));
    if let Some(header) = payload.header.as_mut() {
        header.workspace = "other".to_owned();
    }
    let status = refused(setup.send(setup.seal(&payload)).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), envelope::STRANGER_MESSAGE);
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn empty_and_garbage_payloads_and_signatures_are_invalid_argument(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let genuine = setup.seal(&setup.command(spawn_command("true")));
    for payload in [Vec::new(), vec![0xff; 64]] {
        let hostile = pb::SignedEnvelope {
            payload,
            ..genuine.clone()
        };
        let status = refused(setup.send(hostile).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // Truncated, empty and oversized signatures never verify: refused before
    // any lookup, as malformed.
    let oversized: Vec<u8> = genuine
        .signature
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    for signature in [genuine.signature[..10].to_vec(), Vec::new(), oversized] {
        let length = signature.len();
        let hostile = pb::SignedEnvelope {
            signature,
            ..genuine.clone()
        };
        let status = refused(setup.send(hostile).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{length}: {status:?}");
        assert!(status.message().contains("64 bytes"), "{status:?}");
    }
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    // None of them used up the message id: the genuine message still runs.
    setup.send(genuine).await.expect("the genuine message");
    assert_eq!(setup.agent_count().await, 1);
    setup.finish().await;
}

async fn stale_future_and_expired_commands_are_deadline_exceeded(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let now = now_ms();
    for (issued, expires) in [
        (now - 600_000, now + 60_000),
        (now + 7_200_000, now + 7_260_000),
        (now - 120_000, now - 60_000),
    ] {
        let mut payload = setup.command(spawn_command("true"));
        if let Some(header) = payload.header.as_mut() {
            header.issued_at = Some(timestamp_from_ms(issued));
            header.expires_at = Some(timestamp_from_ms(expires));
        }
        let status = refused(setup.send(setup.seal(&payload)).await);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn an_oversized_prompt_is_an_invalid_argument_result(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let prompt = "x".repeat(8192);
    let reply = result_of(
        &setup
            .send(setup.seal(&setup.command(spawn_command(&prompt))))
            .await
            .expect("reply"),
    );
    let Some(pb::command_result_payload::Outcome::Error(error)) = reply.outcome else {
        panic!("expected an error: {reply:?}");
    };
    assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn the_peer_kills_its_own_agent(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let reply = result_of(
        &setup
            .send(setup.seal(&setup.command(spawn_command("sleep 30"))))
            .await
            .expect("spawn"),
    );
    let Some(pb::command_result_payload::Outcome::Agent(agent)) = reply.outcome else {
        panic!("expected an agent: {reply:?}");
    };
    let kill = pb::command_payload::Command::AgentKill(pb::AgentKillCommand {
        agent_id: agent.agent_id.clone(),
        reason: "done".to_owned(),
    });
    let reply = result_of(
        &setup
            .send(setup.seal(&setup.command(kill)))
            .await
            .expect("kill"),
    );
    assert!(
        matches!(
            reply.outcome,
            Some(pb::command_result_payload::Outcome::Agent(_))
        ),
        "{reply:?}"
    );
    setup
        .agents
        .wait_for_state(&agent.agent_id, agent_pb::AgentState::Killed)
        .await;
    setup.finish().await;
}

/// A spawns on B, watches it run and kills it; C, also connected to B, can
/// neither see nor kill A's agent; once B suspends A, A's commands fail.
async fn three_daemons_spawn_watch_kill_and_suspend(backend: Backend) {
    use crate::support::admin::{Admin, connect_and_accept};
    // A and B connected in `ws`, and a third daemon C.
    let pair = Pair::connected(backend, |_| {}, with_test_agents).await;
    let environment_c = TestEnvironment::new(backend).await;
    let c = environment_c.start_peer(0, |_| {}).await;
    let admin_c = Admin::of(&c).await;
    let (b, b_id) = (pair.b(), pair.b_id.clone());
    // C's connection is in its own workspace so that B's operator view of
    // each workspace holds one connection.
    connect_and_accept(&admin_c, &pair.admin_b, b, "ws-c", ALL).await;
    let key_a = pair.a().api_key(&[Scope::Admin]).await;
    let key_c = c.api_key(&[Scope::Admin]).await;
    let mut client_a = FederationClient::new(pair.a().channel().await);
    let mut client_c = FederationClient::new(c.channel().await);

    let agent = client_a
        .spawn_remote_agent(with_key(
            pb::SpawnRemoteAgentRequest {
                peer_instance_id: b_id.clone(),
                spawn: Some(agent_pb::SpawnRequest {
                    agent_type: "sh".to_owned(),
                    prompt: "sleep 30".to_owned(),
                    ..agent_pb::SpawnRequest::default()
                }),
                ..pb::SpawnRemoteAgentRequest::default()
            },
            &key_a,
        ))
        .await
        .expect("remote spawn")
        .into_inner()
        .agent
        .expect("agent");
    let get = |agent_id: &str, key: &str| {
        with_key(
            pb::GetRemoteAgentRequest {
                peer_instance_id: b_id.clone(),
                workspace: String::new(),
                agent_id: agent_id.to_owned(),
            },
            key,
        )
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let seen = client_a
            .get_remote_agent(get(&agent.agent_id, &key_a))
            .await
            .expect("remote status")
            .into_inner()
            .agent
            .expect("agent");
        if seen.state == agent_pb::AgentState::Running as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never RUNNING: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // C cannot see or kill A's agent, and cannot tell that it exists.
    let status = client_c
        .get_remote_agent(get(&agent.agent_id, &key_c))
        .await
        .expect_err("hidden");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client_c
        .kill_remote_agent(with_key(
            pb::KillRemoteAgentRequest {
                peer_instance_id: b_id.clone(),
                agent_id: agent.agent_id.clone(),
                ..pb::KillRemoteAgentRequest::default()
            },
            &key_c,
        ))
        .await
        .expect_err("hidden");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    client_a
        .kill_remote_agent(with_key(
            pb::KillRemoteAgentRequest {
                peer_instance_id: b_id.clone(),
                agent_id: agent.agent_id.clone(),
                reason: "done".to_owned(),
                ..pb::KillRemoteAgentRequest::default()
            },
            &key_a,
        ))
        .await
        .expect("remote kill");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let seen = client_a
            .get_remote_agent(get(&agent.agent_id, &key_a))
            .await
            .expect("remote status")
            .into_inner()
            .agent
            .expect("agent");
        if seen.state == agent_pb::AgentState::Killed as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never KILLED: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // B suspends A: B refuses A's commands while its own row is SUSPENDED.
    pair.admin_b
        .suspend(pair.connection_on_b())
        .await
        .expect("suspend");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = client_a
            .get_remote_agent(get(&agent.agent_id, &key_a))
            .await
            .expect_err("suspended");
        if status.code() == Code::FailedPrecondition {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unexpected: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.stop().await;
    pair.finish().await;
    environment_c.cleanup().await;
}

async fn a_peer_that_is_down_is_unavailable_within_the_deadline(backend: Backend) {
    let mut pair = Pair::connected(backend, |_| {}, |_| {}).await;
    pair.stop_b().await;
    let key_a = pair.a().api_key(&[Scope::Admin]).await;
    let started = std::time::Instant::now();
    let status = FederationClient::new(pair.a().channel().await)
        .get_remote_agent(with_key(
            pb::GetRemoteAgentRequest {
                peer_instance_id: pair.b_id.clone(),
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
        started.elapsed() < std::time::Duration::from_secs(30),
        "within the deadline"
    );
    pair.finish().await;
}

async fn a_command_signed_with_another_key_is_unauthenticated(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    // Names the connected peer as sender but is signed by another instance's
    // key (which is also not the TLS key of the channel).
    let other = TestPeer::new("other").await;
    let mut payload = setup.command(spawn_command("true"));
    if let Some(header) = payload.header.as_mut() {
        header.key_id = other.current().public_key().key_id();
    }
    let sealed = envelope::seal(&payload, other.current().as_ref()).expect("seal");
    let status = refused(setup.send(sealed).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_pending_connection_is_permission_denied(backend: Backend) {
    let mut setup = Setup::requested(backend, |_| {}).await;
    let status = refused(
        setup
            .send(setup.seal(&setup.command(spawn_command("true"))))
            .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    // Once accepted, the very same kind of command runs: the refusal was the
    // state, not the message.
    setup.accept(ALL).await;
    setup
        .send(setup.seal(&setup.command(spawn_command("true"))))
        .await
        .expect("accepted");
    assert_eq!(setup.agent_count().await, 1);
    setup.finish().await;
}

/// A DISCONNECTED connection is no connection: its key identifies no one.
async fn a_disconnected_connection_is_refused_as_from_a_stranger(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    setup
        .admin
        .disconnect_connection(with_key(
            pb::DisconnectConnectionRequest {
                connection_id: setup.connection_id.clone(),
                ..pb::DisconnectConnectionRequest::default()
            },
            &setup.admin_key,
        ))
        .await
        .expect("disconnect");
    let status = refused(
        setup
            .send(setup.seal(&setup.command(spawn_command("true"))))
            .await,
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), envelope::STRANGER_MESSAGE);
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_rotated_out_key_after_its_grace_is_unauthenticated(backend: Backend) {
    let mut setup = Setup::new(backend, ALL).await;
    let before = setup.peer.current();
    let old_key_id = before.public_key().key_id();
    let after = setup
        .peer
        .identity
        .rotate(std::time::Duration::from_secs(2))
        .await
        .expect("rotate");
    let rotated_at = now_ms();
    let old_signer = after
        .previous_signing_key(&old_key_id, rotated_at)
        .expect("old key held");
    let valid_until = after
        .previous_keys(rotated_at)
        .next()
        .expect("previous key")
        .valid_until_ms;
    // Tell the daemon, signed with the old key over a channel with the new one.
    let mut new_client = FederationClient::new(setup.peer.channel_to(&setup.daemon).await);
    let notice = pb::ConnectionNoticePayload {
        header: Some(
            setup
                .peer
                .header(&setup.daemon_id, "ws", old_key_id.clone()),
        ),
        kind: pb::NoticeKind::KeyRotated.into(),
        granted_capabilities: Vec::new(),
        reason: String::new(),
        new_key: Some(pb::PublicKeyInfo {
            key_id: after.public_key().key_id(),
            public_key: after.public_key().spki_der().to_vec(),
            fingerprint: after.public_key().fingerprint(),
            created_at: None,
            valid_until: None,
        }),
        previous_key_valid_until: Some(timestamp_from_ms(valid_until)),
    };
    new_client
        .notify_connection(pb::NotifyConnectionRequest {
            envelope: Some(envelope::seal(&notice, old_signer).expect("seal")),
        })
        .await
        .expect("key rotation notice");
    // A spawn signed by the old key over the old TLS session (setup.client).
    let old_command = |setup: &Setup| {
        let payload = pb::CommandPayload {
            header: Some(
                setup
                    .peer
                    .header(&setup.daemon_id, "ws", old_key_id.clone()),
            ),
            command: Some(spawn_command("true")),
        };
        envelope::seal(&payload, old_signer).expect("seal")
    };
    // Wait out the grace, then the old key is refused and nothing runs.
    let wait = u64::try_from(valid_until.saturating_sub(now_ms()) + 200).unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    let count_before = setup.agent_count().await;
    let status = refused(setup.send(old_command(&setup)).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("grace"), "{status:?}");
    assert_eq!(setup.agent_count().await, count_before, "nothing spawned");
    // The new key, over a session with the new certificate, still works.
    let payload = pb::CommandPayload {
        header: Some(
            setup
                .peer
                .header(&setup.daemon_id, "ws", after.public_key().key_id()),
        ),
        command: Some(spawn_command("true")),
    };
    new_client
        .execute_command(pb::ExecuteCommandRequest {
            envelope: Some(envelope::seal(&payload, after.as_ref()).expect("seal")),
        })
        .await
        .expect("the new key works");
    assert_eq!(setup.agent_count().await, count_before + 1);
    setup.finish().await;
}

/// gRPC's status-code guide: a message larger than the limit is
/// RESOURCE_EXHAUSTED.
async fn a_message_over_the_transport_limit_is_resource_exhausted(backend: Backend) {
    let mut setup = Setup::requested(backend, |config| config.max_message_bytes = 16 * 1024).await;
    setup.accept(ALL).await;
    let prompt = "x".repeat(64 * 1024);
    let status = refused(
        setup
            .send(setup.seal(&setup.command(spawn_command(&prompt))))
            .await,
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    assert!(setup.log().await.is_empty(), "never reached the handler");
    setup.finish().await;
}

async fn refusals_of_the_connected_peer_are_logged_and_a_strangers_are_not(backend: Backend) {
    let mut setup = Setup::new(backend, &["agent.spawn"]).await;
    // Identified by its TLS key, the peer's refused commands are logged.
    let status = refused(
        setup
            .send(
                setup.seal(&setup.command(pb::command_payload::Command::AgentStatus(
                    pb::AgentStatusCommand {
                        agent_id: "any".to_owned(),
                    },
                ))),
            )
            .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut flipped = setup.seal(&setup.command(spawn_command("true")));
    flipped.signature[7] ^= 0x01;
    let status = refused(setup.send(flipped).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let log = setup.log().await;
    let seen: Vec<_> = log
        .iter()
        .map(|entry| (entry.command_type.as_str(), entry.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("agent.spawn", "UNAUTHENTICATED"),
            ("agent.status", "PERMISSION_DENIED")
        ],
        "{log:?}"
    );
    assert!(
        log.iter()
            .all(|entry| entry.direction() == pb::CommandDirection::Inbound
                && entry.sender_instance_id == setup.peer.current().instance_id)
    );

    // A stranger with a certificate, as itself or claiming the peer's id:
    // refused, and not in the log (it cannot fill it).
    let stranger = TestPeer::new("stranger").await;
    let mut wire = FederationClient::new(stranger.channel_to(&setup.daemon).await);
    for claimed in [
        stranger.current().instance_id.clone(),
        setup.peer.current().instance_id.clone(),
    ] {
        let mut header = stranger.header(
            &setup.daemon_id,
            "ws",
            stranger.current().public_key().key_id(),
        );
        header.sender_instance_id = claimed;
        let payload = pb::CommandPayload {
            header: Some(header),
            command: Some(spawn_command("true")),
        };
        let status = wire
            .execute_command(pb::ExecuteCommandRequest {
                envelope: Some(
                    envelope::seal(&payload, stranger.current().as_ref()).expect("seal"),
                ),
            })
            .await
            .expect_err("stranger");
        assert!(
            matches!(
                status.code(),
                Code::PermissionDenied | Code::Unauthenticated
            ),
            "{status:?}"
        );
    }
    assert_eq!(setup.log().await, log, "strangers are not logged");
    assert_eq!(setup.agent_count().await, 0, "nothing spawned");
    setup.finish().await;
}

async fn a_message_id_the_operator_may_choose_is_one_the_peer_accepts(backend: Backend) {
    let pair = Pair::start(backend, |_| {}, with_test_agents).await;
    pair.connect("ws", &["agent.spawn"]).await;
    let a = pair.a();
    let key = a.api_key(&[Scope::Admin]).await;
    let mut client = FederationClient::new(a.channel().await);
    let spawn = |message_id: String| {
        with_key(
            pb::SpawnRemoteAgentRequest {
                peer_instance_id: pair.b_id.clone(),
                message_id,
                spawn: Some(agent_pb::SpawnRequest {
                    agent_type: "true".to_owned(),
                    ..agent_pb::SpawnRequest::default()
                }),
                ..pb::SpawnRemoteAgentRequest::default()
            },
            &key,
        )
    };
    // 65 characters: refused here, before anything is signed or sent.
    let status = client
        .spawn_remote_agent(spawn("m".repeat(65)))
        .await
        .expect_err("a 65-character message id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("1 to 64"), "{status:?}");
    let store = mosaic_mesh::store::Store::connect(&a.config.database_url)
        .await
        .expect("A's database");
    assert!(
        store
            .find_outbound_command(&"m".repeat(65))
            .await
            .expect("read the command log")
            .is_none(),
        "the command was signed and sent"
    );
    drop(store);
    // 64 characters: the peer takes it and starts the agent.
    let started = client
        .spawn_remote_agent(spawn("m".repeat(64)))
        .await
        .expect("a 64-character message id reaches the peer")
        .into_inner();
    assert_eq!(started.message_id, "m".repeat(64));
    assert!(started.agent.is_some());
    pair.finish().await;
}
