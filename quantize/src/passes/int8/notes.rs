//! What an INT8 pass tells its user besides what it quantized: that the model already held
//! quantized operators, and — when it quantized nothing — why, from what the model computes and
//! where. A pass that leaves every node FP32 without a word looks like a working quantizer
//! with no speedup.

use std::collections::BTreeMap;

use super::options::{Int8Mode, Int8Report};
use crate::onnx::{GraphProto, ModelProto};

/// Ops that do the arithmetic a quantizer is for.
const COMPUTE_OPS: &[&str] = &["Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "LSTM", "GRU", "RNN"];

/// Ops that only exist in already-quantized models.
const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "QGemm",
    "QAttention",
    "QLinearAdd",
    "QLinearMul",
    "GatherBlockQuantized",
];

/// Op counts of a model, split by where the nodes live.
#[derive(Debug, Clone, Default)]
pub(super) struct Census {
    main: BTreeMap<String, usize>,
    subgraphs: BTreeMap<String, usize>,
    quantized: BTreeMap<String, usize>,
}

impl Census {
    pub(super) fn of(model: &ModelProto) -> Self {
        let mut census = Self::default();
        if let Some(graph) = &model.graph {
            census.count(graph, false);
        }
        census
    }

    fn count(&mut self, graph: &GraphProto, nested: bool) {
        for node in &graph.node {
            let op = node.op_type();
            if COMPUTE_OPS.contains(&op) && (node.domain().is_empty() || node.domain() == "ai.onnx") {
                let counts = if nested { &mut self.subgraphs } else { &mut self.main };
                *counts.entry(op.to_owned()).or_insert(0) += 1;
            }
            if QUANTIZED_OPS.contains(&op) {
                *self.quantized.entry(op.to_owned()).or_insert(0) += 1;
            }
            for attribute in &node.attribute {
                for subgraph in attribute.g.iter().chain(&attribute.graphs) {
                    self.count(subgraph, true);
                }
            }
        }
    }
}

fn listing(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(op, n)| format!("{n} {op}")).collect::<Vec<_>>().join(", ")
}

/// What `mode` turns into integer work.
fn scope_of(mode: Int8Mode) -> &'static str {
    match mode {
        Int8Mode::Dynamic => {
            "dynamic mode quantizes MatMul and Gemm with constant weights, anywhere in the graph (Conv stays FP32: ONNX Runtime has no fast dynamic Conv kernel; static mode quantizes Conv)"
        }
        Int8Mode::WeightOnly => "weight-only mode quantizes the weights of MatMul and Gemm with constant weights",
        Int8Mode::Auto => "auto mode keeps the fastest of the dynamic and static forms within the drift budget",
        Int8Mode::Static => {
            "static mode quantizes Conv, MatMul and Gemm of the main graph (calibration cannot observe tensors inside If/Loop/Scan subgraphs; MatMul and Gemm there are quantized dynamically)"
        }
    }
}

/// The notes for a pass in `mode` over a model whose census before the pass was `before`.
pub(super) fn notes(mode: Int8Mode, before: &Census, report: &Int8Report) -> Vec<String> {
    let mut notes = Vec::new();
    if !before.quantized.is_empty() {
        notes.push(format!(
            "the model already holds quantized operators ({}); they are left as they are and only its FP32 nodes were considered",
            listing(&before.quantized)
        ));
    }
    if report.quantized.is_empty() {
        let mut found = Vec::new();
        if !before.main.is_empty() {
            found.push(format!("{} in the main graph", listing(&before.main)));
        }
        if !before.subgraphs.is_empty() {
            found.push(format!("{} inside If/Loop/Scan subgraphs", listing(&before.subgraphs)));
        }
        let computes =
            if found.is_empty() { "no Conv, MatMul, Gemm or recurrent node".to_owned() } else { found.join("; ") };
        let recurrent =
            ["LSTM", "GRU", "RNN"].iter().any(|op| before.main.contains_key(*op) || before.subgraphs.contains_key(*op));
        let recurrent_note = if recurrent { "; LSTM, GRU and RNN have no INT8 form here and stay FP32" } else { "" };
        let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
        for (_, _, reason) in &report.skipped {
            *skipped.entry(reason_kind(&reason.to_string())).or_insert(0) += 1;
        }
        let skipped_note =
            if skipped.is_empty() { String::new() } else { format!("; kept FP32: {}", listing(&skipped)) };
        notes.push(format!(
            "no node was quantized, the model is unchanged: {}; the model computes with {computes}{recurrent_note}{skipped_note}",
            scope_of(mode)
        ));
    }
    notes
}

/// A skip reason without its per-node detail (the text before the first parenthesis or colon).
fn reason_kind(reason: &str) -> String {
    reason.split([':', '(']).next().unwrap_or(reason).trim().to_owned()
}
