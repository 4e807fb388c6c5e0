//! Turns a variant of a policy into the model ONNX Runtime loads: the FP32 file as it is, or
//! the output of the variant's precision pass, built in memory at startup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mantissa_model_store::{BudgetMiss, DriftBudget, ModelEntry, Precision, VariantSpec};
use mantissa_quantize::fp16::convert_to_fp16;
use mantissa_quantize::int8::{Int8Mode, Int8Options, Int8Report, quantize_dynamic, quantize_weight_only};
use mantissa_quantize::int8_static::{quantize_static, tensors_to_calibrate};
use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::{load_model, to_bytes};
use ort::environment::Environment;

use crate::artifact_cache::ArtifactCache;
use crate::mixed_precision::SearchReport;

/// Where a session reads its model from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    File(PathBuf),
    Memory(Arc<[u8]>),
}

/// A variant's model plus facts about how it was built, shown in ModelConfig parameters.
#[derive(Debug, Clone)]
pub struct BuiltVariant {
    pub source: ModelSource,
    pub parameters: BTreeMap<String, String>,
}

/// Builds the model of `spec`, or takes it from `cache` when an intact artifact built from the
/// same inputs is there (blocking; building may take a while for large models).
pub fn build_variant_cached(
    environment: &Environment,
    entry: &ModelEntry,
    spec: &VariantSpec,
    cache: Option<&ArtifactCache>,
) -> Result<BuiltVariant, String> {
    let Some(cache) = cache.filter(|_| spec.precision != Precision::Fp32) else {
        return build_variant(environment, entry, spec);
    };
    let started = Instant::now();
    let options =
        format!("{:?} {:?} {:?} {:?}", spec.precision, spec.fp16, spec.int8, budget_for(entry, spec).map(|b| b.budget));
    let key = ArtifactCache::key(&input_files(entry, spec)?, &options).map_err(|err| format!("cache key: {err}"))?;
    if let Some((bytes, mut parameters)) = cache.load(&entry.name, &spec.name, &key) {
        tracing::info!(
            model = %entry.name,
            variant = %spec.name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "variant loaded from cache"
        );
        parameters.insert("cache".to_owned(), "hit".to_owned());
        return Ok(BuiltVariant { source: ModelSource::Memory(bytes.into()), parameters });
    }
    let mut built = build_variant(environment, entry, spec)?;
    if let ModelSource::Memory(bytes) = &built.source
        && let Err(err) = cache.store(&entry.name, &spec.name, &key, bytes, &built.parameters)
    {
        tracing::warn!(model = %entry.name, variant = %spec.name, error = %err, "cannot write the variant to the cache");
    }
    built.parameters.insert("cache".to_owned(), "miss".to_owned());
    Ok(built)
}

/// The policy's drift budget, when it applies to this variant: a static INT8 variant of a
/// model whose policy names holdout data and a budget.
fn budget_for<'a>(entry: &'a ModelEntry, spec: &VariantSpec) -> Option<BudgetSearch<'a>> {
    let drift = entry.policy.drift.as_ref()?;
    let is_static = spec.int8.as_ref().is_some_and(|o| o.mode == Int8Mode::Static);
    let has_budget = drift.budget.min_cosine.is_some() || drift.budget.min_top1_agreement.is_some();
    (is_static && has_budget && spec.name != drift.reference).then_some(BudgetSearch {
        holdout: &drift.holdout_data,
        class_outputs: &drift.class_outputs,
        budget: &drift.budget,
        serve_flagged: drift.on_budget_miss == BudgetMiss::ServeFlagged,
    })
}

/// Every file a variant's artifact depends on: the model, its external data, and for static
/// INT8 the calibration samples.
fn input_files(entry: &ModelEntry, spec: &VariantSpec) -> Result<Vec<PathBuf>, String> {
    let mut files = vec![entry.model_path.clone()];
    let bytes = std::fs::read(&entry.model_path).map_err(|err| format!("{}: {err}", entry.model_path.display()))?;
    let model = mantissa_quantize::load_model_from_bytes(&bytes, &entry.model_path).map_err(|err| err.to_string())?;
    let mut external = std::collections::BTreeSet::new();
    for tensor in model.graph.iter().flat_map(|g| &g.initializer) {
        for location in tensor.external_data.iter().filter(|e| e.key() == "location") {
            external.insert(entry.directory.join(location.value()));
        }
    }
    files.extend(external);
    if let Some(options) = &spec.int8
        && options.mode == Int8Mode::Static
        && let Some(data) = &options.calibration_data
    {
        files.extend(crate::calibrate::sample_files(data)?);
    }
    if let Some(search) = budget_for(entry, spec) {
        files.extend(crate::calibrate::sample_files(search.holdout)?);
    }
    Ok(files)
}

