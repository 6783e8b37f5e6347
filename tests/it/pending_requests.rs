//! Keys before names, and a queue of requests that one source cannot fill
//! (issue 20): a new key claiming an instance id this daemon knows by another
//! key is marked and accepted only on an explicit flag, with the fingerprint
//! in front of the operator; and each source has its own share of the queue.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::federation::envelope;
use mosaic_mesh::identity::PublicKey;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::tls::ServerPin;
use tonic::Code;

use crate::peer_cli::{json_of, mosaicd, mosaicd_text};
use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::daemon::{TestDaemon, TestEnvironment, spki_of_pem, with_key};
use crate::support::peer::TestPeer;

/// `peer`'s request to `daemon` in `workspace`, claiming `instance_id` (its
/// own when `None`) and the name `name`.
async fn ask(
    daemon: &TestDaemon,
    peer: &TestPeer,
    workspace: &str,
    claimed: Option<(&str, &str)>,
) -> Result<(), tonic::Status> {
    ask_from(daemon, peer, workspace, claimed, None).await
}

/// `ask`, over a connection from the local address `from` (loopback has
/// all of 127.0.0.0/8, so a test can come from several sources); from the
/// default local address when `None`.
async fn ask_from(
    daemon: &TestDaemon,
    peer: &TestPeer,
    workspace: &str,
    claimed: Option<(&str, &str)>,
    from: Option<Ipv4Addr>,
) -> Result<(), tonic::Status> {
    let recipient = Admin::of(daemon).await.instance().await.instance_id;
    let mut request = peer.connection_request(&recipient, workspace);
    if let Some((instance_id, name)) = claimed {
        request.header.as_mut().expect("header").sender_instance_id = instance_id.to_owned();
        let sender = request.sender.as_mut().expect("sender");
        sender.instance_id = instance_id.to_owned();
        sender.name = name.to_owned();
    }
    let sealed = envelope::seal(&request, peer.current().as_ref()).expect("seal");
    let channel = match from {
        None => peer.channel_to(daemon).await,
        Some(local) => channel_from(peer, daemon, local).await,
    };
    FederationClient::new(channel)
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(sealed),
        })
        .await
        .map(|_| ())
}

/// A mutual-TLS channel from `peer` to `daemon` whose TCP connection is made
/// from the local address `local` (as `TestPeer::channel_to` otherwise).
async fn channel_from(
    peer: &TestPeer,
    daemon: &TestDaemon,
    local: Ipv4Addr,
) -> tonic::transport::Channel {
    let key = PublicKey::from_spki_der(&spki_of_pem(&daemon.certificate_pem())).expect("key");
    let tls = Arc::new(
        mosaic_mesh::tls::mutual_client_config(
            ServerPin::PublicKey(key),
            Arc::clone(&peer.identity),
        )
        .expect("client tls"),
    );
    let target: SocketAddr = daemon
        .url()
        .trim_start_matches("https://")
        .parse()
        .expect("the daemon listens on an address");
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = Arc::clone(&tls);
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(IpAddr::V4(local), 0))?;
            let tcp = socket.connect(target).await?;
            let name = rustls_pki_types::ServerName::IpAddress(target.ip().into());
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("connect from a second loopback address")
}

fn in_workspace(connections: &[pb::Connection], workspace: &str) -> pb::Connection {
    connections
        .iter()
        .find(|connection| connection.workspace == workspace)
        .unwrap_or_else(|| panic!("no connection in {workspace}: {connections:?}"))
        .clone()
}

