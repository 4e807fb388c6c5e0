//! The `inference.GRPCInferenceService` handlers. They only translate between protocol messages
//! and the registry's domain types; all checks live in `validation`, all work in the
//! scheduling layer's workers, and ModelConfig is assembled in `model_config`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use mantissa_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use mantissa_proto::inference::model_infer_response::InferOutputTensor;
use mantissa_proto::inference::model_metadata_response::TensorMetadata;
use mantissa_proto::inference::repository_index_response::ModelIndex;
use mantissa_proto::inference::*;
use tonic::{Request, Response, Status};

use mantissa_runtime::{OutputTensor, TensorSpec};

use crate::api::model_config::model_config;
use crate::api::validation::validate_request;
use crate::error::ServeError;
use crate::routing::registry::{Registry, ServedModel, Variant};
use crate::routing::shadow::{ShadowSample, Shadows};
use crate::routing::split::{parameter_text, route};
use crate::scheduling::queue::SubmitError;
use crate::scheduling::workers::WorkerPool;
use crate::telemetry::metrics;

/// Protocol extensions this server implements, as listed by ServerMetadata.
pub const EXTENSIONS: &[&str] = &["model_configuration", "statistics"];

/// The response parameter that names the variant behind the numeric `model_version`.
pub const VARIANT_PARAMETER: &str = "variant";

fn text_parameter(text: &str) -> InferParameter {
    InferParameter { parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(text.to_owned())) }
}

/// The gRPC service: a cheap handle over the shared registry.
#[derive(Debug, Clone)]
pub struct InferenceService {
    registry: Arc<Registry>,
    max_message_bytes: usize,
    shadows: Shadows,
}

impl InferenceService {
    pub fn new(registry: Arc<Registry>, max_message_bytes: usize, shadows: Shadows) -> Self {
        Self { registry, max_message_bytes, shadows }
    }

    fn ready_variant(
        &self,
        model: &str,
        version: &str,
    ) -> Result<(&ServedModel, &Variant, Arc<WorkerPool>), ServeError> {
        let served = self.registry.model(model)?;
        let variant = served.variant(version)?;
        Ok((served, variant, ready_pool(served, variant)?))
    }

    /// Serves one request; `routed` learns the variant as soon as routing chose it.
    async fn infer(
        &self,
        request: &mut ModelInferRequest,
        received: Instant,
        client_timeout: Option<Duration>,
        routed: &mut Option<String>,
    ) -> Result<ModelInferResponse, ServeError> {
        let served = self.registry.model(&request.model_name)?;
        let _in_flight = metrics::in_flight(served.name());
        let parameters = &request.parameters;
        let variant = route(served, &request.model_version, |key| parameters.get(key).and_then(parameter_text))?;
        *routed = Some(variant.spec.name.clone());
        let pool = ready_pool(served, variant)?;
        let result = self.run_on(served.name(), variant, &pool, request, received, client_timeout).await;
        pool.statistics().record_request(result.is_ok(), received.elapsed());
        let outputs = result?;
        // The version number says which variant served, as Triton's clients expect; the
        // `variant` parameter names it for a person.
        let mut response = ModelInferResponse {
            model_name: served.name().to_owned(),
            model_version: variant.version(),
            id: request.id.clone(),
            parameters: HashMap::from([(VARIANT_PARAMETER.to_owned(), text_parameter(&variant.spec.name))]),
            ..Default::default()
        };
        for output in outputs {
            response.outputs.push(InferOutputTensor {
                name: output.name,
                datatype: output.datatype.as_str().to_owned(),
                shape: output.shape,
                ..Default::default()
            });
            response.raw_output_contents.push(output.raw);
        }
        Ok(response)
    }
}

impl InferenceService {
    /// Validates, queues and awaits one request on `pool`, sampling it for shadow comparison.
    async fn run_on(
        &self,
        model: &str,
        variant: &Variant,
        pool: &WorkerPool,
        request: &mut ModelInferRequest,
        received: Instant,
        client_timeout: Option<Duration>,
    ) -> Result<Vec<OutputTensor>, ServeError> {
        let valid = validate_request(request, pool.signature(), self.max_message_bytes)?;
        let shadow_copy = self.shadows.wants(model, &variant.spec.name).then(|| valid.clone());
        let deadline = effective_deadline(received, client_timeout, variant.spec.serving.default_timeout);
        let receiver = pool.submit(valid, deadline).map_err(|err| match err {
            SubmitError::Full { capacity } => {
                ServeError::QueueFull { model: model.to_owned(), version: variant.label(), capacity }
            }
            SubmitError::Closed => ServeError::ShuttingDown,
        })?;
        let reply = async { receiver.await.map_err(|_| ServeError::ShuttingDown) };
        let outputs = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), reply)
                .await
                .map_err(|_| ServeError::DeadlineExceeded { waited: received.elapsed() })???,
            None => reply.await??,
        };
        if let Some(request) = shadow_copy {
            let sample = ShadowSample { variant: variant.spec.name.clone(), request, outputs: outputs.clone() };
            self.shadows.offer(model, sample);
        }
        Ok(outputs)
    }
}

