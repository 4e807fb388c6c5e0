//! A variant's execution provider as the policy sets it, turned into the runtime's session
//! setting. Shared by the server's workers and `mantissa bench`'s in-process run, so both
//! open the variant on the same provider with the same options.

use std::path::PathBuf;

use mantissa_model_store::{ExecutionProviderSpec, GpuProvider};
use mantissa_runtime::{CudaOptions, ExecutionProvider, TensorRtOptions};

/// The session provider of `spec`. `engine_cache` is where TensorRT keeps its engines (see
/// [`crate::ArtifactCache::engine_cache_dir`]); it is used only when the policy keeps the
/// engine cache on.
pub fn session_provider(spec: &ExecutionProviderSpec, engine_cache: Option<PathBuf>) -> ExecutionProvider {
    let ExecutionProviderSpec::Gpu(gpu) = spec else { return ExecutionProvider::Cpu };
    let cuda = CudaOptions { device_id: gpu.device_id, gpu_mem_limit: gpu.gpu_mem_limit };
    match &gpu.provider {
        GpuProvider::Cuda => ExecutionProvider::Cuda(cuda),
        GpuProvider::TensorRt(trt) => ExecutionProvider::TensorRt(TensorRtOptions {
            cuda,
            fp16: trt.fp16,
            int8: trt.int8,
            engine_cache: engine_cache.filter(|_| trt.engine_cache),
        }),
    }
}

/// Whether the policy asks for a TensorRT engine cache (the caller then supplies a directory).
pub fn wants_engine_cache(spec: &ExecutionProviderSpec) -> bool {
    matches!(spec, ExecutionProviderSpec::Gpu(gpu) if matches!(&gpu.provider, GpuProvider::TensorRt(trt) if trt.engine_cache))
}

#[cfg(test)]
mod tests {
    use mantissa_model_store::{GpuProviderSpec, TensorRtSpec};

    use super::*;

    fn gpu(provider: GpuProvider) -> ExecutionProviderSpec {
        ExecutionProviderSpec::Gpu(GpuProviderSpec {
            provider,
            device_id: 2,
            gpu_mem_limit: Some(1 << 30),
            fallback_to_cpu: true,
        })
    }

    #[test]
    fn policy_settings_reach_the_session_options() {
        assert_eq!(session_provider(&ExecutionProviderSpec::Cpu, None), ExecutionProvider::Cpu);
        let cuda = CudaOptions { device_id: 2, gpu_mem_limit: Some(1 << 30) };
        assert_eq!(session_provider(&gpu(GpuProvider::Cuda), None), ExecutionProvider::Cuda(cuda.clone()));
        let trt = gpu(GpuProvider::TensorRt(TensorRtSpec { fp16: true, int8: false, engine_cache: true }));
        assert!(wants_engine_cache(&trt));
        assert_eq!(
            session_provider(&trt, Some(PathBuf::from("/cache/m/tensorrt/v"))),
            ExecutionProvider::TensorRt(TensorRtOptions {
                cuda,
                fp16: true,
                int8: false,
                engine_cache: Some(PathBuf::from("/cache/m/tensorrt/v")),
            })
        );
    }

    #[test]
    fn an_engine_cache_the_policy_turns_off_is_not_used() {
        let trt = gpu(GpuProvider::TensorRt(TensorRtSpec { fp16: false, int8: false, engine_cache: false }));
        assert!(!wants_engine_cache(&trt));
        let ExecutionProvider::TensorRt(options) = session_provider(&trt, Some(PathBuf::from("/c"))) else {
            panic!("tensorrt stays tensorrt");
        };
        assert_eq!(options.engine_cache, None);
        assert!(!wants_engine_cache(&gpu(GpuProvider::Cuda)));
    }
}
