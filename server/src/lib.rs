//! Mantissa: serves ONNX models over the KServe v2 / Triton gRPC protocol.
//!
//! Data flows one way: a request is validated into a typed request (`validation`), handed to a
//! variant's bounded queue and executed by a worker thread that owns an ONNX Runtime session
//! (`worker`, `executor`), and answered by the gRPC handler (`service`). `server` wires the
//! lifecycle; `bench` is the load generator.

pub mod analyze;
pub mod artifact_cache;
pub mod batching;
pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod contents;
pub mod datatype;
pub mod drift;
pub mod error;
pub mod executor;
pub mod metrics;
pub mod mixed_precision;
pub mod npz;
pub mod ort_runtime;
pub mod peak_memory;
pub mod quantize_cmd;
pub mod registry;
pub mod self_test;
pub mod server;
pub mod service;
pub mod shadow;
pub mod signature;
pub mod statistics;
pub mod validation;
pub mod variant_build;
pub mod worker;
