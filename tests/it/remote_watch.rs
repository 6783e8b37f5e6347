//! Following an agent on a peer (WatchRemoteAgent over signed `agent.watch`):
//! every line once and in order through cut connections, the refusals
//! `agent.status` gets, and the end of a watch when the peer suspends.

use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::federation::envelope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use pb::federation_client::FederationClient;
use tonic::Code;

use crate::support::Backend;
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestDaemon, mosaicd_binary, with_key};
use crate::support::fault_proxy::{Fault, FaultProxy};
use crate::support::pair::{Pair, with_test_agents};
use crate::support::peer::TestPeer;

on_both_backends!(
    a_remote_agent_followed_through_three_cuts_prints_every_line_once_in_order,
    a_remote_watch_is_refused_as_agent_status_is_and_ends_when_the_peer_suspends,
);

/// Lines the talkative agent prints, in 100 bursts.
const LINES: u64 = 100_000;
/// Lines per burst.
const BURST: u64 = LINES / 100;

/// A's admin client for remote calls.
struct Remote {
    client: FederationClient<tonic::transport::Channel>,
    key: String,
    peer: String,
}

impl Remote {
    async fn spawn(&mut self, workspace: &str, prompt: &str) -> String {
        self.client
            .spawn_remote_agent(with_key(
                pb::SpawnRemoteAgentRequest {
                    peer_instance_id: self.peer.clone(),
                    workspace: workspace.to_owned(),
                    message_id: String::new(),
                    spawn: Some(agent_pb::SpawnRequest {
                        agent_type: "sh".to_owned(),
                        prompt: prompt.to_owned(),
                        ..agent_pb::SpawnRequest::default()
                    }),
                },
                &self.key,
            ))
            .await
            .expect("remote spawn")
            .into_inner()
            .agent
            .expect("agent")
            .agent_id
    }

    /// The code GetRemoteAgent gets for `agent_id` through `workspace`.
    async fn status_code(&mut self, workspace: &str, agent_id: &str) -> Code {
        let request = pb::GetRemoteAgentRequest {
            peer_instance_id: self.peer.clone(),
            workspace: workspace.to_owned(),
            agent_id: agent_id.to_owned(),
        };
        match self
            .client
            .get_remote_agent(with_key(request, &self.key))
            .await
        {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    }

    /// WatchRemoteAgent from the current state.
    async fn watch(
        &mut self,
        workspace: &str,
        agent_id: &str,
    ) -> Result<tonic::Streaming<pb::WatchRemoteAgentResponse>, tonic::Status> {
        let request = pb::WatchRemoteAgentRequest {
            peer_instance_id: self.peer.clone(),
            workspace: workspace.to_owned(),
            agent_id: agent_id.to_owned(),
            include_output: true,
            from_sequence: None,
        };
        Ok(self
            .client
            .watch_remote_agent(with_key(request, &self.key))
            .await?
            .into_inner())
    }

    /// The code a watch gets: its call's, or its first message's.
    async fn watch_code(&mut self, workspace: &str, agent_id: &str) -> Code {
        match self.watch(workspace, agent_id).await {
            Ok(mut stream) => match stream.message().await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            },
            Err(status) => status.code(),
        }
    }

    /// A's outbound `agent.watch` entries, newest first.
    async fn watch_entries(&mut self) -> Vec<pb::CommandLogEntry> {
        let request = pb::ListCommandLogRequest {
            direction: pb::CommandDirection::Outbound as i32,
            page_size: 1000,
            ..pb::ListCommandLogRequest::default()
        };
        self.client
            .list_command_log(with_key(request, &self.key))
            .await
            .expect("command log")
            .into_inner()
            .entries
            .into_iter()
            .filter(|entry| entry.command_type == "agent.watch")
            .collect()
    }
}

async fn remote(a: &TestDaemon, peer: &str) -> Remote {
    Remote {
        client: FederationClient::new(a.channel().await),
        key: a.api_key(&[Scope::Admin]).await,
        peer: peer.to_owned(),
    }
}

