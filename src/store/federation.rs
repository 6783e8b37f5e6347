//! Queries for federation: connections and their history, keys peers rotated
//! away from, and queuing notices to peers (message ids already seen are in
//! `seen_messages.rs`, reading the outbox in `outbox.rs`).
//!
//! Every change that the protocol makes together (a state change, its history
//! event, the notice to the peer and the message id that caused it) is written in
//! one transaction, so a failure leaves nothing half-written.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::error::outcome_of;
use super::schema::{
    federation_connection_events, federation_connections, federation_outbox, federation_peer_keys,
    federation_seen_messages,
};
use super::seen_messages::{SeenMessage, SeenRow};
use super::{Conflict, Store, StoreError, WriteOutcome};
use crate::federation::state::{Actor, ConnectionState, Direction, NoticeKind};

/// Inserts a notice (a `NoticeRow`) after every other pending one, on a
/// connection inside a transaction. A macro because the body must compile
/// against each backend's connection type.
macro_rules! insert_notice_row {
    ($conn:expr, $row:expr) => {{
        let last_sequence: Option<i64> = federation_outbox::table
            .select(diesel::dsl::max(federation_outbox::sequence))
            .first($conn)
            .await?;
        let mut row: NoticeRow = $row.clone();
        row.sequence = last_sequence.unwrap_or(0).saturating_add(1);
        diesel::insert_into(federation_outbox::table)
            .values(&row)
            .execute($conn)
            .await?;
    }};
}

/// The capability lists of a connection (stored as one JSON object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCapabilities {
    /// What the peer advertises.
    pub remote: Vec<String>,
    /// What this instance grants the peer.
    pub granted: Vec<String>,
    /// What the peer grants this instance.
    pub granted_to_us: Vec<String>,
    /// What the connection request asked for.
    pub requested: Vec<String>,
}

/// A connection with one peer in one workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionRecord {
    pub id: String,
    pub workspace: String,
    pub remote_instance_id: String,
    pub remote_name: String,
    pub remote_url: String,
    /// SPKI DER of the peer's current key.
    pub remote_public_key: Vec<u8>,
    pub remote_fingerprint: String,
    pub capabilities: ConnectionCapabilities,
    pub direction: Direction,
    pub state: ConnectionState,
    pub state_reason: String,
    pub suspended_by: Option<Actor>,
    pub reachable: bool,
    pub last_contact_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Where an inbound request came from, as the rate limiter groups
    /// clients (`ip:203.0.113.7`); `None` for outbound connections.
    pub request_source: Option<String>,
}

/// One state change of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEventRecord {
    pub connection_id: String,
    /// `None` for the creation.
    pub from_state: Option<ConnectionState>,
    pub to_state: ConnectionState,
    pub actor: Actor,
    pub reason: String,
    pub at_ms: i64,
}

/// A key a peer rotated away from, still valid for its connection until
/// `valid_until_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerKeyRecord {
    pub connection_id: String,
    pub key_id: String,
    pub public_key: Vec<u8>,
    pub valid_until_ms: i64,
}

/// A notice to a peer that has not been delivered yet.
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeRecord {
    pub id: String,
    pub connection_id: String,
    pub kind: NoticeKind,
    pub reason: String,
    pub granted_capabilities: Vec<String>,
    /// For `KeyRotated`: the key id to sign with (the one the peer trusts).
    pub signing_key_id: Option<String>,
    pub attempts: i32,
    pub next_attempt_at_ms: i64,
    pub last_error: String,
    pub created_at_ms: i64,
}

/// A change to one connection, written atomically with what goes with it.
#[derive(Debug, Clone)]
pub struct ConnectionChange {
    pub connection_id: String,
    /// The change applies only if the connection is still in this state.
    pub expected_state: ConnectionState,
    pub new_state: ConnectionState,
    pub state_reason: String,
    pub suspended_by: Option<Actor>,
    /// Replaces the capability lists when set.
    pub capabilities: Option<ConnectionCapabilities>,
    /// Replaces the peer's current key (SPKI DER, fingerprint) when set.
    pub new_remote_key: Option<(Vec<u8>, String)>,
    /// A key of the peer that stays valid for a while (the one just replaced).
    pub retired_peer_key: Option<PeerKeyRecord>,
    /// The history entry; `None` when the state does not change.
    pub event: Option<ConnectionEventRecord>,
    /// A notice to queue for the peer.
    pub notice: Option<NoticeRecord>,
    /// The message that caused the change, for replay protection.
    pub seen: Option<SeenMessage>,
    pub at_ms: i64,
}

