//! `mantissa analyze`: a quantization-readiness report of an FP32 model on sample data, following
//! precision-rules.md: the observed range of every input (§1.1), the spread of per-channel ranges
//! of the weights and activations Conv/MatMul/Gemm read (§1.2), dead ReLU/Clip channels (§1.3),
//! saturated Sigmoid/Tanh inputs (§1.4), MACCs per sample (§2), and the nodes whose static INT8
//! outputs drift most from FP32.
//!
//! Data is streamed: each sample runs once through the FP32 model (with the tensors the report
//! looks at added as graph outputs) and once through its static INT8 form, and only fixed-size
//! statistics survive from one sample to the next.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use mantissa_quantize::calibration::TensorStatistics;
use mantissa_quantize::elem;
use mantissa_quantize::graph::{GraphIndex, constants_to_initializers, sort_topologically};
use mantissa_quantize::int8::{Int8Mode, Int8Options};
use mantissa_quantize::int8_static::{quantize_static, tensors_to_calibrate};
use mantissa_quantize::load_model;
use mantissa_quantize::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use mantissa_quantize::tensor::f32_values;
use mantissa_quantize::types::{attribute, infer_elem_types};
use serde::Serialize;

use mantissa_preparation::accuracy::DriftAccumulator;
use mantissa_preparation::calibrate::{CalibrationJob, add_float_outputs, calibrate};
use mantissa_runtime::DataType;
use mantissa_runtime::InferenceRequest;
use mantissa_runtime::ModelSignature;
use mantissa_runtime::TensorData;
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{OutputTensor, Session, execute, open_internal_session};

/// Inputs whose observed range leaves [-LIMIT, LIMIT] are flagged as un-normalized.
pub const INPUT_RANGE_LIMIT: f64 = 10.0;
/// Tensors whose widest channel range exceeds this many median channel ranges are flagged.
pub const SPREAD_RATIO_LIMIT: f64 = 10.0;
/// ReLU/Clip nodes with more than this fraction of dead channels are flagged.
pub const DEAD_FRACTION_LIMIT: f64 = 0.1;
/// Sigmoid/Tanh nodes with more than this fraction of saturated inputs are flagged.
pub const SATURATION_LIMIT: f64 = 0.01;
/// Quantized nodes whose output SQNR is below this many dB are flagged.
pub const SQNR_LIMIT_DB: f64 = 20.0;
/// Inputs of Sigmoid beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
const SIGMOID_LIMIT: f32 = mantissa_quantize::calibration::SIGMOID_INPUT_LIMIT;
/// Inputs of Tanh beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
const TANH_LIMIT: f32 = mantissa_quantize::calibration::TANH_INPUT_LIMIT;

const COMPUTE_OPS: &[&str] = &["Conv", "MatMul", "Gemm"];

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The FP32 ONNX model.
    pub model: PathBuf,
    /// Directory of samples (.npz, keys = input names; .npy for single-input models), or one file.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON document with every section instead of tables.
    #[arg(long)]
    pub json: bool,
    /// How many of the most INT8-sensitive nodes to list.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Path of libonnxruntime.so.1.31.1. Default: next to the executable or .onnxruntime/lib.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AnalyzeError(String);

impl From<String> for AnalyzeError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

/// Title and advice of one report section.
#[derive(Debug, Clone, Serialize)]
pub struct About {
    pub title: &'static str,
    /// Why the section matters (with the rule of precision-rules.md it follows).
    pub why: &'static str,
    /// What to do about flagged entries.
    pub suggestion: &'static str,
}

/// The whole report; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    /// Sample files read.
    pub samples: usize,
    /// Items over all samples (rows along a dynamic first dimension; 1 per file otherwise).
    pub items: u64,
    pub inputs: Section<InputReport>,
    pub channel_spread: Section<SpreadReport>,
    pub dead_channels: Section<DeadReport>,
    pub saturation: Section<SaturationReport>,
    pub maccs: MaccsSection,
    pub sensitivity: SensitivitySection,
}

#[derive(Debug, Clone, Serialize)]
pub struct Section<T> {
    #[serde(flatten)]
    pub about: About,
    /// The value above (below, for SQNR) which an entry is flagged.
    pub threshold: f64,
    pub flagged: usize,
    pub items: Vec<T>,
}

