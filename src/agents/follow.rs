//! Following an agent: its events from any point ([`AgentRuntime::watch`])
//! and its captured output by offset ([`AgentRuntime::read_output`]). An
//! agent this replica ran is served from its directory here (the journal,
//! `output.log`); one another replica ran, from that replica's, through
//! [`super::elsewhere::Elsewhere`]. When that replica is gone, so are the
//! files: the record alone remains.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt as _;

use super::AgentRuntime;
use super::elsewhere::EventStream;
use super::error::AgentError;
use super::journal;
use super::model::{AgentRecord, OutputChunk, WatchFrom};
use super::watch;

/// Bytes a ReadAgentOutput returns when it does not say.
pub const DEFAULT_READ_BYTES: u32 = 64 * 1024;
/// The most bytes one ReadAgentOutput returns.
pub const MAX_READ_BYTES: u32 = 1024 * 1024;

impl AgentRuntime {
    /// The agent's events from `from`: with [`WatchFrom::Now`], first its
    /// current state (numbered with the last event it reflects), then each
    /// event after it; with a sequence, every event from there on, first the
    /// kept ones, then live. Output lines only with `include_output`. Ends
    /// after the change into a terminal state. An agent another replica
    /// supervises is followed there (its output lines too).
    pub async fn watch(
        &self,
        id: &str,
        include_output: bool,
        from: WatchFrom,
    ) -> Result<EventStream, AgentError> {
        self.watch_routed(id, include_output, from, true).await
    }

    /// [`AgentRuntime::watch`] of an agent this replica supervises (or ran),
    /// for another replica that routed the watch here.
    pub async fn watch_here(
        &self,
        id: &str,
        include_output: bool,
        from: WatchFrom,
    ) -> Result<EventStream, AgentError> {
        self.watch_routed(id, include_output, from, false).await
    }

    async fn watch_routed(
        &self,
        id: &str,
        include_output: bool,
        from: WatchFrom,
        route: bool,
    ) -> Result<EventStream, AgentError> {
        let journal = journal::path(&self.agents_dir, id);
        if let Some(tracked) = self.registry.get(id) {
            return Ok(watch::tracked_watch(
                &tracked,
                journal,
                from,
                include_output,
            ));
        }
        let current = self.stored(id).await?;
        if current.runner_id == self.runner_id && current.state.is_terminal() {
            return Ok(watch::ended_watch(journal, current, from, include_output));
        }
        if route && current.runner_id == self.runner_id {
            // Ours but not tracked: its end is being recorded.
            return Ok(watch::polled_watch(self.store.clone(), current));
        }
        let routed = match self.elsewhere(&current, route) {
            Ok(elsewhere) => elsewhere.watch(&current, include_output, from).await,
            Err(error) => Err(error),
        };
        match routed {
            Err(error) if current.state.is_terminal() && owner_gone(&error) => match from {
                WatchFrom::Now => Ok(watch::record_only(current)),
                WatchFrom::Sequence(_) => Err(not_kept_there(current, "events")),
            },
            other => other,
        }
    }

    /// Up to `max_bytes` (0: [`DEFAULT_READ_BYTES`]; at most
    /// [`MAX_READ_BYTES`]) of the agent's captured output from `offset`,
    /// while it is kept. An offset past the end is refused
    /// ([`AgentError::PastEnd`]); at the end, the answer is empty.
    pub async fn read_output(
        &self,
        id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<OutputChunk, AgentError> {
        self.read_output_routed(id, offset, max_bytes, true).await
    }

    /// [`AgentRuntime::read_output`] for another replica that routed the
    /// read here.
    pub async fn read_output_here(
        &self,
        id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<OutputChunk, AgentError> {
        self.read_output_routed(id, offset, max_bytes, false).await
    }

    async fn read_output_routed(
        &self,
        id: &str,
        offset: u64,
        max_bytes: u32,
        route: bool,
    ) -> Result<OutputChunk, AgentError> {
        let record = match self.registry.get(id) {
            Some(tracked) => tracked.snapshot(),
            None => self.stored(id).await?,
        };
        if record.runner_id == self.runner_id {
            return self.read_output_file(record, offset, max_bytes).await;
        }
        let routed = match self.elsewhere(&record, route) {
            Ok(elsewhere) => elsewhere.read_output(&record, offset, max_bytes).await,
            Err(error) => Err(error),
        };
        match routed {
            Err(error) if record.state.is_terminal() && owner_gone(&error) => {
                Err(not_kept_there(record, "output"))
            }
            other => other,
        }
    }

    /// Reads `output.log` of an agent this replica ran.
    async fn read_output_file(
        &self,
        record: AgentRecord,
        offset: u64,
        max_bytes: u32,
    ) -> Result<OutputChunk, AgentError> {
        let path = self.agents_dir.join(&record.id).join(super::OUTPUT_FILE);
        let wanted = match max_bytes {
            0 => DEFAULT_READ_BYTES,
            asked => asked.min(MAX_READ_BYTES),
        };
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let file = std::fs::File::open(&path)?;
            let kept = file.metadata()?.len();
            if offset > kept {
                return Ok((kept, None));
            }
            let length = (kept - offset).min(u64::from(wanted));
            let mut data = vec![0; usize::try_from(length).unwrap_or(0)];
            let mut filled = 0;
            while filled < data.len() {
                let position = offset + u64::try_from(filled).unwrap_or(u64::MAX);
                match file.read_at(&mut data[filled..], position)? {
                    0 => break,
                    count => filled += count,
                }
            }
            data.truncate(filled);
            Ok((kept, Some(data)))
        })
        .await
        .map_err(|_| AgentError::Interrupted)?;
        let (kept, data) = match read {
            Ok(read) => read,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(AgentError::NotKept {
                    agent_id: record.id,
                    what: "output",
                    why: "is no longer kept (storage.agent_output_retention_secs)".to_owned(),
                });
            }
            Err(error) => {
                return Err(AgentError::Unreadable {
                    agent_id: record.id,
                    cause: error.to_string(),
                });
            }
        };
        let Some(data) = data else {
            return Err(AgentError::PastEnd {
                agent_id: record.id,
                offset,
                kept,
            });
        };
        let next_offset = offset + u64::try_from(data.len()).unwrap_or(0);
        Ok(OutputChunk {
            end: record.state.is_terminal() && next_offset >= kept,
            data,
            offset,
            next_offset,
            kept_bytes: kept,
        })
    }

    /// The stored record of agent `id`.
    async fn stored(&self, id: &str) -> Result<AgentRecord, AgentError> {
        self.store
            .get_agent(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))
    }
}

/// True when the replica that ran an agent is no longer there to ask.
fn owner_gone(error: &AgentError) -> bool {
    matches!(
        error,
        AgentError::OwnerLost { .. }
            | AgentError::SupervisedElsewhere { .. }
            | AgentError::NotSupervisedHere { .. }
    )
}

/// The events or output of an ended agent whose replica is gone.
fn not_kept_there(record: AgentRecord, what: &'static str) -> AgentError {
    AgentError::NotKept {
        why: format!(
            "{} kept by replica {}, which no longer serves",
            if what == "output" { "was" } else { "were" },
            record.runner_id
        ),
        agent_id: record.id,
        what,
    }
}
