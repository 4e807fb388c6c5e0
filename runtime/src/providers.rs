//! Execution providers a session runs on: the CPU (ONNX Runtime's default), CUDA, or TensorRT
//! (with CUDA beside it for the nodes TensorRT does not take). GPU providers are registered
//! through `ort`'s execution-provider API with errors made explicit: `ort` otherwise logs a
//! failed registration and carries on with the CPU, which would serve a GPU variant on the
//! CPU without anyone asking for it. Whether to fall back is the caller's decision.

use std::ffi::{CStr, c_char, c_int};
use std::fmt;
use std::path::{Path, PathBuf};

use ort::ep::{self, ArenaExtendStrategy, ExecutionProviderDispatch};
use ort::session::builder::SessionBuilder;

use crate::environment::{ORT_LIBRARY_FILE, loaded_library};

/// The execution provider a session is opened on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda(CudaOptions),
    TensorRt(TensorRtOptions),
}

/// Settings of the CUDA provider (also used for the CUDA provider behind TensorRT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaOptions {
    pub device_id: u32,
    /// Cap of the CUDA memory arena in bytes; `None` leaves it to ONNX Runtime (no cap).
    pub gpu_mem_limit: Option<u64>,
}

/// Settings of the TensorRT provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    pub cuda: CudaOptions,
    /// Let TensorRT pick FP16 kernels where it finds them faster.
    pub fp16: bool,
    /// Let TensorRT run INT8 kernels (for QDQ models, or with a calibration table).
    pub int8: bool,
    /// Where built engines (and the timing cache) are kept across restarts; `None` builds the
    /// engines on every start.
    pub engine_cache: Option<PathBuf>,
}

impl ExecutionProvider {
    /// The short name the policy uses: `cpu`, `cuda`, `tensorrt`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda(_) => "cuda",
            ExecutionProvider::TensorRt(_) => "tensorrt",
        }
    }

    /// ONNX Runtime's name of the provider, as `GetAvailableProviders` lists it.
    pub fn ort_name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPUExecutionProvider",
            ExecutionProvider::Cuda(_) => "CUDAExecutionProvider",
            ExecutionProvider::TensorRt(_) => "TensorrtExecutionProvider",
        }
    }

    /// The GPU the provider runs on; `None` for the CPU.
    pub fn device_id(&self) -> Option<u32> {
        match self {
            ExecutionProvider::Cpu => None,
            ExecutionProvider::Cuda(cuda) => Some(cuda.device_id),
            ExecutionProvider::TensorRt(trt) => Some(trt.cuda.device_id),
        }
    }

    /// `cpu`, `cuda (device 0)`, `tensorrt (device 1)`: for logs and ModelConfig.
    pub fn describe(&self) -> String {
        match self.device_id() {
            None => self.kind().to_owned(),
            Some(device) => format!("{} (device {device})", self.kind()),
        }
    }

    /// The providers to register, in priority order; empty for the CPU, which ONNX Runtime
    /// always has. Each fails the session builder instead of being skipped.
    pub(crate) fn dispatch(&self) -> Result<Vec<ExecutionProviderDispatch>, ProviderError> {
        match self {
            ExecutionProvider::Cpu => Ok(Vec::new()),
            ExecutionProvider::Cuda(cuda) => Ok(vec![cuda_dispatch(cuda)]),
            ExecutionProvider::TensorRt(trt) => {
                let mut provider = ep::TensorRT::default()
                    .with_device_id(device_index(trt.cuda.device_id))
                    .with_fp16(trt.fp16)
                    .with_int8(trt.int8);
                if let Some(directory) = &trt.engine_cache {
                    let path =
                        utf8_path(directory).map_err(|reason| self.error(ProviderStage::Registration, reason))?;
                    provider = provider
                        .with_engine_cache(true)
                        .with_engine_cache_path(path)
                        .with_timing_cache(true)
                        .with_timing_cache_path(path);
                }
                // CUDA takes the nodes TensorRT leaves, so they do not drop to the CPU.
                Ok(vec![provider.build().error_on_failure(), cuda_dispatch(&trt.cuda)])
            }
        }
    }

    /// Registers the provider on a session builder.
    pub(crate) fn register(&self, builder: SessionBuilder) -> Result<SessionBuilder, ProviderError> {
        let providers = self.dispatch()?;
        if providers.is_empty() {
            return Ok(builder);
        }
        builder
            .with_execution_providers(providers)
            .map_err(|err| self.error(ProviderStage::Registration, err.to_string()))
    }

    /// A failure of this provider at `stage`, with what the loaded library offers.
    pub(crate) fn error(&self, stage: ProviderStage, reason: String) -> ProviderError {
        ProviderError {
            kind: self.kind(),
            device_id: self.device_id(),
            ort_name: self.ort_name(),
            stage,
            reason: reason.trim_end().trim_end_matches('.').to_owned(),
            library: loaded_library().map(Path::to_owned),
            available: available_providers(),
        }
    }
}