/// The grpc-timeout header (`<digits><unit>`, unit one of H M S m u n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// When a request stops being worth running: the client's deadline or the policy's default,
/// whichever is sooner. The client's deadline is brought forward by 2 ms so that the server
/// answers DEADLINE_EXCEEDED itself before the transport cancels the call.
fn effective_deadline(received: Instant, client: Option<Duration>, default: Option<Duration>) -> Option<Instant> {
    let client = client.map(|timeout| received + timeout.saturating_sub(Duration::from_millis(2)));
    let default = default.map(|timeout| received + timeout);
    match (client, default) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn ready_pool(served: &ServedModel, variant: &Variant) -> Result<Arc<WorkerPool>, ServeError> {
    variant.pool().map_err(|reason| ServeError::NotReady {
        model: served.name().to_owned(),
        version: variant.label(),
        reason,
    })
}

fn tensor_metadata(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|spec| TensorMetadata {
            name: spec.name.clone(),
            datatype: spec.datatype.as_str().to_owned(),
            shape: spec.dims.clone(),
        })
        .collect()
}

type StreamInferStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by this server"))
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.registry.is_ready() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        // Like Triton, an unknown model or version is simply not ready, so clients can poll
        // readiness before a model appears without handling an error.
        let ready = self
            .registry
            .model(&request.name)
            .and_then(|served| served.variant(&request.version))
            .is_ok_and(Variant::is_ready);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "mantissa".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let (served, _, pool) = self.ready_variant(&request.name, &request.version)?;
        let signature = pool.signature();
        Ok(Response::new(ModelMetadataResponse {
            name: served.name().to_owned(),
            versions: served.version_numbers(),
            platform: "onnxruntime_onnx".to_owned(),
            inputs: tensor_metadata(&signature.inputs),
            outputs: tensor_metadata(&signature.outputs),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let client_timeout =
            request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let mut request = request.into_inner();
        let mut routed = None;
        let result = self.infer(&mut request, started, client_timeout, &mut routed).await;
        // Label values come from the server's own models and variants only, so clients cannot
        // create series by sending names that do not exist.
        let (model, variant) = match (&result, &routed) {
            (Err(ServeError::ModelNotFound { .. }), _) => ("_unknown", "".to_owned()),
            (_, Some(variant)) => (request.model_name.as_str(), variant.clone()),
            (_, None) => (request.model_name.as_str(), "_unknown".to_owned()),
        };
        let outcome = result.as_ref().map_or_else(ServeError::error_type, |_| "ok");
        metrics::record_request(model, &variant, outcome, started.elapsed());
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => {
                tracing::debug!(model = %request.model_name, id = %request.id, error = %err, "request failed");
                Err(err.into())
            }
        }
    }

    type ModelStreamInferStream = StreamInferStream;

    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        Err(unimplemented("ModelStreamInfer"))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let (served, variant, pool) = self.ready_variant(&request.name, &request.version)?;
        let config = model_config(served, variant, pool.signature());
        Ok(Response::new(ModelConfigResponse { config: Some(config) }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let models: Vec<&ServedModel> = if request.name.is_empty() {
            self.registry.models().collect()
        } else {
            vec![self.registry.model(&request.name)?]
        };
        let mut model_stats = Vec::new();
        for served in models {
            let variants: Vec<&Variant> = if request.version.is_empty() {
                served.variants.iter().collect()
            } else {
                vec![served.variant(&request.version)?]
            };
            for variant in variants {
                if let Ok(pool) = variant.pool() {
                    model_stats.push(pool.statistics().proto(served.name(), &variant.version()));
                }
            }
        }
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        let mut models = Vec::new();
        for served in self.registry.models() {
            for variant in &served.variants {
                let (state, reason) = variant.state_name();
                if request.ready && state != "READY" {
                    continue;
                }
                models.push(ModelIndex {
                    name: served.name().to_owned(),
                    version: variant.version(),
                    state: state.to_owned(),
                    reason,
                });
            }
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        _: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        Err(unimplemented("RepositoryModelLoad (models are loaded from the repository at startup)"))
    }

    async fn repository_model_unload(
        &self,
        _: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        Err(unimplemented("RepositoryModelUnload (models are loaded from the repository at startup)"))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        Err(unimplemented("system shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        Err(unimplemented("system shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        Err(unimplemented("system shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        Err(unimplemented("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        Err(unimplemented("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Err(unimplemented("CUDA shared memory"))
    }

    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> Result<Response<TraceSettingResponse>, Status> {
        Err(unimplemented("TraceSetting"))
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> Result<Response<LogSettingsResponse>, Status> {
        Err(unimplemented("LogSettings"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn the_sooner_deadline_wins() {
        let now = Instant::now();
        let both = effective_deadline(now, Some(Duration::from_secs(1)), Some(Duration::from_millis(100)));
        assert_eq!(both, Some(now + Duration::from_millis(100)));
        let client = effective_deadline(now, Some(Duration::from_millis(100)), None).unwrap();
        assert_eq!(client, now + Duration::from_millis(98));
        assert_eq!(effective_deadline(now, None, None), None);
    }
}
