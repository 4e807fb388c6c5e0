//! The precision policy (`policy.yaml`): raw serde structures, then validation into typed
//! settings. The schema grows by adding keys under `variants.<name>`; unknown keys are errors.
//!
//! ```yaml
//! serving:              # defaults for every variant
//!   max_batch_size: 32
//!   instances: 1
//!   intra_op_threads: 1
//!   intra_op_spinning: false
//!   dynamic_batching: true
//!   max_queue_delay: 2ms
//! variants:
//!   fp32:
//!     version: 1        # optional; else numbered 1, 2, 3... in this order
//!     precision: fp32
//!     serving:          # optional per-variant overrides
//!       instances: 2
//!     execution_provider: cpu   # or cuda, tensorrt, or a map with `kind` (see `provider`)
//! routing:
//!   default: fp32
//! ```
//!
//! Parsing runs in two stages so that each error comes from the stage that can place it best:
//! `raw` deserializes the file as written (serde reports unknown keys and wrong types with
//! their position), then `validate` checks values and cross-references (unknown variant
//! names, bounds, missing directories) and finds the line from the key path. `types` holds
//! the typed result and depends on neither stage.

mod part_slice;
mod provider;
#[cfg(test)]
mod provider_tests;
mod raw;
#[cfg(test)]
mod tests;
mod types;
mod validate;
mod versions;

use std::collections::BTreeMap;
use std::path::Path;

pub use part_slice::PartSlice;
pub use types::{
    BudgetMiss, DriftBudget, DriftSettings, ExecutionProviderSpec, GpuProvider, GpuProviderSpec, PartBudget, Policy,
    PolicyError, Precision, ServingSettings, ShadowSettings, Split, TensorRtSpec, Top1Axis, VariantSpec, parse_version,
};

// Loading is implemented here rather than beside the type because it runs both stages, and
// both stages already depend on `types`.
impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::parse(&read(path, "policy")?, path)
    }

    /// Parses and validates policy text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let raw = raw::parse(text, path)?;
        validate::validate(raw, text, path)
    }
}

fn read(path: &Path, what: &str) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|err| PolicyError {
        file: path.to_owned(),
        line: None,
        key: String::new(),
        message: format!("cannot read {what}: {err}"),
    })
}

/// Reads a file holding what `drift.budget.parts` holds in a policy (part name -> spec), as
/// `mantissa quantize --budget-parts` takes it; errors name the file, line and key.
pub fn load_budget_parts(path: &Path) -> Result<BTreeMap<String, PartBudget>, PolicyError> {
    parse_budget_parts(&read(path, "budget parts")?, path)
}

/// Parses and validates the text of a budget-parts file; `path` is used in error messages.
pub fn parse_budget_parts(text: &str, path: &Path) -> Result<BTreeMap<String, PartBudget>, PolicyError> {
    let raw: raw::RawParts = raw::parse(text, path)?;
    validate::validate_parts_file(&raw, text, path)
}