/// B prints LINES numbered lines in 100 bursts, 50 ms apart; A's operator
/// follows it with `agent logs --peer --follow` while the proxy between A and
/// B cuts every connection three times. The CLI prints 1 to LINES, each once,
/// in order, and A sent one `agent.watch` per stream (at least four).
async fn a_remote_agent_followed_through_three_cuts_prints_every_line_once_in_order(
    backend: Backend,
) {
    let pair = Pair::start(
        backend,
        |_| {},
        |config| {
            *config = with_agent_types(config.clone());
            config.instance.name = "bravo".to_owned();
        },
    )
    .await;
    let a = pair.a();
    // A dials B only through the proxy (the URL it connected with).
    let proxy = FaultProxy::start(pair.b().address).await;
    pair.connect_via(
        &format!("https://{}", proxy.address),
        "ws",
        &["agent.spawn", "agent.status"],
    )
    .await;
    let mut remote = remote(a, &pair.b_id).await;
    let agent_id = remote
        .spawn(
            "ws",
            &format!(
                "for i in $(seq 0 99); do seq $((i*{BURST}+1)) $((i*{BURST}+{BURST})); sleep 0.05; done"
            ),
        )
        .await;

    let mut follow = tokio::process::Command::new(mosaicd_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOSAIC_") {
            follow.env_remove(name);
        }
    }
    follow
        .arg("--data-dir")
        .arg(&a.data_dir)
        .arg("--server")
        .arg(a.url())
        .arg("--api-key")
        .arg(a.api_key(&[Scope::Admin]).await)
        .args(["agent", "logs", &agent_id, "--peer", "bravo", "--follow"])
        .env("MOSAIC_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let follow = follow.spawn().expect("run mosaicd agent logs");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.set(Fault::Cut);
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set(Fault::Pass);
    }
    let printed = tokio::time::timeout(Duration::from_secs(120), follow.wait_with_output())
        .await
        .expect("the follow ends with the agent")
        .expect("agent logs output");
    assert!(
        printed.status.success(),
        "agent logs --follow: {}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let stdout = String::from_utf8_lossy(&printed.stdout);
    let mut expected = 1;
    for line in stdout.lines() {
        assert_eq!(line, expected.to_string(), "line {expected} of the output");
        expected += 1;
    }
    assert_eq!(expected - 1, LINES, "every line once");
    let stderr = String::from_utf8_lossy(&printed.stderr);
    assert!(stderr.contains("is COMPLETED"), "{stderr}");

    // Each cut ended a stream and a new `agent.watch` resumed it.
    let entries = remote.watch_entries().await;
    assert!(entries.len() >= 4, "one command per stream: {entries:#?}");
    let newest = &entries[0];
    assert_eq!(newest.outcome, "ok", "{newest:?}");
    assert!(newest.detail.ends_with("the agent ended"), "{newest:?}");
    assert!(
        entries[1..].iter().all(|entry| entry.outcome != "ok"),
        "the earlier streams were cut: {entries:#?}"
    );

    drop(proxy);
    pair.finish().await;
}

