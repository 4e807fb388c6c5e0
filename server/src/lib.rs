//! Mantissa: serves ONNX models over the KServe v2 / Triton gRPC protocol.
//!
//! A request flows down through the folders: `api` validates the wire request into a typed
//! [`mantissa_runtime::InferenceRequest`] (or an `INVALID_ARGUMENT` naming the field),
//! `routing` picks the model's variant (explicit version, A/B split or default), `scheduling`
//! queues it for the variant's worker threads, which batch and run it on ONNX Runtime sessions
//! (`mantissa-runtime`), and `telemetry` records what happened. `lifecycle` starts it all:
//! it prepares every variant (`mantissa-preparation`), self-tests it, measures startup drift,
//! and shuts down cleanly. `commands` holds the other subcommands (bench, quantize, analyze).
//!
//! Dependencies point one way: lifecycle -> api -> routing -> scheduling -> telemetry, with
//! `error` and `facts` beneath them all; `commands` and `cli` sit beside, at the top.

pub mod api;
pub mod cli;
pub mod commands;
pub mod error;
pub mod facts;
pub mod lifecycle;
pub mod routing;
pub mod scheduling;
pub mod telemetry;
