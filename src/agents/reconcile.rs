//! Restart reconciliation: what a daemon's previous run left unfinished —
//! its agents' records, their process groups, processes no record names, and
//! agent directories made ahead and never used — is settled before serving.

use std::collections::HashSet;
use std::time::Duration;

use super::AgentRuntime;
use super::model::AgentState;
use super::process::{self, GroupSignal};
use super::spare::Spares;
use crate::clock::now_ms;
use crate::store::StoreError;

impl AgentRuntime {
    /// Settles this daemon's agents left unfinished by its previous run (a
    /// crash, SIGKILL, power loss): none of them is supervised any more.
    ///
    /// Orphans are not re-adopted: the daemon cannot wait for a process that
    /// is not its child, and their output pipes died with it. A process group
    /// that still runs — recognised by the agent id in its environment, not
    /// by the pid alone, which may have been reused — is stopped (SIGTERM,
    /// then SIGKILL after the grace period, in the background); the agent is
    /// recorded FAILED with the reason.
    ///
    /// Then every other process group that carries this runner's id in its
    /// environment is stopped the same way: a daemon that died between
    /// starting an agent's process and committing its record left a process
    /// that no record names. Groups of agents this runtime tracks (none,
    /// when called before serving) are left alone.
    ///
    /// Last, the agent directories the previous run made ahead and no
    /// recorded agent took are removed, and new ones are made
    /// (`agents/spare.rs`).
    pub async fn reconcile(&self) -> Result<usize, StoreError> {
        let orphans = self.store.list_unfinished_agents(&self.runner_id).await?;
        let mut stopped_groups = HashSet::new();
        for orphan in &orphans {
            let running_group = orphan
                .pid
                .filter(|pid| process::group_belongs_to_agent(*pid, &orphan.id));
            let reason = match running_group {
                Some(pgid) => {
                    stopped_groups.insert(pgid);
                    let agent_id = orphan.id.clone();
                    stop_orphan_group(pgid, &orphan.id, self.settings.kill_grace, move |pgid| {
                        process::group_belongs_to_agent(pgid, &agent_id)
                    });
                    "the daemon restarted while the agent ran; its processes were stopped"
                }
                None => "the daemon restarted while the agent ran; its process was gone",
            };
            let mut failed = orphan.clone();
            let now = now_ms();
            failed.state = AgentState::Failed;
            failed.state_reason = reason.to_owned();
            failed.ended_at_ms = Some(now);
            failed.updated_at_ms = now;
            match self
                .store
                .record_agent_transition(orphan.state, &failed)
                .await
            {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(error) => return Err(error),
            }
            tracing::warn!(agent.id = %orphan.id, pid = ?orphan.pid, reason, "settled an orphaned agent");
        }
        for stray in process::processes_of_runner(&self.runner_id) {
            let tracked = stray
                .agent_id
                .as_deref()
                .is_some_and(|agent_id| self.registry.get(agent_id).is_some());
            if tracked || !stopped_groups.insert(stray.group) {
                continue;
            }
            // A start that was never committed, or a process that left its
            // agent's group: either way nothing supervises it any more.
            let agent_id = stray.agent_id.unwrap_or_default();
            let runner_id = self.runner_id.clone();
            stop_orphan_group(
                stray.group,
                &agent_id,
                self.settings.kill_grace,
                move |pgid| process::group_belongs_to_runner(pgid, &runner_id),
            );
            tracing::warn!(
                agent.id = %agent_id,
                pgid = stray.group,
                "stopped agent processes that no unfinished record names"
            );
        }
        // The spares the last run left and no recorded agent took go (an
        // unrecorded process still working in one is being stopped above; its
        // directory going first does not keep that from finishing), and new
        // ones are made.
        let removed = Spares::sweep(&self.agents_dir, &self.store).await?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed agent directories made ahead and never used"
            );
        }
        self.spares.refill();
        Ok(orphans.len())
    }
}

/// SIGTERM to an orphaned group now, SIGKILL after `grace` if it still runs
/// and is still the orphan's (`still_ours`: the group number may have been
/// reused meanwhile).
fn stop_orphan_group(
    pgid: u32,
    agent_id: &str,
    grace: Duration,
    still_ours: impl FnOnce(u32) -> bool + Send + 'static,
) {
    if let Err(error) = process::signal_group(pgid, GroupSignal::Terminate) {
        tracing::warn!(agent.id = %agent_id, pgid, %error, "cannot signal an orphaned agent");
    }
    let agent_id = agent_id.to_owned();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && process::group_is_alive(pgid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process::group_is_alive(pgid)
            && still_ours(pgid)
            && let Err(error) = process::signal_group(pgid, GroupSignal::Kill)
        {
            tracing::warn!(agent.id = %agent_id, pgid, %error, "cannot kill an orphaned agent");
        }
    });
}
