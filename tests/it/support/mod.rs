//! Shared test support: real daemons on 127.0.0.1:0 with temporary data dirs, on
//! SQLite or PostgreSQL, reached over real TLS with the generated clients.

pub mod admin;
pub mod agents;
pub mod balancer;
pub mod binary;
pub mod daemon;
pub mod fake_peer;
pub mod fault_proxy;
pub mod node;
pub mod pair;
pub mod peer;
pub mod python;
pub mod redis;
pub mod replicas;
pub mod tls;

pub use daemon::Backend;
