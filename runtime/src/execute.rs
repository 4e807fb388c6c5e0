//! Running one request on an ONNX Runtime session: building input tensors from raw bytes, and
//! copying outputs back into the raw little-endian wire layout.

use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor};

use crate::bytes_layout::join_bytes_elements;
use crate::datatype::DataType;
use crate::error::RuntimeError;
use crate::signature::{ModelSignature, TensorSpec};
use crate::tensor::{InferenceRequest, InputTensor, OutputTensor, TensorData};

/// Durations of one ONNX Runtime run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunTimings {
    /// Building input tensors (and merging a batch).
    pub input: Duration,
    /// `Session::run`.
    pub infer: Duration,
    /// Copying outputs out (and splitting a batch).
    pub output: Duration,
}

pub(crate) fn input_value(input: &InputTensor) -> Result<DynValue, ort::Error> {
    match &input.data {
        TensorData::Raw(raw) => {
            let mut tensor = DynTensor::new(&Allocator::default(), input.datatype.to_onnx(), input.shape.clone())?;
            if !raw.is_empty() {
                // SAFETY: the tensor was allocated on the CPU for exactly `shape x element size`
                // bytes, which validation checked `raw` holds.
                unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), tensor.data_ptr_mut().cast::<u8>(), raw.len()) };
            }
            Ok(tensor.into_dyn())
        }
        TensorData::Strings(strings) => {
            let shape: Vec<usize> = input.shape.iter().map(|&dim| dim as usize).collect();
            Ok(Tensor::from_string_array((shape, strings.as_slice()))?.into_dyn())
        }
    }
}

fn output_tensor(spec: &TensorSpec, value: &DynValue) -> Result<OutputTensor, RuntimeError> {
    let fail = |why: String| RuntimeError::Execution(format!("output '{}': {why}", spec.name));
    let tensor = value.view().downcast::<ort::value::DynTensorValueType>().map_err(|err| fail(err.to_string()))?;
    let shape: Vec<i64> = tensor.shape().iter().copied().collect();
    let raw = if spec.datatype == DataType::Bytes {
        let (_, strings) = value.try_extract_strings().map_err(|err| fail(err.to_string()))?;
        join_bytes_elements(&strings)
    } else {
        let size = tensor.size().unwrap_or(0);
        let pointer = tensor.data_ptr().cast::<u8>();
        if size == 0 || pointer.is_null() {
            Vec::new()
        } else {
            // SAFETY: a CPU tensor's buffer holds `size` bytes and lives as long as `value`.
            unsafe { std::slice::from_raw_parts(pointer, size) }.to_vec()
        }
    };
    Ok(OutputTensor { name: spec.name.clone(), datatype: spec.datatype, shape, raw })
}

/// The request's tensors as ONNX Runtime values, named after the model's inputs.
fn session_inputs<'s>(
    signature: &'s ModelSignature,
    request: &InferenceRequest,
) -> Result<Vec<(&'s str, SessionInputValue<'static>)>, RuntimeError> {
    signature
        .inputs
        .iter()
        .zip(&request.inputs)
        .map(|(spec, input)| {
            let value =
                input_value(input).map_err(|err| RuntimeError::Execution(format!("input '{}': {err}", spec.name)))?;
            Ok((spec.name.as_str(), value.into()))
        })
        .collect()
}

/// Runs `request` and returns the requested outputs in the order the caller asked for them.
pub fn execute(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
) -> Result<Vec<OutputTensor>, RuntimeError> {
    execute_timed(session, signature, request).map(|(outputs, _)| outputs)
}

/// [`execute`], also timing input preparation, the run and output extraction.
pub fn execute_timed(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
) -> Result<(Vec<OutputTensor>, RunTimings), RuntimeError> {
    let started = Instant::now();
    let inputs = session_inputs(signature, request)?;
    let prepared = Instant::now();
    let outputs = session.run(inputs).map_err(|err| RuntimeError::Execution(err.to_string()))?;
    let ran = Instant::now();
    let tensors = request
        .outputs
        .iter()
        .map(|&index| {
            let spec = &signature.outputs[index];
            let value = outputs
                .get(&spec.name)
                .ok_or_else(|| RuntimeError::Execution(format!("output '{}' missing from the run", spec.name)))?;
            output_tensor(spec, value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timings = RunTimings { input: prepared - started, infer: ran - prepared, output: ran.elapsed() };
    Ok((tensors, timings))
}

/// Runs `request` and hands each requested output's bytes (little-endian, as the model's
/// element type) to `visit` in place, without copying them: for calibration, which streams
/// large activations into statistics. BYTES outputs are not supported.
pub fn execute_visit(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
    mut visit: impl FnMut(&str, &[u8]),
) -> Result<(), RuntimeError> {
    execute_visit_tensors(session, signature, request, |spec, _, bytes| visit(&spec.name, bytes))
}

/// [`execute_visit`], also handing over each output's spec and shape.
pub fn execute_visit_tensors(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
    mut visit: impl FnMut(&TensorSpec, &[i64], &[u8]),
) -> Result<(), RuntimeError> {
    let inputs = session_inputs(signature, request)?;
    let outputs = session.run(inputs).map_err(|err| RuntimeError::Execution(err.to_string()))?;
    for &index in &request.outputs {
        let spec = &signature.outputs[index];
        let fail = |why: String| RuntimeError::Execution(format!("output '{}': {why}", spec.name));
        if spec.datatype == DataType::Bytes {
            return Err(fail("BYTES outputs cannot be visited in place".to_owned()));
        }
        let value = outputs.get(&spec.name).ok_or_else(|| fail("missing from the run".to_owned()))?;
        let tensor = value.view().downcast::<ort::value::DynTensorValueType>().map_err(|err| fail(err.to_string()))?;
        let shape: Vec<i64> = tensor.shape().iter().copied().collect();
        let bytes = tensor_bytes(value).map_err(fail)?;
        visit(spec, &shape, bytes);
    }
    Ok(())
}

/// A request of zeros (empty strings for BYTES) with batch 1 and every dynamic dimension 1,
/// used to warm a session before it is reported ready.
pub fn warmup_request(signature: &ModelSignature) -> InferenceRequest {
    let inputs = signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<i64> = spec.dims.iter().map(|&dim| if dim < 0 { 1 } else { dim }).collect();
            let elements: usize = shape.iter().map(|&dim| dim as usize).product();
            let data = match spec.datatype.element_size() {
                Some(size) => TensorData::Raw(vec![0; elements * size]),
                None => TensorData::Strings(vec![String::new(); elements]),
            };
            InputTensor { datatype: spec.datatype, shape, data }
        })
        .collect();
    InferenceRequest { id: "warmup".to_owned(), inputs, outputs: (0..signature.outputs.len()).collect() }
}

/// A CPU tensor's bytes, borrowed from the value.
pub(crate) fn tensor_bytes(value: &DynValue) -> Result<&[u8], String> {
    let tensor = value.view().downcast::<ort::value::DynTensorValueType>().map_err(|err| err.to_string())?;
    let size = tensor.size().unwrap_or(0);
    let pointer = tensor.data_ptr().cast::<u8>();
    if size == 0 || pointer.is_null() {
        return Ok(&[]);
    }
    // SAFETY: a CPU tensor's buffer holds `size` bytes and lives as long as `value`.
    Ok(unsafe { std::slice::from_raw_parts(pointer, size) })
}
