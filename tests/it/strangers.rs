//! Strangers learn nothing (DESIGN.md section 4): a caller with its own
//! certificate whose messages name someone else's instance id gets one
//! refusal, the same code and message on every wire method, whatever the
//! state of that instance's connection (none, PENDING, SUSPENDED, ACTIVE
//! without the capability, ACTIVE), and nothing it sends is logged or
//! changed. The real peers still get the refusals that help them.

use std::fmt::Debug;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::clock::{now_ms, timestamp_from_ms};
use mosaic_mesh::federation::envelope::{self, STRANGER_MESSAGE};
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};
use crate::support::peer::TestPeer;

on_both_backends!(
    a_stranger_gets_one_answer_whatever_the_state_of_the_connection_it_names,
    the_real_peers_keep_their_helpful_refusals,
);

const ALL: &[&str] = &["agent.spawn", "agent.status", "agent.kill"];

/// The states a victim's connection with the daemon can be in, in `ws`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// It never asked.
    None,
    /// It asked; the daemon's operator has not answered.
    Pending,
    /// Accepted with everything, then suspended by the daemon's operator.
    Suspended,
    /// Accepted with `agent.status` only (a spawn needs `agent.spawn`).
    WithoutSpawn,
    /// Accepted with everything.
    Active,
}

const STATES: [State; 5] = [
    State::None,
    State::Pending,
    State::Suspended,
    State::WithoutSpawn,
    State::Active,
];

/// A daemon with one victim per state, and its operator.
struct Victims {
    environment: TestEnvironment,
    daemon: TestDaemon,
    admin: Admin,
    daemon_id: String,
    victims: Vec<(State, TestPeer)>,
}

impl Victims {
    async fn new(backend: Backend) -> Victims {
        let environment = TestEnvironment::new(backend).await;
        let daemon = environment
            .start_peer(0, |config| *config = with_agent_types(config.clone()))
            .await;
        let admin = Admin::of(&daemon).await;
        let daemon_id = admin.instance().await.instance_id;
        let mut victims = Vec::new();
        for state in STATES {
            let peer = TestPeer::new(&format!("{state:?}").to_lowercase()).await;
            if state != State::None {
                let connection_id = request_connection(&peer, &daemon, &daemon_id).await;
                match state {
                    State::None | State::Pending => {}
                    State::Suspended => {
                        admin.accept(&connection_id, ALL).await.expect("accept");
                        admin.suspend(&connection_id).await.expect("suspend");
                    }
                    State::WithoutSpawn => {
                        admin
                            .accept(&connection_id, &["agent.status"])
                            .await
                            .expect("accept");
                    }
                    State::Active => {
                        admin.accept(&connection_id, ALL).await.expect("accept");
                    }
                }
            }
            victims.push((state, peer));
        }
        Victims {
            environment,
            daemon,
            admin,
            daemon_id,
            victims,
        }
    }

    /// The daemon's command log.
    async fn log(&self) -> Vec<pb::CommandLogEntry> {
        self.admin
            .client
            .clone()
            .list_command_log(with_key(
                pb::ListCommandLogRequest::default(),
                &self.admin.key,
            ))
            .await
            .expect("command log")
            .into_inner()
            .entries
    }

    /// Each connection's id and state, as the operator sees them.
    async fn connections(&self) -> Vec<(String, i32, Vec<u8>)> {
        let mut connections: Vec<_> = self
            .admin
            .list()
            .await
            .into_iter()
            .map(|connection| {
                (
                    connection.remote_instance_id,
                    connection.state,
                    connection.remote_public_key,
                )
            })
            .collect();
        connections.sort();
        connections
    }

    async fn agent_count(&self) -> usize {
        let key = self.daemon.api_key(&[Scope::Agents]).await;
        Agents::new(self.daemon.channel().await, key)
            .list(agent_pb::ListAgentsRequest::default())
            .await
            .expect("list agents")
            .agents
            .len()
    }

    async fn finish(self) {
        drop(self.daemon);
        self.environment.cleanup().await;
    }
}

/// `peer` asks `daemon` for a connection in `ws`; the connection's id.
async fn request_connection(peer: &TestPeer, daemon: &TestDaemon, daemon_id: &str) -> String {
    let request = peer.connection_request(daemon_id, "ws");
    let sealed = envelope::seal(&request, peer.current().as_ref()).expect("seal");
    let reply = FederationClient::new(peer.channel_to(daemon).await)
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(sealed),
        })
        .await
        .expect("connection request")
        .into_inner()
        .envelope
        .expect("reply");
    pb::ConnectionReplyPayload::decode(reply.payload.as_slice())
        .expect("reply payload")
        .connection_id
}

