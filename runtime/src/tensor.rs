//! Typed tensors and requests: the currency the serving layer, preparation, the benchmark and
//! the self-test exchange. A request here has already been checked against a signature
//! (by the gRPC validation, or by the sample reader), so execution can trust its sizes.

use crate::datatype::DataType;

/// A tensor payload in the form the executor needs.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Little-endian, row-major element bytes.
    Raw(Vec<u8>),
    /// One entry per element, already checked to be UTF-8.
    Strings(Vec<String>),
}

/// One input, in the model's input order.
#[derive(Debug, Clone)]
pub struct InputTensor {
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// A request whose every tensor agrees with the model's signature.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub id: String,
    /// One entry per model input, in signature order.
    pub inputs: Vec<InputTensor>,
    /// Indices of the outputs to return, in the order the caller asked for them.
    pub outputs: Vec<usize>,
}

/// One output tensor in wire form.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub raw: Vec<u8>,
}

impl OutputTensor {
    /// The values as f32, for accuracy comparisons; empty for non-float outputs.
    pub fn floats(&self) -> Vec<f32> {
        match self.datatype {
            DataType::Fp32 => self.raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DataType::Fp16 => {
                self.raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            DataType::Fp64 => {
                self.raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
            }
            _ => Vec::new(),
        }
    }
}
