//! The event streams of `AgentRuntime::watch`: live from the registry for an
//! agent this daemon supervises, with what a watcher asked for earlier or
//! fell behind on read back from the agent's journal; read from the journal
//! alone for one that has ended; re-read from the store for one this daemon
//! no longer tracks while its end is being recorded. (An agent another
//! replica supervises is watched through that replica: `replicas::routing`.)
//!
//! Every event carries its sequence in the agent's history. A watch from a
//! sequence sends each event from there on exactly once, in order: first
//! the journal's, then the live ones, and when the live broadcast runs ahead
//! of a slow watcher it goes back to the journal instead of skipping.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::elsewhere::EventStream;
use super::error::AgentError;
use super::journal::JournalReader;
use super::model::{AgentEvent, AgentRecord, AgentState, SequencedEvent, WatchFrom};
use super::registry::Tracked;
use crate::store::Store;

/// How often a watch of an agent this daemon does not track re-reads it.
const REMOTE_WATCH_POLL: Duration = Duration::from_millis(500);
/// Events a watch's task may run ahead of its client.
const WATCH_QUEUE: usize = 64;

/// The sending end of a watch: drops output lines the watcher did not ask
/// for, and knows when the stream is over.
struct Sink {
    sender: mpsc::Sender<Result<SequencedEvent, AgentError>>,
    include_output: bool,
}

/// Why a watch's task stops sending.
enum Over {
    /// The final event was sent (or the watcher went away).
    Done,
    /// The stream ends with this error.
    Failed(AgentError),
}

impl Sink {
    /// Sends `event` unless it is a line the watcher did not ask for.
    /// `Err(Done)` once it was the final event or the watcher went away.
    async fn send(&self, event: SequencedEvent) -> Result<(), Over> {
        let last = event.event.is_final();
        if self.include_output || !matches!(event.event, AgentEvent::Output { .. }) {
            self.sender.send(Ok(event)).await.map_err(|_| Over::Done)?;
        }
        if last { Err(Over::Done) } else { Ok(()) }
    }
}

/// Runs `follow` on a task of its own, its events as a stream.
fn spawned<F>(include_output: bool, follow: impl FnOnce(Sink) -> F) -> EventStream
where
    F: Future<Output = Result<(), Over>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
    let sink = Sink {
        sender: sender.clone(),
        include_output,
    };
    let follow = follow(sink);
    tokio::spawn(async move {
        if let Err(Over::Failed(error)) = follow.await {
            let _ = sender.send(Err(error)).await;
        }
    });
    ReceiverStream::new(receiver).boxed()
}

/// The watch of an agent this daemon supervises, its journal at `journal`.
pub(super) fn tracked_watch(
    tracked: &Arc<Tracked>,
    journal: PathBuf,
    from: WatchFrom,
    include_output: bool,
) -> EventStream {
    let weak = Arc::downgrade(tracked);
    let subscribed = tracked.current_and_events();
    spawned(include_output, move |sink| {
        follow_tracked(weak, subscribed, journal, from, sink)
    })
}

async fn follow_tracked(
    tracked: Weak<Tracked>,
    (current, mut published, mut receiver): (AgentRecord, u64, broadcast::Receiver<SequencedEvent>),
    journal: PathBuf,
    from: WatchFrom,
    sink: Sink,
) -> Result<(), Over> {
    let mut next = match from {
        WatchFrom::Now => {
            let first = SequencedEvent {
                sequence: published,
                event: AgentEvent::StateChanged {
                    from: None,
                    agent: Box::new(current),
                },
            };
            sink.send(first).await?;
            published + 1
        }
        WatchFrom::Sequence(from) => from.max(1),
    };
    // Where the next replay reads on: each one continues where the last
    // stopped, so a watcher that falls behind again and again reads the
    // journal once.
    let mut resume_at = 0;
    loop {
        if next <= published {
            let replayed = replay(&journal, resume_at, next, Some(published), &sink).await?;
            (next, resume_at) = (replayed.next, replayed.resume_at);
        }
        let closed = loop {
            match receiver.recv().await {
                // Before the start asked for; the end still ends the watch
                // (a start past it has nothing more to send).
                Ok(event) if event.sequence < next => {
                    if event.event.is_final() {
                        return Ok(());
                    }
                }
                Ok(event) => {
                    next = event.sequence + 1;
                    sink.send(event).await?;
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::debug!(skipped, "a slow agent watcher reads on from the journal");
                    break false;
                }
                Err(broadcast::error::RecvError::Closed) => break true,
            }
        };
        match tracked.upgrade() {
            Some(tracked) if !closed => {
                let (_, now_published, now_receiver) = tracked.current_and_events();
                published = now_published;
                receiver = now_receiver;
            }
            _ => {
                // The supervisor is done and its last events are in the
                // journal; without the final one, the daemon is stopping.
                replay(&journal, resume_at, next, None, &sink).await?;
                return Err(Over::Failed(AgentError::Interrupted));
            }
        }
    }
}

/// What a replay read.
struct Replayed {
    /// The sequence after the last event sent.
    next: u64,
    /// Where in the journal a later replay reads on (the first record after
    /// those read).
    resume_at: u64,
    /// The sequence of the last event read, sent or not (0: none).
    last: u64,
    /// The state of the last state change read, sent or not.
    last_state: Option<AgentState>,
}