impl<T> Section<T> {
    fn new(about: About, threshold: f64, items: Vec<T>, is_flagged: impl Fn(&T) -> bool) -> Self {
        let flagged = items.iter().filter(|item| is_flagged(item)).count();
        Self { about, threshold, flagged, items }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InputReport {
    pub name: String,
    pub datatype: String,
    /// Shape in the first sample.
    pub shape: Vec<i64>,
    pub values: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub nan: u64,
    pub flagged: bool,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpreadReport {
    pub tensor: String,
    /// `weight`, `activation`, or `concat` (the output of a Concat, its inputs as channels).
    pub kind: &'static str,
    /// The Conv/MatMul/Gemm node that reads the tensor (the first, when several do); for
    /// `concat` rows the Concat that writes it.
    pub node: String,
    pub op: String,
    pub axis: Option<usize>,
    pub channels: usize,
    pub widest_channel: usize,
    /// Width of the widest channel's range (with 0 included, as quantization ranges are).
    pub widest_range: f64,
    pub median_range: f64,
    pub narrowest_range: f64,
    /// Widest over median (`concat` rows: widest over narrowest input); `null` when that
    /// denominator is 0.
    pub ratio: Option<f64>,
    pub flagged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadReport {
    pub node: String,
    pub op: String,
    pub tensor: String,
    /// Clip with bounds [0, 6].
    pub relu6: bool,
    pub low_bound: Option<f64>,
    pub high_bound: Option<f64>,
    pub axis: Option<usize>,
    pub channels: usize,
    /// Channels at the low bound (0 for ReLU) on every sample.
    pub dead_at_low: usize,
    /// Channels at the high bound (Clip's max) on every sample.
    pub dead_at_high: usize,
    pub dead_fraction: f64,
    pub flagged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SaturationReport {
    pub node: String,
    pub op: String,
    pub tensor: String,
    /// |x| beyond which the output sits at an asymptote.
    pub limit: f64,
    pub values: u64,
    pub saturated: u64,
    pub fraction: f64,
    pub flagged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaccsNode {
    pub node: String,
    pub op: String,
    /// Per sample; `null` when a shape was not observed.
    pub maccs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaccsSection {
    #[serde(flatten)]
    pub about: About,
    /// Sum over Conv/MatMul/Gemm, per item.
    pub per_sample: u64,
    /// Items in the sample the shapes were taken from.
    pub batch: u64,
    pub nodes: Vec<MaccsNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensitiveNode {
    pub node: String,
    pub op: String,
    /// The node's output in the FP32 model.
    pub tensor: String,
    /// The tensor of the INT8 model it is compared with: the dequantized value of `tensor`
    /// (what the quantized node's readers see), or `tensor` itself when it has no Q/DQ pair.
    pub compared_with: String,
    /// Signal-to-quantization-noise ratio in dB; `null` when identical.
    pub sqnr_db: Option<f64>,
    pub cosine: f64,
    pub max_abs: f64,
    pub flagged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensitivitySection {
    #[serde(flatten)]
    pub about: About,
    pub threshold_db: f64,
    /// The INT8 options used.
    pub settings: String,
    pub quantized_nodes: usize,
    /// Why the INT8 model could not be built or run, if it could not.
    pub error: Option<String>,
    /// The `--top` nodes with the lowest SQNR, lowest first.
    pub nodes: Vec<SensitiveNode>,
}

const INPUTS: About = About {
    title: "Inputs",
    why: "Linear INT8 maps a range onto 256 levels: inputs fed raw (e.g. 0..255 pixels) or spanning wide ranges \
quantize with more loss than inputs in a narrow range such as [-1, 1] or mean 0 / std 1 (precision-rules 1.1).",
    suggestion: "Normalize flagged inputs in preprocessing (scale to [0, 1] or [-1, 1], or standardize) and train \
or export the model on normalized data.",
};
const SPREAD: About = About {
    title: "Per-channel range spread",
    why: "One per-tensor scale must cover the widest channel, so channels with much narrower ranges get only a few \
of the 256 levels (precision-rules 1.2). Ratio = widest channel range / median channel range; for a Concat's \
output (kind concat, its inputs as channels, e.g. box coordinates beside class scores) widest / narrowest input.",
    suggestion: "Quantize flagged tensors per channel along that axis (int8 per_channel: true, the default, does \
this for weights) or keep them in FP32/FP16 (int8 nodes_exclude on the node that reads them). Static INT8 keeps a \
flagged Concat and its readers in FP32 by itself (int8 max_concat_range_ratio).",
};
const DEAD: About = About {
    title: "Dead channels (ReLU/Clip)",
    why: "Clipped activations leave channels that are zero (or at the clip bound) for every sample; such dead \
neurons' weights stop training and often sit outside the normal range, stretching weight ranges (precision-rules \
1.3).",
    suggestion: "Avoid ReLU-N (ReLU6 and similar) where you can; prune dead channels with their weights, or \
retrain, before quantizing.",
};
const SATURATION: About = About {
    title: "Saturated Sigmoid/Tanh inputs",
    why: "Sigmoid inputs with |x| > 6 and Tanh inputs with |x| > 3 give outputs at the asymptotes; range spent \
beyond them is wasted (precision-rules 1.4).",
    suggestion: "Keep calibration clip_saturating_inputs: true (the default), which clips the range of a tensor \
read only by Sigmoid to [-6, 6] and only by Tanh to [-3, 3]; large fractions hint at un-normalized pre-activations.",
};
const MACCS: About = About {
    title: "MACCs per sample",
    why: "INT8 work is counted in multiply-accumulates: Conv, MatMul and Gemm carry nearly all of it, and they are \
what ONNX Runtime runs on its integer kernels (precision-rules 2).",
    suggestion: "The nodes with the most MACCs gain most from INT8; a model with few MACCs gains little over FP32 \
and may lose to the cost of the Q/DQ pairs.",
};
const SENSITIVITY: About = About {
    title: "Top sensitive nodes (static INT8)",
    why: "Each Conv/MatMul/Gemm output of the static INT8 model (QDQ, every compute node a candidate, calibrated on \
this data) compared with FP32, run by this machine's ONNX Runtime kernels; the error accumulates from every \
quantized node upstream. Low SQNR marks where precision is lost; the ends of a model are the usual suspects \
(precision-rules 4).",
    suggestion: "Keep the lowest-SQNR nodes in FP32 (int8 nodes_exclude: [name]; keep_first_and_last_layers: true \
is the default), try percentile/entropy calibration for outlier-heavy tensors (precision-rules 3), and on CPUs \
without VNNI, whose u8s8 kernels can saturate, try int8 reduce_range: true.",
};

/// A tensor's values in one sample.
struct Observed {
    shape: Vec<i64>,
    values: Vec<f32>,
}

type Sample = HashMap<String, Observed>;

fn dims_of(shape: &[i64]) -> Vec<usize> {
    shape.iter().map(|&d| d.max(0) as usize).collect()
}

/// Channel axis of an activation: 1 for rank 4 and more (NCHW), the last for rank 2 and 3, 0 for
/// rank 1, none (one channel) for scalars.
fn activation_axis(rank: usize) -> Option<usize> {
    match rank {
        0 => None,
        1 => Some(0),
        2 | 3 => Some(rank - 1),
        _ => Some(1),
    }
}

/// (channels, inner) of a row-major tensor split at `axis`: element `i` belongs to channel
/// `(i / inner) % channels`.
fn layout(dims: &[usize], axis: Option<usize>) -> (usize, usize) {
    match axis {
        Some(axis) if axis < dims.len() => (dims[axis], dims[axis + 1..].iter().product()),
        _ => (1, dims.iter().product::<usize>().max(1)),
    }
}

fn for_each_channel(values: &[f32], channels: usize, inner: usize, mut f: impl FnMut(usize, f32)) {
    if channels == 0 || inner == 0 {
        return;
    }
    for (block, chunk) in values.chunks(inner).enumerate() {
        let channel = block % channels;
        for &value in chunk {
            f(channel, value);
        }
    }
}

/// Running per-channel min/max.
struct ChannelRanges {
    low: Vec<f32>,
    high: Vec<f32>,
}

impl ChannelRanges {
    fn new(channels: usize) -> Self {
        Self { low: vec![f32::INFINITY; channels], high: vec![f32::NEG_INFINITY; channels] }
    }

    fn observe(&mut self, values: &[f32], inner: usize) {
        let channels = self.low.len();
        let (low, high) = (&mut self.low, &mut self.high);
        for_each_channel(values, channels, inner, |c, v| {
            if v.is_finite() {
                low[c] = low[c].min(v);
                high[c] = high[c].max(v);
            }
        });
    }

    /// Width of each channel's range with 0 included (quantization ranges always hold 0).
    fn widths(&self) -> Vec<f64> {
        self.low
            .iter()
            .zip(&self.high)
            .map(|(&lo, &hi)| if lo <= hi { f64::from(hi.max(0.0)) - f64::from(lo.min(0.0)) } else { 0.0 })
            .collect()
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn spread_report(
    tensor: &str,
    kind: &'static str,
    node: &NodeProto,
    axis: Option<usize>,
    widths: &[f64],
) -> SpreadReport {
    let (widest_channel, widest_range) =
        widths.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
    let median_range = median(widths);
    let narrowest_range = widths.iter().copied().fold(f64::INFINITY, f64::min).min(widest_range);
    // A Concat's inputs get one scale if quantized together: what matters is the narrowest.
    let denominator = if kind == "concat" { narrowest_range } else { median_range };
    let ratio = (denominator > 0.0).then(|| widest_range / denominator);
    let flagged = match ratio {
        Some(ratio) => ratio > SPREAD_RATIO_LIMIT,
        None => widest_range > 0.0,
    };
    SpreadReport {
        tensor: tensor.to_owned(),
        kind,
        node: node_label(node),
        op: node.op_type().to_owned(),
        axis,
        channels: widths.len(),
        widest_channel,
        widest_range,
        median_range,
        narrowest_range,
        ratio,
        flagged,
    }
}

/// Ranges of each input of a Concat (0 included, as quantization ranges are).
struct JoinTracker {
    node: NodeProto,
    inputs: Vec<String>,
    ranges: Vec<(f32, f32)>,
}

impl JoinTracker {
    fn observe(&mut self, sample: &Sample) {
        for (input, range) in self.inputs.iter().zip(self.ranges.iter_mut()) {
            if let Some(observed) = sample.get(input) {
                for &value in observed.values.iter().filter(|v| v.is_finite()) {
                    range.0 = range.0.min(value);
                    range.1 = range.1.max(value);
                }
            }
        }
    }

    fn report(&self) -> SpreadReport {
        let widths: Vec<f64> = self.ranges.iter().map(|(lo, hi)| f64::from(hi - lo)).collect();
        let axis = mantissa_quantize::types::attribute(&self.node, "axis")
            .and_then(|a| a.i)
            .and_then(|a| usize::try_from(a).ok());
        spread_report(self.node.output.first().map_or("", String::as_str), "concat", &self.node, axis, &widths)
    }
}

fn node_label(node: &NodeProto) -> String {
    if node.name().is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name().to_owned() }
}

/// Per-channel weight spread of a Conv/MatMul/Gemm weight initializer, along its output channels.
fn weight_spread(node: &NodeProto, weight: &TensorProto) -> Option<SpreadReport> {
    let values = f32_values(weight)?;
    let dims: Vec<usize> = weight.dims.iter().map(|&d| d.max(0) as usize).collect();
    if dims.is_empty() || values.len() != dims.iter().product::<usize>() {
        return None;
    }
    let axis = match node.op_type() {
        "Conv" => 0,
        "Gemm" if attribute(node, "transB").and_then(|a| a.i).unwrap_or(0) != 0 => 0,
        _ => dims.len() - 1,
    };
    let (channels, inner) = layout(&dims, Some(axis));
    let mut ranges = ChannelRanges::new(channels);
    ranges.observe(&values, inner);
    Some(spread_report(weight.name(), "weight", node, Some(axis), &ranges.widths()))
}

struct InputTracker {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
    stats: TensorStatistics,
    sum: f64,
    sum_sq: f64,
    integral: bool,
}

impl InputTracker {
    fn observe(&mut self, observed: &Observed) {
        if self.shape.is_empty() {
            self.shape = observed.shape.clone();
        }
        self.stats.observe(&observed.values);
        for &value in observed.values.iter().filter(|v| v.is_finite()) {
            let value = f64::from(value);
            self.sum += value;
            self.sum_sq += value * value;
            self.integral &= value.fract() == 0.0;
        }
    }

    fn report(&self) -> InputReport {
        let finite = self.stats.count() - self.stats.infinity_count();
        let (min, max) = (self.stats.min().map(f64::from), self.stats.max().map(f64::from));
        let mean = (finite > 0).then(|| self.sum / finite as f64);
        let std = mean.map(|mean| (self.sum_sq / finite as f64 - mean * mean).max(0.0).sqrt());
        let mut reasons = Vec::new();
        if let (Some(min), Some(max)) = (min, max) {
            if min < -INPUT_RANGE_LIMIT || max > INPUT_RANGE_LIMIT {
                reasons.push(format!(
                    "looks un-normalized: range [{}, {}] exceeds [-{INPUT_RANGE_LIMIT}, {INPUT_RANGE_LIMIT}]",
                    number(min),
                    number(max)
                ));
            }
            if self.integral && min >= 0.0 && max > 1.0 && max <= 255.0 {
                reasons.push("looks un-normalized: integer values in 0..255, like raw pixels".to_owned());
            }
        }
        if self.stats.infinity_count() > 0 {
            reasons.push(format!("{} infinite values", self.stats.infinity_count()));
        }
        if self.stats.nan_count() > 0 {
            reasons.push(format!("{} NaN values", self.stats.nan_count()));
        }
        InputReport {
            name: self.name.clone(),
            datatype: self.datatype.to_string(),
            shape: self.shape.clone(),
            values: self.stats.count(),
            min,
            max,
            mean,
            std,
            nan: self.stats.nan_count(),
            flagged: !reasons.is_empty(),
            reasons,
        }
    }
}

struct ActivationSpreadTracker {
    tensor: String,
    node: NodeProto,
    axis: Option<usize>,
    ranges: Option<ChannelRanges>,
}

impl ActivationSpreadTracker {
    fn observe(&mut self, observed: &Observed) -> Result<(), String> {
        let dims = dims_of(&observed.shape);
        let axis = activation_axis(dims.len());
        let (channels, inner) = layout(&dims, axis);
        let ranges = self.ranges.get_or_insert_with(|| ChannelRanges::new(channels));
        if ranges.low.len() != channels {
            return Err(channel_mismatch(&self.tensor, ranges.low.len(), channels));
        }
        self.axis = axis;
        ranges.observe(&observed.values, inner);
        Ok(())
    }
}

fn channel_mismatch(tensor: &str, before: usize, now: usize) -> String {
    format!("tensor '{tensor}' has {before} channels in one sample and {now} in another")
}

struct DeadTracker {
    node: NodeProto,
    tensor: String,
    low: Option<f32>,
    high: Option<f32>,
    axis: Option<usize>,
    /// Per channel: every value so far at the low / high bound.
    all_low: Vec<bool>,
    all_high: Vec<bool>,
    seen: bool,
}

impl DeadTracker {
    fn observe(&mut self, observed: &Observed) -> Result<(), String> {
        let dims = dims_of(&observed.shape);
        self.axis = activation_axis(dims.len());
        let (channels, inner) = layout(&dims, self.axis);
        if !self.seen {
            self.seen = true;
            self.all_low = vec![self.low.is_some(); channels];
            self.all_high = vec![self.high.is_some(); channels];
        } else if self.all_low.len() != channels {
            return Err(channel_mismatch(&self.tensor, self.all_low.len(), channels));
        }
        let (low, high) = (self.low, self.high);
        let (all_low, all_high) = (&mut self.all_low, &mut self.all_high);
        for_each_channel(&observed.values, channels, inner, |c, v| {
            if low != Some(v) {
                all_low[c] = false;
            }
            if high != Some(v) {
                all_high[c] = false;
            }
        });
        Ok(())
    }

    fn report(&self) -> DeadReport {
        let channels = self.all_low.len();
        let dead_at_low = self.all_low.iter().filter(|&&dead| dead).count();
        let dead_at_high = self.all_high.iter().zip(&self.all_low).filter(|&(&high, &low)| high && !low).count();
        let dead_fraction = if channels > 0 { (dead_at_low + dead_at_high) as f64 / channels as f64 } else { 0.0 };
        DeadReport {
            node: node_label(&self.node),
            op: self.node.op_type().to_owned(),
            tensor: self.tensor.clone(),
            relu6: self.node.op_type() == "Clip" && self.low == Some(0.0) && self.high == Some(6.0),
            low_bound: self.low.map(f64::from),
            high_bound: self.high.map(f64::from),
            axis: self.axis,
            channels,
            dead_at_low,
            dead_at_high,
            dead_fraction,
            flagged: dead_fraction > DEAD_FRACTION_LIMIT,
        }
    }
}

struct SaturationTracker {
    node: NodeProto,
    tensor: String,
    limit: f32,
    values: u64,
    saturated: u64,
}

impl SaturationTracker {
    fn observe(&mut self, observed: &Observed) {
        for &value in observed.values.iter().filter(|v| !v.is_nan()) {
            self.values += 1;
            self.saturated += u64::from(value.abs() > self.limit);
        }
    }

    fn report(&self) -> SaturationReport {
        let fraction = if self.values > 0 { self.saturated as f64 / self.values as f64 } else { 0.0 };
        SaturationReport {
            node: node_label(&self.node),
            op: self.node.op_type().to_owned(),
            tensor: self.tensor.clone(),
            limit: f64::from(self.limit),
            values: self.values,
            saturated: self.saturated,
            fraction,
            flagged: fraction > SATURATION_LIMIT,
        }
    }
}

struct SensitivityTracker {
    node: NodeProto,
    tensor: String,
    compared_with: String,
    accumulator: DriftAccumulator,
}

/// Clip's bounds: inputs 1 and 2 when constant (opset 11 on), else the `min`/`max` attributes.
fn clip_bounds(node: &NodeProto, initializers: &HashMap<String, &TensorProto>) -> (Option<f32>, Option<f32>) {
    let input = |slot: usize| {
        node.input
            .get(slot)
            .filter(|name| !name.is_empty())
            .and_then(|name| initializers.get(name.as_str()))
            .and_then(|tensor| f32_values(tensor))
            .and_then(|values| values.first().copied())
    };
    let attr = |name: &str| attribute(node, name).and_then(|a| a.f);
    (input(1).or_else(|| attr("min")), input(2).or_else(|| attr("max")))
}

/// MACCs of one Conv/MatMul/Gemm over a whole observed sample (all items).
fn node_maccs(node: &NodeProto, sample: &Sample, initializers: &HashMap<String, &TensorProto>) -> Option<u64> {
    let shape = |name: &String| -> Option<Vec<u64>> {
        let shape = match sample.get(name) {
            Some(observed) => observed.shape.clone(),
            None => initializers.get(name.as_str())?.dims.clone(),
        };
        Some(shape.iter().map(|&d| d.max(0) as u64).collect())
    };
    let output: u64 = shape(node.output.first()?)?.iter().product();
    let per_output: u64 = match node.op_type() {
        // Kernel elements x input channels per group: the weight's dims after the first.
        "Conv" => shape(node.input.get(1)?)?.iter().skip(1).product(),
        "MatMul" => *shape(node.input.first()?)?.last()?,
        "Gemm" => {
            let a = shape(node.input.first()?)?;
            let trans_a = attribute(node, "transA").and_then(|a| a.i).unwrap_or(0) != 0;
            if a.len() != 2 {
                return None;
            }
            if trans_a { a[0] } else { a[1] }
        }
        _ => return None,
    };
    Some(output * per_output)
}

fn run_probe(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
    file: &Path,
    what: &str,
) -> Result<Sample, String> {
    let mut request = request.clone();
    request.outputs = (0..signature.outputs.len()).collect();
    let outputs = execute(session, signature, &request).map_err(|err| format!("{}: {what}: {err}", file.display()))?;
    Ok(outputs
        .into_iter()
        .filter(|output| matches!(output.datatype, DataType::Fp32 | DataType::Fp16 | DataType::Fp64))
        .map(|output| {
            let values = output.floats();
            (output.name, Observed { shape: output.shape, values })
        })
        .collect())
}

/// The tensor of the quantized graph that readers of `tensor` see: the output of the
/// DequantizeLinear behind the QuantizeLinear reading `tensor`, if there is such a pair.
fn dequantized_name(graph: &GraphProto, index: &GraphIndex, tensor: &str) -> Option<String> {
    let quantize = index
        .consumers(tensor)
        .iter()
        .map(|&c| &graph.node[c])
        .find(|n| n.op_type() == "QuantizeLinear" && n.input.first().is_some_and(|i| i == tensor))?;
    let quantized = quantize.output.first()?;
    let dequantize = index
        .consumers(quantized)
        .iter()
        .map(|&c| &graph.node[c])
        .find(|n| n.op_type() == "DequantizeLinear" && n.input.first() == Some(quantized))?;
    dequantize.output.first().cloned()
}

/// The quantized model (static INT8, every compute node a candidate) and what it quantized, as
/// (node of `graph`, output tensor, tensor of the quantized graph to compare it with).
fn build_quantized(
    environment: &mantissa_runtime::Environment,
    base: &ModelProto,
    graph: &GraphProto,
    data: &Path,
    observable: &dyn Fn(&str) -> bool,
) -> Result<(ModelProto, Vec<SensitivityTracker>), String> {
    let options = Int8Options {
        mode: Int8Mode::Static,
        keep_first_and_last_layers: false,
        calibration_data: Some(data.to_owned()),
        ..Int8Options::default()
    };
    let mut quantized = base.clone();
    let tensors = tensors_to_calibrate(&quantized, &options).map_err(|err| format!("int8 static: {err}"))?;
    let ranges = calibrate(
        environment,
        &CalibrationJob { model: &quantized, tensors: &tensors, data, options: &options.calibration, label: "analyze" },
    )
    .map_err(|err| err.to_string())?;
    let report = quantize_static(&mut quantized, &options, &ranges).map_err(|err| format!("int8 static: {err}"))?;
    let qgraph = quantized.graph.as_ref().ok_or("quantized model has no graph")?;
    let index = GraphIndex::build(qgraph);
    let produced: HashSet<&str> = qgraph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    // The pass walks the same topologically sorted nodes, so its report follows this order.
    let mut pending = report.quantized.iter().peekable();
    let mut trackers = Vec::new();
    for node in graph.node.iter().filter(|n| n.domain().is_empty() && COMPUTE_OPS.contains(&n.op_type())) {
        let Some((name, op)) = pending.peek() else { break };
        if name != node.name() || op != node.op_type() {
            continue;
        }
        pending.next();
        let Some(tensor) = node.output.first().filter(|t| observable(t)) else { continue };
        let compared_with = match dequantized_name(qgraph, &index, tensor) {
            Some(name) => name,
            None if produced.contains(tensor.as_str()) => tensor.clone(),
            None => continue,
        };
        trackers.push(SensitivityTracker {
            node: node.clone(),
            tensor: tensor.clone(),
            compared_with,
            accumulator: DriftAccumulator::default(),
        });
    }
    Ok((quantized, trackers))
}

/// Builds the report (blocking: runs ONNX Runtime on every sample, twice).
pub fn analyze(args: &AnalyzeArgs) -> Result<Report, AnalyzeError> {
    if !args.data.exists() {
        return Err(AnalyzeError(format!("data directory {} does not exist", args.data.display())));
    }
    let files = sample_files(&args.data).map_err(|err| err.to_string())?;
    let model = load_model(&args.model).map_err(|err| AnalyzeError(err.to_string()))?;
    let mut base = model;
    let graph =
        base.graph.as_mut().ok_or_else(|| AnalyzeError(format!("{}: model has no graph", args.model.display())))?;
    constants_to_initializers(graph);
    sort_topologically(graph).map_err(|err| AnalyzeError(format!("{}: {err}", args.model.display())))?;
    let graph = graph.clone();
    let types = infer_elem_types(&graph, &Default::default());
    let initializers: HashMap<String, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name().to_owned(), t)).collect();
    let graph_inputs: Vec<&ValueInfoProto> =
        graph.input.iter().filter(|i| !initializers.contains_key(i.name())).collect();
    let input_names: HashSet<&str> = graph_inputs.iter().map(|i| i.name()).collect();
    let is_float = |name: &str| !name.is_empty() && types.get(name) == Some(&elem::FLOAT);
    // Tensors a sample shows: float graph inputs, and float node outputs added as graph outputs.
    let observable = |name: &str| is_float(name) && !initializers.contains_key(name);

    let environment =
        mantissa_runtime::load_environment(args.ort_library.as_deref()).map_err(|err| AnalyzeError(err.to_string()))?;

    // What each section watches.
    let mut weight_spread_rows = Vec::new();
    let mut activation_spread: Vec<ActivationSpreadTracker> = Vec::new();
    let mut dead: Vec<DeadTracker> = Vec::new();
    let mut saturation: Vec<SaturationTracker> = Vec::new();
    let mut joins: Vec<JoinTracker> = Vec::new();
    let mut compute_nodes: Vec<&NodeProto> = Vec::new();
    let mut watched: Vec<String> = Vec::new();
    let watch = |name: &str, watched: &mut Vec<String>| {
        if observable(name) && !input_names.contains(name) && !watched.iter().any(|w| w == name) {
            watched.push(name.to_owned());
        }
    };
    for node in graph.node.iter().filter(|n| n.domain().is_empty()) {
        let op = node.op_type();
        if COMPUTE_OPS.contains(&op) {
            compute_nodes.push(node);
            for (slot, input) in node.input.iter().enumerate().take(2) {
                if let Some(weight) = initializers.get(input.as_str()) {
                    if slot == 1 {
                        weight_spread_rows.extend(weight_spread(node, weight));
                    }
                } else if observable(input) {
                    watch(input, &mut watched);
                    if (slot == 0 || op != "Conv") && !activation_spread.iter().any(|t| &t.tensor == input) {
                        activation_spread.push(ActivationSpreadTracker {
                            tensor: input.clone(),
                            node: node.clone(),
                            axis: None,
                            ranges: None,
                        });
                    }
                }
            }
            if let Some(output) = node.output.first() {
                watch(output, &mut watched);
            }
        }
        match op {
            "Relu" | "Clip" => {
                let Some(output) = node.output.first().filter(|o| observable(o)) else { continue };
                let (low, high) = if op == "Relu" { (Some(0.0), None) } else { clip_bounds(node, &initializers) };
                watch(output, &mut watched);
                dead.push(DeadTracker {
                    node: node.clone(),
                    tensor: output.clone(),
                    low,
                    high,
                    axis: None,
                    all_low: Vec::new(),
                    all_high: Vec::new(),
                    seen: false,
                });
            }
            "Concat" => {
                let inputs: Vec<String> = node.input.iter().filter(|i| observable(i)).cloned().collect();
                if inputs.len() >= 2 {
                    for input in &inputs {
                        watch(input, &mut watched);
                    }
                    let ranges = vec![(0.0, 0.0); inputs.len()];
                    joins.push(JoinTracker { node: node.clone(), inputs, ranges });
                }
            }
            "Sigmoid" | "Tanh" => {
                let Some(input) = node.input.first().filter(|i| observable(i)) else { continue };
                watch(input, &mut watched);
                saturation.push(SaturationTracker {
                    node: node.clone(),
                    tensor: input.clone(),
                    limit: if op == "Sigmoid" { SIGMOID_LIMIT } else { TANH_LIMIT },
                    values: 0,
                    saturated: 0,
                });
            }
            _ => {}
        }
    }

    // Static INT8 of the same model, calibrated on the same data.
    let (mut quantized_probe, mut sensitivity, mut sensitivity_error, mut quantized_nodes) =
        match build_quantized(&environment, &base, &graph, &args.data, &observable) {
            Ok((model, trackers)) => {
                let count = trackers.len();
                (Some(model), trackers, None, count)
            }
            Err(err) => (None, Vec::new(), Some(err), 0),
        };
    if let Some(model) = quantized_probe.as_mut() {
        let compared: Vec<String> = sensitivity.iter().map(|t| t.compared_with.clone()).collect();
        add_float_outputs(model, &compared).map_err(|err| err.to_string())?;
    }
    for tracker in &sensitivity {
        watch(&tracker.tensor, &mut watched);
    }

    let mut fp32_probe = base.clone();
    add_float_outputs(&mut fp32_probe, &watched).map_err(|err| err.to_string())?;
    let (mut session, signature) = open_internal_session(&environment, &fp32_probe)
        .map_err(|err| AnalyzeError(format!("{}: {err}", args.model.display())))?;
    let mut quantized_session = match quantized_probe.as_ref().map(|model| open_internal_session(&environment, model)) {
        Some(Ok(session)) => Some(session),
        Some(Err(err)) => {
            sensitivity_error = Some(format!("the INT8 model does not load: {err}"));
            sensitivity.clear();
            quantized_nodes = 0;
            None
        }
        None => None,
    };

    let mut inputs: Vec<InputTracker> = signature
        .inputs
        .iter()
        .map(|spec| InputTracker {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape: Vec::new(),
            stats: TensorStatistics::new(mantissa_quantize::calibration::MIN_BINS),
            sum: 0.0,
            sum_sq: 0.0,
            integral: true,
        })
        .collect();
    let batched = signature.inputs.first().and_then(|spec| spec.dims.first()).is_some_and(|&d| d < 0);
    let mut items = 0u64;
    let mut maccs: Option<(u64, Vec<MaccsNode>)> = None;

    for (done, file) in files.iter().enumerate() {
        let request = load_sample(file, &signature).map_err(|err| err.to_string())?;
        let batch = if batched {
            request.inputs.first().and_then(|i| i.shape.first()).map_or(1, |&d| d.max(1) as u64)
        } else {
            1
        };
        items += batch;
        let mut sample = run_probe(&mut session, &signature, &request, file, "FP32 model")?;
        for (spec, input) in signature.inputs.iter().zip(&request.inputs) {
            if let TensorData::Raw(raw) = &input.data {
                let tensor = OutputTensor {
                    name: spec.name.clone(),
                    datatype: input.datatype,
                    shape: input.shape.clone(),
                    raw: raw.clone(),
                };
                let values = tensor.floats();
                if !values.is_empty() || raw.is_empty() {
                    sample.insert(spec.name.clone(), Observed { shape: input.shape.clone(), values });
                }
            }
        }
        for tracker in &mut inputs {
            if let Some(observed) = sample.get(&tracker.name) {
                tracker.observe(observed);
            }
        }
        let in_file = |err: String| AnalyzeError(format!("{}: {err}", file.display()));
        for tracker in &mut activation_spread {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed).map_err(in_file)?;
            }
        }
        for tracker in &mut dead {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed).map_err(in_file)?;
            }
        }
        for tracker in &mut saturation {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed);
            }
        }
        for tracker in &mut joins {
            tracker.observe(&sample);
        }
        if maccs.is_none() {
            let nodes: Vec<MaccsNode> = compute_nodes
                .iter()
                .map(|node| MaccsNode {
                    node: node_label(node),
                    op: node.op_type().to_owned(),
                    maccs: node_maccs(node, &sample, &initializers).map(|m| m / batch),
                })
                .collect();
            maccs = Some((batch, nodes));
        }
        if let Some((qsession, qsignature)) = quantized_session.as_mut() {
            let quantized = run_probe(qsession, qsignature, &request, file, "INT8 model")?;
            for tracker in &mut sensitivity {
                if let (Some(reference), Some(variant)) =
                    (sample.get(&tracker.tensor), quantized.get(&tracker.compared_with))
                {
                    tracker.accumulator.add(&reference.values, &variant.values, None);
                }
            }
        }
        tracing::debug!(samples_done = done + 1, samples_total = files.len(), "analyzed");
    }

    let (batch, macc_nodes) = maccs.unwrap_or_default();
    let mut sensitive: Vec<SensitiveNode> = sensitivity
        .iter()
        .map(|tracker| {
            let figures = tracker.accumulator.figures();
            SensitiveNode {
                node: node_label(&tracker.node),
                op: tracker.node.op_type().to_owned(),
                tensor: tracker.tensor.clone(),
                compared_with: tracker.compared_with.clone(),
                sqnr_db: figures.sqnr_db.is_finite().then_some(figures.sqnr_db),
                cosine: figures.cosine,
                max_abs: figures.max_abs,
                flagged: figures.sqnr_db < SQNR_LIMIT_DB,
            }
        })
        .collect();
    sensitive.sort_by(|a, b| {
        let key = |n: &SensitiveNode| n.sqnr_db.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b)).then(a.cosine.total_cmp(&b.cosine))
    });
    sensitive.truncate(args.top);
    let mut spread_rows = weight_spread_rows;
    spread_rows.extend(activation_spread.iter().filter_map(|t| {
        t.ranges.as_ref().map(|ranges| spread_report(&t.tensor, "activation", &t.node, t.axis, &ranges.widths()))
    }));
    spread_rows.extend(joins.iter().map(JoinTracker::report));

