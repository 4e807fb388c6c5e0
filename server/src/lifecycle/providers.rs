//! Starting a variant's workers on the execution provider its policy names. A provider that is
//! not available (a CPU-only ONNX Runtime library, no GPU, CUDA libraries that do not load)
//! fails the variant with the provider's error, or, under `fallback: cpu`, starts the workers on
//! the CPU with a warning; either way the model's other variants are not affected.

use std::sync::Arc;

use mantissa_model_store::ExecutionProviderSpec;
use mantissa_preparation::{ArtifactCache, session_provider, wants_engine_cache};
use mantissa_runtime::{Environment, ExecutionProvider, RuntimeError};

use crate::facts::{ProviderFacts, ProviderFallback};
use crate::scheduling::workers::{StartError, WorkerPool, WorkerPoolConfig};

/// The TensorRT engine cache directory of a variant could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("TensorRT engine cache: {0}")]
pub struct EngineCacheError(String);

/// The session provider of a variant, with its TensorRT engine cache under the artifact cache
/// when there is one (created here, so TensorRT finds it).
pub fn variant_provider(
    spec: &ExecutionProviderSpec,
    config: &WorkerPoolConfig,
    cache: Option<&ArtifactCache>,
) -> Result<ExecutionProvider, EngineCacheError> {
    let engine_cache = match cache.filter(|_| wants_engine_cache(spec)) {
        None => None,
        Some(cache) => {
            let directory = cache
                .engine_cache_dir(&config.model_name, &config.variant_name, &config.model)
                .map_err(|err| EngineCacheError(format!("cannot hash the variant's model: {err}")))?;
            std::fs::create_dir_all(&directory)
                .map_err(|err| EngineCacheError(format!("cannot create {}: {err}", directory.display())))?;
            Some(directory)
        }
    };
    Ok(session_provider(spec, engine_cache))
}

/// Starts the workers on `config.session.provider`; when that provider fails and the policy
/// allows it, starts them again on the CPU and says so in the returned facts.
pub fn start_on_provider(
    environment: &Arc<Environment>,
    config: WorkerPoolConfig,
    spec: &ExecutionProviderSpec,
) -> Result<(WorkerPool, ProviderFacts), StartError> {
    let requested = config.session.provider.clone();
    let fallback_allowed = matches!(spec, ExecutionProviderSpec::Gpu(gpu) if gpu.fallback_to_cpu);
    let mut on_cpu = config.clone();
    match WorkerPool::start(Arc::clone(environment), config) {
        Ok(pool) => Ok((pool, ProviderFacts { in_use: requested, fallback: None })),
        Err(StartError::Session(RuntimeError::Provider(failure))) if fallback_allowed => {
            let reason = failure.to_string();
            tracing::warn!(
                variant = %on_cpu.label,
                requested = %requested.describe(),
                %reason,
                "execution provider not available; serving this variant on the CPU (policy `fallback: cpu`)"
            );
            on_cpu.session.provider = ExecutionProvider::Cpu;
            let pool = WorkerPool::start(Arc::clone(environment), on_cpu)?;
            let fallback =
                ProviderFallback { requested: requested.describe(), requested_kind: requested.kind(), reason };
            Ok((pool, ProviderFacts { in_use: ExecutionProvider::Cpu, fallback: Some(fallback) }))
        }
        Err(other) => Err(other),
    }
}
