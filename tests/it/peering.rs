//! Peering between real daemons on loopback over real mutual TLS: the handshake,
//! operator changes seen on both sides, refused envelopes that change nothing,
//! notices retried until a peer comes back, restarts, and key rotation.

use std::time::Duration;

use mosaic_mesh::clock::{now_ms, timestamp_from_ms};
use mosaic_mesh::federation::envelope::{self, TrustedKey};
use mosaic_mesh::identity::PublicKey;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, with_key};
use crate::support::peer::TestPeer;

use crate::support::admin::{Admin, PATIENCE, connect_and_accept};

on_both_backends!(
    handshake_suspend_resume_disconnect_and_reject,
    a_wrong_fingerprint_or_bad_input_stores_nothing,
    forged_stale_misaddressed_and_replayed_requests_are_refused,
    a_notice_to_a_peer_that_is_down_is_delivered_when_it_returns,
    three_daemons_keep_their_connections_across_restarts,
    key_rotation_keeps_connections_working_and_the_old_key_expires,
    the_same_connection_requested_twice_makes_one_row,
    an_allow_listed_fingerprint_is_accepted_at_once_and_pending_requests_are_capped,
);

fn code(outcome: Result<pb::Connection, tonic::Status>) -> Code {
    match outcome {
        Ok(connection) => panic!("expected a refusal, got {connection:?}"),
        Err(status) => status.code(),
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|item| (*item).to_owned()).collect()
}

