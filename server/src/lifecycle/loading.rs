//! Startup loading: every variant is built (or taken from the artifact cache), its workers
//! are started and warmed, batching variants pass the batch-invariance self-test, startup drift
//! is measured against the reference, and only then does a variant become ready.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use mantissa_preparation::{ArtifactCache, build_variant_cached};
use mantissa_runtime::{Environment, ExecutionProvider, SessionConfig};

use crate::facts::VariantFacts;
use crate::lifecycle::providers::{start_on_provider, variant_provider};
use crate::lifecycle::self_test::batch_invariance;
use crate::lifecycle::startup_drift::check_drift;
use crate::lifecycle::{LoadedVariant, LoadedVariants};
use crate::routing::registry::{Registry, ServedModel, Variant, VariantState};
use crate::scheduling::workers::WorkerPoolConfig;
use crate::telemetry::metrics;

/// Serving limits that come from the server's configuration rather than a model's policy.
#[derive(Debug, Clone, Copy)]
pub struct ServingDefaults {
    /// max_batch_size for a batching model whose policy does not set one.
    pub max_batch_size: u32,
    /// Requests a variant may hold waiting for a worker.
    pub queue_capacity: usize,
}

/// How variants are built at startup.
#[derive(Debug, Clone, Default)]
pub struct BuildSettings {
    /// Variants built at the same time.
    pub concurrency: usize,
    /// Content-addressed store of built variants; `None` builds every start.
    pub cache: Option<ArtifactCache>,
}

/// Builds every variant's workers (blocking: run it off the async runtime). Failures are
/// recorded on the variant and logged; the other variants still load.
pub fn load_all(registry: &Registry, environment: &Arc<Environment>, defaults: ServingDefaults, build: &BuildSettings) {
    let jobs: Vec<(&ServedModel, &Variant)> =
        registry.models().flat_map(|model| model.variants.iter().map(move |variant| (model, variant))).collect();
    let next = AtomicUsize::new(0);
    let built: Vec<Mutex<Option<LoadedVariant>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let workers = build.concurrency.clamp(1, jobs.len().max(1));
    // Variants build concurrently, at most `concurrency` at a time: calibration and passes
    // are CPU-bound, so more would only slow each other down.
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let position = next.fetch_add(1, Ordering::Relaxed);
                    let Some((model, variant)) = jobs.get(position) else { break };
                    let loaded = load_variant(environment, model, variant, defaults, build.cache.as_ref());
                    *built[position].lock().unwrap_or_else(|p| p.into_inner()) = loaded;
                }
            });
        }
    });
    let mut loaded = LoadedVariants::new();
    for ((model, variant), slot) in jobs.iter().zip(built) {
        if let Some(result) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            loaded.insert((model.name().to_owned(), variant.spec.name.clone()), result);
        }
    }
    // Drift against the reference on holdout data, then readiness.
    for model in registry.models() {
        check_drift(model, &mut loaded);
        for variant in &model.variants {
            if let Some((pool, facts)) = loaded.remove(&(model.name().to_owned(), variant.spec.name.clone())) {
                metrics::set_variant_ready(model.name(), &variant.spec.name, true);
                variant.set(VariantState::Ready(pool, Arc::new(facts)));
            } else {
                metrics::set_variant_ready(model.name(), &variant.spec.name, false);
            }
        }
    }
    registry.mark_loaded();
}

/// Builds a variant and starts its workers; on failure records why and returns `None`.
fn load_variant(
    environment: &Arc<Environment>,
    model: &ServedModel,
    variant: &Variant,
    defaults: ServingDefaults,
    cache: Option<&ArtifactCache>,
) -> Option<LoadedVariant> {
    let started = std::time::Instant::now();
    tracing::info!(model = model.name(), variant = %variant.spec.name, precision = variant.spec.precision.as_str(), "building variant");
    let built = match build_variant_cached(environment, &model.entry, &variant.spec, cache) {
        Ok(built) => built,
        Err(reason) => {
            let reason = reason.to_string();
            tracing::error!(model = model.name(), variant = %variant.spec.name, %reason, "variant failed to build");
            variant.set(VariantState::Failed(reason));
            return None;
        }
    };
    metrics::set_build_figures(model.name(), &variant.spec.name, started.elapsed(), built.facts.artifact_bytes);
    let mut config = pool_config(model, variant, defaults, built.source);
    let fail = |reason: String| {
        tracing::error!(model = model.name(), variant = %variant.spec.name, %reason, "variant failed to load");
        variant.set(VariantState::Failed(reason));
        None
    };
    match variant_provider(&variant.spec.execution_provider, &config, cache) {
        Ok(provider) => config.session.provider = provider,
        Err(reason) => return fail(reason.to_string()),
    }
    match start_on_provider(environment, config, &variant.spec.execution_provider) {
        Ok((pool, provider)) => {
            let facts = VariantFacts {
                build: built.facts,
                batch_invariance: batch_invariance(&pool, variant.spec.precision),
                drift: None,
                provider,
            };
            tracing::info!(
                model = model.name(),
                variant = %variant.spec.name,
                execution_provider = %facts.provider.describe(),
                instances = variant.spec.serving.instances,
                max_batch_size = pool.signature().max_batch_size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "variant built and warmed up"
            );
            Some((Arc::new(pool), facts))
        }
        Err(reason) => fail(reason.to_string()),
    }
}

/// The worker pool settings of a variant: its policy's serving section over the server's
/// defaults.
fn pool_config(
    model: &ServedModel,
    variant: &Variant,
    defaults: ServingDefaults,
    source: mantissa_runtime::ModelSource,
) -> WorkerPoolConfig {
    let serving = &variant.spec.serving;
    WorkerPoolConfig {
        label: format!("{}:{}", model.name(), variant.spec.name),
        model_name: model.name().to_owned(),
        variant_name: variant.spec.name.clone(),
        model: source,
        instances: serving.instances,
        session: SessionConfig {
            intra_op_threads: serving.intra_op_threads,
            intra_op_spinning: serving.intra_op_spinning,
            cpu_memory: mantissa_runtime::CpuMemory::OwnArena,
            // Set from the policy's execution provider once the artifact is known (a TensorRT
            // engine cache is named by it).
            provider: ExecutionProvider::Cpu,
        },
        max_batch_size: serving.max_batch_size,
        default_max_batch_size: defaults.max_batch_size,
        queue_capacity: serving.max_queue_size.map_or(defaults.queue_capacity, |size| size as usize),
        dynamic_batching: serving.dynamic_batching,
        max_queue_delay: serving.max_queue_delay,
        preferred_batch_sizes: serving.preferred_batch_sizes.iter().map(|&size| size as usize).collect(),
    }
}
