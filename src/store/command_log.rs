//! Queries for the command log of signed commands: rows for commands received
//! and sent, the signed bytes kept with an outbound command so that a retry
//! re-sends them, and the listing operators read.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::Conflict;
use super::error::outcome_of;
use super::schema::{federation_command_log, federation_seen_messages};
use super::seen_messages::SeenRow;
use super::{SeenMessage, Store, StoreError, WriteOutcome};

/// Whether this instance received or sent a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandDirection {
    /// Received from a peer.
    Inbound,
    /// Sent to a peer.
    Outbound,
}

impl CommandDirection {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "inbound" => Ok(Self::Inbound),
            "outbound" => Ok(Self::Outbound),
            other => Err(StoreError::undecodable(format!(
                "unknown value {other:?} in federation_command_log.direction"
            ))),
        }
    }
}

/// A signed command as sent: the exact bytes, their signature and key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommand {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_id: String,
}

/// One command in the command log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLogRecord {
    pub id: String,
    pub direction: CommandDirection,
    pub message_id: String,
    pub sender_instance_id: String,
    pub recipient_instance_id: String,
    pub workspace: String,
    /// e.g. `agent.spawn`; empty when a refused command could not be decoded.
    pub command_type: String,
    /// `ok`, a gRPC code name, or empty while an outbound command awaits its
    /// reply.
    pub outcome: String,
    pub detail: String,
    pub issued_at_ms: i64,
    pub recorded_at_ms: i64,
    /// Outbound: digest of the operator's request.
    pub request_digest: Option<Vec<u8>>,
    /// Outbound: the signed command.
    pub envelope: Option<SignedCommand>,
}

/// Which log entries to list, newest first, after a cursor.
#[derive(Debug, Clone, Default)]
pub struct CommandLogFilter {
    /// Sender or recipient.
    pub peer_instance_id: Option<String>,
    pub workspace: Option<String>,
    pub direction: Option<CommandDirection>,
    /// `(recorded_at_ms, id)` of the last entry of the previous page.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

impl Store {
    /// Records a command. An outbound row whose message id is already
    /// recorded is [`WriteOutcome::DuplicateMessage`] and writes nothing.
    pub async fn insert_command_log(
        &self,
        record: &CommandLogRecord,
    ) -> Result<WriteOutcome<()>, StoreError> {
        let row = CommandLogRow::from_record(record);
        let written = with_connection!(self, |conn| {
            diesel::insert_into(federation_command_log::table)
                .values(&row)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(|error| Conflict::DuplicateMessage.mark(error))
        });
        outcome_of(written)
    }

    /// Records log entries in one transaction, with an outcome per entry: one
    /// whose outbound message id is already logged is
    /// [`WriteOutcome::DuplicateMessage`] and writes nothing, and the others
    /// are written all the same. The group commit of the entries of sent
    /// reads (`federation::journal::SentLog`).
    pub async fn insert_command_logs(
        &self,
        records: Vec<CommandLogRecord>,
    ) -> Result<Vec<WriteOutcome<()>>, StoreError> {
        let outcome = |inserted: usize| {
            if inserted == 0 {
                WriteOutcome::DuplicateMessage
            } else {
                WriteOutcome::Done(())
            }
        };
        in_transaction!(
            self,
            // SQLite, synchronous, on the blocking pool.
            |conn| {
                use diesel::RunQueryDsl as Sync;
                // The records move to the blocking thread.
                records
                    .iter()
                    .map(|record| {
                        Sync::execute(
                            diesel::insert_into(federation_command_log::table)
                                .values(CommandLogRow::from_record(record))
                                .on_conflict_do_nothing(),
                            conn,
                        )
                        .map(outcome)
                        .map_err(StoreError::from)
                    })
                    .collect()
            },
            // PostgreSQL.
            |conn| {
                let mut outcomes = Vec::with_capacity(records.len());
                for record in &records {
                    let inserted = diesel::insert_into(federation_command_log::table)
                        .values(CommandLogRow::from_record(record))
                        .on_conflict_do_nothing()
                        .execute(conn)
                        .await?;
                    outcomes.push(outcome(inserted));
                }
                Ok(outcomes)
            },
        )
    }

