//! The checks a watcher makes on each signed batch of a remote agent's events
//! (`AgentEventsPayload`) before it believes any of it, in the order the
//! proto gives: it verifies as a reply from the watched peer, answers this
//! stream's `agent.watch`, and follows the last verified batch. Pure: no
//! I/O, time comes in as an argument.

use crate::federation::envelope::{self, EnvelopeError, TrustedKey};
use crate::proto::agent as pb_agent;
use crate::proto::federation as pb;

/// Why a batch was refused. Nothing of a refused batch is passed on.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The envelope does not verify (signature, signing key, recipient,
    /// sender or workspace).
    #[error("the batch does not verify: {0}")]
    Envelope(#[from] EnvelopeError),
    /// It answers another `agent.watch` than this stream's.
    #[error("the batch answers another command ({0:?})")]
    OtherCommand(String),
    /// Its range does not start right after the last verified one.
    #[error("the batch covers sequences {first} to {last}, but the next expected is {expected}")]
    NotNext {
        /// The sequence the batch had to start at.
        expected: u64,
        /// Where it starts.
        first: u64,
        /// Where it ends.
        last: u64,
    },
    /// Its range is empty or backwards.
    #[error("the batch's range {first} to {last} is backwards")]
    Backwards {
        /// Where it starts.
        first: u64,
        /// Where it ends.
        last: u64,
    },
    /// An event's sequence is outside the range or not after the one before.
    #[error("event sequence {sequence} is not in order inside the batch's range {first} to {last}")]
    EventOutOfOrder {
        /// The event's sequence.
        sequence: u64,
        /// Where the range starts.
        first: u64,
        /// Where it ends.
        last: u64,
    },
}

/// The state of one followed stream of batches: who may sign them, for which
/// command, and the sequence the next one must start at.
#[derive(Debug, Clone)]
pub struct BatchCheck {
    me: String,
    peer_instance_id: String,
    workspace: String,
    command_message_id: String,
    next: Option<u64>,
}

impl BatchCheck {
    /// Checks batches answering `command_message_id`, sent by
    /// `peer_instance_id` to `me` in `workspace`, the first of which starts
    /// at `from` (0 counts as 1; `None`: anywhere, for a watch from the
    /// current state).
    pub fn new(
        me: &str,
        peer_instance_id: &str,
        workspace: &str,
        command_message_id: &str,
        from: Option<u64>,
    ) -> Self {
        Self {
            me: me.to_owned(),
            peer_instance_id: peer_instance_id.to_owned(),
            workspace: workspace.to_owned(),
            command_message_id: command_message_id.to_owned(),
            next: from.map(|from| from.max(1)),
        }
    }

    /// The sequence the next batch must start at: where to resume. `None`
    /// until the first batch of a watch from the current state.
    pub fn next_sequence(&self) -> Option<u64> {
        self.next
    }

