//! Remote dispatches followed once per instance (DESIGN.md section 11): the
//! replica that holds the lease `coordinator.remote-dispatch` polls the
//! remote agent of every RUNNING job and sends again the signed spawns that
//! a dispatch left unanswered; the other replicas poll nothing. The holder
//! renews the lease at every scan; when it stops, another replica takes the
//! lease once it has run out (three scans) and picks the jobs up from the
//! database at its first scan.
//!
//! No fencing token is needed on the writes: a job's end is a transition the
//! state machine allows once, so a holder that paused past its lease and
//! polls one more time changes nothing its successor did.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::jobs::Jobs;
use super::remote::{self, RemoteDispatch};

/// The lease on following remote dispatches.
const LEASE: &str = "coordinator.remote-dispatch";
/// The shortest and longest time between two scans of the running jobs.
const SCAN_BOUNDS: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// The time between two scans for a poll interval: the interval, within
/// [`SCAN_BOUNDS`], so a job dispatched through another replica is polled
/// about as soon as one dispatched here.
pub fn scan_interval(poll_interval: Duration) -> Duration {
    poll_interval.clamp(SCAN_BOUNDS.0, SCAN_BOUNDS.1)
}

/// What a follow-up task does for its job.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Work {
    /// Sends the job's unanswered signed spawn again.
    Spawn,
    /// Polls the job's remote agent until it ends.
    Follow,
}

/// The follow-up tasks this process runs, one per (work, job), and whether
/// it holds the lease. Shared by the dispatch handlers and the scan.
#[derive(Clone, Debug, Default)]
pub struct Followers {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    held: bool,
    /// The tasks, and whether each runs only while the lease is held.
    tasks: HashMap<(Work, String), (tokio::task::JoinHandle<()>, bool)>,
}

impl Followers {
    /// Runs `task` as `work` for `job_id` unless such a task runs already.
    /// With `only_if_held`, only while this process holds the lease (the
    /// holder's scan picks the job up otherwise). True if it was started.
    pub fn start(
        &self,
        work: Work,
        job_id: &str,
        only_if_held: bool,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        let mut inner = self.lock();
        if only_if_held && !inner.held {
            return false;
        }
        let key = (work, job_id.to_owned());
        if inner
            .tasks
            .get(&key)
            .is_some_and(|(running, _)| !running.is_finished())
        {
            return false;
        }
        inner.tasks.insert(key, (tokio::spawn(task), only_if_held));
        true
    }

    /// Records whether this process holds the lease; without it, every task
    /// that needs it stops (a dispatch's own retry goes on). True when it was
    /// just taken (not held before).
    fn set_held(&self, held: bool) -> bool {
        let mut inner = self.lock();
        let taken = held && !inner.held;
        inner.held = held;
        inner.tasks.retain(|_, (task, needs_lease)| {
            if *needs_lease && !held {
                task.abort();
            }
            !task.is_finished() && (held || !*needs_lease)
        });
        taken
    }

    /// Stops every task, those that do not need the lease too.
    fn stop_all(&self) {
        let mut inner = self.lock();
        inner.held = false;
        for (_, (task, _)) in inner.tasks.drain() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many tasks of `work` run now.
    pub fn running(&self, work: Work) -> usize {
        let inner = self.lock();
        inner
            .tasks
            .iter()
            .filter(|((kind, _), (task, _))| *kind == work && !task.is_finished())
            .count()
    }
}

/// The scan: takes or renews the lease every [`scan_interval`]; while held,
/// follows every RUNNING job's remote agent (and, when just taken, sends
/// again the spawns a dispatch left unanswered); while not, follows none.
/// Runs until the returned guard is stopped or dropped.
pub fn spawn(jobs: Jobs, peers: RemoteDispatch, holder: String) -> Following {
    let followers = peers.followers.clone();
    let scanning = {
        let (jobs, peers, holder) = (jobs, peers.clone(), holder.clone());
        tokio::spawn(async move {
            let scan = scan_interval(peers.poll_interval);
            let ttl_ms = i64::try_from(scan.as_millis().saturating_mul(3)).unwrap_or(i64::MAX);
            let mut ticks = tokio::time::interval(scan);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let granted = match peers
                    .store
                    .take_lease(LEASE, &holder, crate::clock::now_ms(), ttl_ms)
                    .await
                {
                    Ok(granted) => granted.is_some(),
                    Err(error) => {
                        tracing::debug!(%error, "cannot renew the lease on following remote dispatches; stopping them");
                        false
                    }
                };
                let taken = peers.followers.set_held(granted);
                if !granted {
                    continue;
                }
                if let Err(error) = scan_once(&jobs, &peers, taken).await {
                    tracing::debug!(%error, "cannot read the remote dispatches to follow; trying again");
                    if taken {
                        // The unanswered spawns were not read: the next scan
                        // takes over afresh and reads them again.
                        peers.followers.set_held(false);
                    }
                }
            }
        })
    };
    Following {
        scanning,
        followers,
        store: peers.store,
        holder,
    }
}

