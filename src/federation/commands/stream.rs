//! The receiver's side of `agent.watch` (WatchCommand): the command checked
//! as every command is, its message id claimed once, then the watched
//! agent's events sent back as signed batches (`AgentEventsPayload`) for as
//! long as the connection allows it. One command-log entry per stream,
//! finished with what was sent and how it ended.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::receive::{Admitted, allows, own_agent};
use crate::agents::convert::{event_to_proto, watch_from};
use crate::agents::elsewhere::EventStream;
use crate::agents::{AgentError, AgentRuntime, SequencedEvent, WatchFrom};
use crate::federation::command_log::describe_error;
use crate::federation::envelope;
use crate::federation::peering::{no_connection, seen_message};
use crate::federation::{Federation, FederationError};
use crate::identity::PublicKey;
use crate::proto::agent as pb_agent;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogRecord, WriteOutcome};

/// Most events in one batch.
const MAX_BATCH_EVENTS: usize = 4096;
/// A batch is sealed once its events reach this many encoded bytes, or half
/// the configured message size if that is less (a line is at most 4 KiB, so
/// a batch stays inside the limit).
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// A batch sealed within this time of the one before is part of a burst...
const BURST: Duration = Duration::from_millis(5);
/// ...and waits up to this long for more events before it is sealed.
const LINGER: Duration = Duration::from_millis(2);
/// How often a quiet stream checks that the connection still allows it.
const RECHECK: Duration = Duration::from_secs(1);
/// Batches sealed ahead of the watcher's reading.
const QUEUE: usize = 4;

/// The batches of one watch, as the WatchCommand handler streams them.
pub type Batches = ReceiverStream<Result<pb::SignedEnvelope, FederationError>>;

impl Federation {
    /// WatchCommand from a peer whose TLS client key is `tls_key`: the
    /// checks of every command, then the stream of signed batches. A refused
    /// command is an error (nothing was sent); a stream that stops early ends
    /// with the error that stopped it.
    pub async fn receive_watch(
        self: &Arc<Self>,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
    ) -> Result<Batches, FederationError> {
        let mut log_entry = None;
        let result = self
            .open_watch(agents, sealed, tls_key, &mut log_entry)
            .await;
        if let Err(error) = &result {
            self.log_refusal(error, log_entry).await;
        }
        result
    }

    async fn open_watch(
        self: &Arc<Self>,
        agents: &AgentRuntime,
        sealed: Option<&pb::SignedEnvelope>,
        tls_key: &PublicKey,
        log_entry: &mut Option<CommandLogRecord>,
    ) -> Result<Batches, FederationError> {
        let now = self.now();
        let Admitted {
            verified, template, ..
        } = self.admit(sealed, tls_key, true, log_entry, now).await?;
        let Some(pb::command_payload::Command::AgentWatch(watch)) = &verified.payload.command
        else {
            return Err(FederationError::Internal(
                "a streamed command that is not agent.watch".into(),
            ));
        };
        let header = verified.header.clone();
        let from = watch_from(watch.from_sequence);
        // Step 10: the message id is claimed once and for all; a resume is a
        // new command. From here on the entry is written, and a failure
        // finishes it instead of adding a refusal.
        let record = CommandLogRecord {
            outcome: "streaming".to_owned(),
            detail: format!("watch of agent {} {}", watch.agent_id, describe_from(from)),
            ..template
        };
        let seen = seen_message(&header, verified.digest.clone(), None, now);
        if self.received_log().record(seen, record.clone()).await? != WriteOutcome::Done(()) {
            return Err(FederationError::Duplicate(
                "this agent.watch was received before; resume with a new command".into(),
            ));
        }
        *log_entry = None;
        let opened = match own_agent(
            agents,
            &watch.agent_id,
            &header.sender_instance_id,
            &header.workspace,
        )
        .await
        {
            Ok(_) => agents
                .watch(&watch.agent_id, watch.include_output, from)
                .await
                .map_err(command_failed),
            Err(error) => Err(command_failed(error)),
        };
        let events = match opened {
            Ok(events) => events,
            Err(error) => {
                self.finish_stream(&record, Err(&error), None).await;
                return Err(error);
            }
        };
        let (sender, receiver) = mpsc::channel(QUEUE);
        let stream = Stream {
            federation: Arc::clone(self),
            header,
            next: match from {
                WatchFrom::Sequence(first) => Some(first.max(1)),
                WatchFrom::Now => None,
            },
            sent: None,
            batch_bytes: MAX_BATCH_BYTES.min(self.clients.max_message_bytes() / 2),
            sender,
        };
        tokio::spawn(stream.run(events, record));
        Ok(ReceiverStream::new(receiver))
    }

