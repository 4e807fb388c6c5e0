//! Static INT8 calibration: runs the FP32 model through ONNX Runtime on calibration samples
//! and streams every tensor that will get a Q/DQ pair into fixed-size statistics, so memory
//! stays bounded by one sample's activations whatever the number of samples, and each sample
//! runs about once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use mantissa_quantize::calibration::{CalibrationMethod, CalibrationOptions, TensorStatistics};
use mantissa_quantize::onnx::{ModelProto, TypeProto, ValueInfoProto, type_proto};
use mantissa_quantize::passes::int8::Ranges;
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{Environment, ModelSignature, execute, execute_visit, open_internal_session};

use crate::error::PrepareError;
use crate::segmented::SegmentedObserver;

/// What one calibration observes, and on which data.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationJob<'a> {
    /// The FP32 model.
    pub model: &'a ModelProto,
    /// Tensors whose ranges are wanted.
    pub tensors: &'a [String],
    /// Of those, the ones that get their observed `[min, max]` whatever the method (see
    /// [`mantissa_quantize::passes::int8::tensors_needing_full_range`]).
    pub full_range: &'a [String],
    /// A directory of `.npz`/`.npy` samples, or one file.
    pub data: &'a Path,
    pub options: &'a CalibrationOptions,
    /// `model:variant`, for progress logs.
    pub label: &'a str,
}

/// Runs the FP32 model once on the first sample of `data_dir`, as inference would: the
/// yardstick for calibration's memory (calibration must stay within twice what this takes).
/// Returns the model's signature.
pub fn run_first_sample(
    environment: &Environment,
    model: &ModelProto,
    data_dir: &Path,
) -> Result<ModelSignature, PrepareError> {
    let Some(file) = sample_files(data_dir)?.into_iter().next() else {
        return Err(PrepareError::Observation("no calibration samples".to_owned()));
    };
    let (mut session, signature) = open_internal_session(environment, model)?;
    let mut request = load_sample(&file, &signature)?;
    request.outputs = (0..signature.outputs.len()).collect();
    execute(&mut session, &signature, &request)
        .map_err(|source| PrepareError::Sample { path: file.display().to_string(), source })?;
    Ok(signature)
}

/// Extra outputs one calibration run may return at least, whatever inference measured.
const GROUP_FLOOR_BYTES: usize = 8 << 20;

/// What one FP32 inference run on the first sample adds to the process (its session, weights
/// and activations): the bytes of extra outputs one calibration run may hold, so calibration
/// peaks within about twice FP32 inference. ONNX Runtime keeps every declared graph output
/// alive until a run ends, so the outputs of one group are what calibration adds.
pub(crate) struct InferenceYardstick {
    pub(crate) budget_bytes: usize,
    pub(crate) signature: ModelSignature,
}

pub(crate) fn measure_inference(
    environment: &Environment,
    model: &ModelProto,
    data: &Path,
) -> Result<InferenceYardstick, PrepareError> {
    let before = mantissa_runtime::memory::rss_bytes();
    let (ran, peak) = mantissa_runtime::memory::measure(|| run_first_sample(environment, model, data));
    let signature = ran?;
    mantissa_runtime::memory::release_free_memory();
    let added = match (before, peak) {
        (Some(before), Some(peak)) => peak.saturating_sub(before) as usize,
        _ => 0,
    };
    Ok(InferenceYardstick { budget_bytes: added.max(GROUP_FLOOR_BYTES), signature })
}

/// [`measure_inference`]'s budget alone.
pub(crate) fn group_budget_bytes(
    environment: &Environment,
    model: &ModelProto,
    data: &Path,
) -> Result<usize, PrepareError> {
    Ok(measure_inference(environment, model, data)?.budget_bytes)
}

type Statistics = HashMap<String, TensorStatistics>;

