//! Prometheus metrics: every name in one place, described at startup, exported on the metrics
//! port as text. Histograms have explicit buckets.

use std::time::Duration;

use mantissa_preparation::accuracy::DriftFigures;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "mantissa_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "mantissa_request_duration_seconds";
pub const BATCH_SIZE: &str = "mantissa_batch_size";
pub const QUEUE_DURATION_SECONDS: &str = "mantissa_queue_duration_seconds";
pub const COMPUTE_DURATION_SECONDS: &str = "mantissa_compute_duration_seconds";
pub const QUEUE_DEPTH: &str = "mantissa_queue_depth";
pub const IN_FLIGHT: &str = "mantissa_requests_in_flight";
pub const SHADOW_COSINE: &str = "mantissa_shadow_drift_cosine";
pub const SHADOW_SQNR_DB: &str = "mantissa_shadow_drift_sqnr_db";
pub const SHADOW_MAX_ABS: &str = "mantissa_shadow_drift_max_abs_error";
pub const SHADOW_SAMPLES_TOTAL: &str = "mantissa_shadow_samples_total";
pub const SHADOW_DROPPED_TOTAL: &str = "mantissa_shadow_dropped_total";

const COSINE_BUCKETS: &[f64] = &[0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0];
const SQNR_BUCKETS: &[f64] = &[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0];
const ERROR_BUCKETS: &[f64] = &[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0];

pub const QUEUE_MICROSECONDS_TOTAL: &str = "mantissa_queue_microseconds_total";
pub const REQUESTS_SUCCEEDED_TOTAL: &str = "mantissa_requests_succeeded_total";
pub const REQUESTS_DROPPED_TOTAL: &str = "mantissa_requests_dropped_total";
pub const VARIANT_READY: &str = "mantissa_variant_ready";
pub const BUILD_DURATION_SECONDS: &str = "mantissa_variant_build_duration_seconds";
pub const ARTIFACT_BYTES: &str = "mantissa_variant_artifact_bytes";
pub const DRIFT_COSINE: &str = "mantissa_startup_drift_cosine";
pub const DRIFT_SQNR_DB: &str = "mantissa_startup_drift_sqnr_db";
pub const DRIFT_MAX_ABS: &str = "mantissa_startup_drift_max_abs_error";
pub const DRIFT_RMSE: &str = "mantissa_startup_drift_rmse";
pub const DRIFT_TOP1: &str = "mantissa_startup_drift_top1_agreement";

/// Requests merged into one run: 1, 2, 4, ... 256.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide recorder and returns the handle that renders the text format.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_owned()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SHADOW_COSINE.to_owned()), COSINE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SHADOW_SQNR_DB.to_owned()), SQNR_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SHADOW_MAX_ABS.to_owned()), ERROR_BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!(REQUESTS_TOTAL, "Inference requests by model, variant and outcome");
    metrics::describe_histogram!(BATCH_SIZE, "Requests merged into one ONNX Runtime run");
    metrics::describe_histogram!(
        QUEUE_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time a request waited in its variant's queue before a worker took it"
    );
    metrics::describe_histogram!(
        COMPUTE_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of the ONNX Runtime run (with batching: of the whole batch) that served a request"
    );
    metrics::describe_histogram!(
        SHADOW_COSINE,
        "Live shadow drift: cosine similarity of a sampled request's outputs with the reference's"
    );
    metrics::describe_histogram!(SHADOW_SQNR_DB, "Live shadow drift: SQNR in dB against the reference");
    metrics::describe_histogram!(SHADOW_MAX_ABS, "Live shadow drift: largest absolute difference from the reference");
    metrics::describe_counter!(SHADOW_SAMPLES_TOTAL, "Sampled requests compared with the reference");
    metrics::describe_counter!(
        SHADOW_DROPPED_TOTAL,
        "Samples dropped because the shadow queue or the reference was busy"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Requests waiting in the variant's queue");
    metrics::describe_counter!(
        QUEUE_MICROSECONDS_TOTAL,
        metrics::Unit::Microseconds,
        "Cumulative queue time of executed requests, in microseconds (counters are integers); with mantissa_requests_succeeded_total it gives the average queue time per request"
    );
    metrics::describe_counter!(REQUESTS_SUCCEEDED_TOTAL, "Requests answered with outputs");
    metrics::describe_gauge!(IN_FLIGHT, "Requests received and not yet answered");
    metrics::describe_gauge!(VARIANT_READY, "1 when the variant serves, 0 when it failed to load or missed its budget");
    metrics::describe_gauge!(
        BUILD_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to build (or load from cache) the variant at startup"
    );
    metrics::describe_gauge!(ARTIFACT_BYTES, metrics::Unit::Bytes, "Size of the model the variant's sessions load");
    metrics::describe_gauge!(DRIFT_COSINE, "Startup drift against the reference on holdout data: cosine similarity");
    metrics::describe_gauge!(DRIFT_SQNR_DB, "Startup drift: signal-to-quantization-noise ratio in dB");
    metrics::describe_gauge!(DRIFT_MAX_ABS, "Startup drift: largest absolute difference");
    metrics::describe_gauge!(DRIFT_RMSE, "Startup drift: root mean square error");
    metrics::describe_gauge!(DRIFT_TOP1, "Startup drift: share of rows whose arg-max class matches the reference");
    metrics::describe_counter!(
        REQUESTS_DROPPED_TOTAL,
        "Queued requests dropped before execution, by reason (cancelled, deadline)"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving an inference request to answering it"
    );
    Ok(handle)
}

