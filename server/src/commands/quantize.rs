//! `mantissa quantize`: runs the same precision pass the server runs at startup on one model
//! file and prints what it did.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use mantissa_model_store::{DriftBudget, Policy, PolicyError, Precision, VariantSpec, load_budget_parts};
use mantissa_preparation::PrepareError;
use mantissa_preparation::auto_int8::{AutoTiming, quantize_int8_any};
use mantissa_preparation::calibrate::run_first_sample;
use mantissa_preparation::facts::AutoFacts;
use mantissa_preparation::int8::{Int8Job, Int8Outcome, quantize_int8};
use mantissa_preparation::search::{BudgetSearch, SearchReport};
use mantissa_quantize::calibration::CalibrationMethodKind;
use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::passes::fp16::{Fp16Options, Fp16Report, convert_to_fp16};
use mantissa_quantize::passes::int8::{Int8Mode, Int8Options, Int8Report, quantize_dynamic, quantize_weight_only};
use mantissa_quantize::{ModelIoError, SaveOptions, load_model, save_model};
use mantissa_runtime::memory;
use mantissa_runtime::{Environment, OrtSetupError, load_environment};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Fp16,
    Int8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Dynamic,
    Static,
    WeightOnly,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    Minmax,
    Percentile,
    Entropy,
    Mse,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The FP32 ONNX model.
    pub model: PathBuf,
    /// Target precision.
    #[arg(long, value_enum)]
    pub precision: PrecisionArg,
    /// Take the pass options from this policy.yaml (its first variant of the target precision,
    /// or --variant).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Variant of --policy whose options to use.
    #[arg(long, requires = "policy")]
    pub variant: Option<String>,
    /// Output model.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write initializers of at least 1 KiB to this external-data file beside the output.
    #[arg(long)]
    pub external_data: Option<String>,
    /// List every node kept in FP32 with its reason.
    #[arg(long)]
    pub verbose: bool,
    /// INT8: quantize activations at run time (dynamic), with calibrated ranges (static), or
    /// keep the fastest of those within the budget, timed on this CPU (auto, the default;
    /// without --holdout and a budget it is dynamic).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// INT8 auto: batch sizes each form is timed at (models batching along dimension 0).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub auto_batch_sizes: Vec<usize>,
    /// INT8 auto: ONNX Runtime intra-op threads while timing (0: ONNX Runtime's choice), as
    /// the serving variant will run.
    #[arg(long, default_value_t = 0)]
    pub auto_threads: u32,
    /// INT8 static: directory of calibration samples (.npz, keys = input names; .npy for one input).
    #[arg(long)]
    pub calibration_data: Option<PathBuf>,
    /// INT8 static: how activation ranges are chosen.
    #[arg(long, value_enum)]
    pub calibration_method: Option<MethodArg>,
    /// INT8 static with --calibration-method percentile: the percentile kept.
    #[arg(long)]
    pub percentile: Option<f64>,
    /// INT8 static: holdout samples (.npz file or directory) for --budget-cosine/--budget-top1.
    #[arg(long)]
    pub holdout: Option<PathBuf>,
    /// INT8 static: keep the most sensitive nodes in FP32 until the outputs' cosine with FP32
    /// on --holdout reaches this.
    #[arg(long, requires = "holdout")]
    pub budget_cosine: Option<f64>,
    /// INT8 static: minimum top-1 agreement with FP32 on --holdout for --class-output outputs.
    #[arg(long, requires = "holdout")]
    pub budget_top1: Option<f64>,
    /// INT8 static: the most of the quantized nodes the budget search may keep in FP32 (a
    /// fraction); needing more is a budget miss.
    #[arg(long, requires = "holdout")]
    pub budget_max_fp32_fraction: Option<f64>,
    /// INT8 static: the longest the budget search may run (e.g. 5m, 30s, 500ms; calibration
    /// excluded); past it the search fails with the best configuration it reached.
    #[arg(long, requires = "holdout", value_parser = super::duration_arg)]
    pub budget_time_limit: Option<std::time::Duration>,
    /// INT8 static: a YAML file holding named output parts with their own thresholds, the same
    /// map as a policy's `drift.budget.parts` (e.g. `scores: {output: output0, slice: "[:, 4:, :]",
    /// min_top1_agreement: 0.95, top1_axis: all}`).
    #[arg(long, requires = "holdout")]
    pub budget_parts: Option<PathBuf>,
    /// Outputs holding class scores (for --budget-top1); repeatable.
    #[arg(long)]
    pub class_output: Vec<String>,
    /// INT8: store embedding tables (Gather on a constant matrix) as int8 with a scale per row
    /// (the default; this overrides a --policy that turns it off).
    #[arg(long, conflicts_with = "keep_embeddings_fp32")]
    pub quantize_embeddings: bool,
    /// INT8: leave embedding tables FP32.
    #[arg(long)]
    pub keep_embeddings_fp32: bool,
    /// INT8 weight-only: bits per weight (4 or 8).
    #[arg(long)]
    pub weight_bits: Option<u8>,
    /// INT8 weight-only: weights per block along K (16..=256, a power of two).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// ONNX Runtime library, for static calibration.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The arguments or the policy's variant do not make a complete recipe.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Model(#[from] ModelIoError),
    #[error(transparent)]
    OnnxRuntime(#[from] OrtSetupError),
    /// A pass failed on the model (named by its path).
    #[error("{}: {reason}", model.display())]
    Pass { model: PathBuf, reason: String },
}