/// Calibrated ranges of the job's tensors over every sample of its data.
///
/// Each sample flows once through consecutive segments of the graph, each segment's session
/// declaring a memory budget's worth of the wanted tensors (see [`crate::segmented`]); the
/// budget is what inference itself adds ([`measure_inference`]). A model that cannot be cut
/// (an output no tensor type describes, a value that is not a tensor) is observed in groups
/// instead, the whole model re-run over every sample for each group.
pub fn calibrate(environment: &Environment, job: &CalibrationJob<'_>) -> Result<Ranges, PrepareError> {
    let started = Instant::now();
    let files = sample_files(job.data)?;
    let _mapped = mantissa_runtime::memory::MapLargeBlocks::new();
    let yardstick = measure_inference(environment, job.model, job.data)?;
    let method = job.options.method();
    // MinMax ranges need no histograms, which cost more per value than the min and max.
    let fresh = || -> Statistics {
        let statistics_of = |tensor: &String| {
            if method == CalibrationMethod::MinMax || job.full_range.contains(tensor) {
                TensorStatistics::min_max_only()
            } else {
                TensorStatistics::new(job.options.bins)
            }
        };
        job.tensors.iter().map(|t| (t.clone(), statistics_of(t))).collect()
    };
    let mut statistics = fresh();
    let progress = Progress { job, samples_total: files.len(), started };
    let how = match observe_segmented(environment, job, &files, &yardstick, &mut statistics, &progress) {
        Ok(segments) => format!("{segments} segments, one pass"),
        Err(SegmentedFailure { on_first_sample: true, reason }) => {
            tracing::warn!(variant = job.label, %reason, "int8 calibration: the model cannot be run in segments; observing tensor groups, one pass over the samples each");
            statistics = fresh();
            let groups =
                observe_in_groups(environment, job, &files, yardstick.budget_bytes, &mut statistics, &progress)?;
            format!("{groups} groups, one pass each")
        }
        Err(SegmentedFailure { reason, .. }) => return Err(*reason),
    };
    tracing::info!(
        variant = job.label,
        pass = "int8 calibration",
        tensors = job.tensors.len(),
        observed = %how,
        samples = files.len(),
        group_budget_mib = yardstick.budget_bytes >> 20,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "calibrated"
    );
    if method != CalibrationMethod::MinMax && !job.full_range.is_empty() {
        tracing::info!(variant = job.label, tensors = ?job.full_range, "int8 calibration: inputs and outputs of max-taking ops keep their observed [min, max]");
    }
    Ok(statistics
        .into_iter()
        .map(|(name, stats)| {
            let method = if job.full_range.contains(&name) { CalibrationMethod::MinMax } else { method };
            (name, stats.range_with(method, job.options.symmetric))
        })
        .collect())
}

/// Progress lines of one calibration.
struct Progress<'a> {
    job: &'a CalibrationJob<'a>,
    samples_total: usize,
    started: Instant,
}

impl Progress<'_> {
    fn sample_done(&self, pass: usize, samples_done: usize) {
        tracing::info!(
            variant = self.job.label,
            pass = "int8 calibration",
            group = pass,
            samples_done,
            samples_total = self.samples_total,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "calibrating"
        );
    }
}

/// Why observing in segments failed, and whether it failed before any sample was complete
/// (then observing in groups may still work).
struct SegmentedFailure {
    on_first_sample: bool,
    reason: Box<PrepareError>,
}