    /// Records accepted received commands, each with its message id, in one
    /// transaction, with an outcome per command: one whose message id was
    /// recorded before (a replay, or a concurrent delivery that came first) is
    /// [`WriteOutcome::DuplicateMessage`] and writes nothing, and the others
    /// are written all the same. This is the group commit behind
    /// `federation::journal`: one commit for the commands that arrived
    /// together.
    pub async fn record_inbound_commands(
        &self,
        commands: Vec<(SeenMessage, CommandLogRecord)>,
    ) -> Result<Vec<WriteOutcome<()>>, StoreError> {
        in_transaction!(
            self,
            // SQLite, synchronous, on the blocking pool.
            |conn| {
                use diesel::RunQueryDsl as Sync;
                // The commands move to the blocking thread.
                let mut outcomes = Vec::with_capacity(commands.len());
                for (seen, record) in &commands {
                    let inserted = Sync::execute(
                        diesel::insert_into(federation_seen_messages::table)
                            .values(SeenRow::from_record(seen))
                            .on_conflict_do_nothing(),
                        conn,
                    )?;
                    if inserted == 0 {
                        outcomes.push(WriteOutcome::DuplicateMessage);
                        continue;
                    }
                    Sync::execute(
                        diesel::insert_into(federation_command_log::table)
                            .values(CommandLogRow::from_record(record)),
                        conn,
                    )?;
                    outcomes.push(WriteOutcome::Done(()));
                }
                Ok(outcomes)
            },
            // PostgreSQL.
            |conn| {
                let mut outcomes = Vec::with_capacity(commands.len());
                for (seen, record) in &commands {
                    let inserted = diesel::insert_into(federation_seen_messages::table)
                        .values(SeenRow::from_record(seen))
                        .on_conflict_do_nothing()
                        .execute(conn)
                        .await?;
                    if inserted == 0 {
                        outcomes.push(WriteOutcome::DuplicateMessage);
                        continue;
                    }
                    diesel::insert_into(federation_command_log::table)
                        .values(CommandLogRow::from_record(record))
                        .execute(conn)
                        .await?;
                    outcomes.push(WriteOutcome::Done(()));
                }
                Ok(outcomes)
            },
        )
    }

    /// Sets the outcome of a recorded command.
    pub async fn finish_command_log(
        &self,
        id: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        with_connection!(self, |conn| {
            diesel::update(federation_command_log::table.filter(federation_command_log::id.eq(id)))
                .set((
                    federation_command_log::outcome.eq(outcome),
                    federation_command_log::detail.eq(detail),
                ))
                .execute(conn)
                .await?
        });
        Ok(())
    }

    /// The outbound command with `message_id`, if this instance sent one.
    pub async fn find_outbound_command(
        &self,
        message_id: &str,
    ) -> Result<Option<CommandLogRecord>, StoreError> {
        let row: Option<CommandLogStoredRow> = with_connection!(self, |conn| {
            federation_command_log::table
                .filter(federation_command_log::direction.eq(CommandDirection::Outbound.as_str()))
                .filter(federation_command_log::message_id.eq(message_id))
                .select(CommandLogStoredRow::as_select())
                .first(conn)
                .await
                .optional()?
        });
        row.map(CommandLogStoredRow::into_record).transpose()
    }

