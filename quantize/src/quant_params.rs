//! Scale and zero-point math: from a calibrated range to activation parameters, from float
//! weights to per-channel int8 codes, from a float bias to int32, and from a [K, N] matrix to
//! MatMulNBits blocks. Rounding is half to even throughout, as in QuantizeLinear.

use crate::calibration::CalibrationError;
use crate::elem;
use crate::onnx::TensorProto;
use crate::tensor::float_tensor;

/// NaN -> 0, infinities -> the largest finite values.
fn sanitize(x: f32) -> f32 {
    if x.is_nan() { 0.0 } else { x.clamp(-f32::MAX, f32::MAX) }
}

/// Scale and zero point of asymmetric uint8 quantization of `[lo, hi]`, widened to contain 0 so
/// that 0 is exactly representable (it quantizes to the zero point). `reduce_range` uses 7 bits
/// (0..=127). A range too narrow for a normal positive scale gives `(1.0, 0)`.
pub fn uint8_asymmetric(lo: f32, hi: f32, reduce_range: bool) -> (f32, u8) {
    let qmax = if reduce_range { 127.0 } else { 255.0 };
    let lo = sanitize(lo).min(0.0) as f64;
    let hi = sanitize(hi).max(0.0) as f64;
    let scale = ((hi - lo) / qmax) as f32;
    if !(scale.is_finite() && scale >= f32::MIN_POSITIVE) {
        return (1.0, 0);
    }
    let zero_point = (-lo / scale as f64).round_ties_even().clamp(0.0, qmax);
    (scale, zero_point as u8)
}

/// Scale (and zero point 0) of symmetric int8 quantization covering `max(|lo|, |hi|)` with 127
/// steps per side, or 63 with `reduce_range`. A zero range gives scale 1.0.
pub fn int8_symmetric(lo: f32, hi: f32, reduce_range: bool) -> (f32, i8) {
    let qmax = if reduce_range { 63.0 } else { 127.0 };
    let max_abs = sanitize(lo).abs().max(sanitize(hi).abs());
    (symmetric_scale(max_abs, qmax), 0)
}

fn symmetric_scale(max_abs: f32, qmax: f32) -> f32 {
    let scale = max_abs / qmax;
    if scale.is_finite() && scale >= f32::MIN_POSITIVE { scale } else { 1.0 }
}

