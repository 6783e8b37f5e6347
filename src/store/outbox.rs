//! Reading and rescheduling the outbox: the notices to peers still to
//! deliver, per connection, in the order they were queued. Notices are
//! queued in `federation.rs`, in the transaction of the change they tell.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::federation::{NoticeRecord, undecodable_value};
use super::schema::federation_outbox;
use super::{Store, StoreError};
use crate::federation::state::NoticeKind;

impl Store {
    /// Connection ids that have notices due at `now_ms`, oldest notice first.
    pub async fn connections_with_due_notices(
        &self,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = with_connection!(self, |conn| {
            federation_outbox::table
                .filter(federation_outbox::next_attempt_at_ms.le(now_ms))
                .select(federation_outbox::connection_id)
                .distinct()
                .load(conn)
                .await?
        });
        Ok(ids)
    }

    /// A connection's undelivered notices, in the order they were queued.
    pub async fn notices_of(&self, connection_id: &str) -> Result<Vec<NoticeRecord>, StoreError> {
        let rows: Vec<NoticeStoredRow> = with_connection!(self, |conn| {
            federation_outbox::table
                .filter(federation_outbox::connection_id.eq(connection_id))
                .select(NoticeStoredRow::as_select())
                .order(federation_outbox::sequence.asc())
                .load(conn)
                .await?
        });
        rows.into_iter().map(NoticeStoredRow::into_record).collect()
    }

    /// Removes a delivered (or abandoned) notice.
    pub async fn delete_notice(&self, notice_id: &str) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::delete(federation_outbox::table.filter(federation_outbox::id.eq(notice_id)))
                .execute(conn)
                .await?
        });
        Ok(())
    }

    /// Records a failed delivery attempt and when to try again.
    pub async fn reschedule_notice(
        &self,
        notice_id: &str,
        attempts: i32,
        next_attempt_at_ms: i64,
        last_error: &str,
    ) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::update(federation_outbox::table.filter(federation_outbox::id.eq(notice_id)))
                .set((
                    federation_outbox::attempts.eq(attempts),
                    federation_outbox::next_attempt_at_ms.eq(next_attempt_at_ms),
                    federation_outbox::last_error.eq(last_error),
                ))
                .execute(conn)
                .await?
        });
        Ok(())
    }

    /// Undelivered notices per connection id, for the given connections.
    pub async fn pending_notice_counts(
        &self,
        connection_ids: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let ids: Vec<String> = with_connection!(self, |conn| {
            federation_outbox::table
                .filter(federation_outbox::connection_id.eq_any(connection_ids))
                .select(federation_outbox::connection_id)
                .load(conn)
                .await?
        });
        let mut counts = HashMap::new();
        for id in ids {
            *counts.entry(id).or_insert(0u32) += 1;
        }
        Ok(counts)
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = federation_outbox, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct NoticeStoredRow {
    id: String,
    connection_id: String,
    kind: String,
    reason: String,
    granted_capabilities_json: String,
    signing_key_id: Option<String>,
    attempts: i32,
    next_attempt_at_ms: i64,
    last_error: String,
    created_at_ms: i64,
}

impl NoticeStoredRow {
    fn into_record(self) -> Result<NoticeRecord, StoreError> {
        Ok(NoticeRecord {
            kind: NoticeKind::parse(&self.kind)
                .ok_or_else(|| undecodable_value("kind", &self.kind))?,
            granted_capabilities: serde_json::from_str(&self.granted_capabilities_json)
                .map_err(StoreError::undecodable)?,
            id: self.id,
            connection_id: self.connection_id,
            reason: self.reason,
            signing_key_id: self.signing_key_id,
            attempts: self.attempts,
            next_attempt_at_ms: self.next_attempt_at_ms,
            last_error: self.last_error,
            created_at_ms: self.created_at_ms,
        })
    }
}
