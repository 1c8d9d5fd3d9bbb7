//! Tandem's wire contract: generated tonic/prost code for package `tandem.v1`.
//!
//! This crate is the only place wire types are defined; every other crate speaks
//! through these types.

/// The encoded descriptors of every `tandem.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));

/// The key a node holds one attempt of a request under: the request's id,
/// then `#` and the attempt number (`DecodeRequest.attempt`,
/// `PrefillRequest.attempt`, `CancelRequest.attempt`); the bare id when the
/// attempt is unset (0).
pub fn attempt_key(request_id: &str, attempt: u32) -> String {
    if attempt == 0 {
        request_id.to_owned()
    } else {
        format!("{request_id}#{attempt}")
    }
}

/// Package `tandem.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tandem.v1");
}
