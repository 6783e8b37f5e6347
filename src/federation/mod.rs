//! Federation: the public instance identity, key rotation, peering (mutual TLS,
//! workspace-scoped connections, signed notices and pings) and, as its issue
//! lands, signed commands between instances.
//!
//! - [`envelope`]: the signed envelope and the receiver's checks (pure).
//! - [`state`]: the connection state machine (pure).
//! - [`commands`]: signed commands from peers (ExecuteCommand, receiver side).
//! - `journal`: the group commit of the command log: received commands' message ids and
//!   log entries, and sent reads' log entries.
//! - [`dial`]: the allow/deny CIDR lists for dialing peers (pure).
//! - [`peer_client`]: cached mutual-TLS channels to peers.
//! - [`peering`]: the handshake, operator changes and inbound notices and pings.
//! - [`outbox`]: notice delivery with retries, liveness pings, pruning.
//! - [`service`]: the gRPC handlers.

pub mod audit;
pub mod commands;
pub mod dial;
pub mod envelope;
mod error;
mod journal;
pub mod outbox;
pub mod paging;
pub mod peer_client;
pub mod peering;
pub mod service;
pub mod state;

pub use self::error::FederationError;
pub use self::peering::{Clock, ConnectRequest, ConnectionView, Federation};