/// Which connections to list, newest first, after a cursor.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFilter {
    pub workspace: Option<String>,
    pub state: Option<ConnectionState>,
    /// `(created_at_ms, id)` of the last connection of the previous page.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

impl Store {
    /// Creates a connection with its first history entry, and records the message
    /// that asked for it. Nothing is written on a duplicate message id or when an
    /// open connection with the peer in that workspace exists.
    pub async fn insert_connection(
        &self,
        connection: &ConnectionRecord,
        events: &[ConnectionEventRecord],
        seen: Option<&SeenMessage>,
    ) -> Result<WriteOutcome<()>, StoreError> {
        let row = ConnectionRow::from_record(connection)?;
        let event_rows: Vec<EventRow> = events.iter().map(EventRow::from_record).collect();
        let seen_row = seen.map(SeenRow::from_record);
        let written = with_connection!(self, |conn| {
            conn.transaction::<_, StoreError, _>(async |conn| {
                if let Some(seen_row) = &seen_row {
                    diesel::insert_into(federation_seen_messages::table)
                        .values(seen_row)
                        .execute(conn)
                        .await
                        .map_err(|error| Conflict::DuplicateMessage.mark(error))?;
                }
                diesel::insert_into(federation_connections::table)
                    .values(&row)
                    .execute(conn)
                    .await
                    .map_err(|error| Conflict::OpenConnectionExists.mark(error))?;
                for event_row in &event_rows {
                    diesel::insert_into(federation_connection_events::table)
                        .values(event_row)
                        .execute(conn)
                        .await?;
                }
                Ok(())
            })
            .await
        });
        outcome_of(written)
    }

    /// Applies `change` if the connection is still in `change.expected_state`, and
    /// returns the connection as now stored.
    pub async fn change_connection(
        &self,
        change: &ConnectionChange,
    ) -> Result<WriteOutcome<ConnectionRecord>, StoreError> {
        let capabilities_json = change
            .capabilities
            .as_ref()
            .map(encode_capabilities)
            .transpose()?;
        let event_row = change.event.as_ref().map(EventRow::from_record);
        let notice_row = change
            .notice
            .as_ref()
            .map(NoticeRow::from_record)
            .transpose()?;
        let seen_row = change.seen.as_ref().map(SeenRow::from_record);
        let peer_key_row = change
            .retired_peer_key
            .as_ref()
            .map(PeerKeyRow::from_record);
        let id = change.connection_id.as_str();
        let written = with_connection!(self, |conn| {
            conn.transaction::<_, StoreError, _>(async |conn| {
                // The write comes first: a SQLite transaction that reads before it
                // writes fails at once on a concurrent writer instead of waiting.
                let target = federation_connections::table
                    .filter(federation_connections::id.eq(id))
                    .filter(federation_connections::state.eq(change.expected_state.as_str()));
                let updated_rows = diesel::update(target)
                    .set((
                        federation_connections::state.eq(change.new_state.as_str()),
                        federation_connections::state_reason.eq(&change.state_reason),
                        federation_connections::suspended_by
                            .eq(change.suspended_by.map(Actor::as_str)),
                        federation_connections::updated_at_ms.eq(change.at_ms),
                    ))
                    .execute(conn)
                    .await
                    .map_err(|error| Conflict::OpenConnectionExists.mark(error))?;
                if updated_rows == 0 {
                    return Err(StoreError::NotFound);
                }
                if let Some(capabilities_json) = &capabilities_json {
                    diesel::update(
                        federation_connections::table.filter(federation_connections::id.eq(id)),
                    )
                    .set(federation_connections::capabilities_json.eq(capabilities_json))
                    .execute(conn)
                    .await?;
                }
                if let Some((public_key, fingerprint)) = &change.new_remote_key {
                    diesel::update(
                        federation_connections::table.filter(federation_connections::id.eq(id)),
                    )
                    .set((
                        federation_connections::remote_public_key.eq(public_key),
                        federation_connections::remote_fingerprint.eq(fingerprint),
                    ))
                    .execute(conn)
                    .await?;
                }
                if let Some(peer_key_row) = &peer_key_row {
                    diesel::delete(
                        federation_peer_keys::table
                            .filter(federation_peer_keys::connection_id.eq(id))
                            .filter(federation_peer_keys::key_id.eq(peer_key_row.key_id)),
                    )
                    .execute(conn)
                    .await?;
                    diesel::insert_into(federation_peer_keys::table)
                        .values(peer_key_row)
                        .execute(conn)
                        .await?;
                }
                if let Some(event_row) = &event_row {
                    diesel::insert_into(federation_connection_events::table)
                        .values(event_row)
                        .execute(conn)
                        .await?;
                }
                if let Some(notice_row) = &notice_row {
                    insert_notice_row!(conn, notice_row);
                }
                if let Some(seen_row) = &seen_row {
                    diesel::insert_into(federation_seen_messages::table)
                        .values(seen_row)
                        .execute(conn)
                        .await
                        .map_err(|error| Conflict::DuplicateMessage.mark(error))?;
                }
                let row = federation_connections::table
                    .filter(federation_connections::id.eq(id))
                    .select(ConnectionRow::as_select())
                    .first(conn)
                    .await?;
                Ok(row)
            })
            .await
        });
        match written {
            Err(StoreError::NotFound) => Ok(WriteOutcome::StateChanged),
            other => match outcome_of(other)? {
                WriteOutcome::Done(row) => Ok(WriteOutcome::Done(row.into_record()?)),
                WriteOutcome::DuplicateMessage => Ok(WriteOutcome::DuplicateMessage),
                WriteOutcome::OpenConnectionExists => Ok(WriteOutcome::OpenConnectionExists),
                WriteOutcome::StateChanged => Ok(WriteOutcome::StateChanged),
            },
        }
    }

