//! The one error type of the runtime layer. The serving layer maps it onto gRPC statuses;
//! preparation wraps it with the step that failed.

use crate::providers::ProviderError;

/// Why a session could not be opened or a request could not be run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
    /// ONNX Runtime refused to build a session (unreadable model, unsupported operator...).
    #[error("{0}")]
    Session(String),
    /// The session's execution provider could not be registered, or the session could not be
    /// created on it.
    #[error(transparent)]
    Provider(Box<ProviderError>),
    /// The session's inputs or outputs cannot be served (a non-tensor value, an element type
    /// without a KServe datatype, a batch size the model's shapes do not allow).
    #[error("{0}")]
    Signature(String),
    /// A run failed, or its outputs could not be read.
    #[error("ONNX Runtime failed: {0}")]
    Execution(String),
    /// A sample file is missing, unreadable or does not match the model's inputs.
    #[error("{0}")]
    Sample(String),
}
