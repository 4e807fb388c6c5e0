//! Building a variant through the content-addressed cache: the key covers the recipe (a
//! serialized struct of the pass options and the drift budget) and every input file.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use mantissa_model_store::{DriftBudget, ModelEntry, Precision, VariantSpec};
use mantissa_quantize::passes::fp16::Fp16Options;
use mantissa_quantize::passes::int8::{Int8Mode, Int8Options};
use mantissa_runtime::samples::sample_files;
use mantissa_runtime::{Environment, ModelSource};
use serde::Serialize;

use crate::auto_int8::cpu_signature;
use crate::build::{BuiltVariant, build_variant};
use crate::cache::ArtifactCache;
use crate::error::PrepareError;
use crate::facts::{CacheOutcome, Int8Facts};
use crate::int8::budget_for;

/// Everything besides the input files that decides a variant's artifact.
#[derive(Debug, Serialize)]
struct ArtifactRecipe<'a> {
    precision: Precision,
    fp16: Option<&'a Fp16Options>,
    int8: Option<&'a Int8Options>,
    budget: Option<&'a DriftBudget>,
    /// For `mode: auto`, the CPU the forms are timed on: a choice made on another CPU is
    /// made again, not trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<String>,
}

/// Builds the model of `spec`, or takes it from `cache` when an intact artifact built from the
/// same inputs is there (blocking; building may take a while for large models).
pub fn build_variant_cached(
    environment: &Environment,
    entry: &ModelEntry,
    spec: &VariantSpec,
    cache: Option<&ArtifactCache>,
) -> Result<BuiltVariant, PrepareError> {
    let Some(cache) = cache.filter(|_| spec.precision != Precision::Fp32) else {
        return build_variant(environment, entry, spec);
    };
    let started = Instant::now();
    let recipe = ArtifactRecipe {
        precision: spec.precision,
        fp16: spec.fp16.as_ref(),
        int8: spec.int8.as_ref(),
        budget: budget_for(entry, spec).map(|search| search.budget),
        cpu: (spec.precision == Precision::Int8 && spec.int8.as_ref().is_none_or(|o| o.mode == Int8Mode::Auto))
            .then(cpu_signature),
    };
    let key = ArtifactCache::key(&input_files(entry, spec)?, &recipe).map_err(PrepareError::CacheKey)?;
    if let Some((bytes, mut facts)) = cache.load(&entry.name, &spec.name, &key) {
        tracing::info!(
            model = %entry.name,
            variant = %spec.name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "variant loaded from cache"
        );
        facts.cache = Some(CacheOutcome::Hit);
        return Ok(BuiltVariant { source: ModelSource::Memory(bytes.into()), facts });
    }
    let mut built = build_variant(environment, entry, spec)?;
    // An artifact the search's time limit shaped is not what the recipe gives with time
    // enough; caching it would serve it on every later start.
    let shaped_by_time = built.facts.int8.as_ref().is_some_and(Int8Facts::shaped_by_time_limit);
    if shaped_by_time {
        tracing::info!(model = %entry.name, variant = %spec.name, "not caching a variant the budget search's time limit shaped");
    }
    if let ModelSource::Memory(bytes) = &built.source
        && !shaped_by_time
        && let Err(err) = cache.store(&entry.name, &spec.name, &key, bytes, &built.facts)
    {
        tracing::warn!(model = %entry.name, variant = %spec.name, error = %err, "cannot write the variant to the cache");
    }
    built.facts.cache = Some(CacheOutcome::Miss);
    Ok(built)
}

/// Every file a variant's artifact depends on: the model, its external data, and for static
/// INT8 the calibration samples (and the holdout samples of a budget search).
fn input_files(entry: &ModelEntry, spec: &VariantSpec) -> Result<Vec<PathBuf>, PrepareError> {
    let mut files = vec![entry.model_path.clone()];
    let bytes = std::fs::read(&entry.model_path)
        .map_err(|source| PrepareError::Io { path: entry.model_path.clone(), source })?;
    let model = mantissa_quantize::load_model_from_bytes(&bytes, &entry.model_path)?;
    let mut external = BTreeSet::new();
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
        files.extend(sample_files(data)?);
    }
    if let Some(search) = budget_for(entry, spec) {
        files.extend(sample_files(search.holdout)?);
    }
    Ok(files)
}
