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
//!     precision: fp32
//!     serving:          # optional per-variant overrides
//!       instances: 2
//! routing:
//!   default: fp32
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mantissa_quantize::fp16::Fp16Options;
use mantissa_quantize::int8::{Int8Mode, Int8Options};
use serde::{Deserialize, Serialize};

use crate::yaml_location::line_of_key;

/// A policy file that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line, when it could be determined.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `variants.fp32.serving.instances`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Numeric precision a variant executes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
}

/// How one variant is executed: batch limit, worker count and threads per worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingSettings {
    /// Largest batch a request may carry along dimension 0; `None` lets the server choose
    /// from the model (0 when the model has a fixed leading dimension).
    pub max_batch_size: Option<u32>,
    /// Worker threads, each owning one ONNX Runtime session.
    pub instances: u32,
    /// ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime decide.
    pub intra_op_threads: u32,
    /// Whether idle intra-op threads spin waiting for work. Spinning lowers latency on a
    /// dedicated core but burns CPU that other sessions and the gRPC threads need.
    pub intra_op_spinning: bool,
    /// Merge queued requests with matching shapes into one run, up to max_batch_size rows.
    pub dynamic_batching: bool,
    /// How long a worker holding a request waits for more to batch with it.
    pub max_queue_delay: Duration,
    /// Requests that may wait for a worker; `None` uses the server's `--queue-capacity`.
    pub max_queue_size: Option<u32>,
    /// Deadline for requests whose client sent none; `None` waits as long as the client does.
    pub default_timeout: Option<Duration>,
    /// Batch sizes (rows) the batcher runs as soon as it reaches them, without waiting out
    /// `max_queue_delay`.
    pub preferred_batch_sizes: Vec<u32>,
}

impl Default for ServingSettings {
    fn default() -> Self {
        Self {
            max_batch_size: None,
            instances: 1,
            intra_op_threads: 1,
            intra_op_spinning: false,
            dynamic_batching: true,
            max_queue_delay: Duration::ZERO,
            max_queue_size: None,
            default_timeout: None,
            preferred_batch_sizes: Vec::new(),
        }
    }
}

/// One named variant of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSpec {
    pub name: String,
    pub precision: Precision,
    /// Options of the FP16 pass (defaults when the policy gives none); only for fp16 variants.
    pub fp16: Option<Fp16Options>,
    /// Options of the INT8 passes; only for int8 variants. A static variant's
    /// `calibration_data` is resolved against the model's directory.
    pub int8: Option<Int8Options>,
    pub serving: ServingSettings,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The file it came from, or `None` for the built-in default.
    pub source: Option<PathBuf>,
    pub variants: Vec<VariantSpec>,
    /// Variant that serves requests with an empty `model_version` when there is no split.
    pub default_variant: String,
    /// Weighted A/B split of requests with an empty `model_version`.
    pub split: Option<Split>,
    /// Startup drift measurement against a reference variant.
    pub drift: Option<DriftSettings>,
    /// Live drift: re-run sampled requests on a reference variant off the hot path.
    pub shadow: Option<ShadowSettings>,
}

/// The `shadow:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSettings {
    /// The variant sampled requests are re-run on.
    pub reference: String,
    /// Share of requests served by other variants that are compared, in [0, 1].
    pub sample_rate: f64,
    /// Samples waiting for comparison; more are dropped (and counted), never delaying clients.
    #[serde(default = "default_shadow_queue")]
    pub queue_size: usize,
}

fn default_shadow_queue() -> usize {
    64
}

/// The `drift:` section: compare every variant with the reference on holdout data at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftSettings {
    /// Holdout samples: a directory of `.npz` files (keys = input names) or one such file,
    /// resolved against the model's directory.
    pub holdout_data: PathBuf,
    /// The variant others are compared with (usually the fp32 one).
    pub reference: String,
    /// Outputs holding class scores, for top-1 agreement.
    pub class_outputs: Vec<String>,
    pub budget: DriftBudget,
    /// What happens to a variant that misses the budget.
    pub on_budget_miss: BudgetMiss,
}

