//! Prometheus metrics: every name in one place, described at startup, exported on the metrics
//! port as text. Histograms have explicit buckets.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "mantissa_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "mantissa_request_duration_seconds";
pub const BATCH_SIZE: &str = "mantissa_batch_size";
pub const REQUESTS_DROPPED_TOTAL: &str = "mantissa_requests_dropped_total";

/// Requests merged into one run: 1, 2, 4, ... 256.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide recorder and returns the handle that renders the text format.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .map_err(|err| err.to_string())?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_owned()), BATCH_BUCKETS)
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())?;
    metrics::describe_counter!(REQUESTS_TOTAL, "Inference requests by model, variant and outcome");
    metrics::describe_histogram!(BATCH_SIZE, "Requests merged into one ONNX Runtime run");
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