impl QuantizeError {
    fn pass(model: &Path, reason: impl std::fmt::Display) -> Self {
        QuantizeError::Pass { model: model.to_owned(), reason: reason.to_string() }
    }
}

fn variant_from_policy<'p>(
    policy: &'p Policy,
    path: &Path,
    variant: Option<&str>,
    precision: Precision,
) -> Result<&'p VariantSpec, QuantizeError> {
    let spec = match variant {
        Some(name) => policy
            .variant(name)
            .ok_or_else(|| QuantizeError::Usage(format!("{}: no variant '{name}'", path.display())))?,
        None => policy.variants.iter().find(|v| v.precision == precision).ok_or_else(|| {
            QuantizeError::Usage(format!("{}: no variant with precision {}", path.display(), precision.as_str()))
        })?,
    };
    if spec.precision != precision {
        return Err(QuantizeError::Usage(format!(
            "{}: variant '{}' is not a {} variant",
            path.display(),
            spec.name,
            precision.as_str()
        )));
    }
    Ok(spec)
}

fn fp16_options(args: &QuantizeArgs) -> Result<Fp16Options, QuantizeError> {
    match &args.policy {
        Some(path) => {
            let policy = Policy::load(path)?;
            Ok(variant_from_policy(&policy, path, args.variant.as_deref(), Precision::Fp16)?
                .fp16
                .clone()
                .unwrap_or_default())
        }
        None => Ok(Fp16Options::default()),
    }
}

fn int8_options(args: &QuantizeArgs) -> Result<Int8Options, QuantizeError> {
    let mut options = match &args.policy {
        Some(path) => {
            let policy = Policy::load(path)?;
            variant_from_policy(&policy, path, args.variant.as_deref(), Precision::Int8)?
                .int8
                .clone()
                .unwrap_or_default()
        }
        None => Int8Options::default(),
    };
    if let Some(mode) = args.mode {
        options.mode = match mode {
            ModeArg::Dynamic => Int8Mode::Dynamic,
            ModeArg::Static => Int8Mode::Static,
            ModeArg::WeightOnly => Int8Mode::WeightOnly,
            ModeArg::Auto => Int8Mode::Auto,
        };
    }
    if let Some(data) = &args.calibration_data {
        options.calibration_data = Some(data.clone());
    }
    if let Some(method) = args.calibration_method {
        options.calibration.method = match method {
            MethodArg::Minmax => CalibrationMethodKind::MinMax,
            MethodArg::Percentile => CalibrationMethodKind::Percentile,
            MethodArg::Entropy => CalibrationMethodKind::Entropy,
            MethodArg::Mse => CalibrationMethodKind::Mse,
        };
    }
    if let Some(percentile) = args.percentile {
        options.calibration.percentile = percentile;
    }
    if args.quantize_embeddings {
        options.quantize_embeddings = true;
    }
    if args.keep_embeddings_fp32 {
        options.quantize_embeddings = false;
    }
    if let Some(bits) = args.weight_bits {
        options.weight_bits = bits;
    }
    if let Some(block_size) = args.block_size {
        options.block_size = block_size;
    }
    mantissa_quantize::passes::int8::validate_options(&options).map_err(|err| QuantizeError::Usage(err.to_string()))?;
    if options.mode == Int8Mode::Static && options.calibration_data.is_none() {
        return Err(QuantizeError::Usage(
            "--mode static needs --calibration-data DIR (or a policy that names it)".to_owned(),
        ));
    }
    Ok(options)
}

