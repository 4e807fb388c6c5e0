//! The error type of model preparation: which step failed, with the lower layer's error.

use std::path::PathBuf;
use std::time::Duration;

use mantissa_quantize::ModelIoError;
use mantissa_quantize::passes::fp16::Fp16Error;
use mantissa_quantize::passes::int8::Int8Error;
use mantissa_runtime::RuntimeError;

use crate::named_parts::PartError;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The model file (or an external-data file) cannot be read or parsed.
    #[error(transparent)]
    Model(#[from] ModelIoError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// ONNX Runtime could not open or run a model during calibration or the budget search.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A sample file failed, named by its path.
    #[error("{path}: {source}")]
    Sample { path: String, source: RuntimeError },
    #[error("fp16 pass: {0}")]
    Fp16(#[from] Fp16Error),
    #[error("the FP16 model is {0} bytes, over protobuf's 2 GiB limit")]
    TooLarge(usize),
    /// An INT8 pass refused the model; `mode` names the pass ("int8 dynamic", ...).
    #[error("{mode}: {source}")]
    Int8 { mode: &'static str, source: Int8Error },
    #[error("static INT8 needs calibration_data")]
    NoCalibrationData,
    /// Calibration could not observe a tensor it needs.
    #[error("{0}")]
    Observation(String),
    /// The budget search found no configuration within the budget (the sentence gives the figures).
    #[error("{0}")]
    BudgetMissed(String),
    /// The budget search ran out of its time limit before any configuration met the budget;
    /// `reached` says how close it came.
    #[error(
        "the budget search stopped at its time limit of {:.3}s after {evaluations} evaluations in {:.1}s: {reached}; raise the limit (policy drift.budget.search_time_limit, --budget-time-limit) or loosen the budget",
        .limit.as_secs_f64(),
        .elapsed.as_secs_f64()
    )]
    SearchTimeLimit { limit: Duration, elapsed: Duration, evaluations: usize, reached: String },
    /// A named part of the drift budget does not fit the model's outputs.
    #[error("drift budget: {0}")]
    Part(#[from] PartError),
    #[error("cache key: {0}")]
    CacheKey(std::io::Error),
}
