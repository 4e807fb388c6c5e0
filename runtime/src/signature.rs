//! What a model takes and returns: tensor names, element types and dimensions, read from the
//! ONNX Runtime session, plus whether dimension 0 is a batch dimension.

use ort::session::Session;
use ort::value::ValueType;

use crate::datatype::DataType;
use crate::error::RuntimeError;

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

fn specs_of(outlets: &[ort::value::Outlet], what: &str) -> Result<Vec<TensorSpec>, RuntimeError> {
    outlets
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                let datatype = DataType::from_onnx(*ty).ok_or_else(|| {
                    RuntimeError::Signature(format!(
                        "{what} '{}' has element type {ty:?}, which has no KServe datatype",
                        outlet.name()
                    ))
                })?;
                Ok(TensorSpec { name: outlet.name().to_owned(), datatype, dims: shape.iter().copied().collect() })
            }
            other => Err(RuntimeError::Signature(format!(
                "{what} '{}' is a {other:?}, not a tensor; only tensors can be served",
                outlet.name()
            ))),
        })
        .collect()
}

/// Reads the session's signature. `max_batch_size` of `None` means: batch up to `default_batch`
/// when every input and output has a dynamic dimension 0, otherwise do not batch.
pub fn signature_of(
    session: &Session,
    max_batch_size: Option<u32>,
    default_batch: u32,
) -> Result<ModelSignature, RuntimeError> {
    let inputs = specs_of(session.inputs(), "input")?;
    let outputs = specs_of(session.outputs(), "output")?;
    let can_batch = ModelSignature::supports_batching(&inputs, &outputs);
    let max_batch_size = match max_batch_size {
        Some(size) if size > 0 && !can_batch => {
            return Err(RuntimeError::Signature(format!(
                "policy sets max_batch_size {size}, but not every input and output has a dynamic first dimension"
            )));
        }
        Some(size) => size,
        None if can_batch => default_batch,
        None => 0,
    };
    Ok(ModelSignature { inputs, outputs, max_batch_size })
}
