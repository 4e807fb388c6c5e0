//! Server lifecycle: load the repository, serve gRPC (inference, health, reflection) and
//! metrics, and on shutdown stop accepting, finish in-flight work and join the workers.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use mantissa_model_store::{RepositoryError, scan_repository};
use mantissa_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::artifact_cache::ArtifactCache;
use crate::ort_runtime::{OrtSetupError, init_environment, locate_library};
use crate::registry::{BuildSettings, Registry, ServingDefaults};
use crate::service::InferenceService;
use crate::shadow::Shadows;

/// Health service name of the inference service, as clients ask for it.
pub const INFERENCE_SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// Everything `run` needs; the CLI builds it from flags and environment variables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_store: PathBuf,
    /// Explicit ONNX Runtime library; `None` searches the default places.
    pub ort_library: Option<PathBuf>,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    pub serving: ServingDefaults,
    /// Directory of the content-addressed artifact cache.
    pub cache_dir: Option<PathBuf>,
    /// Variants built at the same time at startup.
    pub build_concurrency: usize,
    /// Connections older than this are closed gracefully so clients rebalance.
    pub max_connection_age: Option<std::time::Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    OnnxRuntime(#[from] OrtSetupError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("cache directory {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Serves until `shutdown` resolves, then drains. The listeners are bound by the caller, so
/// tests can bind port 0 and read the address.
pub async fn run(
    config: ServerConfig,
    grpc_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let entries = scan_repository(&config.model_store)?;
    let library = locate_library(config.ort_library.as_deref())?;
    let environment = Arc::new(init_environment(&library)?);

    let registry = Arc::new(Registry::new(entries));
    let cache = match &config.cache_dir {
        Some(directory) => Some(
            ArtifactCache::new(directory.clone())
                .map_err(|source| ServerError::Cache { path: directory.clone(), source })?,
        ),
        None => None,
    };
    let build = BuildSettings { concurrency: config.build_concurrency, cache };
    let (health, health_service) = tonic_health::server::health_reporter();
    let model_names: Vec<String> = registry.models().map(|model| model.name().to_owned()).collect();
    for name in model_names.iter().map(String::as_str).chain(["", INFERENCE_SERVICE_NAME]) {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let handle = crate::metrics::install().map_err(ServerError::Metrics)?;
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::metrics::serve(listener, handle, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })))
        }
        None => None,
    };

    let loader = {
        let registry = Arc::clone(&registry);
        let health = health.clone();
        let defaults = config.serving;
        tokio::spawn(async move {
            let loading = Arc::clone(&registry);
            tokio::task::spawn_blocking(move || loading.load_all(&environment, defaults, &build)).await?;
            for model in registry.models() {
                let status = if model.is_ready() { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status(model.name(), status).await;
            }
            if registry.is_ready() {
                health.set_service_status("", ServingStatus::Serving).await;
                health.set_service_status(INFERENCE_SERVICE_NAME, ServingStatus::Serving).await;
                tracing::info!("all models ready; serving");
            } else {
                tracing::error!("not every model loaded; health stays NOT_SERVING (see errors above)");
            }
            Ok::<_, tokio::task::JoinError>(())
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mantissa_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| ServerError::Metrics(format!("reflection: {err}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mantissa_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|err| ServerError::Metrics(format!("reflection: {err}")))?;
    let (shadows, shadow_tasks) = Shadows::start(&registry);
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(
        Arc::clone(&registry),
        config.max_message_bytes,
        shadows,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);

    let drain_health = health.clone();
    let drain_names = model_names.clone();
    let graceful = async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new connections; finishing in-flight requests");
        for name in drain_names.iter().map(String::as_str).chain(["", INFERENCE_SERVICE_NAME]) {
            drain_health.set_service_status(name, ServingStatus::NotServing).await;
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = config.max_connection_age {
        builder = builder.max_connection_age(age).max_connection_age_grace(age);
    }
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait out the peer's delayed ACK (~40 ms).
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            graceful,
        )
        .await?;

    let _ = stop_tx.send(true);
    // The service (and with it the shadow senders) is gone: comparisons still queued finish.
    for task in shadow_tasks {
        let _ = task.await;
    }
    loader.await??;
    tokio::task::spawn_blocking(move || registry.shutdown()).await?;
    if let Some(task) = metrics_task
        && let Ok(Err(err)) = task.await
    {
        tracing::warn!(error = %err, "metrics endpoint stopped with an error");
    }
    tracing::info!("shutdown complete");
    Ok(())
}
