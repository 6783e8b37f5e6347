//! The Python conformance peer (`examples/python/conformance_peer.py`), a
//! third-party peer built from the protos and `docs/PROTOCOL.md` alone, against
//! a real daemon: it learns the daemon's identity through the protocol, serves
//! NotifyConnection and Ping, asks to connect, is accepted here through the
//! admin API, sends signed `agent.spawn`, `agent.status` and `agent.kill`
//! (and retries), and verifies every signed reply. The daemon's own records
//! then have to agree: the connection, the command log and the agent.

use std::process::Stdio;
use std::time::Duration;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::support::admin::{Admin, PATIENCE};
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestEnvironment, with_key};
use crate::support::{Backend, python};

/// The workspace the peer connects in.
const WORKSPACE: &str = "python-conformance";
/// What the peer asks for and is granted.
const CAPABILITIES: [&str; 3] = ["agent.spawn", "agent.status", "agent.kill"];
/// How long the whole run of the peer may take (stubs, handshake, commands).
const PEER_DEADLINE: Duration = Duration::from_secs(120);

/// The summary the peer prints as the last line of stdout.
#[derive(Debug, Deserialize)]
struct Summary {
    instance_id: String,
    fingerprint: String,
    url: String,
    daemon_instance_id: String,
    daemon_key_id: String,
    connection_state: String,
    granted: Vec<String>,
    notices: Vec<String>,
    pings_answered: u32,
    replies_verified: u32,
    tampered_refused: u32,
    commands: Commands,
}