/// Minimum agreement a variant must reach with the reference.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriftBudget {
    pub min_cosine: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    /// The most of a static INT8 variant's quantized nodes the mixed-precision search may keep
    /// in FP32 (a fraction; none: no cap). A variant that needs more misses the budget.
    pub max_fp32_fraction: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMiss {
    /// The variant is not served; the reference keeps serving.
    #[default]
    NotReady,
    /// The variant serves, flagged in its metadata and metrics.
    ServeFlagged,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrift {
    holdout_data: PathBuf,
    reference: Option<String>,
    #[serde(default)]
    class_outputs: Vec<String>,
    #[serde(default)]
    budget: DriftBudget,
    #[serde(default)]
    on_budget_miss: BudgetMiss,
}

/// Weighted assignment of unversioned requests to variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// (variant, weight) with every weight > 0, in name order.
    pub weights: Vec<(String, u32)>,
    /// Request parameter whose value pins a caller to a variant (hash based, so stable across
    /// restarts and replicas); requests without it are assigned at random.
    pub key: String,
}

impl Split {
    pub fn total(&self) -> u64 {
        self.weights.iter().map(|(_, w)| u64::from(*w)).sum()
    }

    /// The variant for a point in [0, total).
    pub fn pick(&self, point: u64) -> &str {
        let mut remaining = point % self.total().max(1);
        for (name, weight) in &self.weights {
            if remaining < u64::from(*weight) {
                return name;
            }
            remaining -= u64::from(*weight);
        }
        &self.weights[self.weights.len() - 1].0
    }

    /// The variant a sticky key maps to: FNV-1a 64 of the key's bytes, a hash that every
    /// replica and every restart computes the same way.
    pub fn pick_for_key(&self, key: &str) -> &str {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in key.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.pick(hash % self.total().max(1))
    }
}

