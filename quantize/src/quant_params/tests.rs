//! Scales, zero points, per-channel weights, int32 biases and MatMulNBits blocks.

use super::*;
use crate::calibration::{CalibrationMethod, DEFAULT_BINS, TensorStatistics};
use crate::test_support::Rng;

#[test]
fn degenerate_statistics_calibrate_to_a_unit_scale() {
    // Statistics without a finite non-zero value calibrate to (0, 0), which has no normal
    // positive scale.
    let empty = TensorStatistics::new(DEFAULT_BINS);
    let mut nans = TensorStatistics::new(DEFAULT_BINS);
    nans.observe(&[f32::NAN, f32::NAN]);
    let mut zeros = TensorStatistics::new(DEFAULT_BINS);
    zeros.observe(&[0.0, -0.0, 0.0]);
    let mut infinities = TensorStatistics::new(DEFAULT_BINS);
    infinities.observe(&[f32::INFINITY]);
    let methods = [
        CalibrationMethod::MinMax,
        CalibrationMethod::Percentile(99.9),
        CalibrationMethod::Entropy,
        CalibrationMethod::Mse,
    ];
    for stats in [&empty, &nans, &zeros, &infinities] {
        for method in methods {
            for symmetric in [false, true] {
                let (lo, hi) = stats.range_with(method, symmetric);
                let (scale, zero_point) = uint8_asymmetric(lo, hi, false);
                assert_eq!((scale, zero_point), (1.0, 0));
            }
        }
    }
}

#[test]
fn uint8_params_represent_zero_exactly() {
    for (lo, hi) in [(-1.0f32, 1.0f32), (-0.3, 5.7), (0.0, 6.0), (-2.5, 0.0), (0.5, 2.0), (-3.0, -1.0)] {
        for reduce_range in [false, true] {
            let (scale, zero_point) = uint8_asymmetric(lo, hi, reduce_range);
            let qmax = if reduce_range { 127.0 } else { 255.0 };
            assert!(scale > 0.0 && scale.is_finite());
            assert!(f32::from(zero_point) <= qmax);
            // quantize(0) = round(0 / scale) + zp = zp, and it dequantizes to exactly 0.
            let q = ((0.0 / scale).round_ties_even() + f32::from(zero_point)).clamp(0.0, qmax);
            assert_eq!((q - f32::from(zero_point)) * scale, 0.0);
            // The representable range covers [min(lo, 0), max(hi, 0)] within half a step.
            let lowest = -f32::from(zero_point) * scale;
            let highest = (qmax - f32::from(zero_point)) * scale;
            assert!(lowest <= lo.min(0.0) + scale / 2.0 + 1e-6, "{lo} {hi}: {lowest}");
            assert!(highest >= hi.max(0.0) - scale / 2.0 - 1e-6, "{lo} {hi}: {highest}");
        }
    }
    assert_eq!(uint8_asymmetric(0.0, 6.0, false), (6.0 / 255.0, 0));
    assert_eq!(uint8_asymmetric(-2.55, 0.0, false).1, 255);
    // 1 / (2 / 255) is 127.5 in exact arithmetic; the f32 scale decides which neighbour wins.
    assert!([127, 128].contains(&uint8_asymmetric(-1.0, 1.0, false).1));
    assert_eq!(uint8_asymmetric(-1.0, 1.0, true), (2.0 / 127.0, 64));
    assert_eq!(uint8_asymmetric(f32::NAN, f32::NAN, false), (1.0, 0));
    assert_eq!(uint8_asymmetric(0.0, 1e-40, false), (1.0, 0));
    let (scale, _) = uint8_asymmetric(f32::NEG_INFINITY, f32::INFINITY, false);
    assert!(scale.is_finite() && scale > 0.0);
}

#[test]
fn int8_symmetric_params() {
    assert_eq!(int8_symmetric(-2.0, 1.0, false), (2.0 / 127.0, 0));
    assert_eq!(int8_symmetric(-0.5, 3.0, true), (3.0 / 63.0, 0));
    assert_eq!(int8_symmetric(0.0, 0.0, false), (1.0, 0));
    assert_eq!(int8_symmetric(f32::NAN, 1.0, false), (1.0 / 127.0, 0));
}

#[test]
fn per_channel_outlier_channel_does_not_affect_others() {
    // Conv weight [out=4, in=3, 2, 2], channel 2 holds an outlier.
    let mut rng = Rng(12);
    let shape = [4usize, 3, 2, 2];
    let mut weights = rng.gaussians(48, 0.1);
    weights[2 * 12 + 5] = 50.0;
    let (scales, quantized) = per_channel_int8_symmetric(&weights, &shape, 0);
    assert_eq!(scales.len(), 4);
    assert_eq!(quantized.len(), 48);
    for c in 0..4 {
        let channel = &weights[c * 12..(c + 1) * 12];
        let max_abs = channel.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        assert_eq!(scales[c], max_abs / 127.0, "channel {c}");
        if c != 2 {
            assert!(scales[c] < 0.01, "channel {c} is not stretched by the outlier");
        }
        for (k, &w) in channel.iter().enumerate() {
            let q = quantized[c * 12 + k];
            assert!((-127..=127).contains(&q));
            let error = (f32::from(q) * scales[c] - w).abs();
            assert!(error <= scales[c] * 0.500_01, "channel {c} value {k}: error {error}");
        }
    }
    assert_eq!(quantized[2 * 12 + 5], 127);
}