async fn accept(
    admin: &Admin,
    connection_id: &str,
    new_key: bool,
) -> Result<pb::Connection, tonic::Status> {
    admin
        .client
        .clone()
        .accept_connection(with_key(
            pb::AcceptConnectionRequest {
                connection_id: connection_id.to_owned(),
                granted_capabilities: Vec::new(),
                accept_new_key_for_known_instance: new_key,
            },
            &admin.key,
        ))
        .await
        .map(|response| response.into_inner().connection.expect("connection"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_key_claiming_a_known_instance_id_is_marked_and_accepted_only_with_the_flag() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let alpha = TestPeer::new("alpha").await;
    let alpha_id = alpha.current().instance_id.clone();
    let alpha_fingerprint = alpha.current().public_key().fingerprint();
    ask(&daemon, &alpha, "ws-1", None)
        .await
        .expect("alpha asks");
    let real = in_workspace(&admin.list().await, "ws-1");
    assert!(real.state_reason.is_empty(), "{real:?}");
    accept(&admin, &real.connection_id, false)
        .await
        .expect("the first key of an instance needs no flag");

    // Another key, alpha's id and name, in another workspace.
    let mallory = TestPeer::new("mallory").await;
    let mallory_fingerprint = mallory.current().public_key().fingerprint();
    ask(&daemon, &mallory, "ws-2", Some((&alpha_id, "alpha")))
        .await
        .expect("stored, for the operator to see");
    let claimed = in_workspace(&admin.list().await, "ws-2");
    assert_eq!(claimed.state(), pb::ConnectionState::Pending);
    assert_eq!(claimed.remote_fingerprint, mallory_fingerprint);
    for expected in [
        "already bound to a different key",
        alpha_id.as_str(),
        alpha_fingerprint.as_str(),
        mallory_fingerprint.as_str(),
    ] {
        assert!(
            claimed.state_reason.contains(expected),
            "{expected:?} missing: {claimed:?}"
        );
    }
    let status = accept(&admin, &claimed.connection_id, false)
        .await
        .expect_err("a new key for a known instance id needs the flag");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("accept_new_key_for_known_instance"),
        "{status:?}"
    );
    let still = admin
        .get(&claimed.connection_id)
        .await
        .connection
        .expect("connection");
    assert_eq!(still.state(), pb::ConnectionState::Pending, "{still:?}");

    // The operator checked the fingerprint: the flag accepts it, and the
    // history says so.
    let accepted = accept(&admin, &claimed.connection_id, true)
        .await
        .expect("accepted with the flag");
    assert_eq!(accepted.state(), pb::ConnectionState::Active);
    assert!(
        accepted.state_reason.contains("accepted a new key"),
        "{accepted:?}"
    );
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_for_a_disconnected_peers_id_is_marked_too() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let alpha = TestPeer::new("alpha").await;
    let alpha_id = alpha.current().instance_id.clone();
    ask(&daemon, &alpha, "ws", None).await.expect("alpha asks");
    let real = in_workspace(&admin.list().await, "ws");
    accept(&admin, &real.connection_id, false)
        .await
        .expect("accept");
    admin
        .disconnect(&real.connection_id)
        .await
        .expect("disconnect");

    // Same workspace, same id, after the real peer left: still its id.
    let mallory = TestPeer::new("mallory").await;
    ask(&daemon, &mallory, "ws", Some((&alpha_id, "alpha")))
        .await
        .expect("stored");
    let claimed = admin
        .list()
        .await
        .into_iter()
        .find(|connection| connection.state() == pb::ConnectionState::Pending)
        .expect("the new request");
    assert!(
        claimed
            .state_reason
            .contains("already bound to a different key"),
        "{claimed:?}"
    );
    let status = accept(&admin, &claimed.connection_id, false)
        .await
        .expect_err("refused without the flag");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_shows_the_fingerprint_and_the_warning_and_accepts_only_with_new_key() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let key = daemon.api_key(&[Scope::Admin]).await;
    let alpha = TestPeer::new("alpha").await;
    let alpha_id = alpha.current().instance_id.clone();
    let alpha_fingerprint = alpha.current().public_key().fingerprint();
    ask(&daemon, &alpha, "ws-1", None)
        .await
        .expect("alpha asks");
    let real = in_workspace(&admin.list().await, "ws-1");

    // `peer accept` prints the fingerprint it accepted.
    let accepted = mosaicd_text(&daemon, &key, &["peer", "accept", &real.connection_id]).await;
    assert!(accepted.status.success(), "{accepted:?}");
    let accepted = String::from_utf8_lossy(&accepted.stdout);
    assert!(accepted.contains(&alpha_fingerprint), "{accepted}");

    let mallory = TestPeer::new("mallory").await;
    let mallory_fingerprint = mallory.current().public_key().fingerprint();
    ask(&daemon, &mallory, "ws-2", Some((&alpha_id, "alpha")))
        .await
        .expect("stored");
    let claimed = in_workspace(&admin.list().await, "ws-2");

    // `peer list`: both rows show their fingerprint, and the claim a warning.
    let listed = mosaicd_text(&daemon, &key, &["peer", "list"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let claim_row = listed
        .lines()
        .position(|line| line.starts_with(&claimed.connection_id))
        .expect("the claim's row");
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[claim_row].ends_with(&mallory_fingerprint), "{listed}");
    assert!(
        lines
            .get(claim_row + 1)
            .is_some_and(|warning| warning.starts_with("  ! WARNING")
                && warning.contains("already bound to a different key")),
        "{listed}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with(&real.connection_id) && line.ends_with(&alpha_fingerprint)),
        "{listed}"
    );
    // `peer show`.
    let shown = mosaicd_text(&daemon, &key, &["peer", "show", &claimed.connection_id]).await;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains(&format!("fingerprint:  {mallory_fingerprint}")),
        "{shown}"
    );
    assert!(
        shown.contains("already bound to a different key"),
        "{shown}"
    );

    // `peer accept` without --new-key: refused (4), with the reason.
    let refused = mosaicd(&daemon, &key, &["peer", "accept", &claimed.connection_id]).await;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--new-key"),
        "{refused:?}"
    );
    let accepted = json_of(
        &mosaicd(
            &daemon,
            &key,
            &["peer", "accept", &claimed.connection_id, "--new-key"],
        )
        .await,
    );
    assert_eq!(accepted["state"], "ACTIVE", "{accepted}");
    assert_eq!(accepted["remote_fingerprint"], mallory_fingerprint.as_str());
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_source_at_its_quota_is_refused_while_a_newcomer_from_elsewhere_still_gets_pending() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| {
            config.federation.max_pending_inbound = 100;
            config.federation.max_pending_inbound_per_source = 2;
        })
        .await;
    let admin = Admin::of(&daemon).await;
    // Fresh keys, all from 127.0.0.1: two wait, the third is this source's
    // one too many.
    for workspace in ["ws-1", "ws-2"] {
        let stranger = TestPeer::new("stranger").await;
        ask(&daemon, &stranger, workspace, None)
            .await
            .expect("within the source's quota");
    }
    let third = TestPeer::new("stranger").await;
    let status = ask(&daemon, &third, "ws-3", None)
        .await
        .expect_err("the source is at its quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("this source's quota")
            && status.message().contains("ip:127.0.0.1"),
        "{status:?}"
    );

    // A newcomer from another address still gets PENDING.
    let newcomer = TestPeer::new("newcomer").await;
    ask_from(
        &daemon,
        &newcomer,
        "ws-3",
        None,
        Some(Ipv4Addr::new(127, 0, 0, 2)),
    )
    .await
    .expect("a newcomer from another source still asks");
    let listed = admin.list().await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|connection| connection.state() == pb::ConnectionState::Pending),
        "{listed:?}"
    );

    // Once one of the first source's requests is answered, it may ask again.
    let answered = in_workspace(&listed, "ws-1");
    admin.reject(&answered.connection_id).await.expect("reject");
    ask(&daemon, &third, "ws-3", None)
        .await
        .expect("the source has room again");
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_key_at_its_quota_is_refused_from_any_address() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment
        .start_peer(0, |config| {
            config.federation.max_pending_inbound_per_source = 2;
        })
        .await;
    // One key, many instance ids and workspaces, from three addresses.
    let mallory = TestPeer::new("mallory").await;
    for (index, last_octet) in [3, 4].into_iter().enumerate() {
        let claimed = format!("claimed-{index}");
        ask_from(
            &daemon,
            &mallory,
            &format!("ws-{index}"),
            Some((&claimed, "mallory")),
            Some(Ipv4Addr::new(127, 0, 0, last_octet)),
        )
        .await
        .expect("within the key's quota");
    }
    let status = ask_from(
        &daemon,
        &mallory,
        "ws-9",
        Some(("claimed-9", "mallory")),
        Some(Ipv4Addr::new(127, 0, 0, 5)),
    )
    .await
    .expect_err("the key is at its quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("this key's quota"), "{status:?}");
    assert_eq!(Admin::of(&daemon).await.list().await.len(), 2);
    daemon.stop().await;
    environment.cleanup().await;
}