/// Bytes of a model file plus the external-data files beside it that it references.
fn stored_size(path: &Path) -> u64 {
    let model = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let external: u64 = mantissa_quantize::load_model_from_bytes(&std::fs::read(path).unwrap_or_default(), path)
        .ok()
        .map(|proto| {
            let mut files = std::collections::BTreeSet::new();
            for tensor in proto.graph.iter().flat_map(|g| &g.initializer) {
                for entry in tensor.external_data.iter().filter(|e| e.key() == "location") {
                    files.insert(entry.value().to_owned());
                }
            }
            let base = path.parent().unwrap_or(Path::new("."));
            files.iter().filter_map(|f| std::fs::metadata(base.join(f)).ok()).map(|m| m.len()).sum()
        })
        .unwrap_or(0);
    model + external
}

pub fn run(args: &QuantizeArgs) -> Result<(), QuantizeError> {
    let started = std::time::Instant::now();
    let mut model = load_model(&args.model)?;
    let summary = match args.precision {
        PrecisionArg::Fp16 => {
            let report = convert_to_fp16(&mut model, &fp16_options(args)?)
                .map_err(|err| QuantizeError::pass(&args.model, err))?;
            Summary::Fp16(report)
        }
        PrecisionArg::Int8 => run_int8(args, &mut model)?,
    };
    let save = SaveOptions { external_file: args.external_data.clone(), threshold: 1024 };
    save_model(&model, &args.output, &save)?;
    print_summary(args, &summary, started.elapsed());
    Ok(())
}

/// The budget given by the flags, each checked to lie in [0, 1].
fn budget_from_flags(args: &QuantizeArgs) -> Result<DriftBudget, QuantizeError> {
    let budget = DriftBudget {
        min_cosine: args.budget_cosine,
        min_top1_agreement: args.budget_top1,
        parts: match &args.budget_parts {
            Some(path) => load_budget_parts(path)?,
            None => Default::default(),
        },
        max_fp32_fraction: args.budget_max_fp32_fraction,
        search_time_limit: args.budget_time_limit,
    };
    for (flag, value) in [
        ("--budget-cosine", budget.min_cosine),
        ("--budget-top1", budget.min_top1_agreement),
        ("--budget-max-fp32-fraction", budget.max_fp32_fraction),
    ] {
        if let Some(value) = value.filter(|v| !(0.0..=1.0).contains(v)) {
            return Err(QuantizeError::Usage(format!("{flag}: expected a value in [0, 1], got {value}")));
        }
    }
    Ok(budget)
}

fn run_int8(args: &QuantizeArgs, model: &mut ModelProto) -> Result<Summary, QuantizeError> {
    let options = int8_options(args)?;
    let environment = if matches!(options.mode, Int8Mode::Static | Int8Mode::Auto) {
        // Calibration, the budget search and auto's timing run the model on ONNX Runtime.
        Some(load_environment(args.ort_library.as_deref())?)
    } else {
        None
    };
    let budget = budget_from_flags(args)?;
    let search = args.holdout.as_deref().filter(|_| budget.has_thresholds()).map(|holdout| BudgetSearch {
        holdout,
        class_outputs: &args.class_output,
        budget: &budget,
        serve_flagged: false,
    });
    let mut memory_peaks = None;
    let outcome = match &environment {
        Some(environment) if options.mode == Int8Mode::Auto => {
            let job = Int8Job { options: &options, label: "quantize", budget: search };
            let timing = AutoTiming {
                intra_op_threads: args.auto_threads,
                batch_sizes: args.auto_batch_sizes.clone(),
                ..AutoTiming::default()
            };
            quantize_int8_any(environment, model, &job, &timing).map_err(|err| err.to_string())
        }
        Some(environment) => {
            let job = Int8Job { options: &options, label: "quantize", budget: search };
            let (result, peaks) =
                static_pass_measured(environment, model, &job).map_err(|err| QuantizeError::pass(&args.model, err))?;
            memory_peaks = peaks;
            result
        }
        None if options.mode == Int8Mode::WeightOnly => {
            quantize_weight_only(model, &options).map(plain_outcome).map_err(|err| err.to_string())
        }
        None => quantize_dynamic(model, &options).map(plain_outcome).map_err(|err| err.to_string()),
    }
    .map_err(|err| QuantizeError::pass(&args.model, err))?;
    let details =
        Int8Details { search: outcome.search.map(Box::new), memory: memory_peaks, auto: outcome.auto.map(Box::new) };
    Ok(Summary::Int8(outcome.report, options.mode, details))
}

fn plain_outcome(report: Int8Report) -> Int8Outcome {
    Int8Outcome::plain(report)
}

type StaticOutcome = Result<Int8Outcome, String>;