    /// Verifies one batch with the peer's `trusted` keys and returns its
    /// events; on success the next batch must start after this one's last
    /// sequence. A refused batch changes nothing.
    pub fn check(
        &mut self,
        sealed: Option<&pb::SignedEnvelope>,
        trusted: &[TrustedKey],
        now_ms: i64,
    ) -> Result<Vec<pb_agent::WatchAgentResponse>, BatchError> {
        let verified = envelope::open_reply::<pb::AgentEventsPayload>(
            sealed,
            &self.me,
            &self.peer_instance_id,
            &self.workspace,
            trusted,
            now_ms,
        )?;
        let batch = verified.payload;
        if batch.command_message_id != self.command_message_id {
            return Err(BatchError::OtherCommand(batch.command_message_id));
        }
        let (first, last) = (batch.first_sequence, batch.last_sequence);
        if let Some(expected) = self.next
            && first != expected
        {
            return Err(BatchError::NotNext {
                expected,
                first,
                last,
            });
        }
        if last < first {
            return Err(BatchError::Backwards { first, last });
        }
        let mut floor = first;
        for (index, event) in batch.events.iter().enumerate() {
            let sequence = event.sequence;
            let in_order = if index == 0 {
                sequence >= floor
            } else {
                sequence > floor
            };
            if !in_order || sequence > last {
                return Err(BatchError::EventOutOfOrder {
                    sequence,
                    first,
                    last,
                });
            }
            floor = sequence;
        }
        self.next = Some(last + 1);
        Ok(batch.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::envelope::{Routing, new_header, seal};
    use crate::identity::InstanceKey;

    const NOW: i64 = 1_800_000_000_000;

    fn key() -> InstanceKey {
        InstanceKey::generate().expect("key")
    }

    fn trusted(key: &InstanceKey) -> Vec<TrustedKey> {
        vec![TrustedKey {
            key: key.public_key().clone(),
            valid_until_ms: None,
        }]
    }

    fn event(sequence: u64) -> pb_agent::WatchAgentResponse {
        pb_agent::WatchAgentResponse {
            sequence,
            event: Some(pb_agent::watch_agent_response::Event::OutputLine(
                pb_agent::AgentOutputLine {
                    line: format!("line {sequence}"),
                    ..Default::default()
                },
            )),
        }
    }

    /// A batch from "b" to "a" in "ws" answering "cmd-1".
    fn batch(
        signer: &InstanceKey,
        command: &str,
        first: u64,
        last: u64,
        events: &[u64],
    ) -> pb::SignedEnvelope {
        let routing = Routing {
            sender_instance_id: "b",
            recipient_instance_id: "a",
            workspace: "ws",
            now_ms: NOW,
            lifetime_ms: 60_000,
        };
        let payload = pb::AgentEventsPayload {
            header: Some(new_header(&routing, signer.public_key().key_id())),
            command_message_id: command.to_owned(),
            first_sequence: first,
            last_sequence: last,
            events: events.iter().copied().map(event).collect(),
        };
        seal(&payload, signer).expect("seal")
    }

    fn check(from: Option<u64>) -> BatchCheck {
        BatchCheck::new("a", "b", "ws", "cmd-1", from)
    }

    #[test]
    fn contiguous_batches_pass_and_say_where_to_resume() {
        let b = key();
        let mut check = check(Some(0));
        let events = check
            .check(
                Some(&batch(&b, "cmd-1", 1, 3, &[1, 2, 3])),
                &trusted(&b),
                NOW,
            )
            .expect("first batch");
        assert_eq!(events.len(), 3);
        // Sequences without an event (output not sent) inside a range are fine.
        check
            .check(Some(&batch(&b, "cmd-1", 4, 9, &[5, 9])), &trusted(&b), NOW)
            .expect("second batch");
        assert_eq!(check.next_sequence(), Some(10));
        // A resume: a new command, its batches from where this one stopped.
        let mut resumed = BatchCheck::new("a", "b", "ws", "cmd-2", check.next_sequence());
        resumed
            .check(Some(&batch(&b, "cmd-2", 10, 10, &[10])), &trusted(&b), NOW)
            .expect("a batch of the resumed command");
    }

    #[test]
    fn a_watch_from_now_takes_its_first_batch_anywhere() {
        let b = key();
        let mut check = check(None);
        assert_eq!(check.next_sequence(), None);
        check
            .check(Some(&batch(&b, "cmd-1", 7, 7, &[7])), &trusted(&b), NOW)
            .expect("first batch");
        assert_eq!(check.next_sequence(), Some(8));
    }

    #[test]
    fn a_flipped_bit_another_key_another_command_or_a_gap_is_refused() {
        let b = key();
        let stranger = key();
        let mut check = check(Some(1));
        let mut flipped = batch(&b, "cmd-1", 1, 2, &[1, 2]);
        flipped.payload[20] ^= 0x01;
        let mut flipped_signature = batch(&b, "cmd-1", 1, 2, &[1, 2]);
        flipped_signature.signature[5] ^= 0x01;
        let refusals = [
            (flipped, "payload bit"),
            (flipped_signature, "signature bit"),
            (batch(&stranger, "cmd-1", 1, 2, &[1, 2]), "another key"),
            (batch(&b, "cmd-0", 1, 2, &[1, 2]), "another command"),
            (batch(&b, "cmd-1", 2, 3, &[2, 3]), "skips sequence 1"),
            (batch(&b, "cmd-1", 1, 2, &[2, 1]), "events out of order"),
            (batch(&b, "cmd-1", 1, 2, &[1, 3]), "event past the range"),
            (batch(&b, "cmd-1", 3, 1, &[]), "backwards"),
        ];
        for (sealed, case) in refusals {
            let refused = check.check(Some(&sealed), &trusted(&b), NOW);
            assert!(refused.is_err(), "{case}: {refused:?}");
            // Nothing moved: the honest batch still fits.
            assert_eq!(check.next_sequence(), Some(1), "{case}");
        }
        assert!(matches!(
            check.check(Some(&batch(&b, "cmd-1", 2, 3, &[2])), &trusted(&b), NOW),
            Err(BatchError::NotNext { expected: 1, .. })
        ));
        check
            .check(Some(&batch(&b, "cmd-1", 1, 2, &[1, 2])), &trusted(&b), NOW)
            .expect("the honest batch");
        // A replay of a batch already believed does not follow.
        assert!(
            check
                .check(Some(&batch(&b, "cmd-1", 1, 2, &[1, 2])), &trusted(&b), NOW)
                .is_err()
        );
    }

    #[test]
    fn a_batch_for_someone_else_is_refused() {
        let b = key();
        let mut to_other = BatchCheck::new("c", "b", "ws", "cmd-1", Some(1));
        assert!(
            to_other
                .check(Some(&batch(&b, "cmd-1", 1, 1, &[1])), &trusted(&b), NOW)
                .is_err()
        );
        let mut other_workspace = BatchCheck::new("a", "b", "other", "cmd-1", Some(1));
        assert!(
            other_workspace
                .check(Some(&batch(&b, "cmd-1", 1, 1, &[1])), &trusted(&b), NOW)
                .is_err()
        );
    }
}