fn cuda_dispatch(cuda: &CudaOptions) -> ExecutionProviderDispatch {
    let mut provider = ep::CUDA::default().with_device_id(device_index(cuda.device_id));
    if let Some(limit) = cuda.gpu_mem_limit {
        // With a cap, grow the arena by what is asked rather than by powers of two, which
        // would hit the cap long before the memory is used.
        provider = provider
            .with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX))
            .with_arena_extend_strategy(ArenaExtendStrategy::SameAsRequested);
    }
    provider.build().error_on_failure()
}

/// ONNX Runtime takes the device as a C int; the policy bounds it far below that.
fn device_index(device: u32) -> i32 {
    i32::try_from(device).unwrap_or(i32::MAX)
}

fn utf8_path(path: &Path) -> Result<&str, String> {
    path.to_str().ok_or_else(|| format!("engine cache path {} is not valid UTF-8", path.display()))
}

/// When a provider failed: while being added to the session options (the library lacks it,
/// or its own libraries do not load) or while the session was created on it (no device, out
/// of memory, an operator it cannot place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStage {
    Registration,
    SessionCreation,
}

/// A session could not be opened on the execution provider it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// The policy's name of the provider (`cuda`, `tensorrt`).
    pub kind: &'static str,
    pub device_id: Option<u32>,
    pub ort_name: &'static str,
    pub stage: ProviderStage,
    /// ONNX Runtime's own message.
    pub reason: String,
    /// The ONNX Runtime library this process loaded.
    pub library: Option<PathBuf>,
    /// The providers that library was built with.
    pub available: Vec<String>,
}

impl ProviderError {
    /// Whether the loaded library was built without the provider at all.
    pub fn missing_from_library(&self) -> bool {
        !self.available.iter().any(|name| name == self.ort_name)
    }
}

impl std::error::Error for ProviderError {}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let library = self.library.as_ref().map_or_else(|| "(none loaded)".to_owned(), |p| p.display().to_string());
        let device = self.device_id.map(|device| format!(", device {device}")).unwrap_or_default();
        let provider = format!("execution provider {} ({}{device})", self.kind, self.ort_name);
        match self.stage {
            ProviderStage::Registration => write!(f, "{provider} is not available: {}", self.reason)?,
            ProviderStage::SessionCreation => write!(f, "cannot create a session on {provider}: {}", self.reason)?,
        }
        write!(f, "; ONNX Runtime library {library} provides [{}]", self.available.join(", "))?;
        if self.missing_from_library() {
            write!(
                f,
                "; GPU variants need the {ORT_LIBRARY_FILE} of the onnxruntime-gpu==1.31.1 wheel \
                 (onnxruntime/capi/ inside it) passed with --ort-library, with the CUDA 13 and cuDNN 9 \
                 libraries on LD_LIBRARY_PATH"
            )?;
        } else if self.stage == ProviderStage::Registration && self.reason.contains("libcuda.so") {
            write!(
                f,
                "; libcuda.so.1 comes with the NVIDIA driver, which is not installed or not on the loader's path"
            )?;
        } else if self.stage == ProviderStage::Registration {
            write!(
                f,
                "; the library has the provider but could not load it: put the CUDA 13, cuDNN 9 \
                 (and for TensorRT, TensorRT 10) libraries on LD_LIBRARY_PATH"
            )?;
        }
        Ok(())
    }
}

