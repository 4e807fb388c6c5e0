//! Tensor element types and their names in each vocabulary: KServe v2 datatype strings,
//! Triton's `DataType` enum, and ONNX Runtime's element types.

use std::fmt;

use ort::value::TensorElementType;

/// An element type Mantissa can carry over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    /// Variable-length byte strings (ONNX `string`); each element travels as a 4-byte
    /// little-endian length followed by its bytes.
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The KServe v2 datatype string.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|datatype| datatype.as_str() == name)
    }

    /// Bytes per element, or `None` for variable-length BYTES.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Triton's `inference.DataType` enum value (model_config.proto).
    pub fn triton_enum(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
            DataType::Bf16 => 14,
        }
    }

    pub fn from_onnx(element: TensorElementType) -> Option<Self> {
        Some(match element {
            TensorElementType::Bool => DataType::Bool,
            TensorElementType::Uint8 => DataType::Uint8,
            TensorElementType::Uint16 => DataType::Uint16,
            TensorElementType::Uint32 => DataType::Uint32,
            TensorElementType::Uint64 => DataType::Uint64,
            TensorElementType::Int8 => DataType::Int8,
            TensorElementType::Int16 => DataType::Int16,
            TensorElementType::Int32 => DataType::Int32,
            TensorElementType::Int64 => DataType::Int64,
            TensorElementType::Float16 => DataType::Fp16,
            TensorElementType::Bfloat16 => DataType::Bf16,
            TensorElementType::Float32 => DataType::Fp32,
            TensorElementType::Float64 => DataType::Fp64,
            TensorElementType::String => DataType::Bytes,
            _ => return None,
        })
    }

    pub fn to_onnx(self) -> TensorElementType {
        match self {
            DataType::Bool => TensorElementType::Bool,
            DataType::Uint8 => TensorElementType::Uint8,
            DataType::Uint16 => TensorElementType::Uint16,
            DataType::Uint32 => TensorElementType::Uint32,
            DataType::Uint64 => TensorElementType::Uint64,
            DataType::Int8 => TensorElementType::Int8,
            DataType::Int16 => TensorElementType::Int16,
            DataType::Int32 => TensorElementType::Int32,
            DataType::Int64 => TensorElementType::Int64,
            DataType::Fp16 => TensorElementType::Float16,
            DataType::Bf16 => TensorElementType::Bfloat16,
            DataType::Fp32 => TensorElementType::Float32,
            DataType::Fp64 => TensorElementType::Float64,
            DataType::Bytes => TensorElementType::String,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_every_vocabulary() {
        for datatype in DataType::ALL {
            assert_eq!(DataType::parse(datatype.as_str()), Some(datatype));
            assert_eq!(DataType::from_onnx(datatype.to_onnx()), Some(datatype));
        }
        let mut enums: Vec<i32> = DataType::ALL.iter().map(|d| d.triton_enum()).collect();
        enums.sort_unstable();
        assert_eq!(enums, (1..=14).collect::<Vec<_>>());
        assert_eq!(DataType::parse("FLOAT32"), None);
    }
}
