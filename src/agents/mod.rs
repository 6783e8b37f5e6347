//! The local agent runtime behind `mosaic.agent.v1.AgentControl`.
//!
//! - [`model`]: states and transitions, origins, records, filters, events (pure).
//! - [`command`]: command templates and spawn input checks (pure).
//! - [`output`]: line splitting, the output tail, the output cap (pure).
//! - [`paging`]: ListAgents page tokens (pure).
//! - [`process`]: signalling process groups and recognising them.
//! - [`runtime`]: [`AgentRuntime`], the in-process API used by the gRPC
//!   handlers and by the federation.
//! - `retention`: ended agents pruned past their retention.
//! - `spare`: agent directories made ahead of the spawns that take them.
//! - `supervisor`: the task that runs alongside each agent.
//! - [`service`]: the thin gRPC shell.

pub mod command;
pub mod error;
pub mod model;
pub mod output;
pub mod paging;
pub mod process;
mod retention;
pub mod runtime;
pub mod service;
mod spare;
mod supervisor;

pub use error::AgentError;
pub use model::{
    AgentEvent, AgentFilter, AgentRecord, AgentState, Origin, RuntimeStatus, SpawnSpec,
};
pub use runtime::AgentRuntime;
