//! What the INT8 passes can be asked (the `int8:` section of a policy variant), which nodes
//! those options select, the errors and the report the passes share.

use std::collections::HashSet;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationOptions;
use crate::onnx::NodeProto;

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Int8Mode {
    /// Activations quantized at run time; no calibration data needed.
    Dynamic,
    /// Activations quantized with ranges calibrated ahead of time (QDQ format).
    Static,
    /// Block-wise weight-only quantization of MatMul weights (com.microsoft.MatMulNBits):
    /// activations stay float, each block of `block_size` weights along K has its own scale.
    WeightOnly,
    /// The fastest of dynamic and static that meets the drift budget, timed on the serving
    /// CPU (preparation builds and times the forms; a pass never runs in this mode itself).
    /// The default: without a drift budget to judge the forms by, it is the dynamic form.
    #[default]
    Auto,
}

impl Int8Mode {
    /// The mode as logs and errors name it.
    pub fn label(self) -> &'static str {
        match self {
            Int8Mode::Dynamic => "int8 dynamic",
            Int8Mode::Static => "int8 static",
            Int8Mode::WeightOnly => "int8 weight-only",
            Int8Mode::Auto => "int8 auto",
        }
    }
}

/// Element type of quantized activations in static mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActivationType {
    /// uint8 asymmetric: the form ONNX Runtime fuses onto its u8s8 integer kernels on x86.
    #[default]
    Uint8,
    /// int8 symmetric (S8S8): mostly not fused on x86, slower than FP32 there.
    Int8,
}

/// Options of the INT8 passes (the `int8:` section of a variant in policy.yaml).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Int8Options {
    pub mode: Int8Mode,
    /// One weight scale per output channel (per tensor otherwise).
    pub per_channel: bool,
    /// 7-bit weights, for CPUs without VNNI, whose u8 x s8 instructions add pairs of products
    /// into int16 and saturate with full 8-bit weights. `None` (the default) decides from the
    /// CPU that builds the variant: 7-bit unless it has AVX512-VNNI or AVX-VNNI.
    pub reduce_range: Option<bool>,
    pub activation_type: ActivationType,
    /// The first and last compute layers stay FP32. In dynamic mode only those at the model's
    /// boundary count (see [`crate::graph::model_ends`]): a first MatMul reading a join of
    /// embedding lookups, or a last one whose result joins a residual sum, is quantized, as
    /// ONNX Runtime's quantize_dynamic does. On MiniLM-L6 those are the first block's query,
    /// key and value projections and the last feed-forward projection; quantizing them left the
    /// output cosine where it was (0.9900 -> 0.9902) and let every projection run on integer
    /// kernels (scripts/corpus/dynamic_forms.py).
    pub keep_first_and_last_layers: bool,
    /// Operators to quantize (empty: all supported by the mode).
    pub op_types_include: Vec<String>,
    /// Operators never quantized.
    pub op_types_exclude: Vec<String>,
    /// Node names (exact or regular expressions over the whole name) never quantized.
    pub nodes_exclude: Vec<String>,
    /// Static mode: directory of calibration samples (`.npz`, keys = input names; `.npy` for
    /// single-input models), relative to the model's directory.
    pub calibration_data: Option<std::path::PathBuf>,
    /// Static mode: how activation ranges are calibrated.
    pub calibration: CalibrationOptions,
    /// Embedding tables (Gather on a constant [V, D] float matrix) stored as int8 with one
    /// scale per row, dequantized after the lookup, in every mode. On by default: the lookup's
    /// result is FP32 again before any arithmetic (the precision rules keep embedding
    /// *compute* FP32), one scale per row bounds each row's error by its own range, and the
    /// table is most of a transformer encoder's bytes (MiniLM-L6 dynamic: 0.68x -> 0.29x of
    /// the FP32 file, output cosine 0.9904 -> 0.9900).
    pub quantize_embeddings: bool,
    /// Static mode: a Concat whose inputs' calibrated ranges differ by more than this factor
    /// (widest over narrowest) stays FP32, and so do the nodes reading its output, because one
    /// shared scale would crush its narrow-range inputs (box coordinates beside class scores).
    pub max_concat_range_ratio: f32,
    /// Weight-only mode: bits per weight (4 or 8).
    pub weight_bits: u8,
    /// Weight-only mode: weights per block along K (a power of two from 16 to 256).
    pub block_size: usize,
    /// Weight-only mode: symmetric blocks (zero point fixed at the middle) or min/max blocks.
    pub weight_symmetric: bool,
}

