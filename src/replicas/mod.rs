//! Replicas of one instance: several `mosaicd` processes on one PostgreSQL
//! behind a TCP balancer.
//!
//! - [`identity`]: a key rotation made through one replica taken up by the
//!   others, with no restart.
//! - [`runner`]: the runner id that names one daemon (its data dir) as the
//!   supervisor of the agents it starts.
//! - [`lease`]: a pure, fenced, time-bounded claim with an injected clock:
//!   the building block of what replicas will hand between themselves.
//! - [`registry`]: this replica in the table of replicas, its lease renewed
//!   by a heartbeat and fenced by an epoch.
//! - [`settle`]: a replica that stopped renewing its lease taken over by
//!   another, which settles its agents and their jobs.
//! - [`routing`]: a kill or a watch of an agent another replica supervises,
//!   carried to that replica.
//! - [`service`]: the `mosaic.replica.v1.Replica` handlers that receive them.
//! - [`settings`]: the `[replicas]` section.
//!
//! This module owns what one replica must know of the others: which are alive
//! and how to reach them (the replica registry), which replica supervises what
//! (leases), and routing a call to the owner. `federation/` never reads the
//! replica registry: a peer sees one instance, whichever replica answers.

pub mod identity;
pub mod lease;
pub mod registry;
pub mod routing;
pub mod runner;
pub mod service;
pub mod settings;
pub mod settle;
