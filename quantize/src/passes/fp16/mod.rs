//! FP32 -> FP16 conversion that keeps precision-sensitive work in FP32.
//!
//! Every node is either converted (its float inputs and outputs become FP16), kept (its float
//! inputs and outputs stay FP32) or neutral (no float tensors). Each float value has a home
//! precision, that of its producer; a consumer that needs the other precision reads a Cast
//! inserted once per value and precision, right before its first use. Initializers and
//! Constant nodes are narrowed in place when every reader is converted, otherwise an FP16
//! copy is added beside the FP32 original. Control-flow nodes (If/Loop/Scan) keep FP32 at
//! their boundary and their subgraphs are converted inside, so loop-carried and branch types
//! always match. The defaults follow precision-rules.md; each is switchable.
//!
//! Files: `options` (what a policy can set and the report), `decisions` (which nodes convert,
//! stay FP32 or carry no floats, and why) and `convert` (rewriting a graph from those
//! decisions, subgraphs included).

mod convert;
mod decisions;
mod options;

pub use options::{DEFAULT_OP_BLOCK_LIST, Fp16Error, Fp16Options, Fp16Report, KeepReason};

use crate::onnx::ModelProto;
use crate::rewrite::NameGenerator;
use crate::type_check::{ForeignSignatures, check_types};
use crate::types::ElemTypes;
use convert::convert_graph;
use decisions::{Rules, Scope};

/// Checks options without converting anything (e.g. the node_block_list patterns).
pub fn validate_options(options: &Fp16Options) -> Result<(), Fp16Error> {
    Rules::new(options).map(|_| ())
}

/// Converts `model` to FP16 in place.
pub fn convert_to_fp16(model: &mut ModelProto, options: &Fp16Options) -> Result<Fp16Report, Fp16Error> {
    let rules = Rules::new(options)?;
    let before = ForeignSignatures::of(model);
    let graph = model.graph.as_mut().ok_or(Fp16Error::NoGraph)?;
    let mut report = Fp16Report::default();
    let mut names = NameGenerator::for_graph(graph);
    convert_graph(graph, &ElemTypes::new(), &rules, Scope::Main, &mut names, &mut report)?;
    check_types("fp16 conversion", model, &before)?;
    Ok(report)
}