    /// Log entries matching `filter`, newest first.
    pub async fn list_command_log(
        &self,
        filter: &CommandLogFilter,
    ) -> Result<Vec<CommandLogRecord>, StoreError> {
        let rows: Vec<CommandLogStoredRow> = with_connection!(self, |conn| {
            let mut query = federation_command_log::table
                .select(CommandLogStoredRow::as_select())
                .into_boxed();
            if let Some(peer) = &filter.peer_instance_id {
                query = query.filter(
                    federation_command_log::sender_instance_id
                        .eq(peer)
                        .or(federation_command_log::recipient_instance_id.eq(peer)),
                );
            }
            if let Some(workspace) = &filter.workspace {
                query = query.filter(federation_command_log::workspace.eq(workspace));
            }
            if let Some(direction) = filter.direction {
                query = query.filter(federation_command_log::direction.eq(direction.as_str()));
            }
            if let Some((recorded_at_ms, id)) = &filter.after {
                query = query.filter(
                    federation_command_log::recorded_at_ms
                        .lt(*recorded_at_ms)
                        .or(federation_command_log::recorded_at_ms
                            .eq(*recorded_at_ms)
                            .and(federation_command_log::id.lt(id))),
                );
            }
            query
                .order((
                    federation_command_log::recorded_at_ms.desc(),
                    federation_command_log::id.desc(),
                ))
                .limit(filter.limit)
                .load(conn)
                .await?
        });
        rows.into_iter()
            .map(CommandLogStoredRow::into_record)
            .collect()
    }

    /// Forgets log entries recorded before `before_ms`. Returns how many.
    pub async fn prune_command_log(&self, before_ms: i64) -> Result<u64, StoreError> {
        let deleted = with_connection!(self, |conn| {
            diesel::delete(
                federation_command_log::table
                    .filter(federation_command_log::recorded_at_ms.lt(before_ms)),
            )
            .execute(conn)
            .await?
        });
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }
}

#[derive(Insertable)]
#[diesel(table_name = federation_command_log)]
struct CommandLogRow<'a> {
    id: &'a str,
    direction: &'static str,
    message_id: &'a str,
    sender_instance_id: &'a str,
    recipient_instance_id: &'a str,
    workspace: &'a str,
    command_type: &'a str,
    outcome: &'a str,
    detail: &'a str,
    issued_at_ms: i64,
    recorded_at_ms: i64,
    request_digest: Option<&'a [u8]>,
    envelope_payload: Option<&'a [u8]>,
    envelope_signature: Option<&'a [u8]>,
    envelope_key_id: Option<&'a str>,
}

