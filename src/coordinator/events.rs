//! The in-process feed of committed job changes that `WatchJob` streams follow.
//!
//! A change is published only after its transaction has committed, so a watcher
//! never sees a change that could still roll back. The feed is a
//! `tokio::sync::broadcast` channel shared by all jobs: a watcher that falls
//! behind loses messages (`Lagged`) instead of slowing writers, and then reads
//! what it missed from the database, where every change is in the history.
//!
//! Changes made through another replica arrive as hints: the replica that
//! wrote a batch of changes sends one PostgreSQL notification naming each
//! changed job and its new version ([`notify_changes`]), every replica
//! listens ([`follow_other_replicas`]) and passes the hints to its watchers,
//! and a watcher of one of those jobs reads what it has not seen from the
//! history. Watchers also read on a timer, so a hint lost with a connection
//! delays the news, nothing more.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::store::{JobHistoryRecord, JobRecord, Listener, Store, Topic};

/// Hints buffered per watcher; one that lags reads the history anyway.
const HINT_CAPACITY: usize = 1024;
/// PostgreSQL refuses notification payloads of 8000 bytes or more.
const MAX_PAYLOAD_BYTES: usize = 7900;
/// How long a replica whose listening connection failed waits before it
/// listens again (watchers read on their timer meanwhile).
const LISTEN_AGAIN_AFTER: Duration = Duration::from_secs(1);

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
    /// Changes made through other replicas: (job id, version after).
    hints: broadcast::Sender<Arc<(String, i64)>>,
}

impl Default for JobEvents {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(FEED_CAPACITY);
        let (hints, _) = broadcast::channel(HINT_CAPACITY);
        JobEvents { sender, hints }
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

    /// A receiver of the hints of changes made through other replicas:
    /// (job id, version after the change).
    pub fn subscribe_hints(&self) -> broadcast::Receiver<Arc<(String, i64)>> {
        self.hints.subscribe()
    }

    /// Passes on the hints of one notification (`id:version,...`); nothing
    /// when nobody watches.
    fn hint(&self, payload: &str) {
        if self.hints.receiver_count() == 0 {
            return;
        }
        for (job_id, version) in parse_payload(payload) {
            let _ = self.hints.send(Arc::new((job_id.to_owned(), version)));
        }
    }
}

/// The payloads that name `changes` (job id, version after), each within
/// PostgreSQL's limit.
fn payloads<'a>(changes: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::new();
    for (job_id, version) in changes {
        let item = format!("{job_id}:{version}");
        if !payload.is_empty() && payload.len() + 1 + item.len() > MAX_PAYLOAD_BYTES {
            payloads.push(std::mem::take(&mut payload));
        }
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&item);
    }
    if !payload.is_empty() {
        payloads.push(payload);
    }
    payloads
}

/// The (job id, version) pairs of a payload; malformed items are skipped.
fn parse_payload(payload: &str) -> impl Iterator<Item = (&str, i64)> {
    payload.split(',').filter_map(|item| {
        let (job_id, version) = item.rsplit_once(':')?;
        Some((job_id, version.parse().ok()?))
    })
}

/// Tells the other replicas (on PostgreSQL) that `changes` (job id, version
/// after) were committed, in the background: the writer does not wait.
pub fn notify_changes<'a>(store: &Store, changes: impl IntoIterator<Item = (&'a str, i64)>) {
    if store.backend() != crate::store::Backend::Postgres {
        return;
    }
    let payloads = payloads(changes);
    if payloads.is_empty() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        for payload in payloads {
            if let Err(error) = store.notify_with(Topic::Jobs, &payload).await {
                tracing::debug!(%error, "cannot tell the other replicas of job changes; their watchers read on a timer");
                return;
            }
        }
    });
}

/// Passes the job changes other replicas announce to `events`' watchers for
/// as long as the returned task runs. `None` on SQLite, where there are no
/// other replicas.
pub fn follow_other_replicas(
    store: Store,
    events: JobEvents,
) -> Option<tokio::task::JoinHandle<()>> {
    if store.backend() != crate::store::Backend::Postgres {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            let mut listener: Listener = match store.listen(Topic::Jobs).await {
                Ok(Some(listener)) => listener,
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(%error, "cannot listen for other replicas' job changes; watchers read on a timer");
                    tokio::time::sleep(LISTEN_AGAIN_AFTER).await;
                    continue;
                }
            };
            while let Ok(payload) = listener.next().await {
                events.hint(&payload);
            }
            tokio::time::sleep(LISTEN_AGAIN_AFTER).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_every_change_within_the_limit_and_read_back() {
        let ids: Vec<String> = (0..600).map(|index| format!("job-{index:040}")).collect();
        let changes: Vec<(&str, i64)> = ids
            .iter()
            .enumerate()
            .map(|(index, id)| (id.as_str(), index as i64 + 2))
            .collect();
        let sent = payloads(changes.iter().copied());
        assert!(sent.len() > 1, "600 changes need several payloads");
        assert!(sent.iter().all(|payload| payload.len() < 8000));
        let read: Vec<(&str, i64)> = sent
            .iter()
            .flat_map(|payload| parse_payload(payload))
            .collect();
        assert_eq!(read, changes);
        assert!(payloads(std::iter::empty()).is_empty());
        assert_eq!(
            parse_payload("a:1,bogus,b:x,c:3").collect::<Vec<_>>(),
            [("a", 1), ("c", 3)]
        );
    }
}
