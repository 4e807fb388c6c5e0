//! `mantissa bench`: a load generator for any KServe v2 gRPC server, in the spirit of
//! perf_analyzer, plus an in-process mode that runs the same model on ONNX Runtime directly
//! so that one command reports the server/in-process throughput ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mantissa_preparation::ArtifactCache;
use mantissa_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mantissa_proto::inference::model_infer_request::InferInputTensor;
use mantissa_proto::inference::{ModelInferRequest, ModelMetadataRequest};
use rand::Rng;
use serde::Serialize;
use tonic::transport::Channel;

use mantissa_runtime::bytes_layout::{join_bytes_elements, split_bytes_elements};
use mantissa_runtime::samples::read_inputs;
use mantissa_runtime::{
    DataType, Environment, InferenceRequest, InputTensor, ModelSource, SessionConfig, TensorData, execute,
    load_environment, open_session, signature_of,
};

use crate::commands::bench_inputs::{
    DatatypeArg, InputSpec, Overrides, ShapeArg, datatype_arg, file_inputs, random_inputs, shape_arg,
};
use crate::commands::duration_arg;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub url: String,
    /// Model to load-test.
    #[arg(long)]
    pub model: String,
    /// Model version: a version number or (Mantissa) a variant name; empty follows the
    /// server's routing.
    #[arg(long, default_value = "")]
    pub model_version: String,
    /// Rows per request along the batch dimension.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Concurrency levels to sweep (closed loop: each client waits for its answer).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Measurement time per level.
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    pub duration: Duration,
    /// Stop each level after this many requests instead of after --duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Send at a fixed rate (requests/s, open loop) with at most --concurrency in flight.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Warm-up time before each level, not measured.
    #[arg(long, value_parser = duration_arg, default_value = "1s")]
    pub warmup: Duration,
    /// Take inputs from an .npz file (keys = input names, rows along dimension 0; its arrays
    /// give the shapes, and the inputs when the server's metadata lists none); default random.
    #[arg(long)]
    pub input_data: Option<PathBuf>,
    /// The whole shape of one request's input, batch dimension included (NAME=D0,D1,...), for
    /// random inputs whose metadata shape has variable dimensions or is missing. Repeatable.
    #[arg(long = "shape", value_name = "NAME=DIMS", value_parser = shape_arg)]
    pub shapes: Vec<ShapeArg>,
    /// Datatype of a random input the server's metadata does not list (NAME=TYPE; default
    /// FP32). Repeatable.
    #[arg(long = "datatype", value_name = "NAME=TYPE", value_parser = datatype_arg)]
    pub datatypes: Vec<DatatypeArg>,
    /// Also run the model in-process on ONNX Runtime, with the instances and threads of its policy
    /// in this model repository, and print the server/in-process throughput ratio.
    #[arg(long)]
    pub in_process_store: Option<PathBuf>,
    /// ONNX Runtime library for --in-process-store.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
    /// The server's --cache-dir, so that a TensorRT variant run in-process loads the engines
    /// the server built instead of building its own.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(String);

fn fail(message: impl Into<String>) -> BenchError {
    BenchError(message.into())
}

/// Server-side averages per request over one level, from the ModelStatistics RPC.
#[derive(Debug, Serialize, Default)]
pub struct ServerBreakdown {
    pub requests: u64,
    pub queue_us: f64,
    pub compute_input_us: f64,
    pub compute_infer_us: f64,
    pub compute_output_us: f64,
    /// Rows per ONNX Runtime run (dynamic batching merges requests).
    pub rows_per_run: f64,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    /// Present when the server implements the ModelStatistics RPC.
    pub server: Option<ServerBreakdown>,
    pub requests: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub inferences_per_second: f64,
    pub latency_ms_mean: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct InProcessReport {
    /// The variant's execution provider (its policy's; no CPU fallback here).
    pub execution_provider: String,
    pub instances: u32,
    pub intra_op_threads: u32,
    pub runs: u64,
    pub seconds: f64,
    pub inferences_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub model_version: String,
    pub batch_size: usize,
    pub levels: Vec<LevelReport>,
    pub in_process: Option<InProcessReport>,
    /// Best server throughput divided by in-process throughput.
    pub server_to_in_process_ratio: Option<f64>,
}

/// One tensor of a prepared request.
#[derive(Debug, Clone)]
struct PreparedInput {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
    raw: Vec<u8>,
}

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    if args.batch_size == 0 || args.concurrency.contains(&0) {
        return Err(fail("--batch-size and every --concurrency level must be at least 1"));
    }
    let channel = Channel::from_shared(args.url.clone())
        .map_err(|err| fail(format!("invalid --url '{}': {err}", args.url)))?
        .connect()
        .await
        .map_err(|err| fail(format!("cannot connect to {}: {err}", args.url)))?;
    let mut client = GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let metadata = client
        .model_metadata(ModelMetadataRequest { name: args.model.clone(), version: args.model_version.clone() })
        .await
        .map_err(|status| fail(format!("ModelMetadata for '{}': {}", args.model, status.message())))?
        .into_inner();