/// The message ids of the commands the peer sent, and the agent they ran.
#[derive(Debug, Deserialize)]
struct Commands {
    spawn: String,
    reused_with_other_bytes: String,
    status: String,
    kill: String,
    status_after_kill: Vec<String>,
    agent_id: String,
    agent_state: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_conformance_peer_is_accepted_and_its_signed_commands_run_end_to_end() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| *config = with_agent_types(config.clone()))
        .await;
    let admin = Admin::of(&daemon).await;
    let identity = admin.instance().await;

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/python/conformance_peer.py");
    // Only the daemon's URL: the peer learns its identity through the protocol.
    let mut peer = tokio::process::Command::new(python::python_with_grpcio())
        .arg(&script)
        .arg(daemon.url())
        .args(["--workspace", WORKSPACE, "--agent-type", "sh"])
        .args(["--prompt", "sleep 60", "--listen-host", "127.0.0.1"])
        .args(["--accept-timeout", "60", "--ping-timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the python conformance peer");
    let mut stdout = peer.stdout.take().expect("stdout");
    let mut stderr = peer.stderr.take().expect("stderr");
    let read_stdout = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let read_stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    // The operator accepts the request once it is stored PENDING.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let pending = loop {
        let found = admin.list().await.into_iter().find(|connection| {
            connection.workspace == WORKSPACE
                && connection.direction() == pb::ConnectionDirection::Inbound
                && connection.state() == pb::ConnectionState::Pending
        });
        if let Some(connection) = found {
            break connection;
        }
        if let Ok(Some(status)) = peer.try_wait() {
            panic!(
                "the peer exited ({status}) before its request was stored: {}",
                read_stderr.await.expect("stderr")
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PENDING request from the python peer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(pending.remote_name, "python-conformance-peer");
    assert_eq!(pending.requested_capabilities, CAPABILITIES);
    admin
        .accept(&pending.connection_id, &CAPABILITIES)
        .await
        .expect("accept the python peer");

    let status = tokio::time::timeout(PEER_DEADLINE, peer.wait())
        .await
        .expect("the python peer finishes")
        .expect("wait for the python peer");
    let stdout = read_stdout.await.expect("stdout");
    let stderr = read_stderr.await.expect("stderr");
    assert!(
        status.success(),
        "the python peer failed ({status}): {stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let summary: Summary = serde_json::from_str(last)
        .unwrap_or_else(|error| panic!("summary {last:?}: {error}; stderr: {stderr}"));

    // The peer saw this daemon, by the key it serves, and was accepted.
    assert_eq!(summary.daemon_instance_id, identity.instance_id);
    assert_eq!(summary.daemon_key_id, identity.key_id);
    assert_eq!(summary.instance_id, pending.remote_instance_id);
    assert_eq!(summary.fingerprint, pending.remote_fingerprint);
    assert_eq!(summary.url, pending.remote_url);
    assert_eq!(summary.connection_state, "CONNECTION_STATE_ACTIVE");
    assert_eq!(summary.granted, CAPABILITIES);
    assert_eq!(summary.notices, ["NOTICE_KIND_ACCEPTED"]);
    assert!(summary.pings_answered >= 1, "{summary:?}");
    // A connection reply, four spawn results (the first, two retries),
    // status, kill and at least one status after it: each signature verified,
    // and each check's control (a flipped payload bit, a flipped signature
    // bit) refused, for the notice and pings too.
    assert!(summary.replies_verified >= 7, "{summary:?}");
    let signatures_checked =
        summary.replies_verified + summary.pings_answered + summary.notices.len() as u32;
    assert!(
        summary.tampered_refused >= 2 * signatures_checked,
        "{summary:?}"
    );

    // The daemon believed the peer's ack and its ping replies.
    let connection = admin
        .get(&pending.connection_id)
        .await
        .connection
        .expect("connection");
    assert_eq!(connection.state(), pb::ConnectionState::Active);
    assert_eq!(connection.pending_notices, 0, "{connection:?}");
    assert_eq!(connection.granted_capabilities, CAPABILITIES);

    // The command log: every command from the peer's instance id, as sent.
    let log = admin
        .client
        .clone()
        .list_command_log(with_key(
            pb::ListCommandLogRequest {
                peer_instance_id: summary.instance_id.clone(),
                direction: pb::CommandDirection::Inbound.into(),
                page_size: 100,
                ..pb::ListCommandLogRequest::default()
            },
            &admin.key,
        ))
        .await
        .expect("ListCommandLog")
        .into_inner()
        .entries;
    for entry in &log {
        assert_eq!(entry.sender_instance_id, summary.instance_id);
        assert_eq!(entry.recipient_instance_id, identity.instance_id);
        assert_eq!(entry.workspace, WORKSPACE);
    }
    let outcomes = |message_id: &str| -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = log
            .iter()
            .filter(|entry| entry.message_id == message_id)
            .map(|entry| (entry.command_type.clone(), entry.outcome.clone()))
            .collect();
        found.sort();
        found
    };
    let entry = |command: &str, outcome: &str| (command.to_owned(), outcome.to_owned());
    // The spawn ran once, its two retries got the stored result, and other
    // bytes under its id were refused.
    assert_eq!(
        summary.commands.reused_with_other_bytes,
        summary.commands.spawn
    );
    assert_eq!(
        outcomes(&summary.commands.spawn),
        [
            entry("agent.spawn", "ALREADY_EXISTS"),
            entry("agent.spawn", "ok"),
            entry("agent.spawn", "ok"),
            entry("agent.spawn", "ok"),
        ],
        "{log:#?}"
    );
    assert_eq!(
        outcomes(&summary.commands.status),
        [entry("agent.status", "ok")]
    );
    assert_eq!(
        outcomes(&summary.commands.kill),
        [entry("agent.kill", "ok")]
    );
    assert!(!summary.commands.status_after_kill.is_empty());
    for read in &summary.commands.status_after_kill {
        assert_eq!(outcomes(read), [entry("agent.status", "ok")]);
    }
    assert_eq!(
        log.len(),
        6 + summary.commands.status_after_kill.len(),
        "{log:#?}"
    );

    // One agent, the peer's, killed.
    let mut agents = Agents::new(
        daemon.channel().await,
        daemon.api_key(&[Scope::Agents]).await,
    );
    let agent = agents
        .get(&summary.commands.agent_id)
        .await
        .expect("the peer's agent");
    assert_eq!(agent.state(), agent_pb::AgentState::Killed);
    assert_eq!(summary.commands.agent_state, "AGENT_STATE_KILLED");
    let origin = agent.origin.expect("origin");
    assert_eq!(origin.kind(), agent_pb::AgentOriginKind::Peer);
    assert_eq!(origin.instance_id, summary.instance_id);
    assert_eq!(origin.workspace, WORKSPACE);
    let all = agents
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list agents")
        .agents;
    assert_eq!(all.len(), 1, "a retried spawn never starts a second agent");

    daemon.stop().await;
    environment.cleanup().await;
}
