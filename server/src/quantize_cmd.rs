//! `mantissa quantize`: runs the same precision pass the server runs at startup on one model
//! file and prints what it did.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use mantissa_model_store::{Policy, Precision};
use mantissa_quantize::fp16::{Fp16Options, Fp16Report, convert_to_fp16};
use mantissa_quantize::{SaveOptions, load_model, save_model};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Fp16,
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
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuantizeError(String);

fn options_from_policy(path: &Path, variant: Option<&str>) -> Result<Fp16Options, QuantizeError> {
    let policy = Policy::load(path).map_err(|err| QuantizeError(err.to_string()))?;
    let spec = match variant {
        Some(name) => {
            policy.variant(name).ok_or_else(|| QuantizeError(format!("{}: no variant '{name}'", path.display())))?
        }
        None => policy
            .variants
            .iter()
            .find(|v| v.precision == Precision::Fp16)
            .ok_or_else(|| QuantizeError(format!("{}: no variant with precision fp16", path.display())))?,
    };
    spec.fp16
        .clone()
        .ok_or_else(|| QuantizeError(format!("{}: variant '{}' is not an fp16 variant", path.display(), spec.name)))
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
    let options = match &args.policy {
        Some(path) => options_from_policy(path, args.variant.as_deref())?,
        None => Fp16Options::default(),
    };
    let started = std::time::Instant::now();
    let mut model = load_model(&args.model).map_err(|err| QuantizeError(err.to_string()))?;
    let report = convert_to_fp16(&mut model, &options)
        .map_err(|err| QuantizeError(format!("{}: {err}", args.model.display())))?;
    let save = SaveOptions { external_file: args.external_data.clone(), threshold: 1024 };
    save_model(&model, &args.output, &save).map_err(|err| QuantizeError(err.to_string()))?;
    let elapsed = started.elapsed();
    print_summary(args, &report, elapsed);
    Ok(())
}

fn print_summary(args: &QuantizeArgs, report: &Fp16Report, elapsed: std::time::Duration) {
    let before = stored_size(&args.model);
    let after = stored_size(&args.output);
    println!(
        "{} -> {} (fp16) in {:.1} ms",
        args.model.display(),
        args.output.display(),
        elapsed.as_secs_f64() * 1000.0
    );
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
    let ratio = if before > 0 { after as f64 / before as f64 } else { 0.0 };
    println!("  size: {before} -> {after} bytes ({ratio:.2}x)");
}
