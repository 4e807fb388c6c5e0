//! ONNX Runtime for Mantissa: everything that touches `ort`, and the typed currency the layers
//! above exchange. No gRPC and no async runtime here.
//!
//! - [`environment`]: finding and loading `libonnxruntime.so`, the one process-wide environment.
//! - [`datatype`]: element types in every vocabulary (KServe strings, Triton enums, ONNX).
//! - [`tensor`]: typed input and output tensors and the [`InferenceRequest`] they travel in.
//! - [`bytes_layout`]: the length-prefixed layout of BYTES (string) tensors.
//! - [`signature`]: what a session takes and returns, and whether it batches.
//! - [`providers`]: execution providers (CPU, CUDA, TensorRT) and why one is unavailable.
//! - [`session`]: where a model comes from ([`ModelSource`]) and opening sessions on it.
//! - [`execute`]: running a request on a session, with timings.
//! - [`samples`]: `.npz`/`.npy` sample files (calibration, holdout, benchmark inputs).
//! - [`memory`]: peak resident memory of a phase, and handing freed memory back.
//! - [`error`]: the one error type, [`RuntimeError`].

pub mod bytes_layout;
pub mod chain;
pub mod datatype;
pub mod environment;
pub mod error;
pub mod execute;
pub mod memory;
pub mod providers;
pub mod samples;
pub mod session;
pub mod shared_arena;
pub mod signature;
pub mod tensor;

pub use chain::{HeldTensor, execute_link};
pub use datatype::DataType;
pub use environment::{OrtSetupError, load_environment, loaded_library};
pub use error::RuntimeError;
pub use execute::{RunTimings, execute, execute_timed, execute_visit, execute_visit_tensors, warmup_request};
pub use providers::{
    CudaOptions, ExecutionProvider, ProviderError, ProviderStage, TensorRtOptions, available_providers,
};
pub use session::{
    CpuMemory, ModelSource, SessionConfig, open_internal_session, open_internal_session_with, open_session,
};
pub use shared_arena::SharedArena;
pub use signature::{ModelSignature, TensorSpec, signature_of};
pub use tensor::{InferenceRequest, InputTensor, OutputTensor, TensorData};

/// The ONNX Runtime types callers hold on to (sessions, the environment), re-exported so that
/// crates above do not need their own `ort` dependency for them.
pub use ort::environment::Environment;
pub use ort::session::Session;