async fn handshake_suspend_resume_disconnect_and_reject(backend: Backend) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let (instance_a, instance_b) = (admin_a.instance().await, admin_b.instance().await);

    // 1. A asks B, checking B's fingerprint; both sides store PENDING.
    let outbound = admin_a
        .connect(&b.url(), "ws-1", &instance_b.fingerprint, &["agent.status"])
        .await
        .expect("connect");
    assert_eq!(outbound.state(), pb::ConnectionState::Pending);
    assert_eq!(outbound.direction(), pb::ConnectionDirection::Outbound);
    assert_eq!(outbound.remote_instance_id, instance_b.instance_id);
    assert_eq!(outbound.remote_fingerprint, instance_b.fingerprint);
    let inbound = admin_b.open_in("ws-1").await;
    assert_eq!(inbound.state(), pb::ConnectionState::Pending);
    assert_eq!(inbound.direction(), pb::ConnectionDirection::Inbound);
    assert_eq!(inbound.remote_instance_id, instance_a.instance_id);
    assert_eq!(inbound.remote_public_key, instance_a.public_key);
    assert_eq!(
        inbound.capabilities_granted_to_us,
        strings(&["agent.status"])
    );
    assert_eq!(inbound.requested_capabilities, instance_b.capabilities);

    // 2. B accepts with grants; A learns it by a signed notice.
    let grants = ["agent.spawn", "agent.status"];
    let accepted = admin_b
        .accept(&inbound.connection_id, &grants)
        .await
        .expect("accept");
    assert_eq!(accepted.state(), pb::ConnectionState::Active);
    assert_eq!(accepted.granted_capabilities, strings(&grants));
    let active = admin_a
        .wait_for_state(&outbound.connection_id, pb::ConnectionState::Active)
        .await;
    assert_eq!(active.capabilities_granted_to_us, strings(&grants));
    let history = admin_a.get(&outbound.connection_id).await.events;
    let steps: Vec<(pb::ConnectionState, &str)> = history
        .iter()
        .map(|event| (event.to_state(), event.actor.as_str()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (pb::ConnectionState::Pending, "local"),
            (pb::ConnectionState::Active, "peer")
        ]
    );
    // Accepting twice is refused.
    assert_eq!(
        code(admin_b.accept(&inbound.connection_id, &[]).await),
        Code::FailedPrecondition
    );

    // Liveness: A's pings reach B and are recorded on both sides.
    let before = now_ms();
    admin_a
        .wait_for(&outbound.connection_id, "a recent ping", |connection| {
            connection.reachable
                && connection
                    .last_contact_at
                    .as_ref()
                    .is_some_and(|at| mosaic_mesh::clock::ms_from_timestamp(at) > before)
        })
        .await;

    // 3. A suspends; B sees it; only A may resume.
    let suspended = admin_a
        .suspend(&outbound.connection_id)
        .await
        .expect("suspend");
    assert_eq!(suspended.state(), pb::ConnectionState::Suspended);
    assert_eq!(suspended.pending_notices, 0, "delivered at once");
    let seen_by_b = admin_b
        .wait_for_state(&inbound.connection_id, pb::ConnectionState::Suspended)
        .await;
    assert_eq!(seen_by_b.state_reason, "maintenance");
    assert_eq!(
        code(admin_b.resume(&inbound.connection_id).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(admin_b.suspend(&inbound.connection_id).await),
        Code::FailedPrecondition
    );
    admin_a
        .resume(&outbound.connection_id)
        .await
        .expect("resume");
    admin_b
        .wait_for_state(&inbound.connection_id, pb::ConnectionState::Active)
        .await;

    // 4. B disconnects: final on both sides.
    admin_b
        .disconnect(&inbound.connection_id)
        .await
        .expect("disconnect");
    admin_a
        .wait_for_state(&outbound.connection_id, pb::ConnectionState::Disconnected)
        .await;
    assert_eq!(
        code(admin_a.disconnect(&outbound.connection_id).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(admin_a.resume(&outbound.connection_id).await),
        Code::FailedPrecondition
    );

    // Connecting again makes new rows that need a new accept; this time B rejects.
    let again = admin_a
        .connect(&b.url(), "ws-1", "", &[])
        .await
        .expect("connect again");
    assert_ne!(again.connection_id, outbound.connection_id);
    assert_eq!(again.state(), pb::ConnectionState::Pending);
    let inbound_again = admin_b.open_in("ws-1").await;
    assert_ne!(inbound_again.connection_id, inbound.connection_id);
    assert_eq!(inbound_again.state(), pb::ConnectionState::Pending);
    let rejected = admin_b
        .reject(&inbound_again.connection_id)
        .await
        .expect("reject");
    assert_eq!(rejected.state(), pb::ConnectionState::Rejected);
    let seen_by_a = admin_a
        .wait_for_state(&again.connection_id, pb::ConnectionState::Rejected)
        .await;
    assert_eq!(seen_by_a.state_reason, "not today");
    assert_eq!(admin_a.list().await.len(), 2);
    assert_eq!(admin_b.list().await.len(), 2);

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

async fn a_wrong_fingerprint_or_bad_input_stores_nothing(backend: Backend) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let instance_a = admin_a.instance().await;

    // A's own fingerprint is a well-formed but wrong one for B.
    let status = admin_a
        .connect(&b.url(), "ws", &instance_a.fingerprint, &[])
        .await
        .expect_err("wrong fingerprint");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("fingerprint"), "{status:?}");

    for (url, workspace, fingerprint, grants, expected) in [
        (b.url(), "", "", vec![], Code::InvalidArgument),
        (
            "http://127.0.0.1:1".to_owned(),
            "ws",
            "",
            vec![],
            Code::InvalidArgument,
        ),
        (
            b.url(),
            "ws",
            "not-a-fingerprint",
            vec![],
            Code::InvalidArgument,
        ),
        (b.url(), "ws", "", vec!["root.shell"], Code::InvalidArgument),
        (a.url(), "ws", "", vec![], Code::InvalidArgument),
        (
            "https://169.254.169.254:443".to_owned(),
            "ws",
            "",
            vec![],
            Code::PermissionDenied,
        ),
        (
            "https://127.0.0.1:1".to_owned(),
            "ws",
            "",
            vec![],
            Code::Unavailable,
        ),
    ] {
        let status = admin_a
            .connect(&url, workspace, fingerprint, &grants)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), expected, "{url} {workspace:?}: {status:?}");
    }
    // Admin methods need an admin key.
    let status = admin_a
        .client
        .clone()
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = admin_a
        .client
        .clone()
        .get_connection(with_key(
            pb::GetConnectionRequest {
                connection_id: "missing".into(),
            },
            &admin_a.key,
        ))
        .await
        .expect_err("missing");
    assert_eq!(status.code(), Code::NotFound);
    let status = admin_a
        .client
        .clone()
        .list_connections(with_key(
            pb::ListConnectionsRequest {
                page_token: "bm9uc2Vuc2U".into(),
                ..Default::default()
            },
            &admin_a.key,
        ))
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), Code::InvalidArgument);

    assert!(admin_a.list().await.is_empty());
    assert!(admin_b.list().await.is_empty());
    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