    /// Counts, traces and (once the sender is identified) logs a refused
    /// command.
    pub(super) async fn log_refusal(
        &self,
        error: &FederationError,
        log_entry: Option<CommandLogRecord>,
    ) {
        let (outcome, detail) = describe_error(error);
        self.command_counters
            .count(CommandDirection::Inbound, &outcome);
        tracing::info!(%outcome, %detail, "refused a command from a peer");
        if let Some(template) = log_entry {
            let record = CommandLogRecord {
                outcome,
                detail,
                ..template
            };
            if let Err(store_error) = self.store.insert_command_log(&record).await {
                tracing::warn!(error = %store_error, "could not record a refused command");
            }
        }
    }

    /// Writes how a stream ended into its command-log entry.
    async fn finish_stream(
        &self,
        record: &CommandLogRecord,
        end: Result<(), &FederationError>,
        sent: Option<(u64, u64)>,
    ) {
        let sent = match sent {
            Some((first, last)) => format!("sent sequences {first} to {last}"),
            None => "sent nothing".to_owned(),
        };
        let (outcome, detail) = match end {
            Ok(()) => ("ok".to_owned(), format!("{sent}; the agent ended")),
            Err(error) => {
                let (outcome, detail) = describe_error(error);
                (outcome, format!("{sent}; {detail}"))
            }
        };
        self.command_counters
            .count(CommandDirection::Inbound, &outcome);
        tracing::info!(
            peer.id = %record.sender_instance_id,
            workspace = %record.workspace,
            command = "agent.watch",
            %outcome,
            %detail,
            "a watch from a peer ended"
        );
        if let Err(error) = self
            .store
            .finish_command_log(&record.id, &outcome, &detail)
            .await
        {
            tracing::warn!(%error, "could not record the end of a watch");
        }
    }
}

/// One watch being streamed to its sender.
struct Stream {
    federation: Arc<Federation>,
    /// The command's header.
    header: pb::EnvelopeHeader,
    /// The first sequence the next batch covers (unknown before the first
    /// batch of a watch from the current state).
    next: Option<u64>,
    /// The sequences sent so far.
    sent: Option<(u64, u64)>,
    /// Encoded event bytes at which a batch is sealed.
    batch_bytes: usize,
    sender: mpsc::Sender<Result<pb::SignedEnvelope, FederationError>>,
}

impl Stream {
    async fn run(mut self, events: EventStream, record: CommandLogRecord) {
        let end = self.stream(events).await;
        self.federation
            .finish_stream(&record, end.as_ref().map(|_| ()), self.sent)
            .await;
        if let Err(error) = end {
            let _ = self.sender.send(Err(error)).await;
        }
    }

