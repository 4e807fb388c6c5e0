//! Generated types for the `inference` package: the KServe v2 / Open Inference Protocol gRPC
//! service with Triton's extensions (ModelConfig, ModelStatistics, repository RPCs).
//!
//! The `.proto` files under `proto/` are written for Mantissa; their field names and numbers
//! follow the public definitions so that existing clients decode our messages unchanged.

#![allow(clippy::all, clippy::pedantic)]

pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of the inference protocol, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");