    Ok(Report {
        model: args.model.display().to_string(),
        data: args.data.display().to_string(),
        samples: files.len(),
        items,
        inputs: Section::new(INPUTS, INPUT_RANGE_LIMIT, inputs.iter().map(InputTracker::report).collect(), |i| {
            i.flagged
        }),
        channel_spread: Section::new(SPREAD, SPREAD_RATIO_LIMIT, spread_rows, |s| s.flagged),
        dead_channels: Section::new(
            DEAD,
            DEAD_FRACTION_LIMIT,
            dead.iter().filter(|t| t.seen).map(DeadTracker::report).collect(),
            |d| d.flagged,
        ),
        saturation: Section::new(
            SATURATION,
            SATURATION_LIMIT,
            saturation.iter().map(SaturationTracker::report).collect(),
            |s| s.flagged,
        ),
        maccs: MaccsSection {
            about: MACCS,
            per_sample: macc_nodes.iter().filter_map(|n| n.maccs).sum(),
            batch,
            nodes: macc_nodes,
        },
        sensitivity: SensitivitySection {
            about: SENSITIVITY,
            threshold_db: SQNR_LIMIT_DB,
            settings: "static QDQ, per-channel int8 weights, uint8 activations, minmax calibration, \
keep_first_and_last_layers: false"
                .to_owned(),
            quantized_nodes,
            error: sensitivity_error,
            nodes: sensitive,
        },
    })
}

