//! Server lifecycle: load the repository, serve gRPC (inference, health, reflection) and
//! metrics, and on shutdown stop accepting, finish in-flight work and join the workers.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use mantissa_model_store::{RepositoryError, scan_repository};
use mantissa_preparation::ArtifactCache;
use mantissa_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use mantissa_runtime::{Environment, OrtSetupError, available_providers, load_environment};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_reflection::server as reflection;

use crate::api::service::InferenceService;
use crate::lifecycle::loading::{BuildSettings, ServingDefaults, load_all};
use crate::routing::registry::Registry;
use crate::routing::shadow::Shadows;
use crate::scheduling::drain;
use crate::telemetry::metrics;

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
    /// From a stop request to exit: queued work that cannot run in time is answered
    /// UNAVAILABLE (see [`crate::scheduling::drain`]).
    pub exit_timeout: std::time::Duration,
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
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("reflection: {0}")]
    Reflection(#[from] reflection::Error),
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
    let environment = Arc::new(load_environment(config.ort_library.as_deref())?);
    // Which GPU variants can run at all follows from this list (see lifecycle::providers).
    tracing::info!(providers = %available_providers().join(", "), "execution providers of the ONNX Runtime library");
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
    set_health(&health, &model_names, ServingStatus::NotServing).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let handle = metrics::install()?;
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(metrics::serve(listener, handle, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })))
        }
        None => None,
    };
    let loader = spawn_loader(Arc::clone(&registry), health.clone(), environment, config.serving, build);

    let (shadows, shadow_tasks) = Shadows::start(&registry);
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(
        Arc::clone(&registry),
        config.max_message_bytes,
        shadows,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let exit_timeout = config.exit_timeout;
    let graceful = async move {
        shutdown.await;
        drain::begin(exit_timeout);
        tracing::info!(
            ?exit_timeout,
            "shutdown requested: no new connections or requests; finishing queued requests within the exit timeout"
        );
        set_health(&health, &model_names, ServingStatus::NotServing).await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = config.max_connection_age {
        builder = builder.max_connection_age(age).max_connection_age_grace(age);
    }
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;
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
    match drain::cut_jobs() {
        0 => tracing::info!("shutdown complete"),
        cut => tracing::warn!(
            cut,
            ?exit_timeout,
            "shutdown complete; requests still queued when the exit timeout ran out were answered UNAVAILABLE unrun"
        ),
    }
    Ok(())
}

/// Sets every model's health, the server's ("") and the inference service's.
async fn set_health(health: &HealthReporter, model_names: &[String], status: ServingStatus) {
    for name in model_names.iter().map(String::as_str).chain(["", INFERENCE_SERVICE_NAME]) {
        health.set_service_status(name, status).await;
    }
}

/// Loads every variant off the async runtime, then reports each model's health and, when all
/// are ready, the server's.
fn spawn_loader(
    registry: Arc<Registry>,
    health: HealthReporter,
    environment: Arc<Environment>,
    defaults: ServingDefaults,
    build: BuildSettings,
) -> JoinHandle<Result<(), tokio::task::JoinError>> {
    tokio::spawn(async move {
        let loading = Arc::clone(&registry);
        tokio::task::spawn_blocking(move || load_all(&loading, &environment, defaults, &build)).await?;
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
        Ok(())
    })
}

/// gRPC server reflection (v1 and the v1alpha grpcurl still asks for) over our protocol and
/// the health protocol.
#[allow(clippy::type_complexity)]
fn reflection_services() -> Result<
    (
        reflection::v1::ServerReflectionServer<impl reflection::v1::ServerReflection>,
        reflection::v1alpha::ServerReflectionServer<impl reflection::v1alpha::ServerReflection>,
    ),
    reflection::Error,
> {
    let v1 = reflection::Builder::configure()
        .register_encoded_file_descriptor_set(mantissa_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = reflection::Builder::configure()
        .register_encoded_file_descriptor_set(mantissa_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}
