//! [`Elsewhere`]: how the runtime reaches an agent whose process another
//! replica of this instance supervises (or supervised: an ended agent's
//! journal and output stay in that replica's data dir). `replicas::routing`
//! implements it (a call to that replica over mutual TLS); the runtime only
//! asks.

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::error::AgentError;
use super::model::{AgentRecord, OutputChunk, SequencedEvent, WatchFrom};

/// A watch's events, as [`super::AgentRuntime::watch`] yields them.
pub type EventStream = BoxStream<'static, Result<SequencedEvent, AgentError>>;

/// The replicas that supervise the agents this one does not.
pub trait Elsewhere: Send + Sync {
    /// Asks the replica that supervises `agent` to stop it (the runtime has
    /// checked `reason`); the agent as that replica answers.
    fn kill<'a>(
        &'a self,
        agent: &'a AgentRecord,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<AgentRecord, AgentError>>;

    /// Asks the replica whose runner tag is `tag` (another replica this one
    /// has reached before) to stop agent `agent_id`, as the replica that
    /// supervises it would: `None` when no such replica is known. A guess
    /// from the agent's id, so the answer may be that it does not run it.
    fn kill_tagged<'a>(
        &'a self,
        agent_id: &'a str,
        tag: [u8; 4],
        reason: &'a str,
    ) -> Option<BoxFuture<'a, Result<AgentRecord, AgentError>>>;

    /// Follows `agent` through the replica that supervises it.
    fn watch<'a>(
        &'a self,
        agent: &'a AgentRecord,
        include_output: bool,
        from: WatchFrom,
    ) -> BoxFuture<'a, Result<EventStream, AgentError>>;

    /// Reads `agent`'s output on the replica that ran it.
    fn read_output<'a>(
        &'a self,
        agent: &'a AgentRecord,
        offset: u64,
        max_bytes: u32,
    ) -> BoxFuture<'a, Result<OutputChunk, AgentError>>;
}