fn spawn_command() -> pb::command_payload::Command {
    pb::command_payload::Command::AgentSpawn(pb::AgentSpawnCommand {
        spawn: Some(agent_pb::SpawnRequest {
            agent_type: "sh".to_owned(),
            prompt: "true".to_owned(),
            ..agent_pb::SpawnRequest::default()
        }),
    })
}

fn refusal<T: Debug>(what: &str, outcome: Result<tonic::Response<T>, tonic::Status>) -> Answer {
    let status = outcome.expect_err(what);
    (status.code(), status.message().to_owned())
}

type Answer = (Code, String);

/// `sealed` claiming to be signed by `key_id`, as its header says.
fn named(mut sealed: pb::SignedEnvelope, key_id: String) -> pb::SignedEnvelope {
    sealed.key_id = key_id;
    sealed
}

/// Everything `mallory` can send naming `victim` (as the sender, in `ws`),
/// over its own mutual-TLS channel, and the answer to each.
async fn probe(
    mallory: &TestPeer,
    wire: &mut FederationClient<Channel>,
    daemon_id: &str,
    victim: &TestPeer,
    with_request: bool,
) -> Vec<(&'static str, Answer)> {
    let identity = mallory.current();
    let victim_id = victim.current().instance_id.clone();
    let header = |key_id: String| {
        let mut header = mallory.header(daemon_id, "ws", key_id);
        header.sender_instance_id.clone_from(&victim_id);
        header
    };
    let own_key_id = identity.public_key().key_id();
    let victim_key_id = victim.current().public_key().key_id();
    let command = |key_id: String, command| {
        let payload = pb::CommandPayload {
            header: Some(header(key_id.clone())),
            command: Some(command),
        };
        named(
            envelope::seal(&payload, identity.as_ref()).expect("seal"),
            key_id,
        )
    };
    let notice = |key_id: String, kind: pb::NoticeKind| {
        let new_key = (kind == pb::NoticeKind::KeyRotated).then(|| pb::PublicKeyInfo {
            key_id: identity.public_key().key_id(),
            public_key: identity.public_key().spki_der().to_vec(),
            fingerprint: identity.public_key().fingerprint(),
            created_at: None,
            valid_until: None,
        });
        let payload = pb::ConnectionNoticePayload {
            header: Some(header(key_id.clone())),
            kind: kind.into(),
            new_key,
            previous_key_valid_until: Some(timestamp_from_ms(now_ms() + 60_000)),
            ..pb::ConnectionNoticePayload::default()
        };
        named(
            envelope::seal(&payload, identity.as_ref()).expect("seal"),
            key_id,
        )
    };
    let mut answers = Vec::new();
    for (what, key_id) in [
        ("a spawn under its own key id", own_key_id.clone()),
        ("a spawn under the victim's key id", victim_key_id.clone()),
    ] {
        let outcome = wire
            .execute_command(pb::ExecuteCommandRequest {
                envelope: Some(command(key_id, spawn_command())),
            })
            .await;
        answers.push((what, refusal(what, outcome)));
    }
    let watch = pb::command_payload::Command::AgentWatch(pb::AgentWatchCommand {
        agent_id: "any".to_owned(),
        include_output: true,
        from_sequence: Some(1),
    });
    let outcome = wire
        .watch_command(pb::WatchCommandRequest {
            envelope: Some(command(own_key_id.clone(), watch)),
        })
        .await;
    answers.push(("a watch", refusal("a watch", outcome)));
    let outcome = wire
        .ping(pb::PingRequest {
            envelope: Some(
                envelope::seal(
                    &pb::PingPayload {
                        header: Some(header(own_key_id.clone())),
                    },
                    identity.as_ref(),
                )
                .expect("seal"),
            ),
        })
        .await;
    answers.push(("a ping", refusal("a ping", outcome)));
    for (what, key_id, kind) in [
        (
            "a suspension",
            own_key_id.clone(),
            pb::NoticeKind::Suspended,
        ),
        (
            "a disconnection under the victim's key id",
            victim_key_id.clone(),
            pb::NoticeKind::Disconnected,
        ),
        (
            "a key rotation to its own key",
            victim_key_id.clone(),
            pb::NoticeKind::KeyRotated,
        ),
    ] {
        let outcome = wire
            .notify_connection(pb::NotifyConnectionRequest {
                envelope: Some(notice(key_id, kind)),
            })
            .await;
        answers.push((what, refusal(what, outcome)));
    }
    if with_request {
        // A request for a connection that exists (one that does not is how
        // a connection begins, and is stored as the asker's).
        let mut request = mallory.connection_request(daemon_id, "ws");
        if let Some(header) = request.header.as_mut() {
            header.sender_instance_id.clone_from(&victim_id);
        }
        if let Some(sender) = request.sender.as_mut() {
            sender.instance_id.clone_from(&victim_id);
        }
        let outcome = wire
            .request_connection(pb::RequestConnectionRequest {
                envelope: Some(envelope::seal(&request, identity.as_ref()).expect("seal")),
            })
            .await;
        answers.push(("a request", refusal("a request", outcome)));
    }
    answers
}

