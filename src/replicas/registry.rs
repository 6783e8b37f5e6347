//! This replica in the registry (table `replicas`): registered when it
//! starts serving, in a new epoch of its runner id; its lease renewed by a
//! heartbeat every third of `replicas.lease_secs`; marked stopped, its lease
//! over, when it stops cleanly, so nothing waits for the expiry.
//!
//! A heartbeat names the epoch it was registered in. When it is refused,
//! the epoch is over: another replica took this runner's agents over (or
//! the runner started again from a copy of this data dir), and this process
//! no longer supervises anything; [`Registration::lost`] tells it.

use std::time::Duration;

use crate::store::{NewReplica, Store};

/// This replica's registration, renewed in the background until
/// [`Registration::stop`] (or drop, which leaves the lease to run out).
#[derive(Debug)]
pub struct Registration {
    store: Store,
    runner_id: String,
    epoch: i64,
    beating: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<bool>,
}

/// Registers `runner_id`, reached at `address`, with a lease of `lease`,
/// and starts its heartbeat.
pub async fn register(
    store: Store,
    runner_id: &str,
    address: &str,
    lease: Duration,
) -> Result<Registration, crate::store::StoreError> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let now_ms = crate::clock::now_ms();
    let epoch = store
        .register_replica(&NewReplica {
            runner_id,
            address,
            version: env!("CARGO_PKG_VERSION"),
            now_ms,
            expires_at_ms: now_ms.saturating_add(lease_ms),
        })
        .await?;
    tracing::info!(runner.id = %runner_id, replica.epoch = epoch, replica.address = %address, "registered as a replica");
    let (lost_sender, lost) = tokio::sync::watch::channel(false);
    let beating = {
        let (store, runner_id) = (store.clone(), runner_id.to_owned());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(lease / 3);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let now_ms = crate::clock::now_ms();
                match store
                    .heartbeat_replica(&runner_id, epoch, now_ms, now_ms.saturating_add(lease_ms))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(runner.id = %runner_id, replica.epoch = epoch, "this replica's lease was taken over by another replica; it no longer supervises its agents");
                        lost_sender.send_replace(true);
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew this replica's lease; trying again");
                    }
                }
            }
        })
    };
    Ok(Registration {
        store,
        runner_id: runner_id.to_owned(),
        epoch,
        beating,
        lost,
    })
}

impl Registration {
    /// The epoch this process registered in.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Sees `true` once a heartbeat was refused: the epoch is over.
    pub fn lost(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops the heartbeat and marks this replica stopped, its lease over.
    pub async fn stop(self) {
        self.beating.abort();
        if let Err(error) = self
            .store
            .stop_replica(&self.runner_id, self.epoch, crate::clock::now_ms())
            .await
        {
            tracing::warn!(%error, "cannot mark this replica stopped; its lease runs out by itself");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.beating.abort();
    }
}
