//! The local agent runtime behind `mosaic.agent.v1.AgentControl`.

pub mod model;
pub mod service;
