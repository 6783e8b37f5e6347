//! The sender's side of `agent.watch` (WatchRemoteAgent): a signed watch
//! command to the peer, each batch it streams back checked
//! ([`BatchCheck`]) before its events are passed on, and a cut stream
//! resumed from the last verified sequence with a new command, until the
//! agent's end or about 30 seconds without progress. One command-log entry
//! per command sent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::batches::BatchCheck;
use super::command_type;
use crate::federation::command_log::describe_error;
use crate::federation::envelope::{self, TrustedKey};
use crate::federation::peering::{peer_error, peer_status};
use crate::federation::peers::PeerEntry;
use crate::federation::{Federation, FederationError};
use crate::identity::PublicKey;
use crate::proto::agent as pb_agent;
use crate::proto::federation as pb;
use crate::store::{CommandDirection, CommandLogRecord, WriteOutcome};

/// How long a watch keeps resuming, from the first cut after the last batch
/// it received, before it gives up (UNAVAILABLE, with the sequence to resume
/// from).
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// The wait before the first resume; it doubles up to [`MAX_RETRY_DELAY`]
/// and starts again after each batch.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between resumes.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Batches of events passed on ahead of the caller's reading.
const QUEUE: usize = 16;

/// What to follow on a peer.
#[derive(Debug, Clone, Default)]
pub struct RemoteWatch {
    /// The peer's instance id.
    pub peer_instance_id: String,
    /// The workspace of the connection; `None` when there is one.
    pub workspace: Option<String>,
    /// The agent's id on the peer.
    pub agent_id: String,
    /// Also its output lines.
    pub include_output: bool,
    /// The first sequence wanted (0 or 1: from the start); `None`: the
    /// current state first.
    pub from_sequence: Option<u64>,
}

/// The events of a remote watch, verified, in order, each once: a verified
/// batch's events at a time, or the error that ended the watch.
pub type RemoteEvents = ReceiverStream<Relayed>;

/// What the follower passes on: a verified batch's events, or the end.
pub type Relayed = Result<Vec<pb_agent::WatchAgentResponse>, FederationError>;

/// One `agent.watch` sent, with its stream open and the checks its batches
/// must pass.
struct Opened {
    responses: tonic::Streaming<pb::WatchCommandResponse>,
    record: CommandLogRecord,
    trusted: Vec<TrustedKey>,
    check: BatchCheck,
}

/// How one command's stream ended.
enum End {
    /// The agent's terminal state was passed on.
    Done,
    /// The caller went away.
    Gone,
    /// Cut (or refused for a reason that may pass): resume.
    Cut(FederationError),
    /// Refused for good, or a batch failed its checks.
    Failed(FederationError),
}

impl Federation {
    /// Follows `watch` on its peer. The first command is sent before this
    /// returns, so a refusal (no connection, no capability, no such agent)
    /// is the call's error; later failures end the stream.
    pub async fn watch_remote(
        self: &Arc<Self>,
        watch: RemoteWatch,
    ) -> Result<RemoteEvents, FederationError> {
        if watch.peer_instance_id.is_empty() {
            return Err(FederationError::Invalid(
                "peer_instance_id is required".into(),
            ));
        }
        if watch.agent_id.is_empty() {
            return Err(FederationError::Invalid("agent_id is required".into()));
        }
        let opened = self.send_watch(&watch, watch.from_sequence).await?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let federation = Arc::clone(self);
        tokio::spawn(async move {
            federation.follow(watch, opened, sender).await;
        });
        Ok(ReceiverStream::new(receiver))
    }

