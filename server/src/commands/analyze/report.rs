//! The report: its serializable types (what `--json` prints), the thresholds that flag entries,
//! and the step that reads the collected statistics into one section each. Every judgement
//! (flags, reasons, ratios, the sensitivity ranking) is made here, so that `collect` only counts
//! and the renderer only lays out.

use std::path::Path;

use mantissa_quantize::onnx::NodeProto;
use mantissa_quantize::types::attribute;
use serde::Serialize;

use super::collect::{Collected, MaccsCount, Sensitivity};
use super::trackers::{DeadTracker, InputTracker, JoinTracker, SaturationTracker, SensitivityTracker};

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
    pub output_parts: Section<OutputPartsReport>,
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

/// A model output whose channels split into parts on different scales.
#[derive(Debug, Clone, Serialize)]
pub struct OutputPartsReport {
    pub output: String,
    /// The axis the channels are counted along.
    pub axis: usize,
    pub parts: Vec<OutputPartRow>,
    /// Widest part's range width over the narrowest's; `null` when the narrowest is constant.
    pub ratio: Option<f64>,
    pub flagged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputPartRow {
    /// As drift reports key it, e.g. `output0[:,4:84,:]`.
    pub label: String,
    /// Channels `start..end` along `axis`.
    pub start: usize,
    pub end: usize,
    /// Highest minus lowest FP32 value over the part's channels.
    pub width: f64,
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
/// The INT8 options `collect` builds the twin with, in words.
const OUTPUT_PARTS: About = About {
    title: "Outputs measured by parts",
    why: "An output whose channels live on different scales (a detection head's box coordinates in pixels beside \
class scores in 0..1) has a cosine that is the cosine of its widest part: the narrow part can be wrong while the \
whole reads near 1. The drift checks measure such an output by part, found on its FP32 values as here: runs of \
channels whose range widths differ more than 10x (precision-rules 2). Ratio = widest part's range / narrowest's.",
    suggestion: "Judge each part on its own: name the parts under drift.budget.parts with thresholds that suit \
them (e.g. max_abs for boxes, min_top1_agreement with top1_axis: all for scores); named parts replace the \
automatic ones for that output.",
};
const INT8_SETTINGS: &str = "static QDQ, per-channel int8 weights, uint8 activations, minmax calibration, \
keep_first_and_last_layers: false";

/// A number for a table or a reason: fixed point for ordinary magnitudes, scientific otherwise.
pub(super) fn number(value: f64) -> String {
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

/// The node's name, or its first output for unnamed nodes.
fn node_label(node: &NodeProto) -> String {
    if node.name().is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name().to_owned() }
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

/// Turns the collected statistics into the report; `top` is how many sensitive nodes to keep.
pub(super) fn build(model: &Path, data: &Path, top: usize, collected: &Collected) -> Report {
    Report {
        model: model.display().to_string(),
        data: data.display().to_string(),
        samples: collected.samples,
        items: collected.items,
        inputs: inputs_section(&collected.inputs),
        channel_spread: spread_section(collected),
        dead_channels: dead_section(&collected.dead),
        saturation: saturation_section(&collected.saturation),
        maccs: maccs_section(collected.maccs.as_ref()),
        sensitivity: sensitivity_section(&collected.sensitivity, top),
        output_parts: output_parts_section(collected),
    }
}

/// Every output whose FP32 values split into parts; each is flagged, as it is measured by part.
fn output_parts_section(collected: &Collected) -> Section<OutputPartsReport> {
    let items = collected
        .output_parts
        .iter()
        .filter_map(|(output, finder)| {
            let parts = finder.parts();
            let (first, _) = parts.first()?;
            let rank = finder.rank();
            let widths = parts.iter().map(|(_, width)| *width);
            let (widest, narrowest) = (widths.clone().fold(0.0, f64::max), widths.fold(f64::INFINITY, f64::min));
            Some(OutputPartsReport {
                output: output.clone(),
                axis: first.axis,
                parts: parts
                    .iter()
                    .map(|(part, width)| OutputPartRow {
                        label: part.label(output, rank),
                        start: part.start,
                        end: part.end,
                        width: *width,
                    })
                    .collect(),
                ratio: (narrowest > 0.0).then(|| widest / narrowest),
                flagged: true,
            })
        })
        .collect();
    Section::new(OUTPUT_PARTS, mantissa_preparation::output_parts::PART_RANGE_RATIO, items, |o| o.flagged)
}

fn inputs_section(inputs: &[InputTracker]) -> Section<InputReport> {
    Section::new(INPUTS, INPUT_RANGE_LIMIT, inputs.iter().map(input_report).collect(), |i| i.flagged)
}

fn input_report(tracker: &InputTracker) -> InputReport {
    let stats = &tracker.stats;
    let finite = stats.count() - stats.infinity_count();
    let (min, max) = (stats.min().map(f64::from), stats.max().map(f64::from));
    let mean = (finite > 0).then(|| tracker.sum / finite as f64);
    let std = mean.map(|mean| (tracker.sum_sq / finite as f64 - mean * mean).max(0.0).sqrt());
    let mut reasons = Vec::new();
    if let (Some(min), Some(max)) = (min, max) {
        if min < -INPUT_RANGE_LIMIT || max > INPUT_RANGE_LIMIT {
            reasons.push(format!(
                "looks un-normalized: range [{}, {}] exceeds [-{INPUT_RANGE_LIMIT}, {INPUT_RANGE_LIMIT}]",
                number(min),
                number(max)
            ));
        }
        if tracker.integral && min >= 0.0 && max > 1.0 && max <= 255.0 {
            reasons.push("looks un-normalized: integer values in 0..255, like raw pixels".to_owned());
        }
    }
    if stats.infinity_count() > 0 {
        reasons.push(format!("{} infinite values", stats.infinity_count()));
    }
    if stats.nan_count() > 0 {
        reasons.push(format!("{} NaN values", stats.nan_count()));
    }
    InputReport {
        name: tracker.name.clone(),
        datatype: tracker.datatype.to_string(),
        shape: tracker.shape.clone(),
        values: stats.count(),
        min,
        max,
        mean,
        std,
        nan: stats.nan_count(),
        flagged: !reasons.is_empty(),
        reasons,
    }
}

/// Weight rows first, then activations, then Concat outputs, each in graph order.
fn spread_section(collected: &Collected) -> Section<SpreadReport> {
    let weights = collected
        .weight_spread
        .iter()
        .map(|w| spread_report(&w.tensor, "weight", &w.node, Some(w.axis), &w.ranges.widths()));
    let activations = collected.activation_spread.iter().filter_map(|t| {
        t.ranges.as_ref().map(|ranges| spread_report(&t.tensor, "activation", &t.node, t.axis, &ranges.widths()))
    });
    let joins = collected.joins.iter().map(join_report);
    let rows = weights.chain(activations).chain(joins).collect();
    Section::new(SPREAD, SPREAD_RATIO_LIMIT, rows, |s| s.flagged)
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

/// A Concat's row: its inputs' ranges as the channels of its output.
fn join_report(tracker: &JoinTracker) -> SpreadReport {
    let widths: Vec<f64> = tracker.ranges.iter().map(|(lo, hi)| f64::from(hi - lo)).collect();
    let axis = attribute(&tracker.node, "axis").and_then(|a| a.i).and_then(|a| usize::try_from(a).ok());
    spread_report(tracker.node.output.first().map_or("", String::as_str), "concat", &tracker.node, axis, &widths)
}

/// Only the ReLU/Clip outputs some sample showed get a row.
fn dead_section(dead: &[DeadTracker]) -> Section<DeadReport> {
    let rows = dead.iter().filter(|t| t.seen).map(dead_report).collect();
    Section::new(DEAD, DEAD_FRACTION_LIMIT, rows, |d| d.flagged)
}

fn dead_report(tracker: &DeadTracker) -> DeadReport {
    let channels = tracker.all_low.len();
    let dead_at_low = tracker.all_low.iter().filter(|&&dead| dead).count();
    // A channel at both bounds (equal bounds, or no values at all) counts once, as low.
    let dead_at_high = tracker.all_high.iter().zip(&tracker.all_low).filter(|&(&high, &low)| high && !low).count();
    let dead_fraction = if channels > 0 { (dead_at_low + dead_at_high) as f64 / channels as f64 } else { 0.0 };
    DeadReport {
        node: node_label(&tracker.node),
        op: tracker.node.op_type().to_owned(),
        tensor: tracker.tensor.clone(),
        relu6: tracker.node.op_type() == "Clip" && tracker.low == Some(0.0) && tracker.high == Some(6.0),
        low_bound: tracker.low.map(f64::from),
        high_bound: tracker.high.map(f64::from),
        axis: tracker.axis,
        channels,
        dead_at_low,
        dead_at_high,
        dead_fraction,
        flagged: dead_fraction > DEAD_FRACTION_LIMIT,
    }
}

fn saturation_section(saturation: &[SaturationTracker]) -> Section<SaturationReport> {
    let rows = saturation.iter().map(saturation_report).collect();
    Section::new(SATURATION, SATURATION_LIMIT, rows, |s| s.flagged)
}

fn saturation_report(tracker: &SaturationTracker) -> SaturationReport {
    let fraction = if tracker.values > 0 { tracker.saturated as f64 / tracker.values as f64 } else { 0.0 };
    SaturationReport {
        node: node_label(&tracker.node),
        op: tracker.node.op_type().to_owned(),
        tensor: tracker.tensor.clone(),
        limit: f64::from(tracker.limit),
        values: tracker.values,
        saturated: tracker.saturated,
        fraction,
        flagged: fraction > SATURATION_LIMIT,
    }
}

/// Without samples there are no shapes: no nodes, and a batch of 0.
fn maccs_section(maccs: Option<&MaccsCount>) -> MaccsSection {
    let (batch, nodes) = match maccs {
        Some(count) => (
            count.batch,
            count
                .nodes
                .iter()
                .map(|n| MaccsNode { node: node_label(&n.node), op: n.node.op_type().to_owned(), maccs: n.maccs })
                .collect(),
        ),
        None => (0, Vec::new()),
    };
    MaccsSection { about: MACCS, per_sample: nodes.iter().filter_map(|n| n.maccs).sum(), batch, nodes }
}

/// The `top` quantized nodes with the lowest SQNR (ties: lowest cosine first).
fn sensitivity_section(sensitivity: &Sensitivity, top: usize) -> SensitivitySection {
    let mut nodes: Vec<SensitiveNode> = sensitivity.trackers.iter().map(sensitive_node).collect();
    nodes.sort_by(|a, b| {
        let key = |n: &SensitiveNode| n.sqnr_db.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b)).then(a.cosine.total_cmp(&b.cosine))
    });
    nodes.truncate(top);
    SensitivitySection {
        about: SENSITIVITY,
        threshold_db: SQNR_LIMIT_DB,
        settings: INT8_SETTINGS.to_owned(),
        quantized_nodes: sensitivity.quantized_nodes,
        error: sensitivity.error.clone(),
        nodes,
    }
}

fn sensitive_node(tracker: &SensitivityTracker) -> SensitiveNode {
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
}

#[cfg(test)]
mod tests {
    use super::super::trackers::{ChannelRanges, Observed};
    use super::*;

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
        let mut tracker = DeadTracker::new(&node, "t", Some(0.0), Some(6.0));
        // [1, 4] along the last axis: channel 0 always 0, channel 1 always 6, channel 2 mixed.
        tracker.observe(&Observed { shape: vec![1, 4], values: vec![0.0, 6.0, 0.0, 1.0] }).unwrap();
        tracker.observe(&Observed { shape: vec![1, 4], values: vec![0.0, 6.0, 3.0, 1.0] }).unwrap();
        let report = dead_report(&tracker);
        assert!(report.relu6);
        assert_eq!((report.dead_at_low, report.dead_at_high, report.channels), (1, 1, 4));
        assert_eq!(report.dead_fraction, 0.5);
        assert!(tracker.observe(&Observed { shape: vec![1, 5], values: vec![0.0; 5] }).is_err());
    }
}
