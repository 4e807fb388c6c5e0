//! What the FP16 pass can be asked (the `fp16:` section of a policy variant) and what it
//! reports back: the default op block list, the options, errors and the reasons a node stays
//! FP32.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::graph::GraphError;

/// Operators kept in FP32 by default: accumulations and exponentials that overflow or lose
/// precision in FP16 (softmax, losses, normalisations) and ops with float index-like inputs.
pub const DEFAULT_OP_BLOCK_LIST: &[&str] = &[
    "Softmax",
    "LogSoftmax",
    "SoftmaxCrossEntropyLoss",
    "NegativeLogLikelihoodLoss",
    "LayerNormalization",
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    // Sums of squares and of exponentials overflow FP16 long before their inputs do.
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
    "Resize",
    "Upsample",
    "Range",
    "TopK",
    "NonMaxSuppression",
    "CumSum",
    "RoiAlign",
    "MaxRoiPool",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
];

/// Options of the FP16 pass (the `fp16:` section of a variant in policy.yaml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fp16Options {
    /// Model inputs and outputs keep FP32 types; Casts sit at the boundary.
    pub keep_io_types: bool,
    /// The first and last compute layers (Conv/MatMul/Gemm/RNN) stay FP32.
    pub keep_first_and_last_layers: bool,
    /// Gather on a float initializer (embedding lookups) stays FP32.
    pub keep_embeddings: bool,
    /// The MatMul of attention probabilities (Softmax -> MatMul) stays FP32.
    pub keep_attention_probabilities: bool,
    /// RMSNorm/LayerNorm written with primitive ops (ReduceMean of Pow/Mul, then
    /// Sqrt/Reciprocal/Div) stays FP32.
    pub keep_normalization_subgraphs: bool,
    /// Operators kept FP32 in addition to the default list.
    pub op_block_list_add: Vec<String>,
    /// Operators removed from the default list.
    pub op_block_list_remove: Vec<String>,
    /// Node names (exact, or a regular expression matching the whole name) kept FP32.
    pub node_block_list: Vec<String>,
}

impl Default for Fp16Options {
    fn default() -> Self {
        Self {
            keep_io_types: true,
            keep_first_and_last_layers: true,
            keep_embeddings: true,
            keep_attention_probabilities: true,
            keep_normalization_subgraphs: true,
            op_block_list_add: Vec::new(),
            op_block_list_remove: Vec::new(),
            node_block_list: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Fp16Error {
    #[error("node_block_list entry '{pattern}' is not a valid regular expression: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("model has no graph")]
    NoGraph,
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The pass produced inconsistent element types: a bug in the pass, reported instead of
    /// handing ONNX Runtime a model it refuses.
    #[error(transparent)]
    TypeCheck(#[from] crate::type_check::TypeCheckError),
}

/// Why a node stayed FP32.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepReason {
    OpBlockList,
    NodeBlockList(String),
    FirstLayer,
    LastLayer,
    Embedding,
    AttentionProbabilities,
    NormalizationSubgraph,
    /// A Cast between float and a non-float type: converting it would round integers above
    /// 2048 or overflow large floats.
    TypeBoundaryCast,
    /// If/Loop/Scan: FP32 at the boundary, subgraph converted inside.
    ControlFlow,
    /// A constant whose readers run in FP32.
    FeedsFp32,
    /// Operator of a non-default domain (com.microsoft, ai.onnx.ml, ...): its kernels are
    /// registered for the types it was exported with, so its inputs and outputs keep them.
    ForeignDomain,
    /// Reads a value whose element type cannot be determined (e.g. an undeclared output of a
    /// custom operator), so converting could mix types.
    UnknownInputType,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::OpBlockList => f.write_str("op block list"),
            KeepReason::NodeBlockList(pattern) => write!(f, "node block list ({pattern})"),
            KeepReason::FirstLayer => f.write_str("first compute layer"),
            KeepReason::LastLayer => f.write_str("last compute layer"),
            KeepReason::Embedding => f.write_str("embedding lookup"),
            KeepReason::AttentionProbabilities => f.write_str("attention probabilities x V"),
            KeepReason::NormalizationSubgraph => f.write_str("normalization subgraph"),
            KeepReason::TypeBoundaryCast => f.write_str("cast across float/non-float types"),
            KeepReason::ControlFlow => f.write_str("control flow boundary (subgraph converted)"),
            KeepReason::FeedsFp32 => f.write_str("constant read by FP32 work"),
            KeepReason::ForeignDomain => f.write_str("non-default operator domain keeps its types"),
            KeepReason::UnknownInputType => f.write_str("input of unknown element type"),
        }
    }
}

/// What the pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fp16Report {
    pub nodes_converted: usize,
    /// (node name, op type, reason) for every float-carrying node kept in FP32.
    pub nodes_kept: Vec<(String, String, KeepReason)>,
    pub casts_inserted: usize,
    pub initializers_converted: usize,
    pub initializer_copies: usize,
    /// FP32 values beyond the FP16 range that were clamped to ±65504.
    pub values_clamped: usize,
}

impl Fp16Report {
    /// Kept nodes counted by reason.
    pub fn kept_by_reason(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (_, _, reason) in &self.nodes_kept {
            *counts.entry(reason_key(reason)).or_insert(0) += 1;
        }
        counts
    }
}

fn reason_key(reason: &KeepReason) -> String {
    match reason {
        KeepReason::NodeBlockList(_) => "node block list".to_owned(),
        other => other.to_string(),
    }
}