/// A is connected to B in `ws` with `agent.spawn` only and in `ws2` with
/// `agent.status` too. A watch gets the code a status read gets for the same
/// agent: no capability, another workspace's agent, B's own agent, a stranger.
/// A watch that runs ends with FAILED_PRECONDITION when B suspends.
async fn a_remote_watch_is_refused_as_agent_status_is_and_ends_when_the_peer_suspends(
    backend: Backend,
) {
    let pair = Pair::start(backend, |_| {}, with_test_agents).await;
    let (b, b_id) = (pair.b(), &pair.b_id);
    pair.connect("ws", &["agent.spawn"]).await;
    let (_, ws2_on_b) = pair.connect("ws2", &["agent.spawn", "agent.status"]).await;
    let mut remote = remote(pair.a(), b_id).await;
    let in_ws2 = remote.spawn("ws2", "sleep 30").await;
    let in_ws = remote.spawn("ws", "sleep 30").await;
    let mut agents_b = Agents::new(b.channel().await, b.api_key(&[Scope::Agents]).await);
    let on_b = agents_b
        .spawn("sh", "sleep 30")
        .await
        .expect("B's own agent")
        .agent_id;

    for (workspace, agent_id, code) in [
        ("ws", in_ws2.as_str(), Code::PermissionDenied),
        ("ws", in_ws.as_str(), Code::PermissionDenied),
        ("ws2", in_ws.as_str(), Code::NotFound),
        ("ws2", on_b.as_str(), Code::NotFound),
        ("ws2", "no-such-agent", Code::NotFound),
        ("ws2", in_ws2.as_str(), Code::Ok),
    ] {
        let status = remote.status_code(workspace, agent_id).await;
        let watch = remote.watch_code(workspace, agent_id).await;
        assert_eq!(status, code, "agent.status of {agent_id} in {workspace}");
        assert_eq!(watch, code, "agent.watch of {agent_id} in {workspace}");
    }

    // A stranger's signed agent.watch is refused like its agent.status.
    let stranger = TestPeer::new("stranger").await;
    let mut wire = FederationClient::new(stranger.channel_to(b).await);
    let identity = stranger.current();
    let command = |command| {
        let payload = pb::CommandPayload {
            header: Some(stranger.header(b_id, "ws2", identity.public_key().key_id())),
            command: Some(command),
        };
        envelope::seal(&payload, identity.as_ref()).expect("seal")
    };
    let status = wire
        .execute_command(pb::ExecuteCommandRequest {
            envelope: Some(command(pb::command_payload::Command::AgentStatus(
                pb::AgentStatusCommand {
                    agent_id: in_ws2.clone(),
                },
            ))),
        })
        .await
        .expect_err("a stranger's status");
    let watch = wire
        .watch_command(pb::WatchCommandRequest {
            envelope: Some(command(pb::command_payload::Command::AgentWatch(
                pb::AgentWatchCommand {
                    agent_id: in_ws2.clone(),
                    include_output: true,
                    from_sequence: Some(1),
                },
            ))),
        })
        .await
        .expect_err("a stranger's watch");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.message(),
        mosaic_mesh::federation::envelope::STRANGER_MESSAGE
    );
    assert_eq!(
        (watch.code(), watch.message()),
        (status.code(), status.message()),
        "{watch:?}"
    );
    // The streamed command by ExecuteCommand, or another by WatchCommand: no.
    let (tampered_route, other_route) = (
        wire.execute_command(pb::ExecuteCommandRequest {
            envelope: Some(command(pb::command_payload::Command::AgentWatch(
                pb::AgentWatchCommand::default(),
            ))),
        })
        .await
        .expect_err("agent.watch by ExecuteCommand"),
        wire.watch_command(pb::WatchCommandRequest {
            envelope: Some(command(pb::command_payload::Command::AgentStatus(
                pb::AgentStatusCommand::default(),
            ))),
        })
        .await
        .expect_err("agent.status by WatchCommand"),
    );
    assert_eq!(tampered_route.code(), Code::InvalidArgument);
    assert_eq!(other_route.code(), Code::InvalidArgument);

    // A running watch ends with the code agent.status gets once B suspends.
    let mut watch = remote.watch("ws2", &in_ws2).await.expect("watch");
    let first = watch
        .message()
        .await
        .expect("first event")
        .expect("an event")
        .events
        .into_iter()
        .next()
        .expect("event");
    assert!(first.sequence >= 2, "the current state: {first:?}");
    pair.admin_b.suspend(&ws2_on_b).await.expect("suspend");
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch ends soon after the suspension")
        .expect_err("ends with an error");
    assert_eq!(ended.code(), Code::FailedPrecondition, "{ended:?}");
    assert_eq!(
        remote.status_code("ws2", &in_ws2).await,
        Code::FailedPrecondition
    );
    let entries = remote.watch_entries().await;
    assert_eq!(entries[0].outcome, "FAILED_PRECONDITION", "{entries:#?}");

    pair.finish().await;
}
