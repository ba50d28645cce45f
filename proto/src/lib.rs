//! herald's public gRPC contract, package `herald.v1`, generated from
//! `proto/herald/v1/broker.proto` at build time, plus the grammar of the names
//! the contract carries (worker ids, connection ids, channels) so that every
//! role validates them the same way.

pub mod codec;
pub mod names;

/// Generated messages, client and server of package `herald.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("herald.v1");
}

/// The largest content of one message a broker takes unless configured
/// otherwise, in bytes. Publishers in front of a broker (the HTTP gateway)
/// check the same limit before a message leaves them.
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 64 * 1024;

/// Encoded `FileDescriptorSet` of the herald protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));
