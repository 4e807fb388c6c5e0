//! Where a model comes from and how sessions are opened on it. A session belongs to the one
//! thread that runs it; callers open one per worker.

use std::path::PathBuf;
use std::sync::Arc;

use mantissa_quantize::onnx::ModelProto;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::error::RuntimeError;
use crate::providers::{ExecutionProvider, ProviderStage};
use crate::signature::{ModelSignature, signature_of};

/// Where a session reads its model from: the FP32 file as it is, or a variant built in memory.
#[derive(Debug, Clone)]
pub enum ModelSource {
    File(PathBuf),
    Memory(Arc<[u8]>),
}

/// Options for building a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Intra-op threads; 0 lets ONNX Runtime pick (all cores, which oversubscribes when
    /// several workers share a machine).
    pub intra_op_threads: u32,
    /// Let idle intra-op threads spin (ONNX Runtime's default) instead of sleeping.
    pub intra_op_spinning: bool,
    /// Where the session's CPU tensors come from.
    pub cpu_memory: CpuMemory,
    /// Where the session runs. A GPU provider that cannot be registered, or on which the
    /// session cannot be created, fails the session: falling back is the caller's choice.
    pub provider: ExecutionProvider,
}

/// Where a session's CPU tensors come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMemory {
    /// ONNX Runtime's default: an arena of the session's own, fast reuse across runs, which
    /// keeps its peak for the session's life.
    OwnArena,
    /// The arena registered on the environment while a [`crate::SharedArena`] is held: many
    /// sessions alive at once (calibration's segments) hold one peak between them. Opening
    /// such a session without a guard alive falls back to ONNX Runtime's own allocator.
    SharedArena,
}

impl SessionConfig {
    /// For internal work (calibration, drift checks, the budget search, analysis): ONNX
    /// Runtime picks the threads, idle threads sleep.
    pub const INTERNAL: SessionConfig = SessionConfig {
        intra_op_threads: 0,
        intra_op_spinning: false,
        cpu_memory: CpuMemory::OwnArena,
        provider: ExecutionProvider::Cpu,
    };
    /// [`Self::INTERNAL`] on the shared arena.
    pub const INTERNAL_SHARED_ARENA: SessionConfig =
        SessionConfig { cpu_memory: CpuMemory::SharedArena, ..Self::INTERNAL };
}

pub fn open_session(
    environment: &Environment,
    model: &ModelSource,
    config: &SessionConfig,
) -> Result<Session, RuntimeError> {
    let describe = |err: ort::Error| RuntimeError::Session(err.to_string());
    let mut builder = Session::builder(environment)
        .map_err(describe)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|err| RuntimeError::Session(err.to_string()))?;
    if config.intra_op_threads > 0 {
        builder = builder
            .with_intra_threads(config.intra_op_threads as usize)
            .map_err(|err| RuntimeError::Session(err.to_string()))?;
    }
    builder = builder
        .with_intra_op_spinning(config.intra_op_spinning)
        .map_err(|err| RuntimeError::Session(err.to_string()))?;
    builder = config.provider.register(builder).map_err(|err| RuntimeError::Provider(Box::new(err)))?;
    if config.cpu_memory == CpuMemory::SharedArena {
        builder = builder.with_env_allocators().map_err(|err| RuntimeError::Session(err.to_string()))?;
    }
    let committed = match model {
        ModelSource::File(path) => builder.commit_from_file(path),
        ModelSource::Memory(bytes) => builder.commit_from_memory(bytes),
    };
    committed.map_err(|err| match config.provider {
        ExecutionProvider::Cpu => describe(err),
        // On a GPU the cause may be the device (none, out of memory) as well as the model; the
        // caller tells them apart by trying the CPU if the policy allows it.
        ref provider => {
            RuntimeError::Provider(Box::new(provider.error(ProviderStage::SessionCreation, err.to_string())))
        }
    })
}

/// A session over an in-memory model for internal work, with the model's signature (no
/// batching limit: internal callers send what their samples hold).
pub fn open_internal_session(
    environment: &Environment,
    model: &ModelProto,
) -> Result<(Session, ModelSignature), RuntimeError> {
    open_internal_session_with(environment, model, SessionConfig::INTERNAL)
}

/// [`open_internal_session`] with other session options.
pub fn open_internal_session_with(
    environment: &Environment,
    model: &ModelProto,
    config: SessionConfig,
) -> Result<(Session, ModelSignature), RuntimeError> {
    let source = ModelSource::Memory(mantissa_quantize::to_bytes(model).into());
    let session = open_session(environment, &source, &config)?;
    let signature = signature_of(&session, Some(0), 0)?;
    Ok((session, signature))
}