    /// One connection by id.
    pub async fn find_connection(&self, id: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        let row = with_connection!(self, |conn| {
            federation_connections::table
                .filter(federation_connections::id.eq(id))
                .select(ConnectionRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(ConnectionRow::into_record).transpose()
    }

    /// The open (pending, active or suspended) connection with a peer in a
    /// workspace, if any.
    pub async fn find_open_connection(
        &self,
        workspace: &str,
        remote_instance_id: &str,
    ) -> Result<Option<ConnectionRecord>, StoreError> {
        let open_states = [
            ConnectionState::Pending.as_str(),
            ConnectionState::Active.as_str(),
            ConnectionState::Suspended.as_str(),
        ];
        let row = with_connection!(self, |conn| {
            federation_connections::table
                .filter(federation_connections::workspace.eq(workspace))
                .filter(federation_connections::remote_instance_id.eq(remote_instance_id))
                .filter(federation_connections::state.eq_any(open_states))
                .select(ConnectionRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(ConnectionRow::into_record).transpose()
    }

    /// Connections matching `filter`, newest first.
    pub async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        let rows = with_connection!(self, |conn| {
            let mut query = federation_connections::table
                .select(ConnectionRow::as_select())
                .order((
                    federation_connections::created_at_ms.desc(),
                    federation_connections::id.desc(),
                ))
                .limit(filter.limit)
                .into_boxed();
            if let Some(workspace) = &filter.workspace {
                query = query.filter(federation_connections::workspace.eq(workspace.clone()));
            }
            if let Some(state) = filter.state {
                query = query.filter(federation_connections::state.eq(state.as_str()));
            }
            if let Some((created_at_ms, id)) = &filter.after {
                query = query.filter(
                    federation_connections::created_at_ms.lt(*created_at_ms).or(
                        federation_connections::created_at_ms
                            .eq(*created_at_ms)
                            .and(federation_connections::id.lt(id.clone())),
                    ),
                );
            }
            query.load(conn).await?
        });
        rows.into_iter().map(ConnectionRow::into_record).collect()
    }

    /// How many connections are in `state` with `direction`.
    pub async fn count_connections(
        &self,
        direction: Direction,
        state: ConnectionState,
    ) -> Result<i64, StoreError> {
        let count = with_connection!(self, |conn| {
            federation_connections::table
                .filter(federation_connections::direction.eq(direction.as_str()))
                .filter(federation_connections::state.eq(state.as_str()))
                .count()
                .get_result::<i64>(conn)
                .await?
        });
        Ok(count)
    }

    /// Up to `limit` inbound requests still PENDING that were made before
    /// `before_ms`, oldest first.
    pub async fn pending_requests_before(
        &self,
        before_ms: i64,
        limit: i64,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        let rows: Vec<ConnectionRow> = with_connection!(self, |conn| {
            federation_connections::table
                .filter(federation_connections::direction.eq(Direction::Inbound.as_str()))
                .filter(federation_connections::state.eq(ConnectionState::Pending.as_str()))
                .filter(federation_connections::created_at_ms.lt(before_ms))
                .order(federation_connections::created_at_ms.asc())
                .limit(limit)
                .select(ConnectionRow::as_select())
                .load(conn)
                .await?
        });
        rows.into_iter().map(ConnectionRow::into_record).collect()
    }

    /// A connection's history, oldest first.
    pub async fn connection_events(
        &self,
        connection_id: &str,
    ) -> Result<Vec<ConnectionEventRecord>, StoreError> {
        let rows: Vec<StoredEventRow> = with_connection!(self, |conn| {
            federation_connection_events::table
                .filter(federation_connection_events::connection_id.eq(connection_id))
                .select(StoredEventRow::as_select())
                .order((
                    federation_connection_events::at_ms.asc(),
                    federation_connection_events::id.asc(),
                ))
                .load(conn)
                .await?
        });
        rows.into_iter().map(StoredEventRow::into_record).collect()
    }

    /// Records the outcome of an exchange with the peer: whether it answered and,
    /// when it did, when.
    pub async fn record_contact(
        &self,
        connection_id: &str,
        reachable: bool,
        contact_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            let target =
                federation_connections::table.filter(federation_connections::id.eq(connection_id));
            match contact_at_ms {
                Some(at_ms) => {
                    diesel::update(target)
                        .set((
                            federation_connections::reachable.eq(reachable),
                            federation_connections::last_contact_at_ms.eq(Some(at_ms)),
                        ))
                        .execute(conn)
                        .await?
                }
                None => {
                    diesel::update(target)
                        .set(federation_connections::reachable.eq(reachable))
                        .execute(conn)
                        .await?
                }
            }
        });
        Ok(())
    }

    /// The peer's previous keys recorded for a connection (expired ones included;
    /// the caller compares `valid_until_ms` with its clock).
    pub async fn peer_keys(&self, connection_id: &str) -> Result<Vec<PeerKeyRecord>, StoreError> {
        let rows: Vec<PeerKeyStoredRow> = with_connection!(self, |conn| {
            federation_peer_keys::table
                .filter(federation_peer_keys::connection_id.eq(connection_id))
                .select(PeerKeyStoredRow::as_select())
                .load(conn)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|row| PeerKeyRecord {
                connection_id: row.connection_id,
                key_id: row.key_id,
                public_key: row.public_key,
                valid_until_ms: row.valid_until_ms,
            })
            .collect())
    }

    /// Forgets message ids seen before `before_ms` (the clock check refuses them
    /// anyway) and peer keys whose grace ended before it. Returns how many message
    /// ids were forgotten.
    pub async fn prune_federation(
        &self,
        seen_before_ms: i64,
        keys_before_ms: i64,
    ) -> Result<u64, StoreError> {
        let deleted_rows = with_connection!(self, |conn| {
            diesel::delete(
                federation_peer_keys::table
                    .filter(federation_peer_keys::valid_until_ms.lt(keys_before_ms)),
            )
            .execute(conn)
            .await?;
            diesel::delete(
                federation_seen_messages::table
                    .filter(federation_seen_messages::seen_at_ms.lt(seen_before_ms)),
            )
            .execute(conn)
            .await?
        });
        Ok(u64::try_from(deleted_rows).unwrap_or(u64::MAX))
    }

    /// Queues a notice on its own (key rotation).
    pub async fn insert_notice(&self, notice: &NoticeRecord) -> Result<(), StoreError> {
        let row = NoticeRow::from_record(notice)?;
        with_connection!(self, |conn| {
            conn.transaction::<_, StoreError, _>(async |conn| {
                insert_notice_row!(conn, &row);
                Ok(())
            })
            .await
        })
    }
}

fn encode_capabilities(capabilities: &ConnectionCapabilities) -> Result<String, StoreError> {
    serde_json::to_string(capabilities).map_err(StoreError::unencodable)
}

fn encode_list(list: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(list).map_err(StoreError::unencodable)
}

pub(super) fn undecodable_value(column: &str, value: &str) -> StoreError {
    StoreError::undecodable(format!("unknown value {value:?} in {column}"))
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = federation_connections, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct ConnectionRow {
    id: String,
    workspace: String,
    remote_instance_id: String,
    remote_name: String,
    remote_url: String,
    remote_public_key: Vec<u8>,
    remote_fingerprint: String,
    capabilities_json: String,
    direction: String,
    state: String,
    state_reason: String,
    suspended_by: Option<String>,
    reachable: bool,
    last_contact_at_ms: Option<i64>,
    created_at_ms: i64,
    updated_at_ms: i64,
    request_source: Option<String>,
}

impl ConnectionRow {
    fn from_record(record: &ConnectionRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: record.id.clone(),
            workspace: record.workspace.clone(),
            remote_instance_id: record.remote_instance_id.clone(),
            remote_name: record.remote_name.clone(),
            remote_url: record.remote_url.clone(),
            remote_public_key: record.remote_public_key.clone(),
            remote_fingerprint: record.remote_fingerprint.clone(),
            capabilities_json: encode_capabilities(&record.capabilities)?,
            direction: record.direction.as_str().to_owned(),
            state: record.state.as_str().to_owned(),
            state_reason: record.state_reason.clone(),
            suspended_by: record.suspended_by.map(|actor| actor.as_str().to_owned()),
            reachable: record.reachable,
            last_contact_at_ms: record.last_contact_at_ms,
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            request_source: record.request_source.clone(),
        })
    }

    fn into_record(self) -> Result<ConnectionRecord, StoreError> {
        Ok(ConnectionRecord {
            capabilities: serde_json::from_str(&self.capabilities_json)
                .map_err(StoreError::undecodable)?,
            direction: Direction::parse(&self.direction)
                .ok_or_else(|| undecodable_value("direction", &self.direction))?,
            state: ConnectionState::parse(&self.state)
                .ok_or_else(|| undecodable_value("state", &self.state))?,
            suspended_by: self
                .suspended_by
                .as_deref()
                .map(|actor| Actor::parse(actor).ok_or_else(|| undecodable_value("actor", actor)))
                .transpose()?,
            id: self.id,
            workspace: self.workspace,
            remote_instance_id: self.remote_instance_id,
            remote_name: self.remote_name,
            remote_url: self.remote_url,
            remote_public_key: self.remote_public_key,
            remote_fingerprint: self.remote_fingerprint,
            state_reason: self.state_reason,
            reachable: self.reachable,
            last_contact_at_ms: self.last_contact_at_ms,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            request_source: self.request_source,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = federation_connection_events)]
struct EventRow {
    id: String,
    connection_id: String,
    from_state: Option<&'static str>,
    to_state: &'static str,
    actor: &'static str,
    reason: String,
    at_ms: i64,
}

impl EventRow {
    fn from_record(record: &ConnectionEventRecord) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            connection_id: record.connection_id.clone(),
            from_state: record.from_state.map(ConnectionState::as_str),
            to_state: record.to_state.as_str(),
            actor: record.actor.as_str(),
            reason: record.reason.clone(),
            at_ms: record.at_ms,
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = federation_connection_events, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct StoredEventRow {
    connection_id: String,
    from_state: Option<String>,
    to_state: String,
    actor: String,
    reason: String,
    at_ms: i64,
}

impl StoredEventRow {
    fn into_record(self) -> Result<ConnectionEventRecord, StoreError> {
        Ok(ConnectionEventRecord {
            from_state: self
                .from_state
                .as_deref()
                .map(|state| {
                    ConnectionState::parse(state).ok_or_else(|| undecodable_value("state", state))
                })
                .transpose()?,
            to_state: ConnectionState::parse(&self.to_state)
                .ok_or_else(|| undecodable_value("state", &self.to_state))?,
            actor: Actor::parse(&self.actor)
                .ok_or_else(|| undecodable_value("actor", &self.actor))?,
            connection_id: self.connection_id,
            reason: self.reason,
            at_ms: self.at_ms,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = federation_peer_keys)]
struct PeerKeyRow<'a> {
    connection_id: &'a str,
    key_id: &'a str,
    public_key: &'a [u8],
    valid_until_ms: i64,
}

impl<'a> PeerKeyRow<'a> {
    fn from_record(record: &'a PeerKeyRecord) -> Self {
        Self {
            connection_id: &record.connection_id,
            key_id: &record.key_id,
            public_key: &record.public_key,
            valid_until_ms: record.valid_until_ms,
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = federation_peer_keys, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct PeerKeyStoredRow {
    connection_id: String,
    key_id: String,
    public_key: Vec<u8>,
    valid_until_ms: i64,
}

#[derive(Clone, Insertable)]
#[diesel(table_name = federation_outbox)]
struct NoticeRow {
    id: String,
    connection_id: String,
    kind: &'static str,
    reason: String,
    granted_capabilities_json: String,
    signing_key_id: Option<String>,
    attempts: i32,
    next_attempt_at_ms: i64,
    last_error: String,
    created_at_ms: i64,
    /// Set when inserted: after every pending notice.
    sequence: i64,
}

impl NoticeRow {
    fn from_record(record: &NoticeRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: record.id.clone(),
            connection_id: record.connection_id.clone(),
            kind: record.kind.as_str(),
            reason: record.reason.clone(),
            granted_capabilities_json: encode_list(&record.granted_capabilities)?,
            signing_key_id: record.signing_key_id.clone(),
            attempts: record.attempts,
            next_attempt_at_ms: record.next_attempt_at_ms,
            last_error: record.last_error.clone(),
            created_at_ms: record.created_at_ms,
            sequence: 0,
        })
    }
}

#[cfg(test)]
mod tests;
