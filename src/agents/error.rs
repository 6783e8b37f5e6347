//! The agent runtime's error type; `crate::error` maps it to gRPC status codes.

use crate::store::StoreError;

/// Why an agent operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed (unknown type, oversized prompt, bad labels,
    /// a timeout above the type's, ...). Nothing was recorded or started.
    #[error("{0}")]
    Invalid(String),
    /// No agent has this id.
    #[error("no agent with id {0}")]
    NotFound(String),
    /// The concurrent-agent cap is reached; the spawn is refused, not queued.
    #[error(
        "{running} agents are running, the configured maximum (agents.max_concurrent = {max}); wait for one to end or kill one, then retry"
    )]
    AtCapacity {
        /// Agents running now.
        running: usize,
        /// The cap.
        max: usize,
    },
    /// The agent's process is supervised by another daemon sharing the
    /// database; only that daemon can signal it.
    #[error("agent {agent_id} runs under another mosaicd sharing this database; stop it there")]
    SupervisedElsewhere {
        /// The agent.
        agent_id: String,
    },
    /// The daemon is shutting down and starts no more agents.
    #[error("the daemon is shutting down and starts no new agents; retry on a running daemon")]
    ShuttingDown,
    /// A watch ended before the agent did: the daemon is shutting down.
    #[error("the daemon is shutting down; watch again to resume from the current state")]
    Interrupted,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