    async fn stream(&mut self, events: EventStream) -> Result<(), FederationError> {
        let mut events = events.ready_chunks(MAX_BATCH_EVENTS);
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the last batch went: a batch that follows closely lingers.
        let mut last_sent: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                chunk = events.next() => {
                    let Some(mut chunk) = chunk else { return Ok(()) };
                    // In a burst, what is ready is often a handful of lines,
                    // and each batch costs a signature here and a check on
                    // the watcher's side: wait a moment for more. A quiet
                    // agent's line goes at once.
                    let mut ended = false;
                    if last_sent.is_some_and(|sent| sent.elapsed() < BURST) {
                        let until = tokio::time::Instant::now() + LINGER;
                        while chunk.len() < MAX_BATCH_EVENTS {
                            match tokio::time::timeout_at(until, events.next()).await {
                                Ok(Some(more)) => chunk.extend(more),
                                Ok(None) => {
                                    ended = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    self.still_allowed().await?;
                    let mut ready = Vec::with_capacity(chunk.len());
                    let mut failed = None;
                    for event in chunk {
                        match event {
                            Ok(event) => ready.push(event),
                            Err(error) => {
                                failed = Some(command_failed(error));
                                break;
                            }
                        }
                    }
                    self.send(ready).await?;
                    last_sent = Some(tokio::time::Instant::now());
                    if let Some(error) = failed {
                        return Err(error);
                    }
                    if ended {
                        return Ok(());
                    }
                }
                _ = recheck.tick() => self.still_allowed().await?,
                () = self.sender.closed() => return Err(watcher_gone()),
            }
        }
    }

    /// Steps 5 and 6 again: the connection is still ACTIVE and still grants
    /// `agent.status`.
    async fn still_allowed(&self) -> Result<(), FederationError> {
        let peer = self
            .federation
            .open_peer(&self.header.workspace, &self.header.sender_instance_id)
            .await?
            .ok_or_else(no_connection)?;
        allows(&peer.connection, "agent.status")
    }

    /// Seals `events` into batches of at most [`MAX_BATCH_BYTES`] and sends
    /// them in order.
    async fn send(&mut self, events: Vec<SequencedEvent>) -> Result<(), FederationError> {
        let mut batch: Vec<pb_agent::WatchAgentResponse> = Vec::new();
        let mut bytes = 0;
        for event in events {
            if self.next.is_some_and(|next| event.sequence < next)
                || batch
                    .last()
                    .is_some_and(|last| event.sequence <= last.sequence)
            {
                // Already covered: never send a sequence twice.
                continue;
            }
            let event = pb_agent::WatchAgentResponse {
                sequence: event.sequence,
                event: Some(event_to_proto(event.event)),
            };
            bytes += event.encoded_len();
            batch.push(event);
            if bytes >= self.batch_bytes {
                self.seal_and_send(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.seal_and_send(batch).await?;
        }
        Ok(())
    }

    async fn seal_and_send(
        &mut self,
        events: Vec<pb_agent::WatchAgentResponse>,
    ) -> Result<(), FederationError> {
        let (Some(first_event), Some(last_event)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let first = self.next.unwrap_or(first_event.sequence);
        let last = last_event.sequence;
        let identity = self.federation.identity.current();
        let routing = self.federation.routing(
            &identity,
            &self.header.sender_instance_id,
            &self.header.workspace,
        );
        let payload = pb::AgentEventsPayload {
            header: Some(envelope::new_header(
                &routing,
                identity.public_key().key_id(),
            )),
            command_message_id: self.header.message_id.clone(),
            first_sequence: first,
            last_sequence: last,
            events,
        };
        let sealed = envelope::seal(&payload, identity.as_ref())?;
        self.sender
            .send(Ok(sealed))
            .await
            .map_err(|_| watcher_gone())?;
        self.next = Some(last + 1);
        self.sent = Some((self.sent.map_or(first, |(sent, _)| sent), last));
        Ok(())
    }
}

/// A command that was accepted but failed here, with the code the agent
/// runtime gives it (NOT_FOUND for an agent that is not the sender's).
fn command_failed(error: AgentError) -> FederationError {
    FederationError::Command(tonic::Status::from(error))
}

fn watcher_gone() -> FederationError {
    FederationError::Command(tonic::Status::cancelled("the watcher went away"))
}

fn describe_from(from: WatchFrom) -> String {
    match from {
        WatchFrom::Now => "from its current state".to_owned(),
        WatchFrom::Sequence(first) => format!("from sequence {}", first.max(1)),
    }
}