/// Sends the journal's events from `from` through `through` (all of them
/// with `None`), reading from byte `at` (0, or where an earlier replay of
/// this watch stopped). `Err(Done)` once the final one is sent.
async fn replay(
    journal: &std::path::Path,
    at: u64,
    from: u64,
    through: Option<u64>,
    sink: &Sink,
) -> Result<Replayed, Over> {
    let mut replayed = Replayed {
        next: from,
        resume_at: at,
        last: 0,
        last_state: None,
    };
    let failed = |error: std::io::Error| {
        tracing::warn!(%error, "cannot read an agent's event journal");
        Over::Failed(AgentError::Interrupted)
    };
    let Some(mut reader) = JournalReader::open_at(journal, at).await.map_err(failed)? else {
        return Ok(replayed);
    };
    while let Some(event) = reader.next().await.map_err(failed)? {
        if through.is_some_and(|through| event.sequence > through) {
            // Not published yet (perhaps not whole): the next replay reads
            // it again.
            break;
        }
        replayed.resume_at = reader.offset();
        replayed.last = event.sequence;
        if let AgentEvent::StateChanged { agent, .. } = &event.event {
            replayed.last_state = Some(agent.state);
        }
        if event.sequence >= replayed.next {
            replayed.next = event.sequence + 1;
            sink.send(event).await?;
        }
    }
    Ok(replayed)
}

/// The watch of an agent that has ended and that this daemon ran: its
/// journal at `journal`, then its end as recorded if the journal misses it
/// (the daemon stopped or crashed before writing it, or another replica
/// settled the agent). Without a journal, `Now` gives the record alone.
pub(super) fn ended_watch(
    journal: PathBuf,
    ended: AgentRecord,
    from: WatchFrom,
    include_output: bool,
) -> EventStream {
    spawned(include_output, move |sink| async move {
        if !tokio::fs::try_exists(&journal).await.unwrap_or(false) {
            if from == WatchFrom::Now {
                return sink.send(unnumbered(ended)).await;
            }
            return Err(Over::Failed(AgentError::NotKept {
                agent_id: ended.id,
                what: "events",
                why: "are no longer kept (storage.agent_output_retention_secs)".to_owned(),
            }));
        }
        let start = match from {
            // Read through to learn where the journal ends; send nothing.
            WatchFrom::Now => u64::MAX,
            WatchFrom::Sequence(from) => from.max(1),
        };
        // Sends the end if the journal has it (and it was asked for).
        let replayed = replay(&journal, 0, start, None, &sink).await?;
        let journaled_end = replayed.last_state.is_some_and(AgentState::is_terminal);
        let event = match from {
            WatchFrom::Now => SequencedEvent {
                sequence: replayed.last + u64::from(!journaled_end),
                event: AgentEvent::StateChanged {
                    from: None,
                    agent: Box::new(ended),
                },
            },
            // The journal's end was before `from`: nothing more to send.
            WatchFrom::Sequence(_) if journaled_end => return Ok(()),
            WatchFrom::Sequence(from) if replayed.last + 1 < from => return Ok(()),
            WatchFrom::Sequence(_) => SequencedEvent {
                sequence: replayed.last + 1,
                event: AgentEvent::StateChanged {
                    from: replayed.last_state,
                    agent: Box::new(ended),
                },
            },
        };
        sink.send(event).await
    })
}

/// The current state of an agent whose events are not at hand: numbered 0.
fn unnumbered(agent: AgentRecord) -> SequencedEvent {
    SequencedEvent {
        sequence: 0,
        event: AgentEvent::StateChanged {
            from: None,
            agent: Box::new(agent),
        },
    }
}

/// The current state of an ended agent whose events are not at hand (they
/// are kept by another replica, which is gone): the record alone.
pub(super) fn record_only(agent: AgentRecord) -> EventStream {
    futures::stream::iter([Ok(unnumbered(agent))]).boxed()
}

/// The watch of an unfinished agent this daemon does not supervise (being
/// settled): its stored record, re-read until it ends, numbered 0.
pub(super) fn polled_watch(store: Store, current: AgentRecord) -> EventStream {
    let first = unnumbered(current.clone());
    let rest = futures::stream::unfold(Some(current), move |last| {
        let store = store.clone();
        async move {
            let last = last?;
            loop {
                tokio::time::sleep(REMOTE_WATCH_POLL).await;
                let fresh = match store.get_agent(&last.id).await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => return Some((Err(AgentError::NotFound(last.id.clone())), None)),
                    Err(error) => return Some((Err(error.into()), None)),
                };
                if fresh.state != last.state {
                    let event = SequencedEvent {
                        sequence: 0,
                        event: AgentEvent::StateChanged {
                            from: Some(last.state),
                            agent: Box::new(fresh.clone()),
                        },
                    };
                    let next = (!fresh.state.is_terminal()).then_some(fresh);
                    return Some((Ok(event), next));
                }
            }
        }
    });
    futures::stream::iter([Ok(first)]).chain(rest).boxed()
}