/// Builds the model of `spec` (blocking; may take a while for large models). Static INT8
/// calibration runs the FP32 model on `environment`.
pub fn build_variant(
    environment: &Environment,
    entry: &ModelEntry,
    spec: &VariantSpec,
) -> Result<BuiltVariant, String> {
    let started = Instant::now();
    let mut parameters = BTreeMap::new();
    parameters.insert("precision".to_owned(), spec.precision.as_str().to_owned());
    let source = match spec.precision {
        Precision::Fp32 => {
            let bytes = std::fs::metadata(&entry.model_path).map(|m| m.len()).unwrap_or(0);
            parameters.insert("artifact_bytes".to_owned(), bytes.to_string());
            ModelSource::File(entry.model_path.clone())
        }
        Precision::Fp16 => {
            let options = spec.fp16.clone().unwrap_or_default();
            let mut model = load_model(&entry.model_path).map_err(|err| err.to_string())?;
            let report = convert_to_fp16(&mut model, &options).map_err(|err| format!("fp16 pass: {err}"))?;
            let bytes = to_bytes(&model);
            if bytes.len() > i32::MAX as usize {
                return Err(format!("the FP16 model is {} bytes, over protobuf's 2 GiB limit", bytes.len()));
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
            parameters.insert("artifact_bytes".to_owned(), bytes.len().to_string());
            parameters.insert("fp16_nodes_converted".to_owned(), report.nodes_converted.to_string());
            parameters.insert("fp16_nodes_kept_fp32".to_owned(), report.nodes_kept.len().to_string());
            parameters.insert("fp16_casts_inserted".to_owned(), report.casts_inserted.to_string());
            parameters.insert("fp16_values_clamped".to_owned(), report.values_clamped.to_string());
            parameters.insert("fp16_keep_io_types".to_owned(), options.keep_io_types.to_string());
            ModelSource::Memory(bytes.into())
        }
        Precision::Int8 => {
            let options = spec.int8.clone().unwrap_or_default();
            let mut model = load_model(&entry.model_path).map_err(|err| err.to_string())?;
            let label = format!("{}:{}", entry.name, spec.name);
            let budget = budget_for(entry, spec);
            let (report, searched) = quantize_int8(environment, &mut model, &options, &label, budget)?;
            if let Some(searched) = &searched {
                parameters.insert("int8_budget_kept_fp32".to_owned(), searched.kept_fp32.join(","));
                parameters.insert("int8_budget_search_cosine".to_owned(), searched.cosine.to_string());
                parameters.insert("int8_plain_recipe_cosine".to_owned(), searched.initial_cosine.to_string());
            }
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
            parameters.insert("artifact_bytes".to_owned(), bytes.len().to_string());
            parameters.insert("int8_mode".to_owned(), format!("{:?}", options.mode).to_lowercase());
            parameters.insert("int8_nodes_quantized".to_owned(), report.quantized.len().to_string());
            parameters.insert("int8_nodes_kept_fp32".to_owned(), report.skipped.len().to_string());
            parameters.insert("int8_activations_quantized".to_owned(), report.activations_quantized.to_string());
            parameters.insert("int8_per_channel".to_owned(), options.per_channel.to_string());
            parameters.insert("int8_reduce_range".to_owned(), options.effective_reduce_range().to_string());
            if options.mode == Int8Mode::Static {
                parameters.insert(
                    "int8_calibration_method".to_owned(),
                    format!("{:?}", options.calibration.method).to_lowercase(),
                );
            }
            ModelSource::Memory(bytes.into())
        }
    };
    parameters.insert("build_ms".to_owned(), started.elapsed().as_millis().to_string());
    Ok(BuiltVariant { source, parameters })
}

/// A drift budget the static INT8 pass must meet on holdout data, by keeping the most
/// sensitive nodes in FP32 (see `mixed_precision`).
#[derive(Debug, Clone, Copy)]
pub struct BudgetSearch<'a> {
    pub holdout: &'a Path,
    pub class_outputs: &'a [String],
    pub budget: &'a DriftBudget,
    /// When no configuration meets the budget: fall back to the plain recipe (the startup
    /// drift check then serves it flagged) instead of failing the build.
    pub serve_flagged: bool,
}

/// Runs the INT8 pass of `options` on `model`: dynamic directly, static after calibrating on
/// `options.calibration_data` (and searching for a mixed-precision configuration when a
/// budget is given).
pub fn quantize_int8(
    environment: &Environment,
    model: &mut ModelProto,
    options: &Int8Options,
    label: &str,
    budget: Option<BudgetSearch<'_>>,
) -> Result<(Int8Report, Option<SearchReport>), String> {
    match options.mode {
        Int8Mode::Dynamic => {
            quantize_dynamic(model, options).map(|r| (r, None)).map_err(|err| format!("int8 dynamic: {err}"))
        }
        Int8Mode::WeightOnly => {
            quantize_weight_only(model, options).map(|r| (r, None)).map_err(|err| format!("int8 weight-only: {err}"))
        }
        Int8Mode::Static => {
            let data = options.calibration_data.as_ref().ok_or("static INT8 needs calibration_data")?;
            let tensors = tensors_to_calibrate(model, options).map_err(|err| format!("int8 static: {err}"))?;
            let ranges = crate::calibrate::calibrate(environment, model, &tensors, data, &options.calibration, label)?;
            match budget {
                Some(search) => {
                    let searched = crate::mixed_precision::search(
                        environment,
                        model,
                        options,
                        &ranges,
                        search.holdout,
                        search.class_outputs,
                        search.budget,
                    );
                    match searched {
                        Ok((quantized, report, searched)) => {
                            *model = quantized;
                            Ok((report, Some(searched)))
                        }
                        Err(missed) if search.serve_flagged => {
                            tracing::warn!(variant = label, %missed, "budget search failed; serving the plain recipe flagged");
                            quantize_static(model, options, &ranges)
                                .map(|r| (r, None))
                                .map_err(|err| format!("int8 static: {err}"))
                        }
                        Err(missed) => Err(missed),
                    }
                }
                None => quantize_static(model, options, &ranges)
                    .map(|r| (r, None))
                    .map_err(|err| format!("int8 static: {err}")),
            }
        }
    }
}
