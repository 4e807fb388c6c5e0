//! Running a model as a chain of sessions (calibration's graph segments), handing tensors from
//! one session's outputs to the next one's inputs as ONNX Runtime values: no copy out into a
//! `Vec` and back in, and the memory stays in the allocator the sessions share.

use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;

use crate::datatype::DataType;
use crate::error::RuntimeError;
use crate::execute::{input_value, tensor_bytes};
use crate::signature::{ModelSignature, TensorSpec};
use crate::tensor::InputTensor;

/// A tensor owned by ONNX Runtime, ready to be any session's input.
pub struct HeldTensor(DynValue);

impl HeldTensor {
    /// Copies a request's tensor into ONNX Runtime once, for the first link of a chain.
    pub fn from_input(input: &InputTensor) -> Result<Self, RuntimeError> {
        input_value(input).map(Self).map_err(|err| RuntimeError::Execution(err.to_string()))
    }
}

/// Runs one link: `input` gives each of the session's inputs by name. Every output's
/// little-endian bytes go to `visit` in place; the outputs `keep` names are returned, held, for
/// later links. BYTES outputs are not supported.
pub fn execute_link<'h>(
    session: &mut Session,
    signature: &ModelSignature,
    input: impl Fn(&str) -> Option<&'h HeldTensor>,
    mut visit: impl FnMut(&TensorSpec, &[u8]),
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, HeldTensor)>, RuntimeError> {
    let inputs = signature
        .inputs
        .iter()
        .map(|spec| {
            let held = input(&spec.name).ok_or_else(|| {
                RuntimeError::Execution(format!("input '{}': no earlier link computed it", spec.name))
            })?;
            Ok((spec.name.as_str(), SessionInputValue::from(&held.0)))
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    let mut outputs = session.run(inputs).map_err(|err| RuntimeError::Execution(err.to_string()))?;
    let mut kept = Vec::new();
    for spec in &signature.outputs {
        let fail = |why: String| RuntimeError::Execution(format!("output '{}': {why}", spec.name));
        if spec.datatype == DataType::Bytes {
            return Err(fail("BYTES outputs cannot be visited in place".to_owned()));
        }
        let value = outputs.get(&spec.name).ok_or_else(|| fail("missing from the run".to_owned()))?;
        visit(spec, tensor_bytes(value).map_err(fail)?);
        if keep(&spec.name) {
            let value = outputs.remove(&spec.name).ok_or_else(|| fail("missing from the run".to_owned()))?;
            kept.push((spec.name.clone(), HeldTensor(value)));
        }
    }
    Ok(kept)
}
