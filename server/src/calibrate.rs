//! Static INT8 calibration: runs the FP32 model through ONNX Runtime on calibration samples
//! and streams every tensor that will get a Q/DQ pair into fixed-size statistics, so memory
//! stays bounded by one sample's activations whatever the number of samples.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mantissa_quantize::calibration::{CalibrationOptions, TensorStatistics};
use mantissa_quantize::int8_static::Ranges;
use mantissa_quantize::onnx::{ModelProto, TypeProto, ValueInfoProto, type_proto};
use ort::environment::Environment;

use crate::contents::TensorData;
use crate::datatype::DataType;
use crate::executor::{SessionConfig, execute, open_session, signature_of};
use crate::npz::read_inputs;
use crate::signature::ModelSignature;
use crate::validation::{ValidInput, ValidRequest};
use crate::variant_build::ModelSource;

/// The `.npz`/`.npy` files of a calibration or holdout directory, sorted (or the one file,
/// when `directory` is a file).
pub fn sample_files(directory: &Path) -> Result<Vec<PathBuf>, String> {
    if directory.is_file() {
        return Ok(vec![directory.to_owned()]);
    }
    let entries =
        std::fs::read_dir(directory).map_err(|err| format!("calibration data {}: {err}", directory.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "npz" || e == "npy"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("calibration data {} holds no .npz or .npy files", directory.display()));
    }
    Ok(files)
}

/// Reads one sample and checks it against the model's inputs: every input present, with the
/// model's element type and rank, fixed dimensions matching.
pub fn load_sample(path: &Path, signature: &ModelSignature) -> Result<ValidRequest, String> {
    let wanted: Vec<(String, DataType)> = signature.inputs.iter().map(|s| (s.name.clone(), s.datatype)).collect();
    let arrays = read_inputs(path, &wanted)?;
    let mut inputs = Vec::with_capacity(arrays.len());
    for (array, spec) in arrays.into_iter().zip(&signature.inputs) {
        let shape: Vec<i64> = array.shape.iter().map(|&d| d as i64).collect();
        let matches =
            shape.len() == spec.dims.len() && shape.iter().zip(&spec.dims).all(|(&got, &want)| want < 0 || got == want);
        if !matches {
            return Err(format!(
                "{}: input '{}': expected shape {:?}, got {shape:?}",
                path.display(),
                spec.name,
                spec.dims
            ));
        }
        inputs.push(ValidInput { datatype: array.datatype, shape, data: TensorData::Raw(array.raw) });
    }
    Ok(ValidRequest { id: path.display().to_string(), inputs, outputs: Vec::new() })
}

/// Runs the FP32 model once on the first sample of `data_dir`, as inference would: the
/// yardstick for calibration's memory (calibration must stay within twice what this takes).
pub fn run_first_sample(environment: &Environment, model: &ModelProto, data_dir: &Path) -> Result<(), String> {
    let file = sample_files(data_dir)?.into_iter().next().ok_or("no calibration samples")?;
    let source = ModelSource::Memory(mantissa_quantize::to_bytes(model).into());
    let mut session =
        open_session(environment, &source, SessionConfig { intra_op_threads: 0, intra_op_spinning: false })?;
    let signature = signature_of(&session, Some(0), 0)?;
    let mut request = load_sample(&file, &signature)?;
    request.outputs = (0..signature.outputs.len()).collect();
    execute(&mut session, &signature, &request).map_err(|err| format!("{}: {err}", file.display()))?;
    Ok(())
}

/// Calibrated ranges of `tensors` over every sample in `data_dir`.
pub fn calibrate(
    environment: &Environment,
    model: &ModelProto,
    tensors: &[String],
    data_dir: &Path,
    options: &CalibrationOptions,
    label: &str,
) -> Result<Ranges, String> {
    let started = Instant::now();
    let files = sample_files(data_dir)?;
    let mut probe = model.clone();
    let graph = probe.graph.as_mut().ok_or("model has no graph")?;
    for tensor in tensors {
        if !graph.output.iter().any(|o| o.name() == tensor) {
            graph.output.push(ValueInfoProto {
                name: Some(tensor.clone()),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(1), shape: None })),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    let bytes = mantissa_quantize::to_bytes(&probe);
    let source = ModelSource::Memory(bytes.into());
    let mut session =
        open_session(environment, &source, SessionConfig { intra_op_threads: 0, intra_op_spinning: false })?;
    let signature = signature_of(&session, Some(0), 0)?;
    let wanted: Vec<usize> = tensors
        .iter()
        .map(|t| {
            signature.outputs.iter().position(|o| &o.name == t).ok_or_else(|| format!("tensor '{t}' is not observable"))
        })
        .collect::<Result<_, _>>()?;
    let mut statistics: HashMap<String, TensorStatistics> =
        tensors.iter().map(|t| (t.clone(), TensorStatistics::new(options.bins))).collect();
    for (done, file) in files.iter().enumerate() {
        let mut request = load_sample(file, &signature)?;
        request.outputs = wanted.clone();
        let outputs =
            execute(&mut session, &signature, &request).map_err(|err| format!("{}: {err}", file.display()))?;
        for output in outputs {
            let values: Vec<f32> =
                output.raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(stats) = statistics.get_mut(&output.name) {
                stats.observe(&values);
            }
        }
        tracing::info!(
            variant = label,
            pass = "int8 calibration",
            samples_done = done + 1,
            samples_total = files.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "calibrating"
        );
    }
    let method = options.method();
    Ok(statistics.into_iter().map(|(name, stats)| (name, stats.range_with(method, options.symmetric))).collect())
}
