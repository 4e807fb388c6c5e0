//! The one error type requests fail with, and its mapping onto gRPC status codes.

use mantissa_runtime::RuntimeError;
use tonic::{Code, Status};

/// Why a request was not answered with outputs. Cloneable so that one execution failure can
/// be handed to every request that shared the run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model '{model}'; this server has {available:?}")]
    ModelNotFound { model: String, available: Vec<String> },
    #[error("model '{model}' has no version '{version}'; available versions: {available:?}")]
    VersionNotFound { model: String, version: String, available: Vec<String> },
    #[error("model '{model}' version '{version}' is not ready: {reason}")]
    NotReady { model: String, version: String, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("model '{model}' version '{version}': queue is full ({capacity} requests waiting); retry later")]
    QueueFull { model: String, version: String, capacity: usize },
    #[error("deadline exceeded after waiting {waited:?} in the queue; the request was not run")]
    DeadlineExceeded { waited: std::time::Duration },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error(
        "server is shutting down: its exit timeout ({timeout:?}) ran out before this request ran; retry on another replica"
    )]
    ExitTimeout { timeout: std::time::Duration },
    #[error("ONNX Runtime failed: {0}")]
    Execution(String),
}

impl ServeError {
    pub fn code(&self) -> Code {
        match self {
            ServeError::ModelNotFound { .. } | ServeError::VersionNotFound { .. } => Code::NotFound,
            ServeError::NotReady { .. } | ServeError::ShuttingDown | ServeError::ExitTimeout { .. } => {
                Code::Unavailable
            }
            ServeError::InvalidArgument(_) => Code::InvalidArgument,
            ServeError::QueueFull { .. } => Code::ResourceExhausted,
            ServeError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ServeError::Execution(_) => Code::Internal,
        }
    }

    /// Short label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            ServeError::ModelNotFound { .. } => "model_not_found",
            ServeError::VersionNotFound { .. } => "version_not_found",
            ServeError::NotReady { .. } => "not_ready",
            ServeError::InvalidArgument(_) => "invalid_argument",
            ServeError::QueueFull { .. } => "queue_full",
            ServeError::DeadlineExceeded { .. } => "deadline_exceeded",
            ServeError::ShuttingDown => "shutting_down",
            ServeError::ExitTimeout { .. } => "exit_timeout",
            ServeError::Execution(_) => "execution",
        }
    }
}

/// A run that failed in ONNX Runtime (or whose outputs could not be read) is an internal error
/// of the request that shared it.
impl From<RuntimeError> for ServeError {
    fn from(error: RuntimeError) -> Self {
        match error {
            RuntimeError::Execution(message) => ServeError::Execution(message),
            other => ServeError::Execution(other.to_string()),
        }
    }
}

impl From<ServeError> for Status {
    fn from(error: ServeError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}