    let flags = Overrides { shapes: &args.shapes, datatypes: &args.datatypes, batch_size: args.batch_size };
    let request_set = match &args.input_data {
        Some(path) => {
            let wanted = file_inputs(&args.model, &metadata.inputs, flags, path).map_err(fail)?;
            requests_from_npz(path, &wanted, args.batch_size)?
        }
        None => {
            let specs = random_inputs(&args.model, &metadata.inputs, flags).map_err(fail)?;
            vec![random_request(&specs), random_request(&specs), random_request(&specs), random_request(&specs)]
        }
    };
    let request_set = Arc::new(request_set);

    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let _ = run_level(&client, &args, &request_set, concurrency, Some(args.warmup)).await;
        let before = server_totals(&mut client, &args).await;
        let mut level = run_level(&client, &args, &request_set, concurrency, None).await;
        let after = server_totals(&mut client, &args).await;
        level.server = before.zip(after).map(|(before, after)| breakdown(&before, &after));
        if !args.json {
            eprintln!(
                "concurrency {concurrency}: {:.1} infer/s, p99 {:.2} ms",
                level.inferences_per_second, level.latency_ms_p99
            );
        }
        levels.push(level);
    }

    let in_process = match &args.in_process_store {
        Some(store) => Some(run_in_process(store, &args, &request_set).await?),
        None => None,
    };
    let best = levels.iter().map(|level| level.inferences_per_second).fold(0.0, f64::max);
    let ratio = in_process.as_ref().map(|report| best / report.inferences_per_second);
    let report = BenchReport {
        model: args.model.clone(),
        model_version: args.model_version.clone(),
        batch_size: args.batch_size,
        levels,
        in_process,
        server_to_in_process_ratio: ratio,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|err| fail(err.to_string()))?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Summed statistics over every variant of the model the level exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    success: u64,
    queue_ns: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
    rows: u64,
    runs: u64,
}

async fn server_totals(client: &mut GrpcInferenceServiceClient<Channel>, args: &BenchArgs) -> Option<Totals> {
    let request = mantissa_proto::inference::ModelStatisticsRequest {
        name: args.model.clone(),
        version: args.model_version.clone(),
    };
    let response = client.model_statistics(request).await.ok()?.into_inner();
    let mut totals = Totals::default();
    for stats in response.model_stats {
        let inference = stats.inference_stats.unwrap_or_default();
        let ns = |d: Option<mantissa_proto::inference::StatisticDuration>| d.map_or(0, |d| d.ns);
        totals.success += inference.success.map_or(0, |d| d.count);
        totals.queue_ns += ns(inference.queue);
        totals.input_ns += ns(inference.compute_input);
        totals.infer_ns += ns(inference.compute_infer);
        totals.output_ns += ns(inference.compute_output);
        totals.rows += stats.inference_count;
        totals.runs += stats.execution_count;
    }
    Some(totals)
}

fn breakdown(before: &Totals, after: &Totals) -> ServerBreakdown {
    let requests = after.success.saturating_sub(before.success);
    let per_request =
        |a: u64, b: u64| if requests > 0 { a.saturating_sub(b) as f64 / requests as f64 / 1000.0 } else { 0.0 };
    let runs = after.runs.saturating_sub(before.runs);
    ServerBreakdown {
        requests,
        queue_us: per_request(after.queue_ns, before.queue_ns),
        compute_input_us: per_request(after.input_ns, before.input_ns),
        compute_infer_us: per_request(after.infer_ns, before.infer_ns),
        compute_output_us: per_request(after.output_ns, before.output_ns),
        rows_per_run: if runs > 0 { after.rows.saturating_sub(before.rows) as f64 / runs as f64 } else { 0.0 },
    }
}

