//! The validated policy as the rest of the server sees it. These types carry no parsing or
//! validation logic, so they depend on neither stage and both stages can depend on them.
//!
//! A few of them (`Precision`, `BudgetMiss`, `ShadowSettings`) are also read straight from
//! YAML, because their YAML form is already their typed form.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use mantissa_quantize::passes::fp16::Fp16Options;
use mantissa_quantize::passes::int8::Int8Options;
use serde::{Deserialize, Serialize};

use super::part_slice::PartSlice;

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
    /// The numeric version Triton-style clients address it by (unique within the model, >= 1):
    /// declared in the policy, or assigned from the order of `variants:`.
    pub version: u64,
    pub precision: Precision,
    /// Options of the FP16 pass (defaults when the policy gives none); only for fp16 variants.
    pub fp16: Option<Fp16Options>,
    /// Options of the INT8 passes; only for int8 variants. A static variant's
    /// `calibration_data` is resolved against the model's directory.
    pub int8: Option<Int8Options>,
    pub serving: ServingSettings,
    /// Where the variant runs (`execution_provider:`; the CPU when absent).
    pub execution_provider: ExecutionProviderSpec,
}

/// A variant's `execution_provider`: the CPU, or a GPU provider with its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ExecutionProviderSpec {
    #[default]
    Cpu,
    Gpu(GpuProviderSpec),
}

/// A GPU execution provider as the policy sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProviderSpec {
    pub provider: GpuProvider,
    pub device_id: u32,
    /// Cap of the provider's device memory arena in bytes; `None`: no cap.
    pub gpu_mem_limit: Option<u64>,
    /// Serve on the CPU, with a warning, when the provider is not available (`fallback: cpu`);
    /// otherwise the variant fails to load.
    pub fallback_to_cpu: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuProvider {
    Cuda,
    TensorRt(TensorRtSpec),
}

/// TensorRT's own switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRtSpec {
    /// Allow FP16 kernels.
    pub fp16: bool,
    /// Allow INT8 kernels (a QDQ model, as a static int8 variant is, says where).
    pub int8: bool,
    /// Keep built engines under the artifact cache (`--cache-dir`) so a restart does not
    /// build them again; without a cache directory engines are built on every start.
    pub engine_cache: bool,
}

impl ExecutionProviderSpec {
    /// The policy's name of the provider: `cpu`, `cuda`, `tensorrt`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExecutionProviderSpec::Cpu => "cpu",
            ExecutionProviderSpec::Gpu(gpu) => gpu.provider.kind(),
        }
    }
}

impl GpuProvider {
    pub fn kind(&self) -> &'static str {
        match self {
            GpuProvider::Cuda => "cuda",
            GpuProvider::TensorRt(_) => "tensorrt",
        }
    }
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

/// Minimum agreement a variant must reach with the reference. Serialized into the artifact
/// cache's key, so it holds only what decides the artifact.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DriftBudget {
    /// Apply to every whole output and every automatically found part; named parts have their
    /// own thresholds instead.
    pub min_cosine: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    /// Named parts of outputs with their own thresholds, by part name. Left out of the key when
    /// empty, so artifacts built before parts existed keep their keys.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartBudget>,
    /// The most of a static INT8 variant's quantized nodes the mixed-precision search may keep
    /// in FP32 (a fraction; none: no cap). A variant that needs more misses the budget.
    pub max_fp32_fraction: Option<f64>,
    /// The longest the mixed-precision search may run (none: no limit). Left out of the cache
    /// key: a search that finishes in time builds the same artifact whatever the limit, and
    /// one stopped by the limit is not cached.
    #[serde(skip)]
    pub search_time_limit: Option<Duration>,
}

impl DriftBudget {
    /// Whether anything is to be met (the cap and the time limit alone are not a budget).
    pub fn has_thresholds(&self) -> bool {
        self.min_cosine.is_some() || self.min_top1_agreement.is_some() || !self.parts.is_empty()
    }
}

/// A named part of one output (`drift.budget.parts.<name>`): some channels of it, or all of it,
/// judged by thresholds of its own. Validation guarantees at least one threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartBudget {
    pub output: String,
    /// The channels measured; `None` measures the whole output.
    pub slice: Option<PartSlice>,
    pub min_cosine: Option<f64>,
    pub min_sqnr_db: Option<f64>,
    pub max_abs: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    /// Along what top-1 agreement is taken (only with `min_top1_agreement`).
    pub top1_axis: Top1Axis,
}

/// Where the argmax of a top-1 agreement is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum Top1Axis {
    /// Along the last axis of the output.
    #[default]
    Last,
    /// Along this axis of the output (negative counts from the end).
    Axis(i64),
    /// Over every non-batch element of the part, once per batch item: on a detection head,
    /// whether the best anchor and class agree.
    All,
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
                version: 1,
                precision: Precision::Fp32,
                fp16: None,
                int8: None,
                serving: ServingSettings::default(),
                execution_provider: ExecutionProviderSpec::Cpu,
            }],
            default_variant: "fp32".to_owned(),
            split: None,
            drift: None,
            shadow: None,
        }
    }

    pub fn variant(&self, name: &str) -> Option<&VariantSpec> {
        self.variants.iter().find(|variant| variant.name == name)
    }

    /// The variant `reference` names: its version number (decimal digits) or its name. Names
    /// are never all digits, so the two cannot collide.
    pub fn find_variant(&self, reference: &str) -> Option<&VariantSpec> {
        match parse_version(reference) {
            Some(version) => self.variants.iter().find(|variant| variant.version == version),
            None => self.variant(reference),
        }
    }
}

/// A `model_version` that is a version number: decimal digits only, as Triton sends them.
/// Anything else (a variant name) is `None`.
pub fn parse_version(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    // More digits than fit are still a number, just one no variant has.
    Some(text.parse().unwrap_or(u64::MAX))
}
