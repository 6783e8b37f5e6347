//! The peer cache: each open connection with the keys its peer signs with,
//! read from the store and believed for `server.auth_cache_ms`, and forgotten
//! by every connection change made here.

use std::sync::Arc;

use crate::federation::FederationError;
use crate::federation::envelope::TrustedKey;
use crate::identity::PublicKey;
use crate::store::{
    ConnectionChange, ConnectionEventRecord, ConnectionRecord, SeenMessage, WriteOutcome,
};

use crate::federation::Federation;

/// An open connection with a peer in one workspace and the keys it was known
/// by, as read together from the store.
#[derive(Debug)]
pub(super) struct PeerEntry {
    /// The stored connection.
    pub connection: ConnectionRecord,
    /// The peer's keys on it.
    keys: PeerKeys,
}

impl PeerEntry {
    /// The keys the peer may sign with at `now_ms` (see [`PeerKeys::trusted`]).
    pub fn trusted_keys(&self, now_ms: i64) -> Vec<TrustedKey> {
        self.keys.trusted(now_ms)
    }
}

/// A peer's keys on one connection, as read from the store.
#[derive(Debug)]
struct PeerKeys {
    /// The peer's current key.
    current: PublicKey,
    /// Its previous keys with the end of their grace (expired ones included).
    previous: Vec<(PublicKey, i64)>,
}

impl PeerKeys {
    /// The keys the peer may sign with at `now_ms`: its current key and previous
    /// keys still in their grace period.
    fn trusted(&self, now_ms: i64) -> Vec<TrustedKey> {
        std::iter::once(TrustedKey {
            key: self.current.clone(),
            valid_until_ms: None,
        })
        .chain(
            self.previous
                .iter()
                .filter(|(_, valid_until_ms)| *valid_until_ms > now_ms)
                .map(|(key, valid_until_ms)| TrustedKey {
                    key: key.clone(),
                    valid_until_ms: Some(*valid_until_ms),
                }),
        )
        .collect()
    }
}

impl Federation {
    /// Forgets every cached connection.
    pub(super) fn forget_peers(&self) {
        self.peers.clear();
        self.sole_peers.clear();
    }

    /// Stores a new connection, then forgets the cached ones.
    pub(super) async fn insert_connection(
        &self,
        record: &ConnectionRecord,
        events: &[ConnectionEventRecord],
        seen: Option<&SeenMessage>,
    ) -> Result<WriteOutcome<()>, crate::store::StoreError> {
        let written = self.store.insert_connection(record, events, seen).await;
        self.forget_peers();
        written
    }

    /// Changes a stored connection (state, capabilities, the peer's key), then
    /// forgets the cached ones, so the next command sees the change.
    pub(super) async fn change_connection(
        &self,
        change: &ConnectionChange,
    ) -> Result<WriteOutcome<ConnectionRecord>, crate::store::StoreError> {
        let written = self.store.change_connection(change).await;
        self.forget_peers();
        written
    }

    /// The cached ACTIVE connection with `peer_instance_id` when it is the only
    /// one (a command that names no workspace), or a ticket to remember it.
    pub(super) fn sole_peer(
        &self,
        peer_instance_id: &str,
    ) -> Result<Arc<PeerEntry>, crate::cache::Ticket> {
        self.sole_peers.get(&peer_instance_id.to_owned())
    }

    /// Remembers `peer` as the only ACTIVE connection with `peer_instance_id`.
    pub(super) fn remember_sole_peer(
        &self,
        ticket: crate::cache::Ticket,
        peer_instance_id: &str,
        peer: &Arc<PeerEntry>,
    ) {
        self.sole_peers
            .insert(ticket, peer_instance_id.to_owned(), Arc::clone(peer));
    }

    /// The open (not DISCONNECTED) connection with `peer_instance_id` in
    /// `workspace` and its keys, from the cache while it is fresh.
    pub(super) async fn open_peer(
        &self,
        workspace: &str,
        peer_instance_id: &str,
    ) -> Result<Option<Arc<PeerEntry>>, FederationError> {
        let key = (workspace.to_owned(), peer_instance_id.to_owned());
        let ticket = match self.peers.get(&key) {
            Ok(entry) => return Ok(Some(entry)),
            Err(ticket) => ticket,
        };
        let Some(connection) = self
            .store
            .find_open_connection(workspace, peer_instance_id)
            .await?
        else {
            return Ok(None);
        };
        let entry = Arc::new(self.peer_entry(connection).await?);
        self.peers.insert(ticket, key, Arc::clone(&entry));
        Ok(Some(entry))
    }

    /// The keys a peer may sign with on this connection: its current key and
    /// previous keys still in their grace period.
    pub(super) async fn trusted_keys(
        &self,
        connection: &ConnectionRecord,
    ) -> Result<Vec<TrustedKey>, FederationError> {
        Ok(self.peer_keys(connection).await?.trusted(self.now()))
    }

    /// `connection` with the peer's keys read from the store.
    pub(super) async fn peer_entry(
        &self,
        connection: ConnectionRecord,
    ) -> Result<PeerEntry, FederationError> {
        let keys = self.peer_keys(&connection).await?;
        Ok(PeerEntry { connection, keys })
    }

    /// The peer's current key on `connection` and its previous keys from the
    /// store.
    async fn peer_keys(&self, connection: &ConnectionRecord) -> Result<PeerKeys, FederationError> {
        let current = PublicKey::from_spki_der(&connection.remote_public_key)
            .map_err(|error| FederationError::Internal(format!("stored peer key: {error}")))?;
        let previous = self
            .store
            .peer_keys(&connection.id)
            .await?
            .into_iter()
            .filter_map(|previous| {
                PublicKey::from_spki_der(&previous.public_key)
                    .ok()
                    .map(|key| (key, previous.valid_until_ms))
            })
            .collect();
        Ok(PeerKeys { current, previous })
    }
}