pub fn record_request(model: &str, variant: &str, outcome: &'static str, elapsed: Duration) {
    let labels = [("model", model.to_owned()), ("variant", variant.to_owned()), ("outcome", outcome.to_owned())];
    metrics::counter!(REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, &labels).record(elapsed.as_secs_f64());
    if outcome == "ok" {
        metrics::counter!(REQUESTS_SUCCEEDED_TOTAL, &variant_labels(model, variant)).increment(1);
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()) }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

pub fn record_dropped(model: &str, variant: &str, reason: &'static str) {
    let labels = [("model", model.to_owned()), ("variant", variant.to_owned()), ("reason", reason.to_owned())];
    metrics::counter!(REQUESTS_DROPPED_TOTAL, &labels).increment(1);
}

fn variant_labels(model: &str, variant: &str) -> [(&'static str, String); 2] {
    [("model", model.to_owned()), ("variant", variant.to_owned())]
}

pub fn set_variant_ready(model: &str, variant: &str, ready: bool) {
    metrics::gauge!(VARIANT_READY, &variant_labels(model, variant)).set(if ready { 1.0 } else { 0.0 });
}

pub fn set_build_figures(model: &str, variant: &str, elapsed: Duration, artifact_bytes: u64) {
    let labels = variant_labels(model, variant);
    metrics::gauge!(BUILD_DURATION_SECONDS, &labels).set(elapsed.as_secs_f64());
    metrics::gauge!(ARTIFACT_BYTES, &labels).set(artifact_bytes as f64);
}

pub fn set_startup_drift(model: &str, variant: &str, output: &str, figures: &DriftFigures) {
    let labels = [("model", model.to_owned()), ("variant", variant.to_owned()), ("output", output.to_owned())];
    metrics::gauge!(DRIFT_COSINE, &labels).set(figures.cosine);
    metrics::gauge!(DRIFT_SQNR_DB, &labels).set(figures.sqnr_db.min(1e9));
    metrics::gauge!(DRIFT_MAX_ABS, &labels).set(figures.max_abs);
    metrics::gauge!(DRIFT_RMSE, &labels).set(figures.rmse);
    if let Some(agreement) = figures.top1_agreement {
        metrics::gauge!(DRIFT_TOP1, &labels).set(agreement);
    }
}

/// Records, for each request of a run, how long it queued and how long the run took.
pub fn record_run(model: &str, variant: &str, queued: &[Duration], compute: Duration, queue_depth: usize) {
    let labels = variant_labels(model, variant);
    let queue = metrics::histogram!(QUEUE_DURATION_SECONDS, &labels);
    let run = metrics::histogram!(COMPUTE_DURATION_SECONDS, &labels);
    let total_queue: f64 = queued.iter().map(Duration::as_secs_f64).sum();
    for waited in queued {
        queue.record(waited.as_secs_f64());
        run.record(compute.as_secs_f64());
    }
    // Counters take integers, so the cumulative queue time is counted in microseconds (the
    // queue histogram's _sum carries the same total in seconds).
    metrics::counter!(QUEUE_MICROSECONDS_TOTAL, &labels).increment((total_queue * 1e6).round() as u64);
    metrics::histogram!(BATCH_SIZE, &labels).record(queued.len() as f64);
    metrics::gauge!(QUEUE_DEPTH, &labels).set(queue_depth as f64);
}

/// Counts a request as in flight until the returned guard is dropped.
pub fn in_flight(model: &str) -> InFlight {
    let gauge = metrics::gauge!(IN_FLIGHT, "model" => model.to_owned());
    gauge.increment(1.0);
    InFlight(gauge)
}

pub struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

pub fn record_shadow_drift(model: &str, variant: &str, output: &str, figures: &DriftFigures) {
    let labels = [("model", model.to_owned()), ("variant", variant.to_owned()), ("output", output.to_owned())];
    metrics::histogram!(SHADOW_COSINE, &labels).record(figures.cosine);
    metrics::histogram!(SHADOW_SQNR_DB, &labels).record(figures.sqnr_db.min(1e9));
    metrics::histogram!(SHADOW_MAX_ABS, &labels).record(figures.max_abs);
}

pub fn record_shadow_sample(model: &str, variant: &str) {
    metrics::counter!(SHADOW_SAMPLES_TOTAL, &variant_labels(model, variant)).increment(1);
}

pub fn record_shadow_dropped(model: &str, variant: &str) {
    metrics::counter!(SHADOW_DROPPED_TOTAL, &variant_labels(model, variant)).increment(1);
}