    async fn follow(&self, watch: RemoteWatch, mut opened: Opened, sender: mpsc::Sender<Relayed>) {
        // When the stream was first cut since the last batch came through.
        let mut cut_since: Option<tokio::time::Instant> = None;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let (end, delivered) = self.relay(&mut opened, &sender).await;
            if delivered.is_some() {
                cut_since = None;
                delay = FIRST_RETRY_DELAY;
            }
            self.finish_watch(&opened.record, &end, delivered).await;
            let mut cause = match end {
                End::Done | End::Gone => return,
                End::Failed(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                End::Cut(cause) => cause,
            };
            // Resume from the last verified sequence with a new command.
            let next = opened.check.next_sequence().or(watch.from_sequence);
            let first_cut = *cut_since.get_or_insert_with(tokio::time::Instant::now);
            opened = loop {
                if first_cut.elapsed() >= GIVE_UP_AFTER {
                    let error = FederationError::Interrupted {
                        message: format!("the watch could not go on: {cause}"),
                        resume_from: next.unwrap_or(0),
                    };
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = sender.closed() => return,
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
                match self.send_watch(&watch, next).await {
                    Ok(opened) => break opened,
                    Err(error) if resumable(error.code()) => cause = error,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                }
            };
        }
    }

    /// Passes on the verified events of one command's stream until it ends;
    /// returns how, with the sequences it delivered.
    async fn relay(
        &self,
        opened: &mut Opened,
        sender: &mpsc::Sender<Relayed>,
    ) -> (End, Option<(u64, u64)>) {
        let mut delivered: Option<(u64, u64)> = None;
        loop {
            let message = tokio::select! {
                message = opened.responses.message() => message,
                () = sender.closed() => return (End::Gone, delivered),
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    let cut = FederationError::PeerUnreachable(
                        "the peer ended the stream before the agent ended".into(),
                    );
                    return (End::Cut(cut), delivered);
                }
                Err(status) if resumable(status.code()) => {
                    return (End::Cut(peer_status(status)), delivered);
                }
                Err(status) => return (End::Failed(peer_status(status)), delivered),
            };
            let first = opened.check.next_sequence();
            let events =
                match opened
                    .check
                    .check(response.envelope.as_ref(), &opened.trusted, self.now())
                {
                    Ok(events) => events,
                    Err(error) => {
                        tracing::warn!(%error, "refused a batch of a watched remote agent");
                        return (
                            End::Failed(FederationError::BadReply(error.to_string())),
                            delivered,
                        );
                    }
                };
            if let Some(last) = opened.check.next_sequence().map(|next| next - 1) {
                let first = first.or(events.first().map(|event| event.sequence));
                delivered = Some((
                    delivered.map_or(first.unwrap_or(last), |(first, _)| first),
                    last,
                ));
            }
            let ended = events.iter().any(is_terminal);
            if sender.send(Ok(events)).await.is_err() {
                return (End::Gone, delivered);
            }
            if ended {
                return (End::Done, delivered);
            }
        }
    }

    /// Signs and sends an `agent.watch` of `watch` from sequence `from`
    /// (`None`: the current state), logs it, and opens its stream, whose
    /// batches must then answer that command and start at `from`.
    async fn send_watch(
        &self,
        watch: &RemoteWatch,
        from: Option<u64>,
    ) -> Result<Opened, FederationError> {
        let peer = self
            .active_connection_to(
                &watch.peer_instance_id,
                watch.workspace.as_deref().filter(|named| !named.is_empty()),
            )
            .await?;
        let connection = &peer.connection;
        let identity = self.identity.current();
        let routing = self.routing(
            &identity,
            &connection.remote_instance_id,
            &connection.workspace,
        );
        let header = envelope::new_header(&routing, identity.public_key().key_id());
        let command = pb::command_payload::Command::AgentWatch(pb::AgentWatchCommand {
            agent_id: watch.agent_id.clone(),
            include_output: watch.include_output,
            from_sequence: from,
        });
        let record = CommandLogRecord {
            id: uuid::Uuid::new_v4().to_string(),
            direction: CommandDirection::Outbound,
            message_id: header.message_id.clone(),
            sender_instance_id: identity.instance_id.clone(),
            recipient_instance_id: connection.remote_instance_id.clone(),
            workspace: connection.workspace.clone(),
            command_type: command_type(&command).to_owned(),
            outcome: String::new(),
            detail: match from {
                Some(from) => format!(
                    "watch of agent {} from sequence {}",
                    watch.agent_id,
                    from.max(1)
                ),
                None => format!("watch of agent {} from its current state", watch.agent_id),
            },
            issued_at_ms: routing.now_ms,
            recorded_at_ms: routing.now_ms,
            request_digest: None,
            envelope: None,
        };
        let payload = pb::CommandPayload {
            header: Some(header),
            command: Some(command),
        };
        let sealed = envelope::seal(&payload, identity.as_ref())?;
        if self.store.insert_command_log(&record).await? != WriteOutcome::Done(()) {
            return Err(FederationError::Internal(
                "a new message id was already in the command log".into(),
            ));
        }
        let opened = self.open_stream(&peer, sealed).await;
        match opened {
            Ok(responses) => Ok(Opened {
                responses,
                trusted: peer.trusted_keys(self.now()),
                check: BatchCheck::new(
                    &identity.instance_id,
                    &connection.remote_instance_id,
                    &connection.workspace,
                    &record.message_id,
                    from,
                ),
                record,
            }),
            Err(error) => {
                let (outcome, detail) = describe_error(&error);
                self.write_watch_end(&record, outcome, format!("delivered nothing; {detail}"))
                    .await;
                Err(error)
            }
        }
    }

