//! What a model takes and returns: tensor names, element types and dimensions, read from the
//! ONNX Runtime session, plus whether dimension 0 is a batch dimension.

use crate::datatype::DataType;

/// One input or output of a model. Dimensions of -1 are dynamic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
}

impl TensorSpec {
    /// Dimensions as shown to clients: with -1 for dynamic dimensions.
    pub fn dims_text(&self) -> String {
        format!("{:?}", self.dims)
    }
}

/// The input/output signature of one variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Largest batch along dimension 0; 0 means the model does not batch and every dimension
    /// is part of the shape the client sends as is.
    pub max_batch_size: u32,
}

impl ModelSignature {
    /// True when dimension 0 of every input and output is dynamic, so requests may carry any
    /// number of rows up to `max_batch_size`.
    pub fn supports_batching(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> bool {
        inputs.iter().chain(outputs).all(|spec| spec.dims.first() == Some(&-1))
    }

    pub fn batches(&self) -> bool {
        self.max_batch_size > 0
    }

    pub fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|spec| spec.name.as_str()).collect()
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.outputs.iter().map(|spec| spec.name.as_str()).collect()
    }
}