/// Runs the static pass, measuring the peak memory of FP32 inference at the calibration batch
/// and then of the whole static pass (calibration, quantization, search), each alone.
fn static_pass_measured(
    environment: &Environment,
    model: &mut ModelProto,
    job: &Int8Job<'_>,
) -> Result<(StaticOutcome, Option<(u64, u64)>), PrepareError> {
    let data = job.options.calibration_data.as_deref().unwrap_or(Path::new("."));
    let (inference, inference_peak) = memory::measure(|| run_first_sample(environment, model, data));
    inference?;
    memory::release_free_memory();
    let (result, static_peak) =
        memory::measure(|| quantize_int8(environment, model, job).map_err(|err| err.to_string()));
    Ok((result, inference_peak.zip(static_peak)))
}

enum Summary {
    Fp16(Fp16Report),
    Int8(Int8Report, Int8Mode, Int8Details),
}

/// What an INT8 run did besides its pass report.
struct Int8Details {
    search: Option<Box<SearchReport>>,
    /// Peak resident bytes of FP32 inference on one calibration sample and of the static pass
    /// (calibration included).
    memory: Option<(u64, u64)>,
    /// Auto's candidates and choice.
    auto: Option<Box<AutoFacts>>,
}

fn print_summary(args: &QuantizeArgs, summary: &Summary, elapsed: std::time::Duration) {
    let before = stored_size(&args.model);
    let after = stored_size(&args.output);
    let precision = match summary {
        Summary::Fp16(_) => "fp16".to_owned(),
        Summary::Int8(_, _, Int8Details { auto: Some(auto), .. }) => format!("int8 auto: {}", auto.chosen),
        Summary::Int8(_, mode, _) => format!("int8 {mode:?}").to_lowercase(),
    };
    println!(
        "{} -> {} ({precision}) in {:.1} ms",
        args.model.display(),
        args.output.display(),
        elapsed.as_secs_f64() * 1000.0
    );
    match summary {
        Summary::Fp16(report) => {
            println!("  nodes converted to FP16: {}", report.nodes_converted);
            println!("  nodes kept in FP32:      {}", report.nodes_kept.len());
            for (reason, count) in report.kept_by_reason() {
                println!("    {count:>5}  {reason}");
            }
            if args.verbose {
                for (node, op, reason) in &report.nodes_kept {
                    println!("      {node} ({op}): {reason}");
                }
            }
            println!("  casts inserted:          {}", report.casts_inserted);
            println!(
                "  initializers converted:  {} (+{} FP16 copies)",
                report.initializers_converted, report.initializer_copies
            );
            println!("  values clamped to ±65504: {}", report.values_clamped);
        }
        Summary::Int8(report, _, Int8Details { search: searched, memory, auto }) => {
            if let Some(auto) = auto {
                println!("  mode auto:               {} ({}), timed on {}", auto.chosen, auto.reason, auto.cpu);
                for line in auto.table() {
                    println!("      {line}");
                }
            }
            if let Some(searched) = searched {
                println!(
                    "  budget search:           plain recipe cosine {:.6} -> {:.6} with {} of {} nodes kept FP32 ({} evaluations, {} sensitivity runs, {:.1} s{})",
                    searched.initial_cosine,
                    searched.cosine,
                    searched.kept_fp32.len(),
                    searched.candidates,
                    searched.evaluations,
                    searched.sensitivity_runs,
                    searched.elapsed.as_secs_f64(),
                    if searched.time_limited { "; stopped by the time limit" } else { "" }
                );
                if let Some(tightest) = &searched.tightest {
                    println!("  tightest threshold:      {tightest}");
                }
                for node in &searched.kept_fp32 {
                    println!("      kept FP32 by the search: {node}");
                }
            }
            for note in &report.notes {
                println!("  note: {note}");
            }
            println!("  nodes quantized:         {}", report.quantized.len());
            println!("  nodes kept in FP32:      {}", report.skipped.len());
            for (node, op, reason) in &report.skipped {
                println!("      {node} ({op}): {reason}");
            }
            if args.verbose {
                for (node, op) in &report.quantized {
                    println!("      quantized {node} ({op})");
                }
            }
            println!("  activations with Q/DQ:   {}", report.activations_quantized);
            println!("  weight bytes:            {} -> {}", report.weight_bytes_before, report.weight_bytes_after);
            if let Some((inference, calibration)) = memory {
                let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
                println!(
                    "  peak memory:             static pass {:.1} MiB, FP32 inference at the calibration batch {:.1} MiB ({:.2}x)",
                    mib(*calibration),
                    mib(*inference),
                    *calibration as f64 / (*inference).max(1) as f64
                );
            }
        }
    }
    let ratio = if before > 0 { after as f64 / before as f64 } else { 0.0 };
    println!("  size: {before} -> {after} bytes ({ratio:.2}x)");
}
