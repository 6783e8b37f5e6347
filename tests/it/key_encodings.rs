//! A public key travels in one encoding, a SubjectPublicKeyInfo with an
//! uncompressed P-256 point (docs/PROTOCOL.md section 4). A compressed point
//! is refused where it enters, with a reason that says what to send
//! instead: in a connection request and in a KEY_ROTATED notice.

use mosaic_mesh::clock::{now_ms, timestamp_from_ms};
use mosaic_mesh::federation::envelope;
use mosaic_mesh::identity::InstanceKey;
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use tonic::Code;

use crate::support::Backend;
use crate::support::admin::Admin;
use crate::support::daemon::TestEnvironment;
use crate::support::peer::TestPeer;

/// What the refusal of a compressed point says.
const REASON: &str =
    "compressed points are not accepted; send the uncompressed form (04 || X || Y)";

/// The SubjectPublicKeyInfo prefix of a compressed P-256 point.
const P256_COMPRESSED_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
];

/// The same key as a compressed point (`02` or `03` by the parity of Y, then X).
fn compressed(spki: &[u8]) -> Vec<u8> {
    let point = &spki[spki.len() - 65..];
    let parity = 0x02 | (point[64] & 1);
    [&P256_COMPRESSED_SPKI_PREFIX[..], &[parity], &point[1..33]].concat()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_key_is_refused_with_the_form_to_send_instead() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start_peer(0, |_| {}).await;
    let admin = Admin::of(&daemon).await;
    let daemon_id = admin.instance().await.instance_id;
    let peer = TestPeer::new("peer").await;
    let identity = peer.current();
    let mut client = FederationClient::new(peer.channel_to(&daemon).await);

    // A request whose sender key is its own key, compressed.
    let mut request = peer.connection_request(&daemon_id, "ws");
    if let Some(sender) = request.sender.as_mut() {
        sender.public_key = compressed(identity.public_key().spki_der());
    }
    let status = client
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(envelope::seal(&request, identity.as_ref()).expect("seal")),
        })
        .await
        .expect_err("a compressed sender key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("sender.public_key") && status.message().contains(REASON),
        "{status:?}"
    );
    assert!(admin.list().await.is_empty(), "the request was stored");

    // Connected, the peer announces a new key, compressed.
    let request = peer.connection_request(&daemon_id, "ws");
    client
        .request_connection(pb::RequestConnectionRequest {
            envelope: Some(envelope::seal(&request, identity.as_ref()).expect("seal")),
        })
        .await
        .expect("the uncompressed request");
    let connection = admin.open_in("ws").await;
    admin
        .accept(&connection.connection_id, &["agent.status"])
        .await
        .expect("accept");
    let new_key = InstanceKey::generate().expect("new key");
    let notice = pb::ConnectionNoticePayload {
        header: Some(peer.header(&daemon_id, "ws", identity.public_key().key_id())),
        kind: pb::NoticeKind::KeyRotated.into(),
        new_key: Some(pb::PublicKeyInfo {
            key_id: new_key.public_key().key_id(),
            public_key: compressed(new_key.public_key().spki_der()),
            fingerprint: new_key.public_key().fingerprint(),
            created_at: None,
            valid_until: None,
        }),
        previous_key_valid_until: Some(timestamp_from_ms(now_ms() + 60_000)),
        ..pb::ConnectionNoticePayload::default()
    };
    let status = client
        .notify_connection(pb::NotifyConnectionRequest {
            envelope: Some(envelope::seal(&notice, identity.as_ref()).expect("seal")),
        })
        .await
        .expect_err("a compressed new key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("new_key.public_key") && status.message().contains(REASON),
        "{status:?}"
    );
    let unchanged = admin.get(&connection.connection_id).await;
    assert_eq!(
        unchanged.connection.expect("connection").remote_public_key,
        identity.public_key().spki_der(),
        "the key changed"
    );
    daemon.stop().await;
    environment.cleanup().await;
}