/// `mantissa analyze`: prints the report as tables, or as JSON with `--json`.
pub fn run(args: &AnalyzeArgs) -> Result<(), AnalyzeError> {
    let report = analyze(args)?;
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).map_err(|err| AnalyzeError(err.to_string()))?;
        text.push('\n');
        text
    } else {
        render(&report)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        // A reader that stops early (`| head`) is not an error.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(AnalyzeError(format!("cannot write the report: {err}")))
        }
        _ => Ok(()),
    }
}

/// A number for a table: fixed point for ordinary magnitudes, scientific otherwise.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 {
        "0".to_owned()
    } else if !value.is_finite() {
        value.to_string()
    } else if !(1e-3..1e5).contains(&magnitude) {
        format!("{value:.3e}")
    } else {
        format!("{value:.4}")
    }
}

fn optional(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), number)
}

fn flag(flagged: bool) -> &'static str {
    if flagged { "FLAGGED" } else { "ok" }
}

fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        out.push_str("   (none)\n");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from("   ");
        for (cell, width) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

fn heading(out: &mut String, number: usize, about: &About, flagged: Option<usize>) {
    let _ = write!(out, "\n{number}. {}", about.title);
    if let Some(flagged) = flagged {
        let _ = write!(out, " ({flagged} flagged)");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "   why: {}", about.why);
    let _ = writeln!(out, "   suggestion: {}", about.suggestion);
}

