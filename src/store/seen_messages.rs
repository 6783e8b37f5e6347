//! Message ids already accepted from each sender (replay protection), with
//! the signed reply stored for an identical retry, and the claim a replica
//! takes on a command before it runs it.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::Conflict;
use super::error::{WriteOutcome, outcome_of};
use super::schema::federation_seen_messages;
use super::{Store, StoreError};

/// The signed reply stored for a message, returned again to an identical retry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReply {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_id: String,
}

/// A message id accepted from a sender.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenMessage {
    pub sender_instance_id: String,
    pub message_id: String,
    /// SHA-256 of the signed payload bytes.
    pub payload_digest: Vec<u8>,
    pub reply: Option<StoredReply>,
    pub seen_at_ms: i64,
}

impl Store {
    /// A message id already accepted from `sender_instance_id`, if any.
    pub async fn find_seen_message(
        &self,
        sender_instance_id: &str,
        message_id: &str,
    ) -> Result<Option<SeenMessage>, StoreError> {
        let row: Option<SeenStoredRow> = with_connection!(self, |conn| {
            federation_seen_messages::table
                .filter(federation_seen_messages::sender_instance_id.eq(sender_instance_id))
                .filter(federation_seen_messages::message_id.eq(message_id))
                .select(SeenStoredRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        Ok(row.map(SeenStoredRow::into_record))
    }

    /// Records a message id on its own (pings, whose replies are not stored).
    pub async fn insert_seen_message(
        &self,
        seen: &SeenMessage,
    ) -> Result<WriteOutcome<()>, StoreError> {
        let row = SeenRow::from_record(seen);
        let written = with_connection!(self, |conn| {
            diesel::insert_into(federation_seen_messages::table)
                .values(&row)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(|error| Conflict::DuplicateMessage.mark(error))
        });
        outcome_of(written)
    }

    /// Stores the reply to a message id claimed with a reply-less
    /// [`insert_seen_message`](Store::insert_seen_message) before the command
    /// ran (a command that changes state: every replica that receives it
    /// looks for the claim, and waits for this reply). Writes nothing if the
    /// claim has a reply already.
    pub async fn answer_claimed_message(&self, seen: &SeenMessage) -> Result<(), StoreError> {
        let Some(reply) = &seen.reply else {
            return Err(StoreError::unencodable("a claim is answered with a reply"));
        };
        with_connection!(self, |conn| {
            diesel::update(
                federation_seen_messages::table
                    .filter(
                        federation_seen_messages::sender_instance_id.eq(&seen.sender_instance_id),
                    )
                    .filter(federation_seen_messages::message_id.eq(&seen.message_id))
                    .filter(federation_seen_messages::reply_payload.is_null()),
            )
            .set((
                federation_seen_messages::reply_payload.eq(Some(reply.payload.as_slice())),
                federation_seen_messages::reply_signature.eq(Some(reply.signature.as_slice())),
                federation_seen_messages::reply_key_id.eq(Some(reply.key_id.as_str())),
            ))
            .execute(conn)
            .await?;
        });
        Ok(())
    }
}

#[derive(Insertable)]
#[diesel(table_name = federation_seen_messages)]
pub(super) struct SeenRow<'a> {
    sender_instance_id: &'a str,
    message_id: &'a str,
    payload_digest: &'a [u8],
    reply_payload: Option<&'a [u8]>,
    reply_signature: Option<&'a [u8]>,
    reply_key_id: Option<&'a str>,
    seen_at_ms: i64,
}

impl<'a> SeenRow<'a> {
    pub(super) fn from_record(record: &'a SeenMessage) -> Self {
        Self {
            sender_instance_id: &record.sender_instance_id,
            message_id: &record.message_id,
            payload_digest: &record.payload_digest,
            reply_payload: record.reply.as_ref().map(|reply| reply.payload.as_slice()),
            reply_signature: record
                .reply
                .as_ref()
                .map(|reply| reply.signature.as_slice()),
            reply_key_id: record.reply.as_ref().map(|reply| reply.key_id.as_str()),
            seen_at_ms: record.seen_at_ms,
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = federation_seen_messages, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct SeenStoredRow {
    sender_instance_id: String,
    message_id: String,
    payload_digest: Vec<u8>,
    reply_payload: Option<Vec<u8>>,
    reply_signature: Option<Vec<u8>>,
    reply_key_id: Option<String>,
    seen_at_ms: i64,
}

impl SeenStoredRow {
    fn into_record(self) -> SeenMessage {
        let reply = match (self.reply_payload, self.reply_signature, self.reply_key_id) {
            (Some(payload), Some(signature), Some(key_id)) => Some(StoredReply {
                payload,
                signature,
                key_id,
            }),
            _ => None,
        };
        SeenMessage {
            sender_instance_id: self.sender_instance_id,
            message_id: self.message_id,
            payload_digest: self.payload_digest,
            reply,
            seen_at_ms: self.seen_at_ms,
        }
    }
}
