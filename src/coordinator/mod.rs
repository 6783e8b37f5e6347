//! The job coordinator behind `mosaic.coordinator.v1.Coordinator`.

pub mod service;
