//! Ended agents pruned past their retention: each one's directory (its
//! working directory and output) first, then its records.
//!
//! A daemon prunes only the agents it ran (its runner id): their directories
//! are in its data dir, and a replica sharing the database prunes its own.

use std::io::ErrorKind;

use super::AgentRuntime;
use crate::store::StoreError;

impl AgentRuntime {
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
        let agents_dir = self.agents_dir.clone();
        let removed = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| match std::fs::remove_dir_all(agents_dir.join(id)) {
                    Ok(()) => true,
                    Err(error) if error.kind() == ErrorKind::NotFound => true,
                    Err(error) => {
                        tracing::warn!(agent.id = %id, %error, "cannot remove an ended agent's directory");
                        false
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.store.delete_agents(&removed).await
    }
}
