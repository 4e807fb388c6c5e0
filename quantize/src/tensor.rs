//! Reading, building and rewriting tensor values held in `TensorProto`s.

use half::f16;

use crate::elem;
use crate::onnx::TensorProto;

/// Largest finite FP16 value.
pub const FP16_MAX: f32 = 65504.0;

/// The values of a FLOAT tensor, from `raw_data` or `float_data`.
pub fn f32_values(tensor: &TensorProto) -> Option<Vec<f32>> {
    if tensor.data_type() != elem::FLOAT {
        return None;
    }
    match &tensor.raw_data {
        Some(raw) => Some(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        None => Some(tensor.float_data.clone()),
    }
}

/// Result of narrowing FP32 values to FP16.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Narrowing {
    /// Finite values beyond ±65504, clamped to the largest FP16 value.
    pub clamped: usize,
}

/// Rewrites a FLOAT tensor in place as FLOAT16, clamping out-of-range finite values.
/// Returns `None` (and leaves the tensor alone) when it is not a FLOAT tensor.
pub fn narrow_to_f16(tensor: &mut TensorProto) -> Option<Narrowing> {
    let values = f32_values(tensor)?;
    let mut narrowing = Narrowing::default();
    let mut raw = Vec::with_capacity(values.len() * 2);
    for value in values {
        let clamped = if value.is_finite() && value.abs() > FP16_MAX {
            narrowing.clamped += 1;
            FP16_MAX.copysign(value)
        } else {
            value
        };
        raw.extend_from_slice(&f16::from_f32(clamped).to_le_bytes());
    }
    tensor.float_data.clear();
    tensor.raw_data = Some(raw);
    tensor.data_type = Some(elem::FLOAT16);
    Some(narrowing)
}

/// A FLOAT tensor holding `values` as little-endian `raw_data`.
pub(crate) fn float_tensor(name: &str, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims,
        data_type: Some(elem::FLOAT),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An INT8 tensor holding `values` as `raw_data`.
pub(crate) fn int8_tensor(name: &str, dims: Vec<i64>, values: &[i8]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims,
        data_type: Some(elem::INT8),
        raw_data: Some(values.iter().map(|v| *v as u8).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float_tensor(values: &[f32]) -> TensorProto {
        TensorProto {
            dims: vec![values.len() as i64],
            data_type: Some(elem::FLOAT),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn narrowing_clamps_out_of_range_values_and_counts_them() {
        let mut tensor = float_tensor(&[1.5, -1e8, 7e4, f32::INFINITY]);
        let narrowing = narrow_to_f16(&mut tensor).unwrap();
        assert_eq!(narrowing.clamped, 2);
        assert_eq!(tensor.data_type(), elem::FLOAT16);
        let raw = tensor.raw_data.unwrap();
        let values: Vec<f32> = raw.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(values, vec![1.5, -65504.0, 65504.0, f32::INFINITY]);
    }

    #[test]
    fn float_data_field_is_read_too() {
        let tensor = TensorProto { data_type: Some(elem::FLOAT), float_data: vec![2.0, 3.0], ..Default::default() };
        assert_eq!(f32_values(&tensor), Some(vec![2.0, 3.0]));
        let ints = TensorProto { data_type: Some(elem::INT64), ..Default::default() };
        assert_eq!(f32_values(&ints), None);
    }
}
