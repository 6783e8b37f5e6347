//! The in-process feed of committed job changes that `WatchJob` streams follow.
//!
//! A change is published only after its transaction has committed, so a watcher
//! never sees a change that could still roll back. The feed is a
//! `tokio::sync::broadcast` channel shared by all jobs: a watcher that falls
//! behind loses messages (`Lagged`) instead of slowing writers, and then reads
//! what it missed from the database, where every change is in the history.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::store::{JobHistoryRecord, JobRecord};

/// Committed changes buffered per watcher before it lags and falls back to
/// reading the history.
const FEED_CAPACITY: usize = 1024;

/// One committed change: the history entry and the job right after it.
#[derive(Debug)]
pub struct JobEvent {
    /// The job after the change.
    pub job: JobRecord,
    /// The change.
    pub entry: JobHistoryRecord,
}

/// The sending side of the feed; clones share one channel.
#[derive(Clone, Debug)]
pub struct JobEvents {
    sender: broadcast::Sender<Arc<JobEvent>>,
}

impl Default for JobEvents {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        JobEvents { sender }
    }
}

impl JobEvents {
    /// Announces a committed change to every current subscriber. With none
    /// (the common case: nobody watches) the job is not even copied; a
    /// watcher that subscribes later reads the job after subscribing, so it
    /// misses nothing.
    pub fn publish(&self, job: &JobRecord, entry: JobHistoryRecord) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        // A watcher that went away between the count and the send is not an
        // error either.
        let _ = self.sender.send(Arc::new(JobEvent {
            job: job.clone(),
            entry,
        }));
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.sender.subscribe()
    }
}