impl<'a> CommandLogRow<'a> {
    fn from_record(record: &'a CommandLogRecord) -> Self {
        Self {
            id: &record.id,
            direction: record.direction.as_str(),
            message_id: &record.message_id,
            sender_instance_id: &record.sender_instance_id,
            recipient_instance_id: &record.recipient_instance_id,
            workspace: &record.workspace,
            command_type: &record.command_type,
            outcome: &record.outcome,
            detail: &record.detail,
            issued_at_ms: record.issued_at_ms,
            recorded_at_ms: record.recorded_at_ms,
            request_digest: record.request_digest.as_deref(),
            envelope_payload: record.envelope.as_ref().map(|sent| sent.payload.as_slice()),
            envelope_signature: record
                .envelope
                .as_ref()
                .map(|sent| sent.signature.as_slice()),
            envelope_key_id: record.envelope.as_ref().map(|sent| sent.key_id.as_str()),
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = federation_command_log, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct CommandLogStoredRow {
    id: String,
    direction: String,
    message_id: String,
    sender_instance_id: String,
    recipient_instance_id: String,
    workspace: String,
    command_type: String,
    outcome: String,
    detail: String,
    issued_at_ms: i64,
    recorded_at_ms: i64,
    request_digest: Option<Vec<u8>>,
    envelope_payload: Option<Vec<u8>>,
    envelope_signature: Option<Vec<u8>>,
    envelope_key_id: Option<String>,
}

impl CommandLogStoredRow {
    fn into_record(self) -> Result<CommandLogRecord, StoreError> {
        let envelope = match (
            self.envelope_payload,
            self.envelope_signature,
            self.envelope_key_id,
        ) {
            (Some(payload), Some(signature), Some(key_id)) => Some(SignedCommand {
                payload,
                signature,
                key_id,
            }),
            _ => None,
        };
        Ok(CommandLogRecord {
            id: self.id,
            direction: CommandDirection::parse(&self.direction)?,
            message_id: self.message_id,
            sender_instance_id: self.sender_instance_id,
            recipient_instance_id: self.recipient_instance_id,
            workspace: self.workspace,
            command_type: self.command_type,
            outcome: self.outcome,
            detail: self.detail,
            issued_at_ms: self.issued_at_ms,
            recorded_at_ms: self.recorded_at_ms,
            request_digest: self.request_digest,
            envelope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{status_log_entry, test_on_both_backends};

    test_on_both_backends!(
        a_batch_writes_each_new_command_and_refuses_each_replay,
        a_batch_of_sent_entries_writes_each_new_message_id_once,
    );

    /// An accepted `agent.status` from `peer` under `message_id`.
    fn received(message_id: &str, digest: u8) -> (SeenMessage, CommandLogRecord) {
        let seen = SeenMessage {
            sender_instance_id: "peer".to_owned(),
            message_id: message_id.to_owned(),
            payload_digest: vec![digest; 32],
            reply: None,
            seen_at_ms: 1_000,
        };
        let record = status_log_entry(CommandDirection::Inbound, message_id);
        (seen, record)
    }

    async fn a_batch_writes_each_new_command_and_refuses_each_replay(store: Store) {
        let first = store
            .record_inbound_commands(vec![received("m1", 1)])
            .await
            .expect("first batch");
        assert_eq!(first, [WriteOutcome::Done(())]);

        // A replay of m1 from an earlier batch, and m2 twice in this one.
        let outcomes = store
            .record_inbound_commands(vec![
                received("m2", 2),
                received("m1", 9),
                received("m3", 3),
                received("m2", 2),
            ])
            .await
            .expect("second batch");
        assert_eq!(
            outcomes,
            [
                WriteOutcome::Done(()),
                WriteOutcome::DuplicateMessage,
                WriteOutcome::Done(()),
                WriteOutcome::DuplicateMessage,
            ]
        );

        let seen = store
            .find_seen_message("peer", "m1")
            .await
            .expect("lookup")
            .expect("m1 recorded");
        assert_eq!(seen.payload_digest, vec![1; 32], "the first bytes stay");
        let mut logged: Vec<String> = store
            .list_command_log(&CommandLogFilter {
                peer_instance_id: None,
                workspace: None,
                direction: None,
                after: None,
                limit: 100,
            })
            .await
            .expect("log")
            .into_iter()
            .map(|entry| entry.message_id)
            .collect();
        logged.sort();
        assert_eq!(
            logged,
            ["m1", "m2", "m3"],
            "one entry per command, none for replays"
        );
    }

    /// A sent `agent.status` under `message_id`, ended with `outcome`.
    fn sent(message_id: &str, outcome: &str) -> CommandLogRecord {
        CommandLogRecord {
            outcome: outcome.to_owned(),
            ..status_log_entry(CommandDirection::Outbound, message_id)
        }
    }

    async fn a_batch_of_sent_entries_writes_each_new_message_id_once(store: Store) {
        let first = store
            .insert_command_logs(vec![sent("s1", "ok")])
            .await
            .expect("first batch");
        assert_eq!(first, [WriteOutcome::Done(())]);
        let outcomes = store
            .insert_command_logs(vec![
                sent("s2", "ok"),
                sent("s1", "again"),
                sent("s3", "unavailable"),
                sent("s2", "again"),
            ])
            .await
            .expect("second batch");
        assert_eq!(
            outcomes,
            [
                WriteOutcome::Done(()),
                WriteOutcome::DuplicateMessage,
                WriteOutcome::Done(()),
                WriteOutcome::DuplicateMessage,
            ]
        );
        let mut logged: Vec<(String, String)> = store
            .list_command_log(&CommandLogFilter {
                peer_instance_id: None,
                workspace: None,
                direction: Some(CommandDirection::Outbound),
                after: None,
                limit: 100,
            })
            .await
            .expect("log")
            .into_iter()
            .map(|entry| (entry.message_id, entry.outcome))
            .collect();
        logged.sort();
        assert_eq!(
            logged,
            [
                ("s1".to_owned(), "ok".to_owned()),
                ("s2".to_owned(), "ok".to_owned()),
                ("s3".to_owned(), "unavailable".to_owned()),
            ]
        );
    }
}
