//! `mosaicd`: a gRPC daemon that federates independently run Mosaic instances.
//!
//! Reading order, from the outside in:
//!
//! - [`cli`]: the clap command tree; offline commands work on the data dir, client
//!   commands talk gRPC to a running daemon.
//! - [`config`]: the one configuration tree and its sources (file, `MOSAIC_*`, flags).
//! - [`server`]: `run(listener, config, shutdown)` — TLS, the front door, the four
//!   services, health, reflection and graceful shutdown; [`health`]: the
//!   standard health service following the database.
//! - [`front_door`]: the one layer in front of every service: it records each
//!   call, rate-limits it, authenticates it and rate-limits it again.
//! - [`ratelimit`]: GCRA limits per client IP, API key and instance by method
//!   tier, in memory or shared through Redis, with fallback.
//! - [`metrics`]: each call's count, duration and log line, and `/metrics`.
//! - [`served`]: the methods the server serves, each classified once (who may
//!   call it, its tier, its labels) for the front door.
//! - [`notify`]: `READY=1` and `STOPPING=1` to systemd (`Type=notify`).
//! - [`auth`]: API keys (generation, hashing, scopes) and the authenticator that
//!   says who a caller is before any handler runs (and how the front door
//!   names it); [`cache`]: the time-bounded cache
//!   behind its lookups and the peers' keys.
//! - [`tls`]: rustls configurations: the server that asks for (but does not demand) a
//!   client certificate, and clients that pin a key instead of trusting a CA.
//! - [`identity`]: the instance identity — the ECDSA P-256 key, its fingerprint, its
//!   encryption at rest, its certificate and its rotation.
//! - [`federation`], [`agents`], [`coordinator`]: the three public gRPC services
//!   (the fourth, `Replica`, is spoken between replicas: [`replicas`]).
//! - [`replicas`]: what replicas of one instance share: the runner id, leases,
//!   key rotations taken up from the database, the registry of replicas and
//!   the settling of a lost one's agents.
//! - [`retention`]: ended jobs, webhook deliveries and agents pruned on a schedule.
//! - [`store`]: the only module that speaks SQL (diesel-async on SQLite or PostgreSQL).
//! - [`error`]: the one table from error kinds to `tonic::Status`.
//! - [`clock`]: epoch milliseconds, and the injectable [`clock::Clock`].
//! - [`text`]: what counts as printable in text from outside; escaping for a
//!   terminal; an error and its causes on one line.
//! - [`proto`]: the generated code.
#![forbid(unsafe_code)]

pub mod agents;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod federation;
pub mod front_door;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod proto;
pub mod ratelimit;
pub mod replicas;
pub mod retention;
pub mod served;
pub mod server;
pub(crate) mod serving;
pub mod store;
pub mod text;
pub mod tls;
