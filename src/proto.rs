//! The generated protobuf and gRPC code, included here and nowhere else.
//!
//! The modules nest as the packages do (`mosaic::federation::v1` refers to
//! `mosaic::agent::v1` by relative path); the short aliases below are what the
//! rest of the crate uses.

/// Generated code, one module per proto package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod mosaic {
    /// `mosaic.agent.*`
    pub mod agent {
        /// `mosaic.agent.v1`
        pub mod v1 {
            tonic::include_proto!("mosaic.agent.v1");
        }
    }
    /// `mosaic.coordinator.*`
    pub mod coordinator {
        /// `mosaic.coordinator.v1`
        pub mod v1 {
            tonic::include_proto!("mosaic.coordinator.v1");
        }
    }
    /// `mosaic.replica.*`
    pub mod replica {
        /// `mosaic.replica.v1`
        pub mod v1 {
            tonic::include_proto!("mosaic.replica.v1");
        }
    }
    /// `mosaic.federation.*`
    pub mod federation {
        /// `mosaic.federation.v1`
        pub mod v1 {
            tonic::include_proto!("mosaic.federation.v1");
        }
    }
}

/// `mosaic.agent.v1`: the local agent runtime.
pub use self::mosaic::agent::v1 as agent;
/// `mosaic.coordinator.v1`: jobs, webhooks and dispatch.
pub use self::mosaic::coordinator::v1 as coordinator;
/// `mosaic.federation.v1`: instance identity, peering and signed commands.
pub use self::mosaic::federation::v1 as federation;
/// `mosaic.replica.v1`: calls between replicas of one instance.
pub use self::mosaic::replica::v1 as replica;

/// The encoded `FileDescriptorSet` of every proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mosaic_descriptor");

/// The fully qualified service names, as reflection and health report them.
/// (`mosaic.replica.v1.Replica`, internal to an instance, is served and
/// described but has no health status of its own.)
pub const SERVICE_NAMES: [&str; 3] = [
    "mosaic.federation.v1.Federation",
    "mosaic.agent.v1.AgentControl",
    "mosaic.coordinator.v1.Coordinator",
];
