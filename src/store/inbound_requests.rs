//! Queries behind the checks of an inbound connection request: the keys an
//! instance id has been seen with, on any connection in any workspace and in
//! any state (connections are never deleted, so the past is there too), and
//! how many requests one source or one key already has waiting.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::federation::undecodable_value;
use super::schema::federation_connections;
use super::{Store, StoreError};
use crate::federation::state::{ConnectionState, Direction};

/// One connection's key for an instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceKeyBinding {
    pub connection_id: String,
    pub workspace: String,
    pub direction: Direction,
    pub state: ConnectionState,
    /// The fingerprint of the connection's current key.
    pub fingerprint: String,
}

impl Store {
    /// Every connection with `remote_instance_id` and the fingerprint of its
    /// current key, newest first.
    pub async fn key_bindings_of_instance(
        &self,
        remote_instance_id: &str,
    ) -> Result<Vec<InstanceKeyBinding>, StoreError> {
        let rows: Vec<(String, String, String, String, String)> = with_connection!(self, |conn| {
            federation_connections::table
                .filter(federation_connections::remote_instance_id.eq(remote_instance_id))
                .order((
                    federation_connections::created_at_ms.desc(),
                    federation_connections::id.desc(),
                ))
                .select((
                    federation_connections::id,
                    federation_connections::workspace,
                    federation_connections::direction,
                    federation_connections::state,
                    federation_connections::remote_fingerprint,
                ))
                .load(conn)
                .await?
        });
        rows.into_iter()
            .map(
                |(connection_id, workspace, direction, state, fingerprint)| {
                    Ok(InstanceKeyBinding {
                        direction: Direction::parse(&direction)
                            .ok_or_else(|| undecodable_value("direction", &direction))?,
                        state: ConnectionState::parse(&state)
                            .ok_or_else(|| undecodable_value("state", &state))?,
                        connection_id,
                        workspace,
                        fingerprint,
                    })
                },
            )
            .collect()
    }

    /// How many inbound requests from `source` (the rate limiter's client
    /// group) wait for an operator.
    pub async fn count_pending_inbound_from_source(&self, source: &str) -> Result<i64, StoreError> {
        self.count_pending_inbound(PendingFrom::Source(source))
            .await
    }

    /// How many inbound requests made with the key of `fingerprint` wait for
    /// an operator.
    pub async fn count_pending_inbound_of_key(&self, fingerprint: &str) -> Result<i64, StoreError> {
        self.count_pending_inbound(PendingFrom::Key(fingerprint))
            .await
    }

    /// How many inbound requests from `from` wait for an operator.
    async fn count_pending_inbound(&self, from: PendingFrom<'_>) -> Result<i64, StoreError> {
        let count = with_connection!(self, |conn| {
            let pending = federation_connections::table
                .filter(federation_connections::state.eq(ConnectionState::Pending.as_str()))
                .filter(federation_connections::direction.eq(Direction::Inbound.as_str()))
                .into_boxed();
            let pending = match from {
                PendingFrom::Source(source) => {
                    pending.filter(federation_connections::request_source.eq(source))
                }
                PendingFrom::Key(fingerprint) => {
                    pending.filter(federation_connections::remote_fingerprint.eq(fingerprint))
                }
            };
            pending.count().get_result::<i64>(conn).await?
        });
        Ok(count)
    }
}

/// Whose waiting requests [`Store::count_pending_inbound`] counts.
#[derive(Clone, Copy)]
enum PendingFrom<'a> {
    /// One client address group.
    Source(&'a str),
    /// One key, by its fingerprint.
    Key(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_on_both_backends;
    use crate::store::{ConnectionCapabilities, ConnectionRecord};

    fn request(id: &str, source: &str, fingerprint: &str) -> ConnectionRecord {
        ConnectionRecord {
            id: id.to_owned(),
            workspace: id.to_owned(),
            remote_instance_id: "peer".to_owned(),
            remote_name: "peer".to_owned(),
            remote_url: "https://127.0.0.1:1".to_owned(),
            remote_public_key: vec![1, 2, 3],
            remote_fingerprint: fingerprint.to_owned(),
            capabilities: ConnectionCapabilities::default(),
            direction: Direction::Inbound,
            state: ConnectionState::Pending,
            state_reason: String::new(),
            suspended_by: None,
            reachable: true,
            last_contact_at_ms: None,
            created_at_ms: 1_000,
            updated_at_ms: 1_000,
            request_source: Some(source.to_owned()),
        }
    }

    async fn pending_requests_are_counted_by_source_and_key(store: Store) {
        let rows = [
            request("a", "ip:192.0.2.1", "FP1"),
            request("b", "ip:192.0.2.1", "FP2"),
            request("c", "ip:192.0.2.2", "FP1"),
            ConnectionRecord {
                state: ConnectionState::Rejected,
                ..request("d", "ip:192.0.2.1", "FP1")
            },
            ConnectionRecord {
                direction: Direction::Outbound,
                request_source: None,
                ..request("e", "ip:192.0.2.1", "FP1")
            },
        ];
        for row in &rows {
            store
                .insert_connection(row, &[], None)
                .await
                .expect("insert");
        }
        let from = |source: &'static str| store.count_pending_inbound_from_source(source);
        assert_eq!(from("ip:192.0.2.1").await.expect("count"), 2);
        assert_eq!(from("ip:192.0.2.2").await.expect("count"), 1);
        assert_eq!(from("ip:192.0.2.3").await.expect("count"), 0);
        let of = |fingerprint: &'static str| store.count_pending_inbound_of_key(fingerprint);
        assert_eq!(of("FP1").await.expect("count"), 2);
        assert_eq!(of("FP2").await.expect("count"), 1);
        // Every connection of the instance id, newest first by creation.
        let bound = store
            .key_bindings_of_instance("peer")
            .await
            .expect("bindings");
        assert_eq!(bound.len(), rows.len());
        assert!(
            store
                .key_bindings_of_instance("nobody")
                .await
                .expect("bindings")
                .is_empty()
        );
    }

    test_on_both_backends!(pending_requests_are_counted_by_source_and_key);
}
