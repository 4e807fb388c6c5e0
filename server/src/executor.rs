//! Running one validated request on an ONNX Runtime session: building input tensors from raw
//! bytes, and copying outputs back into the raw little-endian wire layout.

use std::time::Instant;

use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor, ValueType};

use crate::contents::{TensorData, join_bytes_elements};
use crate::datatype::DataType;
use crate::error::ServeError;
use crate::signature::{ModelSignature, TensorSpec};
use crate::statistics::RunTimings;
use crate::validation::{ValidInput, ValidRequest};
use crate::variant_build::ModelSource;

/// Options for building a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Intra-op threads; 0 lets ONNX Runtime pick (all cores, which oversubscribes when
    /// several workers share a machine).
    pub intra_op_threads: u32,
    /// Let idle intra-op threads spin (ONNX Runtime's default) instead of sleeping.
    pub intra_op_spinning: bool,
}

/// One output tensor in wire form.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub raw: Vec<u8>,
}

pub fn open_session(environment: &Environment, model: &ModelSource, config: SessionConfig) -> Result<Session, String> {
    let describe = |err: ort::Error| err.to_string();
    let mut builder = Session::builder(environment)
        .map_err(describe)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|err| err.to_string())?;
    if config.intra_op_threads > 0 {
        builder = builder.with_intra_threads(config.intra_op_threads as usize).map_err(|err| err.to_string())?;
    }
    builder = builder.with_intra_op_spinning(config.intra_op_spinning).map_err(|err| err.to_string())?;
    match model {
        ModelSource::File(path) => builder.commit_from_file(path).map_err(describe),
        ModelSource::Memory(bytes) => builder.commit_from_memory(bytes).map_err(describe),
    }
}

/// A session over an in-memory model for internal work (calibration, drift checks, the
/// budget search, analysis): ONNX Runtime picks the threads, idle threads sleep. With the
/// model's signature.
pub fn open_internal_session(
    environment: &Environment,
    model: &mantissa_quantize::onnx::ModelProto,
) -> Result<(Session, ModelSignature), String> {
    let source = ModelSource::Memory(mantissa_quantize::to_bytes(model).into());
    let session = open_session(environment, &source, SessionConfig { intra_op_threads: 0, intra_op_spinning: false })?;
    let signature = signature_of(&session, Some(0), 0)?;
    Ok((session, signature))
}

fn specs_of(outlets: &[ort::value::Outlet], what: &str) -> Result<Vec<TensorSpec>, String> {
    outlets
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                let datatype = DataType::from_onnx(*ty).ok_or_else(|| {
                    format!("{what} '{}' has element type {ty:?}, which has no KServe datatype", outlet.name())
                })?;
                Ok(TensorSpec { name: outlet.name().to_owned(), datatype, dims: shape.iter().copied().collect() })
            }
            other => {
                Err(format!("{what} '{}' is a {other:?}, not a tensor; only tensors can be served", outlet.name()))
            }
        })
        .collect()
}

/// Reads the session's signature. `max_batch_size` of `None` means: batch up to `default_batch`
/// when every input and output has a dynamic dimension 0, otherwise do not batch.
pub fn signature_of(
    session: &Session,
    max_batch_size: Option<u32>,
    default_batch: u32,
) -> Result<ModelSignature, String> {
    let inputs = specs_of(session.inputs(), "input")?;
    let outputs = specs_of(session.outputs(), "output")?;
    let can_batch = ModelSignature::supports_batching(&inputs, &outputs);
    let max_batch_size = match max_batch_size {
        Some(size) if size > 0 && !can_batch => {
            return Err(format!(
                "policy sets max_batch_size {size}, but not every input and output has a dynamic first dimension"
            ));
        }
        Some(size) => size,
        None if can_batch => default_batch,
        None => 0,
    };
    Ok(ModelSignature { inputs, outputs, max_batch_size })
}

fn input_value(input: &ValidInput) -> Result<DynValue, ort::Error> {
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

fn output_tensor(spec: &TensorSpec, value: &DynValue) -> Result<OutputTensor, ServeError> {
    let fail = |why: String| ServeError::Execution(format!("output '{}': {why}", spec.name));
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
    request: &ValidRequest,
) -> Result<Vec<(&'s str, SessionInputValue<'static>)>, ServeError> {
    signature
        .inputs
        .iter()
        .zip(&request.inputs)
        .map(|(spec, input)| {
            let value =
                input_value(input).map_err(|err| ServeError::Execution(format!("input '{}': {err}", spec.name)))?;
            Ok((spec.name.as_str(), value.into()))
        })
        .collect()
}

/// Runs `request` and returns the requested outputs in the order the client asked for them.
pub fn execute(
    session: &mut Session,
    signature: &ModelSignature,
    request: &ValidRequest,
) -> Result<Vec<OutputTensor>, ServeError> {
    execute_timed(session, signature, request).map(|(outputs, _)| outputs)
}

/// [`execute`], also timing input preparation, the run and output extraction.
pub fn execute_timed(
    session: &mut Session,
    signature: &ModelSignature,
    request: &ValidRequest,
) -> Result<(Vec<OutputTensor>, RunTimings), ServeError> {
    let started = Instant::now();
    let inputs = session_inputs(signature, request)?;
    let prepared = Instant::now();
    let outputs = session.run(inputs).map_err(|err| ServeError::Execution(err.to_string()))?;
    let ran = Instant::now();
    let tensors = request
        .outputs
        .iter()
        .map(|&index| {
            let spec = &signature.outputs[index];
            let value = outputs
                .get(&spec.name)
                .ok_or_else(|| ServeError::Execution(format!("output '{}' missing from the run", spec.name)))?;
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
    request: &ValidRequest,
    mut visit: impl FnMut(&str, &[u8]),
) -> Result<(), ServeError> {
    let inputs = session_inputs(signature, request)?;
    let outputs = session.run(inputs).map_err(|err| ServeError::Execution(err.to_string()))?;
    for &index in &request.outputs {
        let spec = &signature.outputs[index];
        let fail = |why: String| ServeError::Execution(format!("output '{}': {why}", spec.name));
        if spec.datatype == DataType::Bytes {
            return Err(fail("BYTES outputs cannot be visited in place".to_owned()));
        }
        let value = outputs.get(&spec.name).ok_or_else(|| fail("missing from the run".to_owned()))?;
        let tensor = value.view().downcast::<ort::value::DynTensorValueType>().map_err(|err| fail(err.to_string()))?;
        let size = tensor.size().unwrap_or(0);
        let pointer = tensor.data_ptr().cast::<u8>();
        if size > 0 && !pointer.is_null() {
            // SAFETY: a CPU tensor's buffer holds `size` bytes and lives as long as `outputs`.
            visit(&spec.name, unsafe { std::slice::from_raw_parts(pointer, size) });
        }
    }
    Ok(())
}

/// A request of zeros (empty strings for BYTES) with batch 1 and every dynamic dimension 1,
/// used to warm a session before it is reported ready.
pub fn warmup_request(signature: &ModelSignature) -> ValidRequest {
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
            ValidInput { datatype: spec.datatype, shape, data }
        })
        .collect();
    ValidRequest { id: "warmup".to_owned(), inputs, outputs: (0..signature.outputs.len()).collect() }
}