    /// Opens the WatchCommand stream: the call's deadline covers the opening
    /// (the peer's checks), not the stream.
    async fn open_stream(
        &self,
        peer: &PeerEntry,
        sealed: pb::SignedEnvelope,
    ) -> Result<tonic::Streaming<pb::WatchCommandResponse>, FederationError> {
        let connection = &peer.connection;
        let pins: Vec<PublicKey> = peer
            .trusted_keys(self.now())
            .into_iter()
            .map(|trusted| trusted.key)
            .collect();
        let mut client = self
            .clients
            .pinned(&connection.remote_url, &pins)
            .await
            .map_err(peer_error)?;
        let request = tonic::Request::new(pb::WatchCommandRequest {
            envelope: Some(sealed),
        });
        match tokio::time::timeout(self.clients.call_timeout(), client.watch_command(request)).await
        {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(peer_status(status)),
            Err(_) => Err(FederationError::PeerTimedOut(
                "the peer did not open the watch in time".into(),
            )),
        }
    }

    /// Writes how one sent `agent.watch` ended into its log entry.
    async fn finish_watch(
        &self,
        record: &CommandLogRecord,
        end: &End,
        delivered: Option<(u64, u64)>,
    ) {
        let delivered = match delivered {
            Some((first, last)) => format!("delivered sequences {first} to {last}"),
            None => "delivered nothing".to_owned(),
        };
        let (outcome, detail) = match end {
            End::Done => ("ok".to_owned(), format!("{delivered}; the agent ended")),
            End::Gone => (
                "CANCELLED".to_owned(),
                format!("{delivered}; the watcher went away"),
            ),
            End::Cut(error) | End::Failed(error) => {
                let (outcome, detail) = describe_error(error);
                (outcome, format!("{delivered}; {detail}"))
            }
        };
        self.write_watch_end(record, outcome, detail).await;
    }

    async fn write_watch_end(&self, record: &CommandLogRecord, outcome: String, detail: String) {
        self.command_counters
            .count(CommandDirection::Outbound, &outcome);
        if let Err(error) = self
            .store
            .finish_command_log(&record.id, &outcome, &detail)
            .await
        {
            tracing::warn!(%error, "could not record the end of a remote watch");
        }
    }
}

/// Whether a failure may pass by itself, so that the watch resumes: the
/// peer unreachable or the connection cut, too slow, or rate limited.
fn resumable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// Whether the event is the agent's change into a terminal state.
fn is_terminal(event: &pb_agent::WatchAgentResponse) -> bool {
    match &event.event {
        Some(pb_agent::watch_agent_response::Event::StateChange(change)) => {
            pb_agent::AgentState::try_from(change.to_state).is_ok_and(|state| {
                !matches!(
                    state,
                    pb_agent::AgentState::Spawning
                        | pb_agent::AgentState::Running
                        | pb_agent::AgentState::Unspecified
                )
            })
        }
        _ => false,
    }
}
