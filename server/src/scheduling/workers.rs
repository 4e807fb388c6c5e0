//! Worker threads for one variant: each owns an ONNX Runtime session and takes jobs from the
//! bounded queue (`queue`) shared by all workers of the variant. Tokio tasks only enqueue and await a
//! oneshot reply, so inference never blocks the async runtime.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;
use mantissa_runtime::{
    Environment, InferenceRequest, ModelSignature, ModelSource, OutputTensor, RunTimings, RuntimeError, Session,
    SessionConfig, execute, execute_timed, open_session, signature_of, warmup_request,
};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::scheduling::batcher::{self, BatchPolicy, NextTake};
use crate::scheduling::drain;
use crate::scheduling::queue::{Job, JobQueue, JobResult, SubmitError};
use crate::telemetry::metrics;
use crate::telemetry::statistics::VariantStatistics;

/// What a variant's workers need to start.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    pub label: String,
    pub model_name: String,
    pub variant_name: String,
    pub model: ModelSource,
    pub instances: u32,
    pub session: SessionConfig,
    pub max_batch_size: Option<u32>,
    pub default_max_batch_size: u32,
    pub queue_capacity: usize,
    /// Merge compatible queued requests into one run (only for models that batch).
    pub dynamic_batching: bool,
    /// How long to wait for more requests once one is in hand.
    pub max_queue_delay: std::time::Duration,
    /// Batch sizes (rows) worth running at once: reaching one ends the wait for more.
    pub preferred_batch_sizes: Vec<usize>,
}

/// What a worker thread shares with its pool.
struct WorkerContext<'a> {
    environment: &'a Environment,
    config: &'a WorkerPoolConfig,
    index: u32,
    jobs: &'a Receiver<Job>,
    statistics: &'a VariantStatistics,
}

/// A running set of workers for one variant.
pub struct WorkerPool {
    label: String,
    statistics: Arc<VariantStatistics>,
    signature: ModelSignature,
    queue: JobQueue,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("label", &self.label).field("workers", &self.workers.len()).finish()
    }
}

impl WorkerPool {
    /// Starts the workers, each opening and warming its own session. Returns once every worker
    /// is ready, or with the first worker's error (the others are stopped).
    pub fn start(environment: Arc<Environment>, config: WorkerPoolConfig) -> Result<Self, StartError> {
        let (queue, jobs) = JobQueue::bounded(config.queue_capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelSignature, RuntimeError>>();
        let statistics = Arc::new(VariantStatistics::default());
        let mut workers = Vec::with_capacity(config.instances as usize);
        for index in 0..config.instances {
            let environment = Arc::clone(&environment);
            let config = config.clone();
            let jobs = jobs.clone();
            let ready_tx = ready_tx.clone();
            let statistics = Arc::clone(&statistics);
            let name = format!("ort-{}-{index}", config.label);
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let context = WorkerContext {
                        environment: &environment,
                        config: &config,
                        index,
                        jobs: &jobs,
                        statistics: &statistics,
                    };
                    worker_main(&context, &ready_tx);
                })
                .map_err(StartError::Spawn)?;
            workers.push(handle);
        }
        drop(ready_tx);
        drop(jobs);

