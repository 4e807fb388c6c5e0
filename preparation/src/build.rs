//! Turns a variant of a policy into the model ONNX Runtime loads: the FP32 file as it is, or
//! the output of the variant's precision pass, built in memory at startup.

use std::time::Instant;

use mantissa_model_store::{ModelEntry, Precision, VariantSpec};
use mantissa_quantize::passes::fp16::convert_to_fp16;
use mantissa_quantize::passes::int8::Int8Mode;
use mantissa_quantize::{load_model, to_bytes};
use mantissa_runtime::{Environment, ModelSource};

use crate::auto_int8::{AutoTiming, MAX_TIMED_BATCH, quantize_int8_any};
use crate::error::PrepareError;
use crate::facts::{BuildFacts, Fp16Facts, Int8Facts, SearchFacts};
use crate::int8::{Int8Job, budget_for};

/// A variant's model plus facts about how it was built.
#[derive(Debug, Clone)]
pub struct BuiltVariant {
    pub source: ModelSource,
    pub facts: BuildFacts,
}

/// Builds the model of `spec` (blocking; may take a while for large models). Static INT8
/// calibration runs the FP32 model on `environment`.
pub fn build_variant(
    environment: &Environment,
    entry: &ModelEntry,
    spec: &VariantSpec,
) -> Result<BuiltVariant, PrepareError> {
    let started = Instant::now();
    let mut facts = BuildFacts::new(spec.precision);
    let source = match spec.precision {
        Precision::Fp32 => {
            facts.artifact_bytes = std::fs::metadata(&entry.model_path).map(|m| m.len()).unwrap_or(0);
            ModelSource::File(entry.model_path.clone())
        }
        Precision::Fp16 => build_fp16(entry, spec, &mut facts, started)?,
        Precision::Int8 => build_int8(environment, entry, spec, &mut facts, started)?,
    };
    facts.build_ms = started.elapsed().as_millis() as u64;
    Ok(BuiltVariant { source, facts })
}

fn build_fp16(
    entry: &ModelEntry,
    spec: &VariantSpec,
    facts: &mut BuildFacts,
    started: Instant,
) -> Result<ModelSource, PrepareError> {
    let options = spec.fp16.clone().unwrap_or_default();
    let mut model = load_model(&entry.model_path)?;
    let report = convert_to_fp16(&mut model, &options)?;
    let bytes = to_bytes(&model);
    if bytes.len() > i32::MAX as usize {
        return Err(PrepareError::TooLarge(bytes.len()));
    }
    tracing::info!(
        model = %entry.name,
        variant = %spec.name,
        pass = "fp16",
        converted = report.nodes_converted,
        kept_fp32 = report.nodes_kept.len(),
        casts = report.casts_inserted,
        clamped = report.values_clamped,
        bytes = bytes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built variant"
    );
    facts.artifact_bytes = bytes.len() as u64;
    facts.fp16 = Some(Fp16Facts {
        nodes_converted: report.nodes_converted,
        nodes_kept_fp32: report.nodes_kept.len(),
        casts_inserted: report.casts_inserted,
        values_clamped: report.values_clamped,
        keep_io_types: options.keep_io_types,
    });
    Ok(ModelSource::Memory(bytes.into()))
}

fn build_int8(
    environment: &Environment,
    entry: &ModelEntry,
    spec: &VariantSpec,
    facts: &mut BuildFacts,
    started: Instant,
) -> Result<ModelSource, PrepareError> {
    let options = spec.int8.clone().unwrap_or_default();
    let mut model = load_model(&entry.model_path)?;
    let label = format!("{}:{}", entry.name, spec.name);
    let job = Int8Job { options: &options, label: &label, budget: budget_for(entry, spec) };
    let serving = &spec.serving;
    let timing = AutoTiming::for_variant(
        serving.intra_op_threads,
        &serving.preferred_batch_sizes,
        serving.max_batch_size.unwrap_or(MAX_TIMED_BATCH as u32),
    );
    let outcome = quantize_int8_any(environment, &mut model, &job, &timing)?;
    let calibrated = options.mode == Int8Mode::Static || outcome.auto.as_ref().is_some_and(|a| a.chosen == "static");
    let report = outcome.report;
    let bytes = to_bytes(&model);
    tracing::info!(
        model = %entry.name,
        variant = %spec.name,
        pass = "int8",
        mode = ?options.mode,
        quantized = report.quantized.len(),
        kept_fp32 = report.skipped.len(),
        activations = report.activations_quantized,
        bytes = bytes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built variant"
    );
    facts.artifact_bytes = bytes.len() as u64;
    facts.int8 = Some(Int8Facts {
        mode: options.mode,
        nodes_quantized: report.quantized.len(),
        nodes_kept_fp32: report.skipped.len(),
        activations_quantized: report.activations_quantized,
        per_channel: options.per_channel,
        reduce_range: options.effective_reduce_range(),
        calibration_method: calibrated.then_some(options.calibration.method),
        budget_search: outcome.search.map(|searched| SearchFacts {
            kept_fp32: searched.kept_fp32,
            cosine: searched.cosine,
            plain_recipe_cosine: searched.initial_cosine,
            evaluations: searched.evaluations,
            search_ms: searched.elapsed.as_millis() as u64,
            time_limited: searched.time_limited,
            tightest: searched.tightest,
        }),
        budget_fallback: outcome.fallback,
        notes: report.notes,
        auto: outcome.auto,
    });
    Ok(ModelSource::Memory(bytes.into()))
}
