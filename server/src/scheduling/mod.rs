//! Getting requests onto ONNX Runtime: each variant's bounded queue and worker threads, and
//! the dynamic batcher that merges compatible requests into one run.

pub mod batcher;
pub mod drain;
pub mod queue;
pub mod workers;