        let mut signature = None;
        let mut failure = None;
        for _ in 0..config.instances {
            match ready_rx.recv() {
                Ok(Ok(found)) => signature = Some(found),
                Ok(Err(err)) => failure = failure.or(Some(StartError::Session(err))),
                Err(_) => failure = failure.or(Some(StartError::ExitedEarly)),
            }
        }
        let pool_signature = signature.clone();
        let pool = WorkerPool {
            label: config.label,
            statistics,
            signature: pool_signature.unwrap_or(ModelSignature { inputs: vec![], outputs: vec![], max_batch_size: 0 }),
            queue,
            workers,
        };
        match (failure, signature) {
            (None, Some(_)) => Ok(pool),
            (failure, _) => {
                pool.shutdown();
                Err(failure.unwrap_or(StartError::NoWorkers))
            }
        }
    }

    pub fn signature(&self) -> &ModelSignature {
        &self.signature
    }

    /// Triton-style statistics of this variant.
    pub fn statistics(&self) -> &VariantStatistics {
        &self.statistics
    }

    /// `model:variant`, for logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Jobs waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Enqueues a request without waiting; a full queue is reported at once.
    pub fn submit(
        &self,
        request: InferenceRequest,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        self.queue.enqueue(request, deadline, false)
    }

    /// Enqueues work of the server's own (self-test, drift, shadow comparison), which the
    /// statistics and metrics leave out.
    pub fn submit_internal(&self, request: InferenceRequest) -> Result<oneshot::Receiver<JobResult>, SubmitError> {
        self.queue.enqueue(request, None, true)
    }

    /// Runs work of the server's own and waits for it (blocking: off the async runtime only).
    pub fn run_internal_blocking(&self, request: InferenceRequest) -> Result<Vec<OutputTensor>, InternalRunError> {
        let receiver = self.submit_internal(request).map_err(InternalRunError::Submit)?;
        Ok(receiver.blocking_recv().map_err(|_| InternalRunError::WorkerStopped)??)
    }

    /// Closes the queue, lets the workers finish every job already queued, and joins them.
    pub fn shutdown(self) {
        drop(self.queue);
        for worker in self.workers {
            if worker.join().is_err() {
                tracing::error!(variant = %self.label, "a worker thread panicked");
            }
        }
    }
}

/// Why an internal run on a variant's workers gave no outputs.
#[derive(Debug, thiserror::Error)]
pub enum InternalRunError {
    #[error("{0:?}")]
    Submit(SubmitError),
    #[error("worker stopped")]
    WorkerStopped,
    #[error(transparent)]
    Failed(#[from] ServeError),
}

/// Why a variant's workers did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot spawn worker thread: {0}")]
    Spawn(std::io::Error),
    /// A worker could not open or read its session.
    #[error(transparent)]
    Session(RuntimeError),
    #[error("a worker exited before reporting")]
    ExitedEarly,
    #[error("no worker started")]
    NoWorkers,
}

/// Opens and warms the worker's session, reports readiness, then serves jobs until the queue
/// closes.
fn worker_main(context: &WorkerContext<'_>, ready: &std::sync::mpsc::Sender<Result<ModelSignature, RuntimeError>>) {
    let config = context.config;
    let started = Instant::now();
    let (mut session, signature) = match open_warm_session(context) {
        Ok(prepared) => prepared,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    tracing::debug!(variant = %config.label, worker = context.index, elapsed_ms = started.elapsed().as_millis() as u64, "worker warmed up");
    if ready.send(Ok(signature.clone())).is_err() {
        return;
    }
    let policy = (config.dynamic_batching && signature.batches()).then(|| BatchPolicy {
        max_rows: signature.max_batch_size as usize,
        max_queue_delay: config.max_queue_delay,
        preferred_batch_sizes: config.preferred_batch_sizes.clone(),
    });
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match context.jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let Some(first) = still_wanted(first, config) else { continue };
        let mut batch = vec![first];
        if let Some(policy) = &policy {
            held = collect_batch(context, policy, &mut batch);
        }
        run_and_record(context, &mut session, &signature, batch);
    }
}

fn open_warm_session(context: &WorkerContext<'_>) -> Result<(Session, ModelSignature), RuntimeError> {
    let config = context.config;
    let mut session = open_session(context.environment, &config.model, &config.session)?;
    let signature = signature_of(&session, config.max_batch_size, config.default_max_batch_size)?;
    // Warm-up uses synthetic zeros; a model whose inputs are data-dependent (a shape tensor,
    // indices) may reject them, which says nothing about real requests, so it only warns.
    if let Err(err) = execute(&mut session, &signature, &warmup_request(&signature)) {
        tracing::warn!(variant = %config.label, worker = context.index, error = %err, "warm-up with zero inputs failed; serving anyway");
    }
    Ok((session, signature))
}

/// Adds queued requests compatible with the first to `batch`, as the policy allows. Returns a
/// request that was taken but does not fit, to start the next batch.
fn collect_batch(context: &WorkerContext<'_>, policy: &BatchPolicy, batch: &mut Vec<Job>) -> Option<Job> {
    let mut collector = policy.collect(batcher::rows(&batch[0].request), Instant::now());
    loop {
        let next = match collector.next_take() {
            NextTake::Stop => return None,
            NextTake::WaitUntil(deadline) => context.jobs.recv_deadline(deadline).ok(),
            NextTake::Queued => context.jobs.try_recv().ok(),
        };
        let job = next?;
        let Some(job) = still_wanted(job, context.config) else { continue };
        let job_rows = batcher::rows(&job.request);
        if collector.fits(job_rows) && batcher::compatible(&batch[0].request, &job.request) {
            collector.add(job_rows);
            batch.push(job);
        } else {
            return Some(job);
        }
    }
}

