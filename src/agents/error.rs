//! The agent runtime's error type; `crate::error` maps it to gRPC status codes.

use crate::store::StoreError;

/// Why an agent operation was refused or failed, by cause; the code each
/// becomes (in `crate::error`) is written beside it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed (unknown type, oversized prompt, bad labels,
    /// a timeout above the type's, ...). Nothing was recorded or started
    /// (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// No agent has this id (NOT_FOUND).
    #[error("no agent with id {0}")]
    NotFound(String),
    /// The concurrent-agent cap is reached; the spawn is refused, not queued
    /// (RESOURCE_EXHAUSTED).
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
    /// database that is not a registered replica (so it cannot be reached;
    /// FAILED_PRECONDITION).
    #[error(
        "agent {agent_id} runs under runner {runner_id}, which is not a registered replica of this instance; stop it on that mosaicd"
    )]
    SupervisedElsewhere {
        /// The agent.
        agent_id: String,
        /// The runner that supervises it.
        runner_id: String,
    },
    /// The replica that supervises the agent holds its lease but did not
    /// answer (or answered that it could not now): worth retrying
    /// (UNAVAILABLE).
    #[error(
        "agent {agent_id} runs under replica {runner_id} at {address}, which did not answer ({cause}); retry"
    )]
    OwnerUnavailable {
        /// The agent.
        agent_id: String,
        /// The replica's runner id.
        runner_id: String,
        /// Where that replica said it is reached.
        address: String,
        /// What went wrong.
        cause: String,
    },
    /// The replica that supervised the agent no longer holds its lease:
    /// another settles its agents as FAILED ("runner lost") shortly
    /// (UNAVAILABLE).
    #[error(
        "agent {agent_id} ran under replica {runner_id}, which stopped renewing its lease; its agents are being settled as failed (runner lost); retry shortly"
    )]
    OwnerLost {
        /// The agent.
        agent_id: String,
        /// The replica's runner id.
        runner_id: String,
    },
    /// Asked (by another replica) about an unfinished agent this replica
    /// does not supervise (UNAVAILABLE: the caller looks again).
    #[error("agent {agent_id} is not supervised by this replica (runner {runner_id}); retry")]
    NotSupervisedHere {
        /// The agent.
        agent_id: String,
        /// This replica's runner id.
        runner_id: String,
    },
    /// The answer of the replica that supervises the agent, passed on as it
    /// came, with its code (NOT_FOUND, INVALID_ARGUMENT, ...).
    #[error("{}", .0.message())]
    Forwarded(tonic::Status),
    /// The agent's events or output asked for are not kept (any more):
    /// pruned after `storage.agent_output_retention_secs`, or kept by a
    /// replica that no longer serves. Its record still is (NOT_FOUND).
    #[error("the {what} of agent {agent_id} {why}; GetAgent still returns its record")]
    NotKept {
        /// The agent.
        agent_id: String,
        /// "events" or "output".
        what: &'static str,
        /// Why they are not here.
        why: String,
    },
    /// This replica's copy of an agent's output could not be read (INTERNAL).
    #[error("cannot read the output of agent {agent_id}: {cause}")]
    Unreadable {
        /// The agent.
        agent_id: String,
        /// What the file system said.
        cause: String,
    },
    /// A read of an agent's output starts past its end (OUT_OF_RANGE).
    #[error("offset {offset} is past the end of agent {agent_id}'s kept output ({kept} bytes)")]
    PastEnd {
        /// The agent.
        agent_id: String,
        /// The offset asked for.
        offset: u64,
        /// Bytes of output kept.
        kept: u64,
    },
    /// The daemon is shutting down and starts no more agents (UNAVAILABLE).
    #[error("the daemon is shutting down and starts no new agents; retry on a running daemon")]
    ShuttingDown,
    /// A watch ended before the agent did: the daemon is shutting down
    /// (UNAVAILABLE).
    #[error("the daemon is shutting down; watch again to resume from the current state")]
    Interrupted,
    /// The database failed (the store's code).
    #[error(transparent)]
    Store(#[from] StoreError),
}