/// The report as human-readable tables.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Quantization readiness of {}", report.model);
    let _ = writeln!(out, "data: {} ({} files, {} items)", report.data, report.samples, report.items);

    heading(&mut out, 1, &report.inputs.about, Some(report.inputs.flagged));
    let rows: Vec<Vec<String>> = report
        .inputs
        .items
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.datatype.clone(),
                format!("{:?}", i.shape),
                optional(i.min),
                optional(i.max),
                optional(i.mean),
                optional(i.std),
                if i.flagged { format!("FLAGGED: {}", i.reasons.join("; ")) } else { "ok".to_owned() },
            ]
        })
        .collect();
    table(&mut out, &["input", "type", "shape", "min", "max", "mean", "std", "status"], &rows);

    let section = &report.channel_spread;
    heading(&mut out, 2, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|s| {
            vec![
                s.tensor.clone(),
                s.kind.to_owned(),
                format!("{} ({})", s.node, s.op),
                s.axis.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                s.channels.to_string(),
                number(s.widest_range),
                number(s.median_range),
                number(s.narrowest_range),
                s.ratio.map_or_else(|| "inf".to_owned(), |r| format!("{r:.2}")),
                flag(s.flagged).to_owned(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["tensor", "kind", "node", "axis", "channels", "widest", "median", "narrowest", "ratio", "status"],
        &rows,
    );

    let section = &report.dead_channels;
    heading(&mut out, 3, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|d| {
            let bounds = format!("[{}, {}]", optional(d.low_bound), optional(d.high_bound));
            vec![
                d.node.clone(),
                if d.relu6 { "Clip (ReLU6)".to_owned() } else { d.op.clone() },
                bounds,
                d.channels.to_string(),
                format!("{} + {}", d.dead_at_low, d.dead_at_high),
                format!("{:.3}", d.dead_fraction),
                flag(d.flagged).to_owned(),
            ]
        })
        .collect();
    table(&mut out, &["node", "op", "bounds", "channels", "dead (low + high)", "dead fraction", "status"], &rows);

    let section = &report.saturation;
    heading(&mut out, 4, &section.about, Some(section.flagged));
    let rows: Vec<Vec<String>> = section
        .items
        .iter()
        .map(|s| {
            vec![
                s.node.clone(),
                s.op.clone(),
                s.tensor.clone(),
                format!("|x| > {}", s.limit),
                format!("{} / {}", s.saturated, s.values),
                format!("{:.4}", s.fraction),
                flag(s.flagged).to_owned(),
            ]
        })
        .collect();
    table(&mut out, &["node", "op", "input", "saturated when", "saturated", "fraction", "status"], &rows);

    let section = &report.maccs;
    heading(&mut out, 5, &section.about, None);
    let rows: Vec<Vec<String>> = section
        .nodes
        .iter()
        .map(|n| {
            let share = match n.maccs {
                Some(m) if section.per_sample > 0 => format!("{:.1}%", m as f64 * 100.0 / section.per_sample as f64),
                _ => "-".to_owned(),
            };
            vec![n.node.clone(), n.op.clone(), n.maccs.map_or_else(|| "?".to_owned(), |m| m.to_string()), share]
        })
        .collect();
    table(&mut out, &["node", "op", "MACCs", "share"], &rows);
    let _ = writeln!(out, "   total: {} MACCs per sample", section.per_sample);

    let section = &report.sensitivity;
    heading(&mut out, 6, &section.about, None);
    let _ = writeln!(out, "   INT8 settings: {}", section.settings);
    if let Some(error) = &section.error {
        let _ = writeln!(out, "   not measured: {error}");
    }
    let rows: Vec<Vec<String>> = section
        .nodes
        .iter()
        .enumerate()
        .map(|(rank, n)| {
            vec![
                (rank + 1).to_string(),
                n.node.clone(),
                n.op.clone(),
                n.tensor.clone(),
                n.sqnr_db.map_or_else(|| "inf".to_owned(), |s| format!("{s:.2}")),
                format!("{:.6}", n.cosine),
                number(n.max_abs),
                if n.flagged { format!("FLAGGED (< {SQNR_LIMIT_DB} dB)") } else { "ok".to_owned() },
            ]
        })
        .collect();
    table(&mut out, &["#", "node", "op", "output", "SQNR dB", "cosine", "max abs err", "status"], &rows);
    let _ = writeln!(
        out,
        "   {} of {} quantized nodes shown, lowest SQNR first",
        section.nodes.len(),
        section.quantized_nodes
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_follow_the_axis_rules() {
        assert_eq!(activation_axis(4), Some(1));
        assert_eq!(activation_axis(3), Some(2));
        assert_eq!(activation_axis(2), Some(1));
        // [2, 3, 2] split at axis 1: channel of element i is (i / 2) % 3.
        let (channels, inner) = layout(&[2, 3, 2], Some(1));
        let mut seen = Vec::new();
        for_each_channel(&[0.0; 12], channels, inner, |c, _| seen.push(c));
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn spread_is_widest_over_median() {
        let mut ranges = ChannelRanges::new(3);
        // Channels along the last axis of [2, 3]: widths (with 0 included) 1, 2 and 30.
        ranges.observe(&[1.0, -2.0, 10.0, 0.5, 1.0, -20.0], 1);
        assert_eq!(ranges.widths(), vec![1.0, 3.0, 30.0]);
        assert_eq!(median(&ranges.widths()), 3.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 8.0]), 3.0);
    }

    #[test]
    fn dead_channels_are_at_a_bound_on_every_value() {
        let node = NodeProto { op_type: Some("Clip".into()), ..Default::default() };
        let mut tracker = DeadTracker {
            node,
            tensor: "t".into(),
            low: Some(0.0),
            high: Some(6.0),
            axis: None,
            all_low: Vec::new(),
            all_high: Vec::new(),
            seen: false,
        };
        // [1, 4] along the last axis: channel 0 always 0, channel 1 always 6, channel 2 mixed.
        tracker.observe(&Observed { shape: vec![1, 4], values: vec![0.0, 6.0, 0.0, 1.0] }).unwrap();
        tracker.observe(&Observed { shape: vec![1, 4], values: vec![0.0, 6.0, 3.0, 1.0] }).unwrap();
        let report = tracker.report();
        assert!(report.relu6);
        assert_eq!((report.dead_at_low, report.dead_at_high, report.channels), (1, 1, 4));
        assert_eq!(report.dead_fraction, 0.5);
        assert!(tracker.observe(&Observed { shape: vec![1, 5], values: vec![0.0; 5] }).is_err());
    }
}