async fn a_stranger_gets_one_answer_whatever_the_state_of_the_connection_it_names(
    backend: Backend,
) {
    let victims = Victims::new(backend).await;
    let connections = victims.connections().await;
    assert_eq!(connections.len(), 4, "{connections:?}");
    let mallory = TestPeer::new("mallory").await;
    let mut wire = FederationClient::new(mallory.channel_to(&victims.daemon).await);

    let mut by_state = Vec::new();
    for (state, victim) in &victims.victims {
        let answers = probe(
            &mallory,
            &mut wire,
            &victims.daemon_id,
            victim,
            *state != State::None,
        )
        .await;
        by_state.push((*state, answers));
    }
    let expected = (Code::Unauthenticated, STRANGER_MESSAGE.to_owned());
    for (state, answers) in &by_state {
        for (what, answer) in answers {
            assert_eq!(
                answer, &expected,
                "{what} naming a victim whose connection is {state:?}"
            );
        }
    }
    // The same questions got the same answers, whatever the state.
    let (_, first) = &by_state[0];
    for (state, answers) in &by_state[1..] {
        assert_eq!(&answers[..first.len()], &first[..], "{state:?}");
    }

    assert!(
        victims.log().await.is_empty(),
        "a stranger's message was logged"
    );
    assert_eq!(
        victims.connections().await,
        connections,
        "a stranger's message changed a connection"
    );
    assert_eq!(
        victims.agent_count().await,
        0,
        "a stranger spawned an agent"
    );
    victims.finish().await;
}

async fn the_real_peers_keep_their_helpful_refusals(backend: Backend) {
    let victims = Victims::new(backend).await;
    let mut answers = Vec::new();
    for (state, peer) in &victims.victims {
        let identity = peer.current();
        let payload = pb::CommandPayload {
            header: Some(peer.header(&victims.daemon_id, "ws", identity.public_key().key_id())),
            command: Some(spawn_command()),
        };
        let outcome = FederationClient::new(peer.channel_to(&victims.daemon).await)
            .execute_command(pb::ExecuteCommandRequest {
                envelope: Some(envelope::seal(&payload, identity.as_ref()).expect("seal")),
            })
            .await;
        answers.push((*state, outcome.map(|_| ())));
    }
    for (state, outcome) in &answers {
        match (state, outcome) {
            (State::Active, Ok(())) => {}
            (State::None, Err(status)) => {
                // Never connected: to this daemon it is a stranger.
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                assert_eq!(status.message(), STRANGER_MESSAGE);
            }
            (State::Pending, Err(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(
                    status.message().contains("no open connection"),
                    "{status:?}"
                );
            }
            (State::Suspended, Err(status)) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert!(status.message().contains("suspended"), "{status:?}");
            }
            (State::WithoutSpawn, Err(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("capability agent.spawn is not granted"),
                    "{status:?}"
                );
            }
            (state, outcome) => panic!("{state:?}: unexpected {outcome:?}"),
        }
    }
    // Identified by their keys, the real peers' commands are logged,
    // refused or not; the one that never connected is not.
    let mut logged: Vec<(String, String)> = victims
        .log()
        .await
        .into_iter()
        .map(|entry| (entry.sender_instance_id, entry.outcome))
        .collect();
    logged.sort();
    let mut expected: Vec<(String, String)> = victims
        .victims
        .iter()
        .filter_map(|(state, peer)| {
            let outcome = match state {
                State::None => return None,
                State::Pending | State::WithoutSpawn => "PERMISSION_DENIED",
                State::Suspended => "FAILED_PRECONDITION",
                State::Active => "ok",
            };
            Some((peer.current().instance_id.clone(), outcome.to_owned()))
        })
        .collect();
    expected.sort();
    assert_eq!(logged, expected);
    victims.finish().await;
}
