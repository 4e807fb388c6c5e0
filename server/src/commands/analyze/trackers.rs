//! The per-tensor statistics of the sample pass: each tracker keeps a fixed-size summary of one
//! tensor (channel ranges, dead-channel masks, saturation counts, moments, drift) that grows with
//! neither the number of samples nor their size. `collect` feeds them; `report` reads them.

use std::collections::HashMap;

use mantissa_quantize::calibration::TensorStatistics;
use mantissa_quantize::onnx::{NodeProto, TensorProto};
use mantissa_quantize::tensor::f32_values;
use mantissa_quantize::types::attribute;

use mantissa_preparation::accuracy::DriftAccumulator;
use mantissa_runtime::DataType;

/// A tensor's values in one sample.
pub(super) struct Observed {
    pub(super) shape: Vec<i64>,
    pub(super) values: Vec<f32>,
}

pub(super) type Sample = HashMap<String, Observed>;

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
pub(super) struct ChannelRanges {
    low: Vec<f32>,
    high: Vec<f32>,
}

impl ChannelRanges {
    pub(super) fn new(channels: usize) -> Self {
        Self { low: vec![f32::INFINITY; channels], high: vec![f32::NEG_INFINITY; channels] }
    }

    pub(super) fn observe(&mut self, values: &[f32], inner: usize) {
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
    pub(super) fn widths(&self) -> Vec<f64> {
        self.low
            .iter()
            .zip(&self.high)
            .map(|(&lo, &hi)| if lo <= hi { f64::from(hi.max(0.0)) - f64::from(lo.min(0.0)) } else { 0.0 })
            .collect()
    }
}

/// Per-channel ranges of a Conv/MatMul/Gemm weight initializer, along its output channels.
pub(super) struct WeightRanges {
    /// The node that reads the weight.
    pub(super) node: NodeProto,
    pub(super) tensor: String,
    pub(super) axis: usize,
    pub(super) ranges: ChannelRanges,
}

/// The weight's ranges, or `None` when its values cannot be read as f32 or do not fill its dims.
pub(super) fn weight_ranges(node: &NodeProto, weight: &TensorProto) -> Option<WeightRanges> {
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
    Some(WeightRanges { node: node.clone(), tensor: weight.name().to_owned(), axis, ranges })
}

/// Ranges of each input of a Concat (0 included, as quantization ranges are).
pub(super) struct JoinTracker {
    pub(super) node: NodeProto,
    inputs: Vec<String>,
    pub(super) ranges: Vec<(f32, f32)>,
}

impl JoinTracker {
    pub(super) fn new(node: &NodeProto, inputs: Vec<String>) -> Self {
        let ranges = vec![(0.0, 0.0); inputs.len()];
        Self { node: node.clone(), inputs, ranges }
    }

    pub(super) fn observe(&mut self, sample: &Sample) {
        for (input, range) in self.inputs.iter().zip(self.ranges.iter_mut()) {
            if let Some(observed) = sample.get(input) {
                for &value in observed.values.iter().filter(|v| v.is_finite()) {
                    range.0 = range.0.min(value);
                    range.1 = range.1.max(value);
                }
            }
        }
    }
}

/// Range, moments and non-finite counts of one model input.
pub(super) struct InputTracker {
    pub(super) name: String,
    pub(super) datatype: DataType,
    /// Shape in the first sample.
    pub(super) shape: Vec<i64>,
    pub(super) stats: TensorStatistics,
    /// Sum of the finite values, for the mean.
    pub(super) sum: f64,
    /// Sum of their squares, for the standard deviation.
    pub(super) sum_sq: f64,
    /// Every finite value so far is a whole number (raw pixels are).
    pub(super) integral: bool,
}

impl InputTracker {
    pub(super) fn new(name: &str, datatype: DataType) -> Self {
        Self {
            name: name.to_owned(),
            datatype,
            shape: Vec::new(),
            stats: TensorStatistics::new(mantissa_quantize::calibration::MIN_BINS),
            sum: 0.0,
            sum_sq: 0.0,
            integral: true,
        }
    }

    pub(super) fn observe(&mut self, observed: &Observed) {
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
}

/// Per-channel ranges of an activation a Conv/MatMul/Gemm reads.
pub(super) struct ActivationSpreadTracker {
    pub(super) tensor: String,
    /// The first compute node that reads the tensor.
    pub(super) node: NodeProto,
    pub(super) axis: Option<usize>,
    /// `None` until the tensor shows up in a sample.
    pub(super) ranges: Option<ChannelRanges>,
}

impl ActivationSpreadTracker {
    pub(super) fn new(tensor: &str, node: &NodeProto) -> Self {
        Self { tensor: tensor.to_owned(), node: node.clone(), axis: None, ranges: None }
    }

    pub(super) fn observe(&mut self, observed: &Observed) -> Result<(), String> {
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

/// Which channels of a ReLU/Clip output sat at a bound on every value of every sample.
pub(super) struct DeadTracker {
    pub(super) node: NodeProto,
    pub(super) tensor: String,
    pub(super) low: Option<f32>,
    pub(super) high: Option<f32>,
    pub(super) axis: Option<usize>,
    /// Per channel: every value so far at the low / high bound.
    pub(super) all_low: Vec<bool>,
    pub(super) all_high: Vec<bool>,
    /// Whether any sample showed the tensor (the masks are empty until one does).
    pub(super) seen: bool,
}

impl DeadTracker {
    pub(super) fn new(node: &NodeProto, tensor: &str, low: Option<f32>, high: Option<f32>) -> Self {
        Self {
            node: node.clone(),
            tensor: tensor.to_owned(),
            low,
            high,
            axis: None,
            all_low: Vec::new(),
            all_high: Vec::new(),
            seen: false,
        }
    }

    pub(super) fn observe(&mut self, observed: &Observed) -> Result<(), String> {
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
}

/// How many inputs of a Sigmoid/Tanh lay beyond its asymptote limit.
pub(super) struct SaturationTracker {
    pub(super) node: NodeProto,
    pub(super) tensor: String,
    pub(super) limit: f32,
    /// Non-NaN values seen.
    pub(super) values: u64,
    pub(super) saturated: u64,
}

impl SaturationTracker {
    pub(super) fn new(node: &NodeProto, tensor: &str, limit: f32) -> Self {
        Self { node: node.clone(), tensor: tensor.to_owned(), limit, values: 0, saturated: 0 }
    }

    pub(super) fn observe(&mut self, observed: &Observed) {
        for &value in observed.values.iter().filter(|v| !v.is_nan()) {
            self.values += 1;
            self.saturated += u64::from(value.abs() > self.limit);
        }
    }
}

/// Drift of one quantized node's output from its FP32 value.
pub(super) struct SensitivityTracker {
    pub(super) node: NodeProto,
    /// The node's output in the FP32 model.
    pub(super) tensor: String,
    /// The tensor of the INT8 model it is compared with.
    pub(super) compared_with: String,
    pub(super) accumulator: DriftAccumulator,
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
}