#[test]
fn per_channel_along_inner_axis_and_edge_cases() {
    // MatMul weight [K=2, N=3] quantized per output column (axis 1).
    let weights = [1.0, -0.5, 0.0, -2.0, 0.25, 0.0];
    let (scales, quantized) = per_channel_int8_symmetric(&weights, &[2, 3], 1);
    assert_eq!(scales, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
    assert_eq!(quantized, vec![64, -127, 0, -127, 64, 0]);
    // Round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, and 127 stays in range.
    let weights = [0.5, 1.5, 2.5, -2.5, 127.0];
    let (scales, quantized) = per_channel_int8_symmetric(&weights, &[1, 5], 0);
    assert_eq!(scales, vec![1.0]);
    assert_eq!(quantized, vec![0, 2, 2, -2, 127]);
    // NaN -> 0, infinity saturates without affecting the scale; tiny channels get scale 1.
    let (scales, quantized) = per_channel_int8_symmetric(&[f32::NAN, f32::INFINITY, 1.27, 1e-42], &[2, 2], 0);
    assert_eq!(scales, vec![1.0, 0.01]);
    assert_eq!(quantized, vec![0, 127, 127, 0]);
    for scale in scales {
        assert!(scale > 0.0 && scale.is_finite());
    }
    assert_eq!(
        try_per_channel_int8_symmetric(&[1.0; 5], &[2, 3], 0),
        Err(CalibrationError::ShapeMismatch { shape: vec![2, 3], expected: 6, actual: 5 })
    );
    assert_eq!(
        try_per_channel_int8_symmetric(&[1.0; 6], &[2, 3], 2),
        Err(CalibrationError::BadAxis { axis: 2, rank: 2 })
    );
    assert_eq!(per_channel_int8_symmetric(&[], &[0, 3], 0), (vec![], vec![]));
}

#[test]
fn bias_int32_rounding_and_saturation() {
    // Scales 0.5 * 0.25 = 0.125: 0.0625 / 0.125 = 0.5 -> 0, 0.1875 -> 1.5 -> 2, -0.3125 -> -2.5 -> -2.
    let bias = [0.0625, 0.1875, -0.3125, 1.0];
    assert_eq!(quantize_bias_int32(&bias, 0.5, &[0.25]), vec![0, 2, -2, 8]);
    assert_eq!(quantize_bias_int32(&bias, 0.5, &[0.25, 0.25, 0.125, 1.0]), vec![0, 2, -5, 2]);
    assert_eq!(quantize_bias_int32(&[1e10, -1e10, f32::NAN], 1e-3, &[1e-3]), vec![i32::MAX, i32::MIN, 0]);
    // Dequantized bias is within half a step of the original.
    let scales = [0.013f32, 0.002, 0.7];
    let bias = [0.123f32, -4.56, 78.9];
    let quantized = quantize_bias_int32(&bias, 0.02, &scales);
    for c in 0..3 {
        let step = 0.02 * scales[c];
        assert!((quantized[c] as f32 * step - bias[c]).abs() <= step * 0.500_01);
    }
}

#[test]
#[should_panic(expected = "weight scales")]
fn bias_with_wrong_scale_count_panics() {
    quantize_bias_int32(&[1.0, 2.0, 3.0], 1.0, &[1.0, 1.0]);
}

#[test]
fn blocks_pack_two_4_bit_codes_per_byte_low_nibble_first() {
    // K = 4, N = 1, one block of 4: symmetric 4-bit, scale = max|w| / 8, zero 8.
    let q = quantize_blocks(&[8.0, -8.0, 4.0, 0.0], 4, 1, 4, 4, true);
    assert_eq!(q.scales, vec![1.0]);
    // codes: 8+8 -> clamp 15, -8+8 = 0, 4+8 = 12, 0+8 = 8
    assert_eq!(q.packed, vec![15, 8 << 4 | 12]);
    assert_eq!(q.zero_points, None);
}

#[test]
fn asymmetric_blocks_carry_zero_points_and_reconstruct_within_half_a_step() {
    let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0).collect();
    let q = quantize_blocks(&values, 32, 2, 8, 16, false);
    assert_eq!(q.blocks, 2);
    let zeros = q.zero_points.as_ref().unwrap();
    for column in 0..2 {
        for row in 0..32 {
            let at = column * 2 + row / 16;
            let code = f32::from(q.packed[at * 16 + row % 16]);
            let restored = (code - f32::from(zeros[at])) * q.scales[at];
            assert!((restored - values[row * 2 + column]).abs() <= q.scales[at] / 2.0 + 1e-6);
        }
    }
}