impl Policy {
    /// The policy used when a model directory has no `policy.yaml`: one fp32 variant.
    pub fn default_fp32() -> Self {
        Self {
            source: None,
            variants: vec![VariantSpec {
                name: "fp32".to_owned(),
                precision: Precision::Fp32,
                fp16: None,
                int8: None,
                serving: ServingSettings::default(),
            }],
            default_variant: "fp32".to_owned(),
            split: None,
            drift: None,
            shadow: None,
        }
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|err| PolicyError {
            file: path.to_owned(),
            line: None,
            key: String::new(),
            message: format!("cannot read policy: {err}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates policy text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let raw = parse_raw(text, path)?;
        validate(raw, text, path)
    }

    pub fn variant(&self, name: &str) -> Option<&VariantSpec> {
        self.variants.iter().find(|variant| variant.name == name)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    serving: RawServing,
    variants: BTreeMap<String, RawVariant>,
    #[serde(default)]
    routing: RawRouting,
    drift: Option<RawDrift>,
    shadow: Option<ShadowSettings>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServing {
    max_batch_size: Option<u32>,
    instances: Option<u32>,
    intra_op_threads: Option<u32>,
    intra_op_spinning: Option<bool>,
    dynamic_batching: Option<bool>,
    max_queue_delay: Option<String>,
    max_queue_size: Option<u32>,
    default_timeout: Option<String>,
    preferred_batch_sizes: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    precision: Precision,
    #[serde(default)]
    serving: RawServing,
    fp16: Option<Fp16Options>,
    int8: Option<Int8Options>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    default: Option<String>,
    split: Option<BTreeMap<String, u32>>,
    key: Option<String>,
}

fn parse_raw(text: &str, path: &Path) -> Result<RawPolicy, PolicyError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = err.into_inner();
        let line = inner.location().map(|location| location.line());
        // serde_yaml appends " at line L column C"; the line is reported separately.
        let message = inner.to_string();
        let message = match message.find(" at line ") {
            Some(cut) => message[..cut].to_owned(),
            None => message,
        };
        PolicyError { file: path.to_owned(), line, key, message }
    })
}

fn validate(raw: RawPolicy, text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let error = |key_path: &[&str], message: String| PolicyError {
        file: path.to_owned(),
        line: line_of_key(text, key_path),
        key: key_path.join("."),
        message,
    };

    if raw.variants.is_empty() {
        return Err(error(&["variants"], "at least one variant is required".to_owned()));
    }
    let defaults = merge_serving(&ServingSettings::default(), &raw.serving)
        .map_err(|(key, message)| error(&["serving", key], message))?;
    check_serving(&defaults, &["serving"], &error)?;

    let mut variants = Vec::with_capacity(raw.variants.len());
    for (name, variant) in &raw.variants {
        if !is_valid_name(name) {
            return Err(error(
                &["variants", name],
                format!("variant name `{name}` must be non-empty and use only letters, digits, '_', '-' or '.'"),
            ));
        }
        let serving = merge_serving(&defaults, &variant.serving)
            .map_err(|(key, message)| error(&["variants", name, "serving", key], message))?;
        check_serving(&serving, &["variants", name, "serving"], &error)?;
        let fp16 =
            pass_section(variant.precision, Precision::Fp16, &variant.fp16, &["variants", name, "fp16"], &error)?;
        if let Some(options) = &fp16
            && let Err(err) = mantissa_quantize::fp16::validate_options(options)
        {
            return Err(error(&["variants", name, "fp16", "node_block_list"], err.to_string()));
        }
        let mut int8 =
            pass_section(variant.precision, Precision::Int8, &variant.int8, &["variants", name, "int8"], &error)?;
        if let Some(options) = int8.as_mut() {
            let at = |leaf: &'static str| -> Vec<&str> { vec!["variants", name, "int8", leaf] };
            if let Err(err) = mantissa_quantize::int8::validate_options(options) {
                let key = err.option_key().unwrap_or("mode");
                // The message after the key names the problem; the key is already in the location.
                let message = match &err {
                    mantissa_quantize::int8::Int8Error::BadOption { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                return Err(error(&at(key), message));
            }
            if let Err(err) = options.calibration.validate() {
                return Err(error(&at("calibration"), err.to_string()));
            }
            match (&options.calibration_data, options.mode) {
                (None, Int8Mode::Static) => {
                    return Err(error(
                        &at("calibration_data"),
                        "static mode needs calibration_data (a directory of .npz samples)".to_owned(),
                    ));
                }
                (Some(data), _) => {
                    let resolved = path.parent().unwrap_or(Path::new(".")).join(data);
                    if !resolved.is_dir() {
                        return Err(error(
                            &at("calibration_data"),
                            format!("directory {} does not exist", resolved.display()),
                        ));
                    }
                    options.calibration_data = Some(resolved);
                }
                (None, _) => {}
            }
        }
        variants.push(VariantSpec { name: name.clone(), precision: variant.precision, fp16, int8, serving });
    }

    let default_variant = match &raw.routing.default {
        Some(name) if raw.variants.contains_key(name) => name.clone(),
        Some(name) => {
            let known: Vec<&str> = raw.variants.keys().map(String::as_str).collect();
            return Err(error(
                &["routing", "default"],
                format!("names unknown variant `{name}`; expected one of {known:?}"),
            ));
        }
        None if variants.len() == 1 => variants[0].name.clone(),
        None if raw.routing.split.is_some() => {
            raw.routing.split.as_ref().and_then(|s| s.keys().next().cloned()).unwrap_or_default()
        }
        None => {
            return Err(error(
                &["routing"],
                "`routing.default` is required when a policy has more than one variant".to_owned(),
            ));
        }
    };

    let split = match &raw.routing.split {
        None => {
            if raw.routing.key.is_some() {
                return Err(error(&["routing", "key"], "`key` only applies with a `split`".to_owned()));
            }
            None
        }
        Some(weights) => {
            if let Some(unknown) = weights.keys().find(|name| !raw.variants.contains_key(*name)) {
                let known: Vec<&str> = raw.variants.keys().map(String::as_str).collect();
                return Err(error(
                    &["routing", "split", unknown],
                    format!("names unknown variant `{unknown}`; expected one of {known:?}"),
                ));
            }
            if let Some((name, _)) = weights.iter().find(|(_, weight)| **weight == 0) {
                return Err(error(
                    &["routing", "split", name],
                    "weight 0 sends no traffic; remove the entry instead".to_owned(),
                ));
            }
            let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
            if weights.len() < 2 || total > 1_000_000 {
                return Err(error(
                    &["routing", "split"],
                    format!(
                        "expected at least two variants with weights summing to at most 1000000 (e.g. int8: 90, fp16: 10), got {weights:?}"
                    ),
                ));
            }
            Some(Split {
                weights: weights.iter().map(|(name, weight)| (name.clone(), *weight)).collect(),
                key: raw.routing.key.clone().unwrap_or_else(|| "routing_key".to_owned()),
            })
        }
    };
    let drift = match raw.drift {
        None => None,
        Some(drift) => {
            let holdout = path.parent().unwrap_or(Path::new(".")).join(&drift.holdout_data);
            if !holdout.exists() {
                return Err(error(&["drift", "holdout_data"], format!("{} does not exist", holdout.display())));
            }
            let reference = drift.reference.clone().unwrap_or_else(|| default_variant.clone());
            if !raw.variants.contains_key(&reference) {
                return Err(error(&["drift", "reference"], format!("names unknown variant `{reference}`")));
            }
            for (key, value) in [
                ("min_cosine", drift.budget.min_cosine),
                ("min_top1_agreement", drift.budget.min_top1_agreement),
                ("max_fp32_fraction", drift.budget.max_fp32_fraction),
            ] {
                if let Some(value) = value
                    && !(0.0..=1.0).contains(&value)
                {
                    return Err(error(&["drift", "budget", key], format!("expected a value in [0, 1], got {value}")));
                }
            }
            Some(DriftSettings {
                holdout_data: holdout,
                reference,
                class_outputs: drift.class_outputs,
                budget: drift.budget,
                on_budget_miss: drift.on_budget_miss,
            })
        }
    };
    if let Some(shadow) = &raw.shadow {
        if !raw.variants.contains_key(&shadow.reference) {
            return Err(error(&["shadow", "reference"], format!("names unknown variant `{}`", shadow.reference)));
        }
        if !(0.0..=1.0).contains(&shadow.sample_rate) {
            return Err(error(
                &["shadow", "sample_rate"],
                format!("expected a value in [0, 1], got {}", shadow.sample_rate),
            ));
        }
        if shadow.queue_size == 0 {
            return Err(error(&["shadow", "queue_size"], "expected at least 1, got 0".to_owned()));
        }
    }
    Ok(Policy { source: Some(path.to_owned()), variants, default_variant, split, drift, shadow: raw.shadow })
}

/// A pass's options section (`fp16:`, `int8:`): defaults when the variant has the pass's
/// precision and no section, an error when the section sits under another precision.
fn pass_section<T: Clone + Default>(
    precision: Precision,
    wanted: Precision,
    section: &Option<T>,
    key: &[&str],
    error: &impl Fn(&[&str], String) -> PolicyError,
) -> Result<Option<T>, PolicyError> {
    match (precision == wanted, section) {
        (true, options) => Ok(Some(options.clone().unwrap_or_default())),
        (false, Some(_)) => Err(error(
            key,
            format!(
                "an `{0}` section needs `precision: {0}`, but this variant has precision {1}",
                wanted.as_str(),
                precision.as_str()
            ),
        )),
        (false, None) => Ok(None),
    }
}

fn merge_serving(base: &ServingSettings, raw: &RawServing) -> Result<ServingSettings, (&'static str, String)> {
    let max_queue_delay = match &raw.max_queue_delay {
        Some(text) => parse_duration(text, 1.0).map_err(|m| ("max_queue_delay", m))?,
        None => base.max_queue_delay,
    };
    let default_timeout = match &raw.default_timeout {
        Some(text) => Some(parse_duration(text, 3600.0).map_err(|m| ("default_timeout", m))?),
        None => base.default_timeout,
    };
    Ok(ServingSettings {
        max_batch_size: raw.max_batch_size.or(base.max_batch_size),
        instances: raw.instances.unwrap_or(base.instances),
        intra_op_threads: raw.intra_op_threads.unwrap_or(base.intra_op_threads),
        intra_op_spinning: raw.intra_op_spinning.unwrap_or(base.intra_op_spinning),
        dynamic_batching: raw.dynamic_batching.unwrap_or(base.dynamic_batching),
        max_queue_delay,
        max_queue_size: raw.max_queue_size.or(base.max_queue_size),
        default_timeout,
        preferred_batch_sizes: raw.preferred_batch_sizes.clone().unwrap_or_else(|| base.preferred_batch_sizes.clone()),
    })
}

/// Parses `500us`, `2ms`, `0.01s` or `2m`, up to `max_seconds`.
fn parse_duration(text: &str, max_seconds: f64) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("expected a duration like 500us, 2ms or 0.5s, got '{text}'"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("expected a duration like 500us, 2ms or 0.5s, got '{text}'")),
    };
    if !(0.0..=max_seconds).contains(&seconds) {
        return Err(format!("expected a duration between 0 and {max_seconds}s, got '{text}'"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn check_serving(
    serving: &ServingSettings,
    at: &[&str],
    error: &impl Fn(&[&str], String) -> PolicyError,
) -> Result<(), PolicyError> {
    let key = |leaf: &'static str| -> Vec<&str> { at.iter().copied().chain([leaf]).collect() };
    if serving.instances == 0 || serving.instances > 256 {
        return Err(error(&key("instances"), format!("expected 1..=256, got {}", serving.instances)));
    }
    if serving.intra_op_threads > 1024 {
        return Err(error(&key("intra_op_threads"), format!("expected 0..=1024, got {}", serving.intra_op_threads)));
    }
    if let Some(bad) = serving
        .preferred_batch_sizes
        .iter()
        .find(|&&size| size == 0 || serving.max_batch_size.is_some_and(|max| size > max))
    {
        return Err(error(
            &key("preferred_batch_sizes"),
            format!("expected sizes from 1 to max_batch_size ({:?}), got {bad}", serving.max_batch_size),
        ));
    }
    if serving.max_queue_size == Some(0) {
        return Err(error(&key("max_queue_size"), "expected at least 1, got 0".to_owned()));
    }
    if let Some(size) = serving.max_batch_size
        && size > 65_536
    {
        return Err(error(&key("max_batch_size"), format!("expected 0..=65536, got {size}")));
    }
    Ok(())
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("store/m/policy.yaml"))
    }

    #[test]
    fn parses_full_policy_with_overrides() {
        let policy = parse(
            "serving:\n  max_batch_size: 16\n  instances: 2\nvariants:\n  fp32:\n    precision: fp32\n    serving:\n      intra_op_threads: 4\nrouting:\n  default: fp32\n",
        )
        .unwrap();
        assert_eq!(policy.default_variant, "fp32");
        assert_eq!(
            policy.variants[0].serving,
            ServingSettings {
                max_batch_size: Some(16),
                instances: 2,
                intra_op_threads: 4,
                intra_op_spinning: false,
                dynamic_batching: true,
                max_queue_delay: Duration::ZERO,
                max_queue_size: None,
                default_timeout: None,
                preferred_batch_sizes: Vec::new(),
            }
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("variants:\n  fp32:\n    precision: fp32\n    instancez: 3\n").unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.key.starts_with("variants.fp32"), "{err}");
        assert!(err.message.contains("unknown field `instancez`"), "{err}");
        assert!(err.to_string().starts_with("store/m/policy.yaml:4: key `variants.fp32"), "{err}");
    }

    #[test]
    fn unknown_precision_is_rejected() {
        let err = parse("variants:\n  x:\n    precision: int4\n").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert_eq!(err.key, "variants.x.precision");
        assert!(err.message.contains("int4"), "{err}");
    }

    #[test]
    fn routing_to_unknown_variant_is_rejected() {
        let err = parse("variants:\n  fp32:\n    precision: fp32\nrouting:\n  default: int8\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(5), "routing.default"));
        assert!(err.message.contains("`int8`"), "{err}");
    }

    #[test]
    fn zero_instances_is_rejected_with_location() {
        let err = parse("variants:\n  fp32:\n    precision: fp32\n    serving:\n      instances: 0\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.fp32.serving.instances"));
        assert!(err.message.contains("got 0"), "{err}");
    }

    #[test]
    fn fp16_variants_take_pass_options() {
        let policy = parse(
            "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\n    fp16:\n      keep_first_and_last_layers: false\n      node_block_list: ['head/.*']\nrouting:\n  default: fp32\n",
        )
        .unwrap();
        let half = policy.variant("half").unwrap();
        let options = half.fp16.as_ref().unwrap();
        assert!(!options.keep_first_and_last_layers);
        assert!(options.keep_io_types, "unset options keep their defaults");
        assert_eq!(options.node_block_list, vec!["head/.*"]);
        assert_eq!(policy.variant("fp32").unwrap().fp16, None);
    }

    #[test]
    fn fp16_option_errors_name_the_key() {
        let err = parse("variants:\n  half:\n    precision: fp16\n    fp16:\n      keep_io: false\n").unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.key.starts_with("variants.half.fp16"), "{err}");
        assert!(err.message.contains("unknown field `keep_io`"), "{err}");
        let err = parse("variants:\n  f:\n    precision: fp32\n    fp16: {}\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.f.fp16"));
        let err = parse("variants:\n  h:\n    precision: fp16\n    fp16:\n      node_block_list: ['(']\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.h.fp16.node_block_list"));
        assert!(err.message.contains("'(' is not a valid regular expression"), "{err}");
    }