fn random_request(specs: &[InputSpec]) -> Vec<PreparedInput> {
    let mut rng = rand::rng();
    specs
        .iter()
        .map(|InputSpec { name, datatype, shape }| {
            let elements: usize = shape.iter().map(|&dim| dim as usize).product();
            let raw = match datatype {
                DataType::Fp32 => (0..elements).flat_map(|_| rng.random::<f32>().to_le_bytes()).collect(),
                DataType::Fp64 => (0..elements).flat_map(|_| rng.random::<f64>().to_le_bytes()).collect(),
                DataType::Fp16 => {
                    (0..elements).flat_map(|_| half::f16::from_f32(rng.random::<f32>()).to_le_bytes()).collect()
                }
                DataType::Bf16 => {
                    (0..elements).flat_map(|_| half::bf16::from_f32(rng.random::<f32>()).to_le_bytes()).collect()
                }
                DataType::Bool => (0..elements).map(|_| u8::from(rng.random::<bool>())).collect(),
                DataType::Bytes => join_bytes_elements(&vec![b"mantissa".to_vec(); elements]),
                // Small non-negative integers are valid for index-like inputs too.
                other => {
                    let size = other.element_size().unwrap_or(1);
                    (0..elements)
                        .flat_map(|_| {
                            let mut bytes = vec![0u8; size];
                            bytes[0] = rng.random_range(0..4);
                            bytes
                        })
                        .collect()
                }
            };
            PreparedInput { name: name.clone(), datatype: *datatype, shape: shape.clone(), raw }
        })
        .collect()
}

fn requests_from_npz(
    path: &Path,
    wanted: &[(String, DataType)],
    batch: usize,
) -> Result<Vec<Vec<PreparedInput>>, BenchError> {
    let arrays = read_inputs(path, wanted).map_err(|err| fail(err.to_string()))?;
    let columns: Vec<(Vec<u8>, Vec<usize>, usize)> = arrays
        .into_iter()
        .map(|array| {
            let size = array.datatype.element_size().unwrap_or(1);
            (array.raw, array.shape, size)
        })
        .collect();
    let rows = columns.iter().map(|(_, shape, _)| shape.first().copied().unwrap_or(0)).min().unwrap_or(0);
    if rows < batch {
        return Err(fail(format!("{} holds {rows} rows, fewer than --batch-size {batch}", path.display())));
    }
    let mut requests = Vec::new();
    for start in (0..=rows - batch).step_by(batch) {
        let inputs = wanted
            .iter()
            .zip(&columns)
            .map(|((name, datatype), (bytes, shape, size))| {
                let row_bytes = shape[1..].iter().product::<usize>() * size;
                let mut request_shape: Vec<i64> = shape.iter().map(|&dim| dim as i64).collect();
                request_shape[0] = batch as i64;
                PreparedInput {
                    name: name.clone(),
                    datatype: *datatype,
                    shape: request_shape,
                    raw: bytes[start * row_bytes..(start + batch) * row_bytes].to_vec(),
                }
            })
            .collect();
        requests.push(inputs);
    }
    Ok(requests)
}

