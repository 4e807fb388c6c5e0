//! Command-line interface. Every serve flag can also come from a `MANTISSA_*` environment
//! variable, which is how containers configure it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::{analyze, bench, duration_arg, quantize};
use crate::lifecycle::loading::ServingDefaults;
use crate::lifecycle::startup::ServerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "mantissa",
    version,
    about = "Mantissa: a gRPC inference server for ONNX models (KServe v2 / Triton protocol)",
    long_about = "Mantissa serves the ONNX models of a model repository over the KServe v2 / Open Inference \
Protocol gRPC service, wire-compatible with Triton's clients. Each model directory holds model.onnx and an \
optional policy.yaml naming its variants and serving settings."
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, env = "MANTISSA_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `mantissa=debug`.
    #[arg(long, env = "MANTISSA_LOG", default_value = "info,ort=warn", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve every model of a model repository over gRPC.
    Serve(ServeArgs),
    /// Measure a KServe v2 gRPC server's latency and throughput, optionally beside the same model
    /// run in-process on ONNX Runtime.
    Bench(bench::BenchArgs),
    /// Convert an FP32 ONNX model with the same pass the server runs at startup, and print a summary.
    Quantize(quantize::QuantizeArgs),
    /// Report how ready an FP32 model is for INT8 on sample data: input ranges, per-channel range spread, dead
    /// ReLU/Clip channels, saturated Sigmoid/Tanh inputs, MACCs per sample and the most INT8-sensitive nodes.
    Analyze(analyze::AnalyzeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model repository: one directory per model holding model.onnx and policy.yaml.
    #[arg(long, env = "MANTISSA_MODEL_STORE")]
    pub model_store: PathBuf,
    /// Address of the gRPC endpoint (inference, health, reflection).
    #[arg(long, env = "MANTISSA_GRPC_ADDR", default_value = "0.0.0.0:8001")]
    pub grpc_addr: SocketAddr,
    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, env = "MANTISSA_METRICS_ADDR", default_value = "0.0.0.0:8002")]
    pub metrics_addr: SocketAddr,
    /// Path of libonnxruntime.so.1.31.1. Default: next to the executable or .onnxruntime/lib.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
    /// Largest gRPC request or response message, in bytes.
    #[arg(long, env = "MANTISSA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// max_batch_size for models whose policy leaves it unset and whose first dimension is dynamic.
    #[arg(long, env = "MANTISSA_DEFAULT_MAX_BATCH_SIZE", default_value_t = 64)]
    pub default_max_batch_size: u32,
    /// Requests each variant may hold waiting for a worker; more are refused with RESOURCE_EXHAUSTED.
    /// A policy's `max_queue_size` overrides it per variant.
    #[arg(long, env = "MANTISSA_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// Directory where built variants (FP16, INT8) are cached by content, so a restart with the
    /// same inputs skips quantization. Without it every start rebuilds.
    #[arg(long, env = "MANTISSA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Variants built at the same time at startup.
    #[arg(long, env = "MANTISSA_BUILD_CONCURRENCY", default_value_t = 2)]
    pub build_concurrency: usize,
    /// Close client connections after this long (e.g. 5m), so HTTP/2 clients reconnect and
    /// spread over new replicas; in-flight calls get a grace period of the same length.
    #[arg(long, env = "MANTISSA_MAX_CONNECTION_AGE", value_parser = duration_arg)]
    pub max_connection_age: Option<Duration>,

    /// On SIGTERM/SIGINT: stop taking requests at once, finish queued ones, and exit within
    /// this long; requests still queued when it is about to run out are answered UNAVAILABLE.
    /// Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "MANTISSA_EXIT_TIMEOUT", value_parser = duration_arg, default_value = "30s")]
    pub exit_timeout: Duration,
}

impl ServeArgs {
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            model_store: self.model_store.clone(),
            ort_library: self.ort_library.clone(),
            max_message_bytes: self.max_message_bytes,
            serving: ServingDefaults {
                max_batch_size: self.default_max_batch_size,
                queue_capacity: self.queue_capacity.max(1),
            },
            cache_dir: self.cache_dir.clone(),
            build_concurrency: self.build_concurrency.max(1),
            max_connection_age: self.max_connection_age,
            exit_timeout: self.exit_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(duration_arg("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration_arg("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration_arg("1.5").unwrap(), Duration::from_millis(1500));
        assert!(duration_arg("5h").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
