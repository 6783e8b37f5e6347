//! What a stranger can put in front of an operator (DESIGN.md section 4):
//! a peer's name, a workspace and a kill reason with escape sequences or
//! line breaks are refused where they enter, the CLI escapes what it prints
//! of an agent's output, a request claiming the daemon's own id is refused,
//! and an unanswered request expires instead of holding its place in the
//! queue forever.

use mosaic_mesh::auth::Scope;
use mosaic_mesh::federation::envelope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::agents::{Agents, with_agent_types};
use crate::support::daemon::{TestEnvironment, mosaicd_binary};
use crate::support::peer::TestPeer;

#[tokio::test(flavor = "multi_thread")]
async fn a_strangers_name_or_workspace_with_control_characters_is_refused_and_nothing_stored() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let instance = admin.instance().await;
    let mallory = TestPeer::new("mallory").await;
    let mut client = FederationClient::new(mallory.channel_to(&daemon).await);
    let identity = mallory.current();

    let mut named = mallory.connection_request(&instance.instance_id, "ws");
    named.sender.as_mut().expect("sender").name = "alpha\u{1b}[2J\u{1b}[Hbravo".to_owned();
    let mut reordered = mallory.connection_request(&instance.instance_id, "ws");
    reordered.sender.as_mut().expect("sender").name = "invoice\u{202e}fdp.exe".to_owned();
    let forged_rows = mallory.connection_request(&instance.instance_id, "ws\r\nACTIVE  trusted");
    for (what, request) in [
        ("an escape sequence in the name", named),
        ("a bidirectional override in the name", reordered),
        ("a line break in the workspace", forged_rows),
    ] {
        let sealed = envelope::seal(&request, identity.as_ref()).expect("seal");
        let status = client
            .request_connection(pb::RequestConnectionRequest {
                envelope: Some(sealed),
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    assert!(
        admin.list().await.is_empty(),
        "a refused request was stored"
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_reason_with_control_characters_is_refused_and_the_agent_runs_on() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| *config = with_agent_types(config.clone()))
        .await;
    let mut agents = Agents::new(
        daemon.channel().await,
        daemon.api_key(&[Scope::Agents]).await,
    );
    let agent = agents.spawn("sh", "sleep 600").await.expect("spawn");
    agents
        .wait_for_state(&agent.agent_id, agent_pb::AgentState::Running)
        .await;
    let status = agents
        .kill(&agent.agent_id, "done\r\nKILLED by the operator")
        .await
        .expect_err("a reason with a line break");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let still = agents.get(&agent.agent_id).await.expect("get");
    assert_eq!(still.state, agent_pb::AgentState::Running as i32);
    agents
        .kill(&agent.agent_id, "the test is over")
        .await
        .expect("kill");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_escapes_an_agents_escape_sequences() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| *config = with_agent_types(config.clone()))
        .await;
    let key = daemon.api_key(&[Scope::Agents]).await;
    let mut agents = Agents::new(daemon.channel().await, key.clone());
    let agent = agents
        .spawn("sh", r"printf 'plain\n\033[2J\033[Hred\rover\n'")
        .await
        .expect("spawn");
    agents
        .wait_for_state(&agent.agent_id, agent_pb::AgentState::Completed)
        .await;

    let output = tokio::process::Command::new(mosaicd_binary())
        .arg("--data-dir")
        .arg(&daemon.data_dir)
        .arg("--server")
        .arg(daemon.url())
        .arg("--api-key")
        .arg(&key)
        .args(["agent", "status", &agent.agent_id])
        .env("MOSAIC_LOG", "warn")
        .env_remove("MOSAIC_API_KEY")
        .output()
        .await
        .expect("run mosaicd agent status");
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        !shown.contains(['\u{1b}', '\r']),
        "raw control characters reached the terminal: {shown:?}"
    );
    assert!(shown.contains("plain"), "{shown}");
    assert!(shown.contains(r"\u{1b}[2J\u{1b}[Hred\rover"), "{shown}");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_claiming_the_daemons_own_id_is_refused() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let instance = admin.instance().await;
    let mallory = TestPeer::new("mallory").await;
    let mut client = FederationClient::new(mallory.channel_to(&daemon).await);

    let mut request = mallory.connection_request(&instance.instance_id, "ws");
    request.sender.as_mut().expect("sender").instance_id = instance.instance_id.clone();
    request.header.as_mut().expect("header").sender_instance_id = instance.instance_id.clone();
    let sealed = envelope::seal(&request, mallory.current().as_ref()).expect("seal");
    let status = client
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(sealed),
        })
        .await
        .expect_err("a request claiming the daemon's own id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(admin.list().await.is_empty(), "the request was stored");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_request_expires_and_frees_its_place_in_the_queue() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| {
            config.federation.ping_interval = std::time::Duration::from_millis(300);
            config.federation.pending_request_ttl = std::time::Duration::from_secs(1);
            config.federation.max_pending_inbound = 1;
        })
        .await;
    let admin = Admin::of(&daemon).await;
    let instance = admin.instance().await;
    let ask = |peer: &TestPeer| {
        let sealed = envelope::seal(
            &peer.connection_request(&instance.instance_id, "ws"),
            peer.current().as_ref(),
        )
        .expect("seal");
        pb::RequestConnectionRequest {
            envelope: Some(sealed),
        }
    };
    let first = TestPeer::new("first").await;
    FederationClient::new(first.channel_to(&daemon).await)
        .request_connection(ask(&first))
        .await
        .expect("the first request waits");
    // The queue (of one) is full...
    let second = TestPeer::new("second").await;
    let mut second_client = FederationClient::new(second.channel_to(&daemon).await);
    let status = second_client
        .request_connection(ask(&second))
        .await
        .expect_err("the queue is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // ...until the first request expires unanswered.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let expired = loop {
        let listed = admin.list().await;
        if let Some(rejected) = listed
            .iter()
            .find(|connection| connection.state() == pb::ConnectionState::Rejected)
        {
            break rejected.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never expired: {listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(expired.state_reason.starts_with("expired"), "{expired:?}");
    second_client
        .request_connection(ask(&second))
        .await
        .expect("a newcomer gets a place once the old request expired");
    daemon.stop().await;
    environment.cleanup().await;
}
