//! A hand-made peer for tests that must send what a well-behaved daemon never
//! would (bad signatures, stale or misaddressed envelopes, replays, a TLS key that
//! differs from the signing key): its own instance identity and certificate,
//! talking to a daemon's wire RPCs directly over real mutual TLS.

use std::sync::Arc;

use mosaic_mesh::clock::now_ms;
use mosaic_mesh::federation::envelope::{self, Routing};
use mosaic_mesh::identity::{
    Identity, IdentityManager, InstanceProfile, MasterKeySource, PublicKey,
};
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::store::testing::TestDatabase;
use mosaic_mesh::tls::{ChannelTimeouts, ServerPin};

use super::daemon::{TestDaemon, spki_of_pem};

/// A peer with its own identity (in its own temporary SQLite database) and no
/// server: notices sent to it are never delivered.
pub struct TestPeer {
    /// The identity, rotatable like a daemon's.
    pub identity: Arc<IdentityManager>,
    _data_dir: tempfile::TempDir,
}

impl TestPeer {
    /// A new peer named `name`.
    pub async fn new(name: &str) -> TestPeer {
        mosaic_mesh::tls::install_default_provider();
        let data_dir = tempfile::tempdir().expect("temporary dir");
        let database = TestDatabase::sqlite(data_dir.path());
        let store = database.migrated_store().await.expect("peer store");
        let source = MasterKeySource {
            environment_value: None,
            key_file: data_dir.path().join("master.key"),
        };
        let profile = InstanceProfile {
            name: name.to_owned(),
            // Nothing listens on port 1: the peer is reachable only as a client.
            public_url: "https://127.0.0.1:1".to_owned(),
            capabilities: mosaic_mesh::config::default_capabilities(),
            metadata: Default::default(),
        };
        let identity = IdentityManager::load_or_create(store, &source, &profile)
            .await
            .expect("peer identity");
        TestPeer {
            identity: Arc::new(identity),
            _data_dir: data_dir,
        }
    }

    /// The current identity snapshot.
    pub fn current(&self) -> Arc<Identity> {
        self.identity.current()
    }

    /// A mutual-TLS channel to `daemon` presenting this peer's current certificate
    /// (the TLS session keeps that certificate even after a rotation).
    pub async fn channel_to(&self, daemon: &TestDaemon) -> tonic::transport::Channel {
        self.channel_to_url(&daemon.url(), &daemon.certificate_pem())
            .await
    }

    /// `channel_to` a daemon at `url` whose certificate is `certificate_pem`
    /// (a replica, straight or through a balancer).
    pub async fn channel_to_url(
        &self,
        url: &str,
        certificate_pem: &str,
    ) -> tonic::transport::Channel {
        let key = PublicKey::from_spki_der(&spki_of_pem(certificate_pem)).expect("daemon key");
        let tls = mosaic_mesh::tls::mutual_client_config(
            ServerPin::PublicKey(key),
            Arc::clone(&self.identity),
        )
        .expect("client tls");
        mosaic_mesh::tls::connect_channel(url, Some(Arc::new(tls)), ChannelTimeouts::default())
            .await
            .expect("connect to the daemon")
    }

    /// A fresh header from this peer, signed (by convention) with `key_id`.
    pub fn header(&self, recipient: &str, workspace: &str, key_id: String) -> pb::EnvelopeHeader {
        let identity = self.current();
        envelope::new_header(
            &Routing {
                sender_instance_id: &identity.instance_id,
                recipient_instance_id: recipient,
                workspace,
                now_ms: now_ms(),
                lifetime_ms: 60_000,
            },
            key_id,
        )
    }

    /// A well-formed connection request from this peer with its current key.
    pub fn connection_request(
        &self,
        recipient: &str,
        workspace: &str,
    ) -> pb::ConnectionRequestPayload {
        let identity = self.current();
        pb::ConnectionRequestPayload {
            header: Some(self.header(recipient, workspace, identity.public_key().key_id())),
            sender: Some(mosaic_mesh::federation::convert::instance_message(
                &identity,
            )),
            requested_capabilities: vec!["agent.status".to_owned()],
            offered_capabilities: Vec::new(),
        }
    }
}
