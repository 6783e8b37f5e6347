//! Helpers shared by the benchmark and soak examples (included with
//! `#[path = "common/mod.rs"] mod common;`): latency statistics, the machine
//! description, `mosaicd` daemons run as separate processes and peered over
//! real mutual TLS, and a bare gRPC echo server to compare against.

// Each example uses a different subset of these helpers.
#![allow(dead_code)]

pub mod calls;
pub mod daemon;
pub mod echo;
pub mod load;
pub mod machine;
pub mod mesh;
pub mod stats;
pub mod storage;
