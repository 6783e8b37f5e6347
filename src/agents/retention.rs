//! Ended agents pruned past their retention: each one's directory (its
//! working directory, output and event journal) first, then its records; and
//! before that, past the (shorter) output retention, the directory alone.
//!
//! A daemon prunes only the agents it ran (its runner id): their directories
//! are in its data dir, and a replica sharing the database prunes its own.

use std::io::ErrorKind;

use super::AgentRuntime;
use crate::store::StoreError;

/// Agents asked about per database read when pruning directories.
const IDS_PER_READ: usize = 500;

impl AgentRuntime {
    /// Removes the directories of the agents this daemon ran that ended
    /// before `before_ms`, keeping their records (GetAgent still answers;
    /// their output and events are no longer kept). The directories left in
    /// the data dir are what may still be pruned, so each pruning looks only
    /// at those. Returns how many were removed.
    pub async fn prune_ended_output(&self, before_ms: i64) -> Result<u64, StoreError> {
        let agents_dir = self.agents_dir.clone();
        let ids = tokio::task::spawn_blocking(move || agent_directories(&agents_dir))
            .await
            .unwrap_or_default();
        let mut removed = 0;
        for batch in ids.chunks(IDS_PER_READ) {
            let ended = self.store.agents_ended_among(batch, before_ms).await?;
            removed += remove_directories(self.agents_dir.clone(), ended)
                .await
                .len();
        }
        Ok(u64::try_from(removed).unwrap_or(u64::MAX))
    }

    /// Removes up to `limit` agents this daemon ran that ended before
    /// `before_ms`: their directories, then their records (status, labels and
    /// events go with them). An agent whose directory cannot be removed keeps
    /// its record, so it is tried again at the next pruning. Returns how many
    /// agents were removed.
    pub async fn prune_ended(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        let ids = self
            .store
            .ended_agents_before(&self.runner_id, before_ms, limit)
            .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let removed = remove_directories(self.agents_dir.clone(), ids).await;
        self.store.delete_agents(&removed).await
    }
}

/// The agents with a directory under `agents_dir` (spares, which have a
/// marker beside them, left out).
fn agent_directories(agents_dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(agents_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|id| !super::spare::is_spare(agents_dir, id))
        .collect()
}

/// Removes the directories of agents `ids`; returns those now gone.
async fn remove_directories(agents_dir: std::path::PathBuf, ids: Vec<String>) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter(|id| match std::fs::remove_dir_all(agents_dir.join(id)) {
                Ok(()) => true,
                Err(error) if error.kind() == ErrorKind::NotFound => true,
                Err(error) => {
                    tracing::warn!(agent.id = %id, %error, "cannot remove an ended agent's directory");
                    false
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}