async fn scan_once(
    jobs: &Jobs,
    peers: &RemoteDispatch,
    taken: bool,
) -> Result<(), super::CoordinatorError> {
    if taken {
        let spawns = remote::resume_spawns(jobs, peers).await?;
        if spawns > 0 {
            tracing::info!(
                jobs = spawns,
                "sending again the spawns of remote dispatches left unanswered"
            );
        }
    }
    let mut started = 0;
    for job in jobs.running_jobs_with_remote_agents().await? {
        if remote::follow_job(jobs, peers, job) {
            started += 1;
        }
    }
    if taken && started > 0 {
        tracing::info!(
            jobs = started,
            "following the remote agents of running jobs"
        );
    }
    Ok(())
}

/// The running scan. Dropping it stops the scan and every task; [`stop`]
/// also lets go of the lease, so another replica takes over at once.
///
/// [`stop`]: Following::stop
pub struct Following {
    scanning: tokio::task::JoinHandle<()>,
    followers: Followers,
    store: crate::store::Store,
    holder: String,
}

impl Following {
    /// Stops following and releases the lease.
    pub async fn stop(self) {
        self.scanning.abort();
        self.followers.stop_all();
        if let Err(error) = self.store.release_lease(LEASE, &self.holder).await {
            tracing::debug!(%error, "could not release the lease on following remote dispatches; it runs out by itself");
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.scanning.abort();
        self.followers.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_follows_the_poll_interval_within_bounds() {
        assert_eq!(
            scan_interval(Duration::from_millis(10)),
            Duration::from_millis(50)
        );
        assert_eq!(
            scan_interval(Duration::from_millis(300)),
            Duration::from_millis(300)
        );
        assert_eq!(
            scan_interval(Duration::from_secs(600)),
            Duration::from_secs(2)
        );
    }

    #[tokio::test]
    async fn one_task_per_job_and_none_without_the_lease() {
        let followers = Followers::default();
        let forever = || std::future::pending::<()>();
        assert!(
            !followers.start(Work::Follow, "j1", true, forever()),
            "started without the lease"
        );
        assert!(followers.set_held(true), "the lease was just taken");
        assert!(!followers.set_held(true), "renewed, not taken");
        assert!(followers.start(Work::Follow, "j1", true, forever()));
        assert!(!followers.start(Work::Follow, "j1", true, forever()));
        assert!(followers.start(Work::Spawn, "j1", true, forever()));
        // A dispatch's own retry runs whether the lease is held or not.
        assert!(followers.start(Work::Spawn, "j2", false, forever()));
        assert_eq!(followers.running(Work::Follow), 1);
        // Losing the lease stops the tasks that need it, not the retry.
        followers.set_held(false);
        followers.set_held(false);
        assert_eq!(followers.running(Work::Follow), 0);
        assert_eq!(followers.running(Work::Spawn), 1);
        followers.stop_all();
        assert_eq!(followers.running(Work::Spawn), 0);
        // A finished task makes room for a new one.
        followers.set_held(true);
        assert!(followers.start(Work::Follow, "j2", false, async {}));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(followers.start(Work::Follow, "j2", false, async {}));
    }
}