fn wire_request(model: &str, version: &str, inputs: &[PreparedInput]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        inputs: inputs
            .iter()
            .map(|input| InferInputTensor {
                name: input.name.clone(),
                datatype: input.datatype.as_str().to_owned(),
                shape: input.shape.clone(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs.iter().map(|input| input.raw.clone()).collect(),
        ..Default::default()
    }
}

struct WorkerTally {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    done: u64,
}

async fn run_level(
    client: &GrpcInferenceServiceClient<Channel>,
    args: &BenchArgs,
    request_set: &Arc<Vec<Vec<PreparedInput>>>,
    concurrency: usize,
    warmup: Option<Duration>,
) -> LevelReport {
    let duration = warmup.unwrap_or(args.duration);
    let budget = if warmup.is_some() { None } else { args.requests };
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    // In rate mode each request has a scheduled send time; latency counts from it.
    let interval = args.rate.filter(|rate| *rate > 0.0).map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let mut client = client.clone();
        let request_set = Arc::clone(request_set);
        let issued = Arc::clone(&issued);
        let (model, version) = (args.model.clone(), args.model_version.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = WorkerTally {
                latencies: Histogram::new(3).expect("valid precision"),
                errors: BTreeMap::new(),
                done: 0,
            };
            loop {
                let ticket = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if budget.is_some_and(|limit| ticket >= limit) {
                    break;
                }
                let scheduled = match interval {
                    Some(step) => {
                        let at = started + step.mul_f64(ticket as f64);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                if budget.is_none() && scheduled >= deadline {
                    break;
                }
                let inputs = &request_set[(ticket as usize + worker) % request_set.len()];
                let result = client.model_infer(wire_request(&model, &version, inputs)).await;
                let micros = scheduled.elapsed().as_micros() as u64;
                match result {
                    Ok(_) => {
                        let _ = tally.latencies.record(micros.max(1));
                        tally.done += 1;
                    }
                    Err(status) => *tally.errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
            tally
        }));
    }
    let mut latencies = Histogram::<u64>::new(3).expect("valid precision");
    let mut errors = BTreeMap::new();
    let mut done = 0;
    for task in tasks {
        if let Ok(tally) = task.await {
            let _ = latencies.add(&tally.latencies);
            for (code, count) in tally.errors {
                *errors.entry(code).or_default() += count;
            }
            done += tally.done;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let ms = |micros: f64| micros / 1000.0;
    LevelReport {
        concurrency,
        server: None,
        requests: done,
        errors,
        seconds,
        requests_per_second: done as f64 / seconds,
        inferences_per_second: (done as f64 * args.batch_size as f64) / seconds,
        latency_ms_mean: ms(latencies.mean()),
        latency_ms_p50: ms(latencies.value_at_quantile(0.5) as f64),
        latency_ms_p90: ms(latencies.value_at_quantile(0.9) as f64),
        latency_ms_p99: ms(latencies.value_at_quantile(0.99) as f64),
    }
}

/// Runs the model straight on ONNX Runtime: the same file, batch size, instance count and
/// intra-op threads as the server's policy, each instance on its own thread, for --duration.
async fn run_in_process(
    store: &Path,
    args: &BenchArgs,
    request_set: &Arc<Vec<Vec<PreparedInput>>>,
) -> Result<InProcessReport, BenchError> {
    let entries = mantissa_model_store::scan_repository(store).map_err(|err| fail(err.to_string()))?;
    let entry = entries
        .into_iter()
        .find(|entry| entry.name == args.model)
        .ok_or_else(|| fail(format!("model '{}' is not in {}", args.model, store.display())))?;
    let version =
        if args.model_version.is_empty() { entry.policy.default_variant.clone() } else { args.model_version.clone() };
    let spec = entry
        .policy
        .find_variant(&version)
        .ok_or_else(|| fail(format!("model '{}' has no variant '{version}'", args.model)))?
        .clone();
    let environment = Arc::new(load_environment(args.ort_library.as_deref()).map_err(|err| fail(err.to_string()))?);
    let model =
        mantissa_preparation::build_variant(&environment, &entry, &spec).map_err(|err| fail(err.to_string()))?.source;
    let engine_cache = match &args.cache_dir {
        Some(directory) if mantissa_preparation::wants_engine_cache(&spec.execution_provider) => {
            let cache = ArtifactCache::new(directory.clone()).map_err(|err| fail(format!("--cache-dir: {err}")))?;
            Some(cache.engine_cache_dir(&args.model, &version, &model).map_err(|err| fail(err.to_string()))?)
        }
        _ => None,
    };
    let provider = mantissa_preparation::session_provider(&spec.execution_provider, engine_cache);
    let run = InProcessRun {
        environment,
        model,
        requests: Arc::new(request_set.iter().map(|inputs| in_process_request(inputs)).collect()),
        instances: spec.serving.instances,
        session: SessionConfig {
            intra_op_threads: spec.serving.intra_op_threads,
            intra_op_spinning: spec.serving.intra_op_spinning,
            cpu_memory: mantissa_runtime::CpuMemory::OwnArena,
            provider: provider.clone(),
        },
        warmup: args.warmup,
        duration: args.duration,
    };
    let (total, seconds) =
        tokio::task::spawn_blocking(move || run.run()).await.map_err(|err| fail(err.to_string()))?.map_err(fail)?;
    Ok(InProcessReport {
        execution_provider: provider.describe(),
        instances: spec.serving.instances,
        intra_op_threads: spec.serving.intra_op_threads,
        runs: total,
        seconds,
        inferences_per_second: (total as f64 * args.batch_size as f64) / seconds,
    })
}

/// A prepared wire request as the typed request the executor takes.
fn in_process_request(inputs: &[PreparedInput]) -> InferenceRequest {
    InferenceRequest {
        id: String::new(),
        inputs: inputs
            .iter()
            .map(|input| InputTensor {
                datatype: input.datatype,
                shape: input.shape.clone(),
                data: match input.datatype {
                    DataType::Bytes => TensorData::Strings(
                        split_bytes_elements(&input.raw)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                            .collect(),
                    ),
                    _ => TensorData::Raw(input.raw.clone()),
                },
            })
            .collect(),
        outputs: Vec::new(),
    }
}

/// The in-process side of the comparison: `instances` threads, each with its own session.
struct InProcessRun {
    environment: Arc<Environment>,
    model: ModelSource,
    requests: Arc<Vec<InferenceRequest>>,
    instances: u32,
    session: SessionConfig,
    warmup: Duration,
    duration: Duration,
}

impl InProcessRun {
    /// Runs every instance (blocking) and returns the total runs and the longest instance's time.
    fn run(self) -> Result<(u64, f64), String> {
        let barrier = Arc::new(std::sync::Barrier::new(self.instances as usize));
        let this = Arc::new(self);
        let handles: Vec<_> = (0..this.instances)
            .map(|_| {
                let this = Arc::clone(&this);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || this.run_instance(&barrier))
            })
            .collect();
        let mut total = 0;
        let mut seconds: f64 = 0.0;
        for handle in handles {
            let (count, elapsed) = handle.join().map_err(|_| "in-process worker panicked".to_owned())??;
            total += count;
            seconds = seconds.max(elapsed);
        }
        Ok((total, seconds))
    }

    /// One instance: warm up, wait for the others, then run for the measured duration.
    fn run_instance(&self, barrier: &std::sync::Barrier) -> Result<(u64, f64), String> {
        let mut session = open_session(&self.environment, &self.model, &self.session).map_err(|err| err.to_string())?;
        let signature = signature_of(&session, None, u32::MAX).map_err(|err| err.to_string())?;
        let mut run_once = |index: usize| {
            let mut request = self.requests[index % self.requests.len()].clone();
            request.outputs = (0..signature.outputs.len()).collect();
            execute(&mut session, &signature, &request).map_err(|err| err.to_string())
        };
        let warm_until = Instant::now() + self.warmup;
        let mut index = 0;
        while Instant::now() < warm_until {
            run_once(index)?;
            index += 1;
        }
        barrier.wait();
        let started = Instant::now();
        let mut count = 0u64;
        while started.elapsed() < self.duration {
            run_once(index)?;
            index += 1;
            count += 1;
        }
        Ok((count, started.elapsed().as_secs_f64()))
    }
}

fn print_table(report: &BenchReport) {
    println!("model {} version '{}' batch {}", report.model, report.model_version, report.batch_size);
    println!(
        "{:>11} {:>9} {:>7} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "concurrency", "requests", "errors", "infer/s", "mean ms", "p50 ms", "p90 ms", "p99 ms"
    );
    for level in &report.levels {
        let errors: u64 = level.errors.values().sum();
        println!(
            "{:>11} {:>9} {:>7} {:>12.1} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            level.concurrency,
            level.requests,
            errors,
            level.inferences_per_second,
            level.latency_ms_mean,
            level.latency_ms_p50,
            level.latency_ms_p90,
            level.latency_ms_p99
        );
        for (code, count) in &level.errors {
            println!("{:>11} {count} x {code}", "");
        }
        if let Some(server) = &level.server {
            println!(
                "{:>11} server per request: queue {:.1} us, input {:.1} us, infer {:.1} us, output {:.1} us; {:.2} rows per run",
                "",
                server.queue_us,
                server.compute_input_us,
                server.compute_infer_us,
                server.compute_output_us,
                server.rows_per_run
            );
        }
    }
    if let Some(in_process) = &report.in_process {
        println!(
            "in-process ONNX Runtime: {:.1} infer/s on {} ({} instances x {} intra-op threads, {} runs)",
            in_process.inferences_per_second,
            in_process.execution_provider,
            in_process.instances,
            in_process.intra_op_threads,
            in_process.runs
        );
    }
    if let Some(ratio) = report.server_to_in_process_ratio {
        println!("server / in-process throughput: {ratio:.3}");
    }
}