impl Default for Int8Options {
    fn default() -> Self {
        Self {
            mode: Int8Mode::Auto,
            per_channel: true,
            reduce_range: None,
            activation_type: ActivationType::Uint8,
            keep_first_and_last_layers: true,
            op_types_include: Vec::new(),
            op_types_exclude: Vec::new(),
            nodes_exclude: Vec::new(),
            calibration_data: None,
            calibration: CalibrationOptions::default(),
            max_concat_range_ratio: 10.0,
            quantize_embeddings: true,
            weight_bits: 4,
            block_size: 128,
            weight_symmetric: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Int8Error {
    #[error("nodes_exclude entry '{pattern}' is not a valid regular expression: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("model has no graph")]
    NoGraph,
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error("static quantization needs calibrated ranges for {0} tensors; run calibration first")]
    MissingRanges(usize),
    /// An option out of its range; `key` is its name in the policy's `int8:` section.
    #[error("{key}: {reason}")]
    BadOption { key: &'static str, reason: String },
    /// The pass produced inconsistent element types: a bug in the pass, reported instead of
    /// handing ONNX Runtime a model it refuses.
    #[error(transparent)]
    TypeCheck(#[from] crate::type_check::TypeCheckError),
}

impl Int8Error {
    /// The policy key (under `int8:`) an options error is about, if it is about one.
    pub fn option_key(&self) -> Option<&'static str> {
        match self {
            Int8Error::BadPattern { .. } => Some("nodes_exclude"),
            Int8Error::BadOption { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Why a candidate node was left in FP32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    FirstLayer,
    LastLayer,
    ExcludedOp,
    ExcludedNode(String),
    /// The weight is not a constant 2-D float tensor, or Gemm attributes are not the plain form.
    Unsupported(String),
    /// A Concat joining tensors of very different ranges, or a node reading its output.
    MixedRanges(String),
    /// The plan wanted a range for this tensor that calibration did not measure.
    NoCalibratedRange(String),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::FirstLayer => f.write_str("first compute layer"),
            SkipReason::LastLayer => f.write_str("last compute layer"),
            SkipReason::ExcludedOp => f.write_str("op_types_exclude"),
            SkipReason::ExcludedNode(pattern) => write!(f, "nodes_exclude ({pattern})"),
            SkipReason::Unsupported(why) => write!(f, "unsupported: {why}"),
            SkipReason::MixedRanges(why) => write!(f, "mixed ranges: {why}"),
            SkipReason::NoCalibratedRange(tensor) => write!(f, "no calibrated range for '{tensor}'"),
        }
    }
}

/// What an INT8 pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Int8Report {
    /// (node, op) quantized.
    pub quantized: Vec<(String, String)>,
    /// (node, op, reason) left in FP32.
    pub skipped: Vec<(String, String, SkipReason)>,
    /// Static mode: tensors given QuantizeLinear/DequantizeLinear pairs.
    pub activations_quantized: usize,
    pub weight_bytes_before: usize,
    pub weight_bytes_after: usize,
    /// What the user should know beyond the counts: an already-quantized model, or why
    /// nothing was quantized.
    pub notes: Vec<String>,
}

/// How the weight-quantizing passes store weights: one scale per output channel or one per
/// tensor, and 7-bit codes (reduce_range, see [`Int8Options::reduce_range`]) or 8-bit ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct WeightSettings {
    pub(super) per_channel: bool,
    pub(super) reduce_range: bool,
}

/// Node-selection rules shared by the INT8 passes.
pub(super) struct Selection {
    include: HashSet<String>,
    exclude: HashSet<String>,
    nodes: Vec<(String, Regex)>,
    keep_first_and_last: bool,
    /// Which first/last compute nodes the rule means: all of them, or only the model's ends.
    pub(super) ends_only: bool,
}

impl Selection {
    pub(super) fn new(options: &Int8Options) -> Result<Self, Int8Error> {
        let nodes = options
            .nodes_exclude
            .iter()
            .map(|pattern| {
                Regex::new(&format!("^(?:{pattern})$"))
                    .map(|regex| (pattern.clone(), regex))
                    .map_err(|err| Int8Error::BadPattern { pattern: pattern.clone(), reason: err.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            include: options.op_types_include.iter().cloned().collect(),
            exclude: options.op_types_exclude.iter().cloned().collect(),
            nodes,
            keep_first_and_last: options.keep_first_and_last_layers,
            ends_only: options.mode == Int8Mode::Dynamic,
        })
    }

    /// `None` when the node may be quantized, otherwise why not.
    pub(super) fn skip_reason(
        &self,
        node: &NodeProto,
        first: &HashSet<usize>,
        last: &HashSet<usize>,
        position: usize,
    ) -> Option<SkipReason> {
        let op = node.op_type();
        if self.exclude.contains(op) || (!self.include.is_empty() && !self.include.contains(op)) {
            return Some(SkipReason::ExcludedOp);
        }
        if let Some((pattern, _)) =
            self.nodes.iter().find(|(pattern, regex)| pattern == node.name() || regex.is_match(node.name()))
        {
            return Some(SkipReason::ExcludedNode(pattern.clone()));
        }
        if self.keep_first_and_last && first.contains(&position) {
            return Some(SkipReason::FirstLayer);
        }
        if self.keep_first_and_last && last.contains(&position) {
            return Some(SkipReason::LastLayer);
        }
        None
    }
}

/// Whether the CPU has VNNI dot-product instructions (AVX512-VNNI or AVX-VNNI), which
/// accumulate u8 x s8 products in int32 without saturating.
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

impl Int8Options {
    /// `reduce_range` with `None` resolved for this CPU.
    pub fn effective_reduce_range(&self) -> bool {
        self.reduce_range.unwrap_or_else(|| !cpu_has_vnni())
    }
}

/// Validates options without touching a model (bad regular expressions, block settings).
pub fn validate_options(options: &Int8Options) -> Result<(), Int8Error> {
    let bad = |key: &'static str, reason: String| Err(Int8Error::BadOption { key, reason });
    if !matches!(options.weight_bits, 4 | 8) {
        return bad("weight_bits", format!("expected 4 or 8, got {}", options.weight_bits));
    }
    if !(16..=256).contains(&options.block_size) || !options.block_size.is_power_of_two() {
        return bad("block_size", format!("expected a power of two from 16 to 256, got {}", options.block_size));
    }
    if options.max_concat_range_ratio.is_nan() || options.max_concat_range_ratio < 1.0 {
        return bad("max_concat_range_ratio", format!("expected at least 1, got {}", options.max_concat_range_ratio));
    }
    Selection::new(options).map(|_| ())
}
