//! `mantissa analyze`: a quantization-readiness report of an FP32 model on sample data, following
//! precision-rules.md: the observed range of every input (§1.1), the spread of per-channel ranges
//! of the weights and activations Conv/MatMul/Gemm read (§1.2), dead ReLU/Clip channels (§1.3),
//! saturated Sigmoid/Tanh inputs (§1.4), MACCs per sample (§2), the nodes whose static INT8
//! outputs drift most from FP32, and the outputs the drift checks measure by part (§2).
//!
//! Data is streamed: each sample runs once through the FP32 model (with the tensors the report
//! looks at added as graph outputs) and once through its static INT8 form, and only fixed-size
//! statistics survive from one sample to the next.
//!
//! The work is split in three steps with dependencies one way: `collect` runs the models and keeps
//! the statistics, `report` turns them into the serializable report (it reads `collect`'s
//! trackers), and `render` lays the report out as tables (it reads only `report`'s types).

mod collect;
mod render;
mod report;
mod trackers;

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

pub use render::render;
pub use report::{
    About, DEAD_FRACTION_LIMIT, DeadReport, INPUT_RANGE_LIMIT, InputReport, MaccsNode, MaccsSection, OutputPartRow,
    OutputPartsReport, Report, SATURATION_LIMIT, SPREAD_RATIO_LIMIT, SQNR_LIMIT_DB, SaturationReport, Section,
    SensitiveNode, SensitivitySection, SpreadReport,
};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The FP32 ONNX model.
    pub model: PathBuf,
    /// Directory of samples (.npz, keys = input names; .npy for single-input models), or one file.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON document with every section instead of tables.
    #[arg(long)]
    pub json: bool,
    /// How many of the most INT8-sensitive nodes to list.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Path of libonnxruntime.so.1.31.1. Default: next to the executable or .onnxruntime/lib.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AnalyzeError(String);

impl From<String> for AnalyzeError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

/// Builds the report (blocking: runs ONNX Runtime on every sample, twice).
pub fn analyze(args: &AnalyzeArgs) -> Result<Report, AnalyzeError> {
    let collected = collect::collect(&args.model, &args.data, args.ort_library.as_deref())?;
    Ok(report::build(&args.model, &args.data, args.top, &collected))
}

/// `mantissa analyze`: prints the report as tables, or as JSON with `--json`.
pub fn run(args: &AnalyzeArgs) -> Result<(), AnalyzeError> {
    let report = analyze(args)?;
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).map_err(|err| AnalyzeError(err.to_string()))?;
        text.push('\n');
        text
    } else {
        render(&report)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        // A reader that stops early (`| head`) is not an error.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(AnalyzeError(format!("cannot write the report: {err}")))
        }
        _ => Ok(()),
    }
}
