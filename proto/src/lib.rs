//! Tandem's wire contract: generated tonic/prost code for package `tandem.v1`.
//!
//! This crate is the only place wire types are defined; every other crate speaks
//! through these types.

/// The encoded descriptors of every `tandem.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));

/// Package `tandem.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tandem.v1");
}