/// Runs a batch and records it in the metrics and statistics (client jobs only).
fn run_and_record(context: &WorkerContext<'_>, session: &mut Session, signature: &ModelSignature, batch: Vec<Job>) {
    let config = context.config;
    // Only client jobs count in the statistics and metrics.
    let clients: Vec<(std::time::Duration, u64)> = batch
        .iter()
        .filter(|job| !job.internal)
        .map(|job| (job.enqueued.elapsed(), batcher::rows(&job.request) as u64))
        .collect();
    let started = Instant::now();
    let ran = run_batch(session, signature, batch);
    if !clients.is_empty() {
        let queued: Vec<std::time::Duration> = clients.iter().map(|(waited, _)| *waited).collect();
        metrics::record_run(&config.model_name, &config.variant_name, &queued, started.elapsed(), context.jobs.len());
        if let Some((_, timings)) = ran {
            context.statistics.record_run(&queued, clients.iter().map(|(_, rows)| rows).sum(), timings);
        }
    }
}

/// The job, unless its caller went away (cancelled) or its deadline passed while it waited:
/// such jobs are answered (if anyone listens), counted, and never run.
fn still_wanted(job: Job, config: &WorkerPoolConfig) -> Option<Job> {
    let now = Instant::now();
    let cut = drain::cut_now(now);
    // The deadline is checked first: a caller whose deadline passed has usually gone too.
    let reason = if job.deadline.is_some_and(|deadline| now >= deadline) {
        "deadline"
    } else if job.reply.is_closed() {
        "cancelled"
    } else if cut.is_some() {
        "exit_timeout"
    } else {
        return Some(job);
    };
    tracing::debug!(variant = %config.label, id = %job.request.id, reason, "dropping request before execution");
    metrics::record_dropped(&config.model_name, &config.variant_name, reason);
    let answer = match (reason, cut) {
        ("deadline", _) => ServeError::DeadlineExceeded { waited: job.enqueued.elapsed() },
        ("exit_timeout", Some(timeout)) => {
            drain::count_cut();
            ServeError::ExitTimeout { timeout }
        }
        _ => return None,
    };
    let _ = job.reply.send(Err(answer));
    None
}

/// Runs a batch of jobs (one run), answers each job, and returns the run's rows and timings
/// when it succeeded.
fn run_batch(session: &mut Session, signature: &ModelSignature, batch: Vec<Job>) -> Option<(u64, RunTimings)> {
    type Outcome = Result<(Vec<Vec<OutputTensor>>, RunTimings), ServeError>;
    let guarded = |work: &mut dyn FnMut() -> Outcome| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(ServeError::Execution("the executor panicked; see server logs".to_owned())))
    };
    let rows: u64 = batch.iter().map(|job| batcher::rows(&job.request) as u64).sum();
    let result = if batch.len() == 1 {
        guarded(&mut || {
            execute_timed(session, signature, &batch[0].request)
                .map(|(outputs, timings)| (vec![outputs], timings))
                .map_err(ServeError::from)
        })
    } else {
        let requests: Vec<&InferenceRequest> = batch.iter().map(|job| &job.request).collect();
        guarded(&mut || {
            let started = Instant::now();
            let merged = batcher::merge(&requests, signature.outputs.len());
            let merge_time = started.elapsed();
            let (outputs, mut timings) = execute_timed(session, signature, &merged)?;
            let split_started = Instant::now();
            let per_request = batcher::split(outputs, &requests)?;
            timings.input += merge_time;
            timings.output += split_started.elapsed();
            Ok((per_request, timings))
        })
    };
    match result {
        Ok((per_request, timings)) => {
            for (job, outputs) in batch.into_iter().zip(per_request) {
                let _ = job.reply.send(Ok(outputs));
            }
            Some((rows, timings))
        }
        Err(err) => {
            for job in batch {
                let _ = job.reply.send(Err(err.clone()));
            }
            None
        }
    }
}