/// Observes every sample through the model's segments; returns how many segments it took.
fn observe_segmented(
    environment: &Environment,
    job: &CalibrationJob<'_>,
    files: &[std::path::PathBuf],
    yardstick: &InferenceYardstick,
    statistics: &mut Statistics,
    progress: &Progress<'_>,
) -> Result<usize, SegmentedFailure> {
    let first = |reason| SegmentedFailure { on_first_sample: true, reason: Box::new(reason) };
    let inputs: Vec<String> = yardstick.signature.inputs.iter().map(|spec| spec.name.clone()).collect();
    let _arena = mantissa_runtime::SharedArena::acquire(environment).map_err(|err| first(err.into()))?;
    let mut observer =
        SegmentedObserver::new(environment, job.model, job.tensors, &inputs, yardstick.budget_bytes).map_err(first)?;
    let mut visit = |name: &str, bytes: &[u8]| {
        if let Some(stats) = statistics.get_mut(name) {
            observe_le_f32(stats, bytes);
        }
    };
    for (done, file) in files.iter().enumerate() {
        let fail = |reason| SegmentedFailure { on_first_sample: done == 0, reason: Box::new(reason) };
        let sample = load_sample(file, &yardstick.signature).map_err(|err| fail(err.into()))?;
        observer.observe(&yardstick.signature, sample, &mut visit).map_err(fail)?;
        progress.sample_done(1, done + 1);
    }
    Ok(observer.segments())
}

/// Observes the job's tensors in groups, one ONNX Runtime session per group declaring only
/// that group's tensors as outputs, each group running over every sample. The first group
/// holds one tensor; later groups are sized from the largest tensor seen so far, so their
/// outputs together stay within `budget`. Returns the number of groups.
fn observe_in_groups(
    environment: &Environment,
    job: &CalibrationJob<'_>,
    files: &[std::path::PathBuf],
    budget: usize,
    statistics: &mut Statistics,
    progress: &Progress<'_>,
) -> Result<usize, PrepareError> {
    let mut pending = job.tensors;
    let mut largest = 0usize;
    let mut group_len = 1;
    let mut groups = 0;
    while !pending.is_empty() {
        let (group, rest) = pending.split_at(group_len.min(pending.len()));
        groups += 1;
        let mut probe = job.model.clone();
        add_float_outputs(&mut probe, group)?;
        let (mut session, signature) = open_internal_session(environment, &probe)?;
        let wanted: Vec<usize> = group
            .iter()
            .map(|t| {
                signature
                    .outputs
                    .iter()
                    .position(|o| &o.name == t)
                    .ok_or_else(|| PrepareError::Observation(format!("tensor '{t}' is not observable")))
            })
            .collect::<Result<_, _>>()?;
        for (done, file) in files.iter().enumerate() {
            let mut request = load_sample(file, &signature)?;
            request.outputs = wanted.clone();
            execute_visit(&mut session, &signature, &request, |name, bytes| {
                largest = largest.max(bytes.len());
                if let Some(stats) = statistics.get_mut(name) {
                    observe_le_f32(stats, bytes);
                }
            })
            .map_err(|source| PrepareError::Sample { path: file.display().to_string(), source })?;
            progress.sample_done(groups, done + 1);
        }
        drop(session);
        mantissa_runtime::memory::release_free_memory();
        pending = rest;
        group_len = (budget / largest.max(1)).max(1);
    }
    Ok(groups)
}

/// Declares `tensors` as extra float outputs of `model`, so a run returns them.
pub fn add_float_outputs(model: &mut ModelProto, tensors: &[String]) -> Result<(), PrepareError> {
    let graph = model.graph.as_mut().ok_or_else(|| PrepareError::Observation("model has no graph".to_owned()))?;
    for tensor in tensors {
        if !graph.output.iter().any(|o| o.name() == tensor) {
            graph.output.push(ValueInfoProto {
                name: Some(tensor.clone()),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: Some(mantissa_quantize::elem::FLOAT),
                        shape: None,
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    Ok(())
}

/// Streams little-endian f32 bytes into `stats` a block at a time, without a full copy.
fn observe_le_f32(stats: &mut TensorStatistics, raw: &[u8]) {
    const BLOCK: usize = 16 * 1024;
    let mut values = Vec::with_capacity(BLOCK);
    for chunk in raw.chunks(BLOCK * 4) {
        values.clear();
        values.extend(chunk.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        stats.observe(&values);
    }
}
