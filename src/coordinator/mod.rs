//! The job coordinator behind `mosaic.coordinator.v1.Coordinator`.
//!
//! - [`state`]: the job state machine (pure).
//! - [`jobs`]: creating, changing, listing and watching jobs over the store.
//! - [`dispatch`]: `DispatchJob`, and jobs that follow their agent's end.
//! - [`remote`]: `DispatchJob` to a federated peer, and jobs that follow a
//!   remote agent by polling it.
//! - [`following`]: which replica polls the remote agents (one per instance,
//!   under a lease).
//! - [`webhook`]: signature checks and event mapping for `HandleWebhook` (pure).
//! - [`events`]: the in-process feed of committed changes behind `WatchJob`.
//! - [`paging`]: `ListJobs` page tokens (pure).
//! - [`health`]: the component checks behind `Health` and `grpc.health.v1`.
//! - [`convert`]: proto messages to and from domain types.
//! - [`service`]: the thin gRPC handlers.
//! - [`settings`]: `[coordinator]` and its webhook sources, as written and resolved.

pub mod convert;
pub mod dispatch;
pub mod events;
pub mod health;
pub mod jobs;
pub mod paging;
pub mod service;
pub mod settings;
pub mod state;
pub mod webhook;

use std::sync::Arc;

use crate::store::StoreError;

pub use self::events::JobEvents;

/// What the coordinator keeps for the life of the daemon.
#[derive(Clone, Debug)]
pub struct CoordinatorState {
    /// Committed job changes, for `WatchJob`.
    pub events: JobEvents,
    /// Becomes `true` when the daemon starts shutting down, so that watch
    /// streams end (UNAVAILABLE) instead of holding the drain.
    shutting_down: Arc<tokio::sync::watch::Sender<bool>>,
    /// The group commit of job creates and changes, started on the first
    /// write (see `jobs::Jobs::writer`).
    job_writes: Arc<std::sync::OnceLock<jobs::JobWriter>>,
    /// The tasks following remote dispatches, while this process holds their
    /// lease.
    followers: dispatch::followers::Followers,
}

impl Default for CoordinatorState {
    fn default() -> Self {
        CoordinatorState {
            events: JobEvents::default(),
            shutting_down: Arc::new(tokio::sync::watch::Sender::new(false)),
            job_writes: Arc::default(),
            followers: dispatch::followers::Followers::default(),
        }
    }
}

impl CoordinatorState {
    /// Ends every watch stream, now and from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.send_replace(true);
    }

    /// Where the daemon's job writer is kept once started.
    pub(crate) fn job_writes(&self) -> Arc<std::sync::OnceLock<jobs::JobWriter>> {
        Arc::clone(&self.job_writes)
    }

    /// The tasks following remote dispatches from this process.
    pub fn followers(&self) -> dispatch::followers::Followers {
        self.followers.clone()
    }

    /// A receiver that sees `true` once shutdown has begun.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }
}

/// Why a coordinator operation failed. Each kind maps to one gRPC code in
/// `error.rs`.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad input: nothing was changed (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// No such job (NOT_FOUND).
    #[error("no job with id {0:?}")]
    NotFound(String),
    /// The state machine refused the change (FAILED_PRECONDITION).
    #[error(transparent)]
    Transition(#[from] state::TransitionError),
    /// The job kept changing under concurrent updates (ABORTED; retry).
    #[error("the job changed concurrently too many times; try again")]
    Contention,
    /// A webhook delivery's signature was missing or wrong (UNAUTHENTICATED).
    #[error(transparent)]
    Signature(#[from] webhook::SignatureError),
    /// The daemon is shutting down (UNAVAILABLE; watch again elsewhere or
    /// later).
    #[error("the server is shutting down; watch again to get the current state")]
    ShuttingDown,
    /// The agent runtime refused or failed (its own code: INVALID_ARGUMENT,
    /// RESOURCE_EXHAUSTED, ...).
    #[error(transparent)]
    Agent(#[from] crate::agents::AgentError),
    /// A signed command to a peer failed: the connection is missing or not
    /// ACTIVE, the peer refused (its own code), or it cannot be reached.
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
