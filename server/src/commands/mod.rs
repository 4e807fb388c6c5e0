//! The command-line tools besides `serve`: `bench` (a load generator), `quantize` (the
//! startup passes on one file) and `analyze` (a quantization-readiness report).

pub mod analyze;
pub mod bench;
pub mod bench_inputs;
pub mod quantize;

use std::time::Duration;

/// The longest duration a command-line flag takes (30 days).
const MAX_FLAG_SECONDS: f64 = 30.0 * 24.0 * 3600.0;

/// Parses a duration flag (`500ms`, `10s`, `2m`; a bare number is seconds), with the same
/// parser as the policy's durations.
pub fn duration_arg(text: &str) -> Result<Duration, String> {
    mantissa_model_store::parse_duration(text, MAX_FLAG_SECONDS)
}
