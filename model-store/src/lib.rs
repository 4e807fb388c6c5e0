//! The model repository: which models exist, where their ONNX files are, and the precision
//! policy that says how each one is served.
//!
//! Layout: `<store>/<model>/model.onnx` and `<store>/<model>/policy.yaml`. Policies are parsed
//! strictly (unknown keys are errors) and validated into typed settings; every error names the
//! file, the line and the key.

mod byte_size;
mod duration;
mod policy;
mod repository;
mod yaml_location;

pub use byte_size::parse_byte_size;
pub use duration::parse_duration;
pub use policy::{
    BudgetMiss, DriftBudget, DriftSettings, ExecutionProviderSpec, GpuProvider, GpuProviderSpec, PartBudget, PartSlice,
    Policy, PolicyError, Precision, ServingSettings, ShadowSettings, Split, TensorRtSpec, Top1Axis, VariantSpec,
    load_budget_parts, parse_budget_parts, parse_version,
};
pub use repository::{ModelEntry, RepositoryError, scan_repository};
