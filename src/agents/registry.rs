//! The agents this daemon supervises, in memory: each one's current record,
//! the broadcast of its events and its stop request. The runtime adds an
//! agent just before its process starts; its supervisor removes it once the
//! terminal state is persisted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{broadcast, watch};

use super::model::{AgentEvent, AgentRecord, SequencedEvent};
use crate::clock::now_ms;

/// Events a slow watcher may fall behind by before it misses some.
const EVENT_BUFFER: usize = 1024;

/// Why a supervisor is asked to stop its agent; the first request wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StopRequest {
    /// A kill: the agent ends KILLED with this reason.
    Kill(String),
    /// The daemon is shutting down: the agent ends FAILED.
    Shutdown,
}

/// One agent this daemon supervises.
pub(super) struct Tracked {
    /// The current record and the sequence of the last event published;
    /// events are sent while holding it, so a watcher that reads it and
    /// subscribes under the same lock misses nothing.
    current: Mutex<Current>,
    events: broadcast::Sender<SequencedEvent>,
    stop: watch::Sender<Option<StopRequest>>,
}

struct Current {
    record: AgentRecord,
    published: u64,
}

impl Tracked {
    pub(super) fn new(record: AgentRecord) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (stop, _) = watch::channel(None);
        Self {
            current: Mutex::new(Current {
                record,
                published: 0,
            }),
            events,
            stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        // A panic while holding the lock leaves a consistent record (it is
        // replaced whole), so a poisoned lock is still usable.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current record.
    pub(super) fn snapshot(&self) -> AgentRecord {
        self.lock().record.clone()
    }

    /// Tells watchers about `events`, numbered and journaled in order (see
    /// `journal.rs`); a state change replaces the record.
    pub(super) fn publish(&self, events: Vec<SequencedEvent>) {
        let mut current = self.lock();
        for event in events {
            if let AgentEvent::StateChanged { agent, .. } = &event.event {
                current.record = (**agent).clone();
            }
            current.published = event.sequence;
            // No watcher is not an error.
            let _ = self.events.send(event);
        }
    }

    /// Updates the output figures of the record (not persisted here).
    pub(super) fn update_output(&self, tail: Vec<String>, bytes: u64, truncated: bool) {
        let mut current = self.lock();
        let record = &mut current.record;
        record.output_tail = tail;
        record.output_bytes = bytes;
        record.output_truncated = truncated;
        record.updated_at_ms = now_ms();
    }

    /// The current record, the sequence of the last event published (every
    /// event up to it is in the journal) and a receiver of every event after
    /// it, read and subscribed under one lock so that nothing falls between.
    pub(super) fn current_and_events(
        &self,
    ) -> (AgentRecord, u64, broadcast::Receiver<SequencedEvent>) {
        let current = self.lock();
        (
            current.record.clone(),
            current.published,
            self.events.subscribe(),
        )
    }

    /// A receiver of stop requests.
    pub(super) fn stop_requests(&self) -> watch::Receiver<Option<StopRequest>> {
        self.stop.subscribe()
    }

    /// Asks the supervisor to stop the agent; a later request does not
    /// replace the first.
    pub(super) fn request_stop(&self, request: StopRequest) {
        self.stop.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(request);
                true
            } else {
                false
            }
        });
    }
}

/// The agents this daemon supervises, by id.
#[derive(Default)]
pub(super) struct Registry {
    agents: Mutex<HashMap<String, Arc<Tracked>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Tracked>>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Tracked>> {
        self.lock().get(id).cloned()
    }

    pub(super) fn insert(&self, id: String, tracked: Arc<Tracked>) {
        self.lock().insert(id, tracked);
    }

    /// Stops tracking an agent whose terminal state is persisted.
    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub(super) fn all(&self) -> Vec<Arc<Tracked>> {
        self.lock().values().cloned().collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}
