//! The local agent runtime behind `mosaic.agent.v1.AgentControl`.
//!
//! - [`model`]: states and transitions, origins, records, filters, events (pure).
//! - [`command`]: command templates and spawn input checks (pure).
//! - [`output`]: line splitting, the output tail, the output cap (pure).
//! - [`paging`]: ListAgents page tokens (pure).
//! - [`process`]: signalling process groups and recognising them.
//! - [`elsewhere`]: the other replicas, as the runtime asks them for the
//!   agents they supervise.
//! - [`runtime`]: [`AgentRuntime`], the in-process API used by the gRPC
//!   handlers and by the federation.
//! - `registry`: the agents this daemon supervises, in memory.
//! - `follow`: watching an agent from any point, and reading its output by
//!   offset, here or through the replica that ran it.
//! - `journal`: each agent's numbered events on disk, for watchers that
//!   start earlier or fall behind.
//! - `reconcile`: settling what a previous run left unfinished, at start.
//! - `retention`: ended agents pruned past their retention.
//! - `spare`: agent directories made ahead of the spawns that take them.
//! - `supervisor`: the task that runs alongside each agent.
//! - `watch`: the event streams of a watch, live or re-read.
//! - [`convert`]: domain types to and from `mosaic.agent.v1` messages.
//! - [`service`]: the thin gRPC shell.
//! - [`settings`]: `[agents]` and `[agents.types.NAME]`, as written and resolved.

pub mod command;
pub mod convert;
pub mod elsewhere;
pub mod error;
mod follow;
mod journal;
pub mod model;
pub mod output;
pub mod paging;
pub mod process;
mod reconcile;
mod registry;
mod retention;
pub mod runtime;
pub mod service;
pub mod settings;
mod spare;
mod supervisor;
mod watch;

pub use error::AgentError;

/// The captured output's file name in an agent's directory.
pub const OUTPUT_FILE: &str = "output.log";
pub use model::{
    AgentEvent, AgentFilter, AgentRecord, AgentState, Origin, OutputChunk, RuntimeStatus,
    SequencedEvent, SpawnSpec, WatchFrom,
};
pub use runtime::AgentRuntime;
