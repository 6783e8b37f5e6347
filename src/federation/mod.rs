//! Federation: the public instance identity, key rotation, and (as their issues
//! land) peering and signed commands between instances.

pub mod envelope;
pub mod service;
pub mod state;
