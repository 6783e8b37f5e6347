//! What a stranger can put in front of an operator (DESIGN.md section 4):
//! a peer's name, a workspace and a kill reason with escape sequences or
//! line breaks are refused where they enter, the CLI escapes what it prints
//! of an agent's output, a request claiming the daemon's own id is refused,
//! and an unanswered request expires instead of holding its place in the
//! queue forever. Every identifier that enters (a header's ids and
//! workspace, capability names, an operator's workspace, an agent type, a
//! label) follows the one identifier rule, and a bad one is refused by name
//! with nothing stored.

use mosaic_mesh::federation::envelope;
use mosaic_mesh::proto::agent as agent_pb;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::agents::start_agents;
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
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
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
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
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
        .arg(&agents.key)
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

/// The bad values every identifier field is tried with: control characters,
/// an invisible reordering character, and characters outside the rule.
const BAD_IDENTIFIERS: [&str; 4] = ["ws\u{1b}[2J", "ws\u{202e}", "two words", "a/b"];

#[tokio::test(flavor = "multi_thread")]
async fn every_id_of_a_requests_header_and_its_capabilities_are_identifiers_refused_by_name() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let instance = admin.instance().await;
    let mallory = TestPeer::new("mallory").await;
    let mut client = FederationClient::new(mallory.channel_to(&daemon).await);
    let identity = mallory.current();

    type Spoil = fn(&mut pb::ConnectionRequestPayload, &str);
    let fields: [(&str, Spoil); 8] = [
        ("header.message_id", |request, bad| {
            request.header.as_mut().expect("header").message_id = bad.to_owned();
        }),
        ("header.sender_instance_id", |request, bad| {
            request.header.as_mut().expect("header").sender_instance_id = bad.to_owned();
            request.sender.as_mut().expect("sender").instance_id = bad.to_owned();
        }),
        ("header.recipient_instance_id", |request, bad| {
            request
                .header
                .as_mut()
                .expect("header")
                .recipient_instance_id = bad.to_owned();
        }),
        ("header.workspace", |request, bad| {
            request.header.as_mut().expect("header").workspace = bad.to_owned();
        }),
        ("header.key_id", |request, bad| {
            request.header.as_mut().expect("header").key_id = bad.to_owned();
        }),
        ("requested_capabilities", |request, bad| {
            request.requested_capabilities = vec![bad.to_owned()];
        }),
        ("offered_capabilities", |request, bad| {
            request.offered_capabilities = vec![bad.to_owned()];
        }),
        ("sender.capabilities", |request, bad| {
            request.sender.as_mut().expect("sender").capabilities = vec![bad.to_owned()];
        }),
    ];
    for (field, spoil) in fields {
        for bad in BAD_IDENTIFIERS {
            let mut request = mallory.connection_request(&instance.instance_id, "ws");
            spoil(&mut request, bad);
            let mut sealed = envelope::seal(&request, identity.as_ref()).expect("seal");
            // The envelope names the header's key id, so that only the
            // header's own check can refuse it.
            sealed.key_id = request.header.as_ref().expect("header").key_id.clone();
            let status = client
                .request_connection(pb::RequestConnectionRequest {
                    envelope: Some(sealed),
                })
                .await
                .expect_err(field);
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{field} = {bad:?}: {status:?}"
            );
            assert!(
                status.message().contains(field),
                "{field} = {bad:?}: the refusal does not name the field: {status:?}"
            );
        }
    }
    assert!(
        admin.list().await.is_empty(),
        "a refused request was stored"
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_workspace_and_reason_are_checked_where_they_enter() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let instance = admin.instance().await;
    for bad in BAD_IDENTIFIERS {
        // Refused before any contact: nothing listens on port 1.
        let status = admin
            .connect("https://127.0.0.1:1", bad, "", &[])
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(status.message().contains("workspace"), "{status:?}");
    }

    let mallory = TestPeer::new("mallory").await;
    let sealed = envelope::seal(
        &mallory.connection_request(&instance.instance_id, "ws"),
        mallory.current().as_ref(),
    )
    .expect("seal");
    FederationClient::new(mallory.channel_to(&daemon).await)
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(sealed),
        })
        .await
        .expect("a well-formed request waits");
    let pending = admin.list().await.pop().expect("the request");
    // The reason travels to the peer in a notice and is shown in its list.
    let status = admin
        .client
        .clone()
        .reject_connection(crate::support::daemon::with_key(
            pb::RejectConnectionRequest {
                connection_id: pending.connection_id.clone(),
                reason: "no\r\nACTIVE  trusted".to_owned(),
            },
            &admin.key,
        ))
        .await
        .expect_err("a reason with a line break");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("reason"), "{status:?}");
    let still = admin.get(&pending.connection_id).await;
    let still = still.connection.expect("connection");
    assert_eq!(still.state(), pb::ConnectionState::Pending, "{still:?}");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_type_and_labels_are_checked_where_they_enter() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let (daemon, mut agents) = start_agents(&environment, |_| {}).await;
    let labelled = |key: &str, value: &str| agent_pb::SpawnRequest {
        agent_type: "sh".to_owned(),
        prompt: "true".to_owned(),
        labels: [(key.to_owned(), value.to_owned())].into_iter().collect(),
        ..agent_pb::SpawnRequest::default()
    };
    let mut cases = Vec::new();
    for bad in BAD_IDENTIFIERS.into_iter().filter(|bad| *bad != "a/b") {
        cases.push((
            "agent_type",
            agent_pb::SpawnRequest {
                agent_type: bad.to_owned(),
                prompt: "true".to_owned(),
                ..agent_pb::SpawnRequest::default()
            },
        ));
        cases.push(("label keys", labelled(bad, "v")));
    }
    for bad in ["line\nbreak", "esc\u{1b}[2J", "invoice\u{202e}fdp.exe"] {
        cases.push(("the value of label", labelled("team", bad)));
    }
    for (field, request) in cases {
        let status = agents
            .spawn_request(request.clone())
            .await
            .expect_err(field);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{request:?}: the refusal does not name the field: {status:?}"
        );
    }
    let listed = agents
        .list(agent_pb::ListAgentsRequest::default())
        .await
        .expect("list");
    assert!(
        listed.agents.is_empty(),
        "a refused spawn left an agent: {listed:?}"
    );
    daemon.stop().await;
    environment.cleanup().await;
}
