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

use std::time::Duration;

use super::followers::Followers;
use super::remote::{self, RemoteDispatch};
use crate::coordinator::jobs::Jobs;

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
) -> Result<(), crate::coordinator::CoordinatorError> {
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
}