    #[test]
    fn queue_delay_parses_with_units_and_is_bounded() {
        let policy = parse("serving:\n  max_queue_delay: 500us\nvariants:\n  a:\n    precision: fp32\n    serving:\n      max_queue_delay: 2ms\n").unwrap();
        assert_eq!(policy.variants[0].serving.max_queue_delay, Duration::from_millis(2));
        let err = parse("serving:\n  max_queue_delay: 5h\nvariants:\n  a:\n    precision: fp32\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(2), "serving.max_queue_delay"));
        assert!(err.message.contains("'5h'"), "{err}");
        let policy =
            parse("serving:\n  default_timeout: 2m\n  max_queue_size: 8\nvariants:\n  a:\n    precision: fp32\n")
                .unwrap();
        assert_eq!(policy.variants[0].serving.default_timeout, Some(Duration::from_secs(120)));
        assert_eq!(policy.variants[0].serving.max_queue_size, Some(8));
        let err =
            parse("variants:\n  a:\n    precision: fp32\n    serving:\n      default_timeout: soon\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.a.serving.default_timeout"));
    }

    #[test]
    fn int8_option_errors_name_their_own_key() {
        for (leaf, value, expected) in [
            ("block_size", "100", "expected a power of two from 16 to 256, got 100"),
            ("weight_bits", "3", "expected 4 or 8, got 3"),
            ("max_concat_range_ratio", "0.5", "expected at least 1, got 0.5"),
            ("nodes_exclude", "[\"(\"]", "is not a valid regular expression"),
        ] {
            let text = format!("variants:\n  q:\n    precision: int8\n    int8:\n      {leaf}: {value}\n");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.key, format!("variants.q.int8.{leaf}"), "{err}");
            assert_eq!(err.line, Some(5), "{err}");
            assert!(err.message.contains(expected), "{err}");
        }
    }

    #[test]
    fn int8_variants_need_calibration_data_for_static_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("calibration")).unwrap();
        let path = dir.path().join("policy.yaml");
        let text = "variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: calibration\n      calibration:\n        method: percentile\n";
        let policy = Policy::parse(text, &path).unwrap();
        let options = policy.variant("q").unwrap().int8.as_ref().unwrap();
        assert_eq!(options.mode, Int8Mode::Static);
        assert_eq!(options.calibration_data.as_deref(), Some(dir.path().join("calibration").as_path()));

        let err =
            Policy::parse("variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n", &path).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.q.int8.calibration_data"));
        let err = Policy::parse(
            "variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: nowhere\n",
            &path,
        )
        .unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(6), "variants.q.int8.calibration_data"));
        assert!(err.message.contains("does not exist"), "{err}");
        let dynamic = Policy::parse("variants:\n  q:\n    precision: int8\n", &path).unwrap();
        assert_eq!(dynamic.variants[0].int8.as_ref().unwrap().mode, Int8Mode::Dynamic);
    }

    #[test]
    fn split_routing_is_validated_and_sticky() {
        let text = "variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  default: a\n  split:\n    a: 90\n    b: 10\n  key: user\n";
        let policy = parse(text).unwrap();
        let split = policy.split.as_ref().unwrap();
        assert_eq!(split.key, "user");
        assert_eq!(split.total(), 100);
        assert_eq!((split.pick(0), split.pick(89), split.pick(90), split.pick(99)), ("a", "a", "b", "b"));
        // Stable: the same key always lands on the same variant.
        let first = split.pick_for_key("customer-42");
        assert!((0..10).all(|_| split.pick_for_key("customer-42") == first));

        let err = parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 90\n    c: 10\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(9), "routing.split.c"));
        let err = parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 0\n    b: 10\n").unwrap_err();
        assert_eq!(err.key, "routing.split.a");
        let err =
            parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 5\n")
                .unwrap_err();
        assert_eq!(err.key, "routing.split");
    }

    #[test]
    fn drift_section_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("holdout")).unwrap();
        let path = dir.path().join("policy.yaml");
        let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
        let policy = Policy::parse(
            &format!(
                "{base}drift:\n  holdout_data: holdout\n  class_outputs: [logits]\n  budget:\n    min_cosine: 0.99\n"
            ),
            &path,
        )
        .unwrap();
        let drift = policy.drift.unwrap();
        assert_eq!((drift.reference.as_str(), drift.budget.min_cosine), ("fp32", Some(0.99)));
        assert_eq!(drift.on_budget_miss, BudgetMiss::NotReady);
        let err =
            Policy::parse(&format!("{base}drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 2\n"), &path)
                .unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(11), "drift.budget.min_cosine"));
        let err = Policy::parse(&format!("{base}drift:\n  holdout_data: nope\n"), &path).unwrap_err();
        assert_eq!(err.key, "drift.holdout_data");
    }

    #[test]
    fn shadow_section_is_validated() {
        let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
        let policy = parse(&format!("{base}shadow:\n  reference: fp32\n  sample_rate: 0.25\n")).unwrap();
        assert_eq!(policy.shadow.unwrap().queue_size, 64);
        let err = parse(&format!("{base}shadow:\n  reference: fp32\n  sample_rate: 1.5\n")).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(10), "shadow.sample_rate"));
        let err = parse(&format!("{base}shadow:\n  reference: int8\n  sample_rate: 1\n")).unwrap_err();
        assert_eq!(err.key, "shadow.reference");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = parse("serving:\n  instances: many\nvariants:\n  fp32:\n    precision: fp32\n").unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(2), "serving.instances"));
    }

    #[test]
    fn multiple_variants_need_a_default() {
        let err = parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp32\n").unwrap_err();
        assert_eq!(err.key, "routing");
    }
}