async fn forged_stale_misaddressed_and_replayed_requests_are_refused(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let b = environment.start_peer(0, |_| {}).await;
    let admin_b = Admin::of(&b).await;
    let instance_b = admin_b.instance().await;
    let b_key = PublicKey::from_spki_der(&instance_b.public_key).expect("key");
    let mallory = TestPeer::new("mallory").await;
    let mut client = FederationClient::new(mallory.channel_to(&b).await);
    let identity = mallory.current();
    let request = |envelope| pb::RequestConnectionRequest {
        envelope: Some(envelope),
    };
    let refused =
        |outcome: Result<tonic::Response<pb::RequestConnectionResponse>, tonic::Status>| {
            match outcome {
                Ok(_) => panic!("expected a refusal"),
                Err(status) => status,
            }
        };

    // No client certificate at all.
    let sealed = envelope::seal(
        &mallory.connection_request(&instance_b.instance_id, "ws"),
        identity.as_ref(),
    )
    .expect("seal");
    let status = refused(
        FederationClient::new(b.channel().await)
            .request_connection(request(sealed.clone()))
            .await,
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A bad signature.
    let mut forged = sealed.clone();
    forged.signature[7] ^= 0x20;
    let status = refused(client.request_connection(request(forged)).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Expired, and issued outside the clock window.
    let mut stale = mallory.connection_request(&instance_b.instance_id, "ws");
    if let Some(header) = stale.header.as_mut() {
        header.issued_at = Some(timestamp_from_ms(now_ms() - 600_000));
        header.expires_at = Some(timestamp_from_ms(now_ms() - 540_000));
    }
    let status = refused(
        client
            .request_connection(request(
                envelope::seal(&stale, identity.as_ref()).expect("seal"),
            ))
            .await,
    );
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Addressed to another instance.
    let misaddressed = mallory.connection_request("someone-else", "ws");
    let status = refused(
        client
            .request_connection(request(
                envelope::seal(&misaddressed, identity.as_ref()).expect("seal"),
            ))
            .await,
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // An impostor: the request names and is signed by another instance's key,
    // but the TLS client certificate is mallory's.
    let victim = TestPeer::new("victim").await;
    let impersonation = victim.connection_request(&instance_b.instance_id, "ws");
    let status = refused(
        client
            .request_connection(request(
                envelope::seal(&impersonation, victim.current().as_ref()).expect("seal"),
            ))
            .await,
    );
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Malformed envelopes.
    let status = refused(
        client
            .request_connection(pb::RequestConnectionRequest { envelope: None })
            .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = refused(
        client
            .request_connection(request(pb::SignedEnvelope {
                payload: vec![0xff; 16],
                signature: vec![0; 64],
                key_id: "x".into(),
            }))
            .await,
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(admin_b.list().await.is_empty(), "nothing was stored");

    // A valid request, then its identical retry gets the same signed reply.
    let first = client
        .request_connection(request(sealed.clone()))
        .await
        .expect("valid request")
        .into_inner()
        .envelope;
    let reply: envelope::Verified<pb::ConnectionReplyPayload> = envelope::open_reply(
        first.as_ref(),
        &identity.instance_id,
        &instance_b.instance_id,
        "ws",
        &[TrustedKey {
            key: b_key,
            valid_until_ms: None,
        }],
        now_ms(),
    )
    .expect("a reply signed by B");
    assert_eq!(reply.payload.state(), pb::ConnectionState::Pending);
    let retried = client
        .request_connection(request(sealed.clone()))
        .await
        .expect("identical retry")
        .into_inner()
        .envelope;
    assert_eq!(retried, first);
    assert_eq!(admin_b.list().await.len(), 1);

    // The same message id with other bytes is a replay.
    let mut replay = mallory.connection_request(&instance_b.instance_id, "ws");
    replay.header = stale_header_with_id(&mallory, &instance_b.instance_id, &sealed);
    replay.requested_capabilities = vec!["agent.kill".into()];
    let status = refused(
        client
            .request_connection(request(
                envelope::seal(&replay, identity.as_ref()).expect("seal"),
            ))
            .await,
    );
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // A new request while one is pending is refused too.
    let status = refused(
        client
            .request_connection(request(
                envelope::seal(
                    &mallory.connection_request(&instance_b.instance_id, "ws"),
                    identity.as_ref(),
                )
                .expect("seal"),
            ))
            .await,
    );
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(admin_b.list().await.len(), 1, "still one row");

    // Pings are never replayed.
    let ping = envelope::seal(
        &pb::PingPayload {
            header: Some(mallory.header(
                &instance_b.instance_id,
                "ws",
                identity.public_key().key_id(),
            )),
        },
        identity.as_ref(),
    )
    .expect("seal");
    client
        .ping(pb::PingRequest {
            envelope: Some(ping.clone()),
        })
        .await
        .expect("ping a pending connection");
    let status = client
        .ping(pb::PingRequest {
            envelope: Some(ping),
        })
        .await
        .expect_err("replayed ping");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // A ping in a workspace without a connection.
    let elsewhere = envelope::seal(
        &pb::PingPayload {
            header: Some(mallory.header(
                &instance_b.instance_id,
                "other",
                identity.public_key().key_id(),
            )),
        },
        identity.as_ref(),
    )
    .expect("seal");
    let status = client
        .ping(pb::PingRequest {
            envelope: Some(elsewhere),
        })
        .await
        .expect_err("no connection");
    // No connection in that workspace: refused as any stranger is.
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), envelope::STRANGER_MESSAGE);

    // A command without an envelope is malformed (tests/it/commands.rs has the rest).
    let status = client
        .execute_command(pb::ExecuteCommandRequest { envelope: None })
        .await
        .expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    b.stop().await;
    environment.cleanup().await;
}

/// A header reusing the message id of `sealed` (which the caller re-signs).
fn stale_header_with_id(
    peer: &TestPeer,
    recipient: &str,
    sealed: &pb::SignedEnvelope,
) -> Option<pb::EnvelopeHeader> {
    use prost::Message;
    let original = pb::ConnectionRequestPayload::decode(sealed.payload.as_slice()).expect("decode");
    let message_id = original.header.expect("header").message_id;
    let mut header = peer.header(recipient, "ws", peer.current().public_key().key_id());
    header.message_id = message_id;
    Some(header)
}

async fn a_notice_to_a_peer_that_is_down_is_delivered_when_it_returns(backend: Backend) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let (on_a, on_b) = connect_and_accept(&admin_a, &admin_b, &b, "ws", &[]).await;

    let port_a = a.address.port();
    a.stop().await;
    let suspended = admin_b
        .suspend(&on_b)
        .await
        .expect("suspend while A is down");
    assert_eq!(suspended.state(), pb::ConnectionState::Suspended);
    assert_eq!(suspended.pending_notices, 1);
    assert!(!suspended.reachable);

    let a = environment_a.start_peer(port_a, |_| {}).await;
    let admin_a = Admin::of(&a).await;
    let seen_by_a = admin_a
        .wait_for_state(&on_a, pb::ConnectionState::Suspended)
        .await;
    assert_eq!(seen_by_a.state_reason, "maintenance");
    let delivered = admin_b
        .wait_for(&on_b, "the notice to be delivered", |connection| {
            connection.pending_notices == 0 && connection.reachable
        })
        .await;
    assert_eq!(delivered.state(), pb::ConnectionState::Suspended);

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

async fn three_daemons_keep_their_connections_across_restarts(backend: Backend) {
    let environments = [
        TestEnvironment::new(backend).await,
        TestEnvironment::new(backend).await,
        TestEnvironment::new(backend).await,
    ];
    let a = environments[0].start_peer(0, |_| {}).await;
    let b = environments[1].start_peer(0, |_| {}).await;
    let c = environments[2].start_peer(0, |_| {}).await;
    let (admin_a, admin_b, admin_c) = (
        Admin::of(&a).await,
        Admin::of(&b).await,
        Admin::of(&c).await,
    );
    let (a_to_b, _) = connect_and_accept(&admin_a, &admin_b, &b, "mesh", &["agent.status"]).await;
    let (a_to_c, c_from_a) = connect_and_accept(&admin_a, &admin_c, &c, "mesh", &[]).await;
    admin_c
        .connect(&b.url(), "other", "", &[])
        .await
        .expect("C asks B, left pending");
    admin_a.suspend(&a_to_c).await.expect("suspend");
    admin_c
        .wait_for_state(&c_from_a, pb::ConnectionState::Suspended)
        .await;

    let summary = |connections: Vec<pb::Connection>| {
        let mut rows: Vec<(String, i32, i32, Vec<String>)> = connections
            .into_iter()
            .map(|connection| {
                (
                    connection.connection_id,
                    connection.state,
                    connection.direction,
                    connection.capabilities_granted_to_us,
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let before = [
        summary(admin_a.list().await),
        summary(admin_b.list().await),
        summary(admin_c.list().await),
    ];
    assert_eq!(
        before.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 2]
    );

    let ports = [a.address.port(), b.address.port(), c.address.port()];
    a.stop().await;
    b.stop().await;
    c.stop().await;
    let a = environments[0].start_peer(ports[0], |_| {}).await;
    let b = environments[1].start_peer(ports[1], |_| {}).await;
    let c = environments[2].start_peer(ports[2], |_| {}).await;
    let (admin_a, admin_b, admin_c) = (
        Admin::of(&a).await,
        Admin::of(&b).await,
        Admin::of(&c).await,
    );
    let after = [
        summary(admin_a.list().await),
        summary(admin_b.list().await),
        summary(admin_c.list().await),
    ];
    assert_eq!(after, before);

    // The restarted daemons still trust each other: pings succeed and a
    // resume is seen on the other side.
    let restarted = now_ms();
    admin_a
        .wait_for(&a_to_b, "a ping after the restart", |connection| {
            connection.reachable
                && connection
                    .last_contact_at
                    .as_ref()
                    .is_some_and(|at| mosaic_mesh::clock::ms_from_timestamp(at) > restarted)
        })
        .await;
    admin_a.resume(&a_to_c).await.expect("resume");
    admin_c
        .wait_for_state(&c_from_a, pb::ConnectionState::Active)
        .await;

    a.stop().await;
    b.stop().await;
    c.stop().await;
    for environment in environments {
        environment.cleanup().await;
    }
}

async fn key_rotation_keeps_connections_working_and_the_old_key_expires(backend: Backend) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
    let (on_a, on_b) = connect_and_accept(&admin_a, &admin_b, &b, "ws", &[]).await;

    // A rotates; B learns the new key from a notice signed with the old one.
    let rotated = admin_a
        .client
        .clone()
        .rotate_keys(with_key(
            pb::RotateKeysRequest {
                grace_period_seconds: Some(3600),
            },
            &admin_a.key,
        ))
        .await
        .expect("rotate")
        .into_inner();
    let new_key = rotated.current_key.expect("current key");
    admin_b
        .wait_for(&on_b, "B to pin A's new key", |connection| {
            connection.remote_fingerprint == new_key.fingerprint
        })
        .await;
    // Both directions still work: B's notice reaches A (whose TLS now shows the
    // new key), and A's notice and pings reach B (signed with the new key).
    admin_b.suspend(&on_b).await.expect("suspend");
    admin_a
        .wait_for_state(&on_a, pb::ConnectionState::Suspended)
        .await;
    admin_b.resume(&on_b).await.expect("resume");
    admin_a
        .wait_for_state(&on_a, pb::ConnectionState::Active)
        .await;
    admin_a.suspend(&on_a).await.expect("suspend from A");
    admin_b
        .wait_for_state(&on_b, pb::ConnectionState::Suspended)
        .await;

    // A hand-made peer rotates with a short grace: its old key works until the
    // grace ends and is refused after.
    let mallory = TestPeer::new("mallory").await;
    let instance_b = admin_b.instance().await;
    let old_channel = mallory.channel_to(&b).await;
    let mut old_client = FederationClient::new(old_channel);
    let before = mallory.current();
    old_client
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(
                envelope::seal(
                    &mallory.connection_request(&instance_b.instance_id, "keys"),
                    before.as_ref(),
                )
                .expect("seal"),
            ),
        })
        .await
        .expect("request");
    let inbound = admin_b.open_in("keys").await;
    admin_b
        .accept(&inbound.connection_id, &[])
        .await
        .expect("accept");

    let old_key_id = before.public_key().key_id();
    let after = mallory
        .identity
        .rotate(Duration::from_secs(2))
        .await
        .expect("rotate mallory");
    let rotated_at = now_ms();
    let old_signer = after
        .previous_signing_key(&old_key_id, rotated_at)
        .expect("old key held");
    let valid_until = after
        .previous_keys(rotated_at)
        .next()
        .expect("previous key")
        .valid_until_ms;
    let mut new_client = FederationClient::new(mallory.channel_to(&b).await);
    let notice = pb::ConnectionNoticePayload {
        header: Some(mallory.header(&instance_b.instance_id, "keys", old_key_id.clone())),
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
    assert_eq!(
        admin_b
            .get(&inbound.connection_id)
            .await
            .connection
            .expect("c")
            .remote_fingerprint,
        after.public_key().fingerprint()
    );

    let ping_with = |signer: &dyn envelope::Signer, key_id: String| pb::PingRequest {
        envelope: Some(
            envelope::seal(
                &pb::PingPayload {
                    header: Some(mallory.header(&instance_b.instance_id, "keys", key_id)),
                },
                signer,
            )
            .expect("seal"),
        ),
    };
    new_client
        .ping(ping_with(after.as_ref(), after.public_key().key_id()))
        .await
        .expect("the new key works");
    // Signed with the new key over the old TLS session: the keys differ.
    let status = old_client
        .ping(ping_with(after.as_ref(), after.public_key().key_id()))
        .await
        .expect_err("signing key is not the TLS key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut worked_in_grace = false;
    loop {
        match old_client
            .ping(ping_with(old_signer, old_key_id.clone()))
            .await
        {
            Ok(_) => worked_in_grace = true,
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                assert!(status.message().contains("grace"), "{status:?}");
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old key never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        worked_in_grace,
        "the old key worked during its grace period"
    );
    assert!(
        now_ms() >= valid_until,
        "refused only after the grace period"
    );

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

async fn the_same_connection_requested_twice_makes_one_row(backend: Backend) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let b = environment_b.start_peer(0, |_| {}).await;
    let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);

    let url = b.url();
    let (first, second) = tokio::join!(
        admin_a.connect(&url, "ws", "", &[]),
        admin_a.connect(&url, "ws", "", &[])
    );
    let outcomes = [first, second];
    assert_eq!(
        outcomes.iter().filter(|outcome| outcome.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    for outcome in &outcomes {
        if let Err(status) = outcome {
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        }
    }
    let status = admin_a
        .connect(&url, "ws", "", &[])
        .await
        .expect_err("a third time");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(admin_a.list().await.len(), 1);
    assert_eq!(admin_b.list().await.len(), 1);
    // B asking A in the same workspace is the same connection, too.
    let status = admin_b
        .connect(&a.url(), "ws", "", &[])
        .await
        .expect_err("the other direction");
    assert_eq!(status.code(), Code::AlreadyExists);
    // Another workspace is another connection.
    admin_a
        .connect(&url, "ws-2", "", &[])
        .await
        .expect("another workspace");
    assert_eq!(admin_b.list().await.len(), 2);

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}

async fn an_allow_listed_fingerprint_is_accepted_at_once_and_pending_requests_are_capped(
    backend: Backend,
) {
    let environment_a = TestEnvironment::new(backend).await;
    let environment_b = TestEnvironment::new(backend).await;
    let a = environment_a.start_peer(0, |_| {}).await;
    let admin_a = Admin::of(&a).await;
    let fingerprint_a = admin_a.instance().await.fingerprint;
    let b = environment_b
        .start_peer(0, |config| {
            config.federation.auto_accept_fingerprints =
                vec![mosaic_mesh::identity::fingerprint::normalize(&fingerprint_a).expect("fp")];
            config.federation.auto_accept_grants = strings(&["agent.status"]);
            config.federation.max_pending_inbound = 1;
        })
        .await;
    let admin_b = Admin::of(&b).await;

    let connection = admin_a
        .connect(&b.url(), "ws", "", &[])
        .await
        .expect("connect");
    assert_eq!(connection.state(), pb::ConnectionState::Active);
    assert_eq!(
        connection.capabilities_granted_to_us,
        strings(&["agent.status"])
    );
    let on_b = admin_b.open_in("ws").await;
    assert_eq!(on_b.state(), pb::ConnectionState::Active);
    let actors: Vec<String> = admin_b
        .get(&on_b.connection_id)
        .await
        .events
        .into_iter()
        .map(|event| event.actor)
        .collect();
    assert_eq!(actors, strings(&["peer", "system"]));

    // One request may wait for B's operator; the next is refused until then.
    let instance_b = admin_b.instance().await;
    for (name, expected) in [("first", None), ("second", Some(Code::ResourceExhausted))] {
        let peer = TestPeer::new(name).await;
        let outcome = FederationClient::new(peer.channel_to(&b).await)
            .request_connection(pb::RequestConnectionRequest {
                envelope: Some(
                    envelope::seal(
                        &peer.connection_request(&instance_b.instance_id, "ws"),
                        peer.current().as_ref(),
                    )
                    .expect("seal"),
                ),
            })
            .await;
        assert_eq!(
            outcome.err().map(|status| status.code()),
            expected,
            "{name}"
        );
    }
    assert_eq!(admin_b.list().await.len(), 2);

    a.stop().await;
    b.stop().await;
    environment_a.cleanup().await;
    environment_b.cleanup().await;
}