/// The execution providers the loaded ONNX Runtime library was built with, in its order
/// (e.g. `TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider`). Empty if
/// no library is loaded yet or the call fails.
pub fn available_providers() -> Vec<String> {
    if loaded_library().is_none() {
        return Vec::new();
    }
    let api = ort::api();
    let mut names: *mut *mut c_char = std::ptr::null_mut();
    let mut count: c_int = 0;
    // SAFETY: both out-pointers are valid for writes; on success ONNX Runtime hands back an
    // array of `count` NUL-terminated strings that stays ours until ReleaseAvailableProviders.
    let status = unsafe { (api.GetAvailableProviders)(&mut names, &mut count) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is owned by the caller and released exactly once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Vec::new();
    }
    if names.is_null() {
        return Vec::new();
    }
    let length = usize::try_from(count).unwrap_or(0);
    // SAFETY: `names` points at `count` string pointers (see above).
    let found = unsafe { std::slice::from_raw_parts(names, length) }
        .iter()
        // SAFETY: each entry is a NUL-terminated string owned by the array.
        .map(|&name| unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
        .collect();
    // SAFETY: releases the array returned above, once.
    let status = unsafe { (api.ReleaseAvailableProviders)(names, count) };
    if !status.0.is_null() {
        // SAFETY: as above.
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda_error(available: &[&str], stage: ProviderStage) -> ProviderError {
        ProviderError {
            kind: "cuda",
            device_id: Some(0),
            ort_name: "CUDAExecutionProvider",
            stage,
            reason: "CUDA execution provider is not enabled in this build".to_owned(),
            library: Some(PathBuf::from("/opt/ort/libonnxruntime.so.1.31.1")),
            available: available.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    #[test]
    fn a_library_without_the_provider_is_named_with_the_wheel_to_take() {
        let text = cuda_error(&["CPUExecutionProvider"], ProviderStage::Registration).to_string();
        assert!(text.starts_with("execution provider cuda (CUDAExecutionProvider, device 0) is not available: CUDA execution provider is not enabled in this build; "), "{text}");
        assert!(text.contains("/opt/ort/libonnxruntime.so.1.31.1 provides [CPUExecutionProvider]"), "{text}");
        assert!(text.contains("onnxruntime-gpu==1.31.1") && text.contains("--ort-library"), "{text}");
    }

    #[test]
    fn a_library_with_the_provider_points_at_its_dependencies() {
        let available = ["CUDAExecutionProvider", "CPUExecutionProvider"];
        let text = cuda_error(&available, ProviderStage::Registration).to_string();
        assert!(!text.contains("onnxruntime-gpu"), "{text}");
        assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
        let mut no_driver = cuda_error(&available, ProviderStage::Registration);
        no_driver.reason = "Failed to load library libonnxruntime_providers_cuda.so with error: libcuda.so.1: cannot open shared object file".to_owned();
        let text = no_driver.to_string();
        assert!(
            text.ends_with(
                "libcuda.so.1 comes with the NVIDIA driver, which is not installed or not on the loader's path"
            ),
            "{text}"
        );
        let text = cuda_error(&available, ProviderStage::SessionCreation).to_string();
        assert!(
            text.starts_with("cannot create a session on execution provider cuda (CUDAExecutionProvider, device 0): "),
            "{text}"
        );
    }

    #[test]
    fn descriptions_name_kind_and_device() {
        assert_eq!(ExecutionProvider::Cpu.describe(), "cpu");
        let cuda = ExecutionProvider::Cuda(CudaOptions { device_id: 1, gpu_mem_limit: None });
        assert_eq!(cuda.describe(), "cuda (device 1)");
        assert_eq!(cuda.device_id(), Some(1));
        let trt = ExecutionProvider::TensorRt(TensorRtOptions::default());
        assert_eq!((trt.kind(), trt.ort_name()), ("tensorrt", "TensorrtExecutionProvider"));
    }

    #[test]
    fn tensorrt_registers_cuda_behind_it_and_the_cpu_registers_nothing() {
        assert!(ExecutionProvider::Cpu.dispatch().unwrap().is_empty());
        let trt = ExecutionProvider::TensorRt(TensorRtOptions::default());
        let names: Vec<&str> = trt.dispatch().unwrap().iter().map(|d| d.name()).collect();
        assert_eq!(names, ["TensorrtExecutionProvider", "CUDAExecutionProvider"]);
    }
}