/// `round_half_to_even(x / scale)` clamped to [-127, 127]; NaN gives 0.
fn quantize_symmetric_int8(x: f32, scale: f32) -> i8 {
    if x.is_nan() {
        return 0;
    }
    (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Per-channel symmetric int8 quantization of a weight tensor (row-major `shape`) along `axis`
/// (the output channels: 0 for Conv and Gemm with transB, 1 for MatMul's `[K, N]`): one scale per
/// channel, `max|w| / 127`, and values rounded half to even and clamped to [-127, 127]. A channel
/// of zeros (or subnormals) gets scale 1.0; NaN quantizes to 0 and infinities saturate without
/// affecting the scale.
///
/// # Panics
/// If `axis` is not an axis of `shape` or `shape` does not match `weights.len()`; see
/// [`try_per_channel_int8_symmetric`].
pub fn per_channel_int8_symmetric(weights: &[f32], shape: &[usize], axis: usize) -> (Vec<f32>, Vec<i8>) {
    match try_per_channel_int8_symmetric(weights, shape, axis) {
        Ok(result) => result,
        Err(err) => panic!("{err}"),
    }
}

/// [`per_channel_int8_symmetric`] returning an error for a bad axis or shape.
pub fn try_per_channel_int8_symmetric(
    weights: &[f32],
    shape: &[usize],
    axis: usize,
) -> Result<(Vec<f32>, Vec<i8>), CalibrationError> {
    try_per_channel_symmetric(weights, shape, axis, false)
}

/// Per-channel symmetric weights in 8 bits, or in 7 bits (±63) with `reduce_range`: on CPUs
/// without VNNI, u8 x s8 products are summed in pairs into int16 (VPMADDUBSW), which
/// saturates unless one operand leaves a bit of headroom.
pub fn per_channel_symmetric(weights: &[f32], shape: &[usize], axis: usize, reduce_range: bool) -> (Vec<f32>, Vec<i8>) {
    match try_per_channel_symmetric(weights, shape, axis, reduce_range) {
        Ok(result) => result,
        Err(err) => panic!("{err}"),
    }
}

fn try_per_channel_symmetric(
    weights: &[f32],
    shape: &[usize],
    axis: usize,
    reduce_range: bool,
) -> Result<(Vec<f32>, Vec<i8>), CalibrationError> {
    let limit = if reduce_range { 63.0 } else { 127.0 };
    if axis >= shape.len() {
        return Err(CalibrationError::BadAxis { axis, rank: shape.len() });
    }
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(weights.len()) {
        return Err(CalibrationError::ShapeMismatch {
            shape: shape.to_vec(),
            expected: expected.unwrap_or(usize::MAX),
            actual: weights.len(),
        });
    }
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let channel_of = |i: usize| (i / inner) % channels;
    let mut max_abs = vec![0.0f32; channels];
    for (i, &w) in weights.iter().enumerate() {
        if w.is_finite() {
            let c = channel_of(i);
            max_abs[c] = max_abs[c].max(w.abs());
        }
    }
    let scales: Vec<f32> = max_abs.iter().map(|&m| symmetric_scale(m, limit)).collect();
    let quantized = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| quantize_symmetric_int8(w, scales[channel_of(i)]).clamp(-(limit as i8), limit as i8))
        .collect();
    Ok((scales, quantized))
}

/// Int32 bias of a quantized Conv/Gemm/MatMul: `round_half_to_even(bias[c] / (input_scale *
/// weight_scales[c]))`, saturating at the i32 limits (NaN gives 0). `weight_scales` holds one
/// scale per channel or a single per-tensor scale. The bias's DequantizeLinear scale must be the
/// same f32 product `input_scale * weight_scales[c]`.
///
/// # Panics
/// If `weight_scales` has neither one element nor one per bias element.
pub fn quantize_bias_int32(bias: &[f32], input_scale: f32, weight_scales: &[f32]) -> Vec<i32> {
    assert!(
        weight_scales.len() == 1 || weight_scales.len() == bias.len(),
        "{} weight scales for a bias of {} elements",
        weight_scales.len(),
        bias.len()
    );
    bias.iter()
        .enumerate()
        .map(|(c, &b)| {
            let weight_scale = if weight_scales.len() == 1 { weight_scales[0] } else { weight_scales[c] };
            let scale = input_scale * weight_scale;
            // `as` saturates at the i32 limits and maps NaN to 0.
            (b as f64 / scale as f64).round_ties_even() as i32
        })
        .collect()
}

/// Scale and zero point of one quantized tensor (an activation, or a constant stored like one),
/// with the element type QuantizeLinear produces for it.
pub(crate) struct QuantParams {
    pub(crate) scale: f32,
    /// The zero point's byte; `zero_point_type` (UINT8 or INT8) says how to read it.
    zero_point: u8,
    pub(crate) zero_point_type: i32,
}

impl QuantParams {
    /// uint8 asymmetric parameters for `[lo, hi]` (8 bits: activations never use reduce_range).
    pub(crate) fn uint8(lo: f32, hi: f32) -> Self {
        let (scale, zero_point) = uint8_asymmetric(lo, hi, false);
        QuantParams { scale, zero_point, zero_point_type: elem::UINT8 }
    }

    /// int8 symmetric parameters (zero point 0) for `[lo, hi]`.
    pub(crate) fn int8(lo: f32, hi: f32) -> Self {
        let (scale, zero_point) = int8_symmetric(lo, hi, false);
        QuantParams { scale, zero_point: zero_point as u8, zero_point_type: elem::INT8 }
    }

    /// One value's code, as the byte QuantizeLinear would store.
    pub(crate) fn code(&self, value: f32) -> u8 {
        let (low, high) = if self.zero_point_type == elem::UINT8 { (0.0, 255.0) } else { (-127.0, 127.0) };
        let zero_point = if self.zero_point_type == elem::UINT8 {
            f32::from(self.zero_point)
        } else {
            f32::from(self.zero_point as i8)
        };
        let code = ((value / self.scale).round_ties_even() + zero_point).clamp(low, high);
        if self.zero_point_type == elem::UINT8 { code as u8 } else { code as i8 as u8 }
    }

    /// The scale and zero-point initializers, named `scale_name` and `zero_name`.
    pub(crate) fn initializers(&self, scale_name: &str, zero_name: &str) -> [TensorProto; 2] {
        [
            float_tensor(scale_name, vec![], &[self.scale]),
            TensorProto {
                name: Some(zero_name.to_owned()),
                data_type: Some(self.zero_point_type),
                raw_data: Some(vec![self.zero_point]),
                ..Default::default()
            },
        ]
    }
}

/// Block-wise quantization of a [K, N] matrix in MatMulNBits' layout: for each column n and
/// block b of `block_size` rows, a scale and a zero point; values packed as
/// `[N][blocks][block_size * bits / 8]` bytes (4-bit: two per byte, low nibble first).
pub(crate) struct BlockQuantized {
    pub(crate) packed: Vec<u8>,
    pub(crate) scales: Vec<f32>,
    /// Packed zero points, `None` when symmetric (MatMulNBits then assumes 2^(bits-1)).
    pub(crate) zero_points: Option<Vec<u8>>,
    pub(crate) blocks: usize,
}

/// Quantizes `values` (row-major [K, N]) into `bits`-bit blocks of `block_size` rows per
/// column, symmetric around 2^(bits-1) or spanning each block's own min/max.
pub(crate) fn quantize_blocks(
    values: &[f32],
    k: usize,
    n: usize,
    bits: u8,
    block_size: usize,
    symmetric: bool,
) -> BlockQuantized {
    let blocks = k.div_ceil(block_size);
    let levels = (1u32 << bits) as f32;
    let middle = (1u32 << (bits - 1)) as f32;
    let mut codes = vec![0u8; n * blocks * block_size];
    let mut scales = vec![0f32; n * blocks];
    let mut zeros = vec![0u8; n * blocks];
    for column in 0..n {
        for block in 0..blocks {
            let rows = block * block_size..((block + 1) * block_size).min(k);
            let weights: Vec<f32> = rows.clone().map(|row| values[row * n + column]).collect();
            let (scale, zero) = if symmetric {
                let max = weights.iter().fold(0f32, |m, w| m.max(w.abs()));
                (if max > 0.0 { max / middle } else { 1.0 }, middle)
            } else {
                let lo = weights.iter().fold(0f32, |m, &w| m.min(w));
                let hi = weights.iter().fold(0f32, |m, &w| m.max(w));
                let scale = if hi > lo { (hi - lo) / (levels - 1.0) } else { 1.0 };
                (scale, (-lo / scale).round_ties_even().clamp(0.0, levels - 1.0))
            };
            let at = column * blocks + block;
            scales[at] = scale;
            zeros[at] = zero as u8;
            for (offset, weight) in weights.iter().enumerate() {
                let code = (weight / scale).round_ties_even() + zero;
                codes[at * block_size + offset] = code.clamp(0.0, levels - 1.0) as u8;
            }
        }
    }
    let pack = |values: &[u8]| -> Vec<u8> {
        values.chunks(2).map(|pair| pair[0] | (pair.get(1).copied().unwrap_or(0) << 4)).collect()
    };
    let (packed, zero_points) = if bits == 4 {
        let zero_points = (!symmetric).then(|| zeros.chunks(blocks).flat_map(pack).collect());
        (pack(&codes), zero_points)
    } else {
        (codes, (!symmetric).then_some(zeros))
    };
    BlockQuantized { packed, scales, zero_points, blocks }
}

#[cfg(test)]
mod tests;
