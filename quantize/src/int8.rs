//! INT8 quantization passes.
//!
//! - Dynamic: MatMul/Gemm with constant weights become `com.microsoft.DynamicQuantizeMatMul`
//!   (int8 weights, symmetric, one scale per output column; activations quantized per run),
//!   with a following bias Add moved into the node. The fused op was picked over
//!   DynamicQuantizeLinear + MatMulInteger + Cast + Mul because ONNX Runtime 1.31 runs it as
//!   one MLAS u8s8 GEMM without materialising the int32 product: measured with
//!   `scripts/time_dynamic_forms.py`, the standard-ops form is 1.03-1.24x slower at
//!   ORT_ENABLE_BASIC and within noise at ORT_ENABLE_ALL (where ONNX Runtime fuses it back).
//!   Conv is left in FP32: ConvInteger has no fast kernel.
//! - Static (QDQ): QuantizeLinear/DequantizeLinear pairs around Conv/MatMul/Gemm and the ops
//!   between them, placed so ONNX Runtime fuses them into QLinearConv/QLinearMatMul; see
//!   [`quantize_static`].
//!
//! Defaults follow precision-rules.md: the first and last compute layers, Softmax and
//! normalisations stay FP32; `op_types_exclude` and `nodes_exclude` add exclusions.

use std::collections::HashSet;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::calibration::{CalibrationOptions, per_channel_symmetric};
use crate::elem;
pub(crate) use crate::graph::first_and_last_compute;
use crate::graph::{GraphIndex, NameGenerator};
use crate::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use crate::tensor::f32_values;
use crate::types::attribute;

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Int8Mode {
    /// Activations quantized at run time; no calibration data needed.
    #[default]
    Dynamic,
    /// Activations quantized with ranges calibrated ahead of time (QDQ format).
    Static,
    /// Block-wise weight-only quantization of MatMul weights (com.microsoft.MatMulNBits):
    /// activations stay float, each block of `block_size` weights along K has its own scale.
    WeightOnly,
}

/// Element type of quantized activations in static mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActivationType {
    /// uint8 asymmetric: the form ONNX Runtime fuses onto its u8s8 integer kernels on x86.
    #[default]
    Uint8,
    /// int8 symmetric (S8S8): mostly not fused on x86, slower than FP32 there.
    Int8,
}

/// Options of the INT8 passes (the `int8:` section of a variant in policy.yaml).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Int8Options {
    pub mode: Int8Mode,
    /// One weight scale per output channel (per tensor otherwise).
    pub per_channel: bool,
    /// 7-bit weights, for CPUs without VNNI, whose u8 x s8 instructions add pairs of products
    /// into int16 and saturate with full 8-bit weights. `None` (the default) decides from the
    /// CPU that builds the variant: 7-bit unless it has AVX512-VNNI or AVX-VNNI.
    pub reduce_range: Option<bool>,
    pub activation_type: ActivationType,
    /// The first and last compute layers stay FP32.
    pub keep_first_and_last_layers: bool,
    /// Operators to quantize (empty: all supported by the mode).
    pub op_types_include: Vec<String>,
    /// Operators never quantized.
    pub op_types_exclude: Vec<String>,
    /// Node names (exact or regular expressions over the whole name) never quantized.
    pub nodes_exclude: Vec<String>,
    /// Static mode: directory of calibration samples (`.npz`, keys = input names; `.npy` for
    /// single-input models), relative to the model's directory.
    pub calibration_data: Option<std::path::PathBuf>,
    /// Static mode: how activation ranges are calibrated.
    pub calibration: CalibrationOptions,
    /// Embedding tables (Gather on a constant [V, D] float matrix) stored as int8 with one
    /// scale per row, dequantized after the lookup. Off by default: embeddings are a model end
    /// and stay FP32 under the precision rules unless asked.
    pub quantize_embeddings: bool,
    /// Static mode: a Concat whose inputs' calibrated ranges differ by more than this factor
    /// (widest over narrowest) stays FP32, and so do the nodes reading its output, because one
    /// shared scale would crush its narrow-range inputs (box coordinates beside class scores).
    pub max_concat_range_ratio: f32,
    /// Weight-only mode: bits per weight (4 or 8).
    pub weight_bits: u8,
    /// Weight-only mode: weights per block along K (a power of two from 16 to 256).
    pub block_size: usize,
    /// Weight-only mode: symmetric blocks (zero point fixed at the middle) or min/max blocks.
    pub weight_symmetric: bool,
}

impl Default for Int8Options {
    fn default() -> Self {
        Self {
            mode: Int8Mode::Dynamic,
            per_channel: true,
            reduce_range: None,
            activation_type: ActivationType::Uint8,
            keep_first_and_last_layers: true,
            op_types_include: Vec::new(),
            op_types_exclude: Vec::new(),
            nodes_exclude: Vec::new(),
            calibration_data: None,
            calibration: CalibrationOptions::default(),
            max_concat_range_ratio: 10.0,
            quantize_embeddings: false,
            weight_bits: 4,
            block_size: 128,
            weight_symmetric: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Int8Error {
    #[error("nodes_exclude entry '{pattern}' is not a valid regular expression: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("model has no graph")]
    NoGraph,
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error("static quantization needs calibrated ranges for {0} tensors; run calibration first")]
    MissingRanges(usize),
    /// An option out of its range; `key` is its name in the policy's `int8:` section.
    #[error("{key}: {reason}")]
    BadOption { key: &'static str, reason: String },
}

impl Int8Error {
    /// The policy key (under `int8:`) an options error is about, if it is about one.
    pub fn option_key(&self) -> Option<&'static str> {
        match self {
            Int8Error::BadPattern { .. } => Some("nodes_exclude"),
            Int8Error::BadOption { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Why a candidate node was left in FP32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    FirstLayer,
    LastLayer,
    ExcludedOp,
    ExcludedNode(String),
    /// The weight is not a constant 2-D float tensor, or Gemm attributes are not the plain form.
    Unsupported(String),
    /// A Concat joining tensors of very different ranges, or a node reading its output.
    MixedRanges(String),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::FirstLayer => f.write_str("first compute layer"),
            SkipReason::LastLayer => f.write_str("last compute layer"),
            SkipReason::ExcludedOp => f.write_str("op_types_exclude"),
            SkipReason::ExcludedNode(pattern) => write!(f, "nodes_exclude ({pattern})"),
            SkipReason::Unsupported(why) => write!(f, "unsupported: {why}"),
            SkipReason::MixedRanges(why) => write!(f, "mixed ranges: {why}"),
        }
    }
}

/// What an INT8 pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Int8Report {
    /// (node, op) quantized.
    pub quantized: Vec<(String, String)>,
    /// (node, op, reason) left in FP32.
    pub skipped: Vec<(String, String, SkipReason)>,
    /// Static mode: tensors given QuantizeLinear/DequantizeLinear pairs.
    pub activations_quantized: usize,
    pub weight_bytes_before: usize,
    pub weight_bytes_after: usize,
}

/// Node-selection rules shared by the INT8 passes.
pub(crate) struct Selection {
    include: HashSet<String>,
    exclude: HashSet<String>,
    nodes: Vec<(String, Regex)>,
    keep_first_and_last: bool,
}

impl Selection {
    pub(crate) fn new(options: &Int8Options) -> Result<Self, Int8Error> {
        let nodes = options
            .nodes_exclude
            .iter()
            .map(|pattern| {
                Regex::new(&format!("^(?:{pattern})$"))
                    .map(|regex| (pattern.clone(), regex))
                    .map_err(|err| Int8Error::BadPattern { pattern: pattern.clone(), reason: err.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            include: options.op_types_include.iter().cloned().collect(),
            exclude: options.op_types_exclude.iter().cloned().collect(),
            nodes,
            keep_first_and_last: options.keep_first_and_last_layers,
        })
    }

    /// `None` when the node may be quantized, otherwise why not.
    pub(crate) fn skip_reason(
        &self,
        node: &NodeProto,
        first: &HashSet<usize>,
        last: &HashSet<usize>,
        position: usize,
    ) -> Option<SkipReason> {
        let op = node.op_type();
        if self.exclude.contains(op) || (!self.include.is_empty() && !self.include.contains(op)) {
            return Some(SkipReason::ExcludedOp);
        }
        if let Some((pattern, _)) =
            self.nodes.iter().find(|(pattern, regex)| pattern == node.name() || regex.is_match(node.name()))
        {
            return Some(SkipReason::ExcludedNode(pattern.clone()));
        }
        if self.keep_first_and_last && first.contains(&position) {
            return Some(SkipReason::FirstLayer);
        }
        if self.keep_first_and_last && last.contains(&position) {
            return Some(SkipReason::LastLayer);
        }
        None
    }
}

/// Whether the CPU has VNNI dot-product instructions (AVX512-VNNI or AVX-VNNI), which
/// accumulate u8 x s8 products in int32 without saturating.
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

impl Int8Options {
    /// `reduce_range` with `None` resolved for this CPU.
    pub fn effective_reduce_range(&self) -> bool {
        self.reduce_range.unwrap_or_else(|| !cpu_has_vnni())
    }
}

/// Validates options without touching a model (bad regular expressions, block settings).
pub fn validate_options(options: &Int8Options) -> Result<(), Int8Error> {
    let bad = |key: &'static str, reason: String| Err(Int8Error::BadOption { key, reason });
    if !matches!(options.weight_bits, 4 | 8) {
        return bad("weight_bits", format!("expected 4 or 8, got {}", options.weight_bits));
    }
    if !(16..=256).contains(&options.block_size) || !options.block_size.is_power_of_two() {
        return bad("block_size", format!("expected a power of two from 16 to 256, got {}", options.block_size));
    }
    if options.max_concat_range_ratio.is_nan() || options.max_concat_range_ratio < 1.0 {
        return bad("max_concat_range_ratio", format!("expected at least 1, got {}", options.max_concat_range_ratio));
    }
    Selection::new(options).map(|_| ())
}

pub(crate) fn ensure_opset(model: &mut ModelProto, domain: &str, version: i64) {
    if !model.opset_import.iter().any(|o| o.domain() == domain) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(domain.to_owned()), version: Some(version) });
    }
}

/// Initializers visible from a graph: its own first, then those of the graphs around it
/// (a subgraph of If/Loop/Scan may read its parents' initializers by name).
struct Scope<'a> {
    layers: Vec<&'a [TensorProto]>,
}

impl<'a> Scope<'a> {
    fn find(&self, name: &str) -> Option<&'a TensorProto> {
        self.layers.iter().rev().find_map(|layer| layer.iter().find(|t| t.name() == name))
    }

    fn nested(&self, inner: &'a [TensorProto]) -> Scope<'a> {
        let mut layers = self.layers.clone();
        layers.push(inner);
        Scope { layers }
    }
}

/// A 2-D FLOAT initializer's values and shape.
fn matrix(scope: &Scope, name: &str) -> Option<(Vec<f32>, usize, usize)> {
    let tensor = scope.find(name)?;
    if tensor.data_type() != elem::FLOAT || tensor.dims.len() != 2 {
        return None;
    }
    Some((f32_values(tensor)?, tensor.dims[0] as usize, tensor.dims[1] as usize))
}

fn vector(scope: &Scope, name: &str, length: usize) -> Option<Vec<f32>> {
    let tensor = scope.find(name)?;
    let elements: i64 = tensor.dims.iter().product();
    (tensor.data_type() == elem::FLOAT && elements as usize == length).then(|| f32_values(tensor)).flatten()
}

pub(crate) fn float_tensor(name: &str, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims,
        data_type: Some(elem::FLOAT),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub(crate) fn int8_tensor(name: &str, dims: Vec<i64>, values: &[i8]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims,
        data_type: Some(elem::INT8),
        raw_data: Some(values.iter().map(|v| *v as u8).collect()),
        ..Default::default()
    }
}

fn float_attribute(node: &NodeProto, name: &str, default: f32) -> f32 {
    attribute(node, name).and_then(|a| a.f).unwrap_or(default)
}

fn int_attribute(node: &NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).and_then(|a| a.i).unwrap_or(default)
}

/// The weight of a MatMul/Gemm as a [K, N] matrix, plus an optional bias of N.
struct LinearWeights {
    k: usize,
    n: usize,
    /// Row-major [K, N].
    values: Vec<f32>,
    bias: Option<Vec<f32>>,
}

fn linear_weights(scope: &Scope, node: &NodeProto) -> Result<LinearWeights, String> {
    let weight_name = node.input.get(1).ok_or("no weight input")?;
    let (values, rows, cols) = matrix(scope, weight_name)
        .ok_or_else(|| format!("weight '{weight_name}' is not a constant 2-D float initializer"))?;
    match node.op_type() {
        "MatMul" => Ok(LinearWeights { k: rows, n: cols, values, bias: None }),
        "Gemm" => {
            if float_attribute(node, "alpha", 1.0) != 1.0 || int_attribute(node, "transA", 0) != 0 {
                return Err("Gemm with alpha != 1 or transA".to_owned());
            }
            let (k, n, values) = if int_attribute(node, "transB", 0) != 0 {
                let mut transposed = vec![0.0; values.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        transposed[c * rows + r] = values[r * cols + c];
                    }
                }
                (cols, rows, transposed)
            } else {
                (rows, cols, values)
            };
            let bias = match node.input.get(2).filter(|name| !name.is_empty()) {
                None => None,
                Some(name) => {
                    let beta = float_attribute(node, "beta", 1.0);
                    let bias = vector(scope, name, n)
                        .ok_or_else(|| format!("bias '{name}' is not a constant float vector of {n}"))?;
                    Some(bias.into_iter().map(|b| b * beta).collect())
                }
            };
            Ok(LinearWeights { k, n, values, bias })
        }
        other => Err(format!("{other} is not a MatMul or Gemm")),
    }
}

/// Where the weight-rewriting passes act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The main graph and every If/Loop/Scan subgraph.
    Everywhere,
    /// Subgraphs only (static mode, whose QDQ pass covers the main graph).
    SubgraphsOnly,
}

/// Rewrites one MatMul/Gemm with constant weights into the nodes that replace it, adding the
/// initializers they read.
type LinearRewrite<'r> =
    dyn FnMut(&NodeProto, &LinearWeights, &mut NameGenerator, &mut Vec<TensorProto>) -> Vec<NodeProto> + 'r;

/// Applies `rewrite` to every MatMul/Gemm with constant weights that the selection rules allow,
/// in `graph` and, recursively, in the subgraphs of its If/Loop/Scan nodes. Inside a subgraph
/// the first/last-layer rule does not apply (a branch body is not an end of the model); the
/// op and node-name rules do. Weights may live in the subgraph or in a graph around it.
/// Returns the names of the FP32 weights some rewritten node no longer reads.
fn rewrite_linear_nodes(
    graph: &mut GraphProto,
    outer: &Scope,
    (reach, selection): (Reach, &Selection),
    names: &mut NameGenerator,
    report: &mut Int8Report,
    rewrite: &mut LinearRewrite,
) -> HashSet<String> {
    crate::graph::constants_to_initializers(graph);
    let in_subgraph = !outer.layers.is_empty();
    let mut replaced: HashSet<String> = HashSet::new();
    if reach == Reach::Everywhere || in_subgraph {
        let (first, last) = if in_subgraph { Default::default() } else { first_and_last_compute(graph) };
        let mut new_initializers = Vec::new();
        let scope = outer.nested(&graph.initializer);
        let mut rebuilt = Vec::with_capacity(graph.node.len());
        for (position, node) in graph.node.iter().enumerate() {
            match linear_candidate(&scope, node, position, selection, (&first, &last), report) {
                Some(weights) => {
                    replaced.insert(node.input[1].clone());
                    report.quantized.push((node.name().to_owned(), node.op_type().to_owned()));
                    rebuilt.extend(rewrite(node, &weights, names, &mut new_initializers));
                }
                None => rebuilt.push(node.clone()),
            }
        }
        graph.node = rebuilt;
        graph.initializer.extend(new_initializers);
    }
    let GraphProto { node: nodes, initializer, .. } = graph;
    let scope = outer.nested(initializer);
    let mut subgraph_quantized = 0;
    for node in nodes.iter_mut() {
        for attribute in node.attribute.iter_mut() {
            for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                let before = report.quantized.len();
                let inner = rewrite_linear_nodes(subgraph, &scope, (reach, selection), names, report, rewrite);
                drop_unread_initializers(subgraph, &inner);
                subgraph_quantized += report.quantized.len() - before;
                replaced.extend(inner);
            }
        }
    }
    if subgraph_quantized > 0 && !in_subgraph {
        tracing::info!(nodes = subgraph_quantized, "int8: quantized MatMul/Gemm weights inside If/Loop/Scan subgraphs");
    }
    replaced
}

/// The constant weights of a MatMul/Gemm the INT8 weight passes may rewrite; a candidate the
/// rules exclude, or whose weights are not constant, is recorded in `report` as skipped.
fn linear_candidate(
    scope: &Scope,
    node: &NodeProto,
    position: usize,
    selection: &Selection,
    (first, last): (&HashSet<usize>, &HashSet<usize>),
    report: &mut Int8Report,
) -> Option<LinearWeights> {
    if !node.domain().is_empty() || !matches!(node.op_type(), "MatMul" | "Gemm") {
        return None;
    }
    let (name, op) = (node.name().to_owned(), node.op_type().to_owned());
    if let Some(reason) = selection.skip_reason(node, first, last, position) {
        tracing::debug!(node = %name, %reason, "int8: kept FP32");
        report.skipped.push((name, op, reason));
        return None;
    }
    match linear_weights(scope, node) {
        Ok(weights) => Some(weights),
        Err(why) => {
            report.skipped.push((name, op, SkipReason::Unsupported(why)));
            None
        }
    }
}

/// Dynamic INT8: rewrites MatMul/Gemm with constant weights as DynamicQuantizeMatMul, in the
/// main graph and in If/Loop/Scan subgraphs.
pub fn quantize_dynamic(model: &mut ModelProto, options: &Int8Options) -> Result<Int8Report, Int8Error> {
    quantize_dynamic_within(model, options, Reach::Everywhere, Int8Report::default())
}

/// Static mode's companion: calibration cannot observe tensors inside If/Loop/Scan subgraphs
/// (ONNX Runtime exposes only main-graph values as outputs), so their MatMul/Gemm nodes are
/// quantized dynamically instead of being left FP32. Adds to `report`.
pub(crate) fn quantize_subgraphs_dynamic(
    model: &mut ModelProto,
    options: &Int8Options,
    report: Int8Report,
) -> Result<Int8Report, Int8Error> {
    quantize_dynamic_within(model, options, Reach::SubgraphsOnly, report)
}

fn quantize_dynamic_within(
    model: &mut ModelProto,
    options: &Int8Options,
    reach: Reach,
    mut report: Int8Report,
) -> Result<Int8Report, Int8Error> {
    let selection = Selection::new(options)?;
    let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
    let mut names = NameGenerator::for_graph(graph);
    let reduce_range = options.effective_reduce_range();
    let per_channel = options.per_channel;
    let quantized_before = report.quantized.len();
    let (mut bytes_before, mut bytes_after) = (0, 0);
    let mut rewrite =
        |node: &NodeProto, weights: &LinearWeights, names: &mut NameGenerator, initializers: &mut Vec<TensorProto>| {
            // Symmetric int8 per output column (axis 1 of [K, N]).
            let (scales, quantized) = if per_channel {
                per_channel_symmetric(&weights.values, &[weights.k, weights.n], 1, reduce_range)
            } else {
                per_channel_symmetric(&weights.values, &[1, weights.values.len()], 0, reduce_range)
            };
            let base = if node.name().is_empty() { node.output[0].clone() } else { node.name().to_owned() };
            let weight_name = names.fresh(&format!("{base}_weight_int8"));
            let scale_name = names.fresh(&format!("{base}_weight_scale"));
            initializers.push(int8_tensor(&weight_name, vec![weights.k as i64, weights.n as i64], &quantized));
            initializers.push(float_tensor(&scale_name, vec![scales.len() as i64], &scales));
            bytes_before += weights.values.len() * 4;
            bytes_after += quantized.len() + scales.len() * 4;
            let mut inputs = vec![node.input[0].clone(), weight_name, scale_name, String::new()];
            if let Some(bias) = &weights.bias {
                let bias_name = names.fresh(&format!("{base}_bias"));
                initializers.push(float_tensor(&bias_name, vec![bias.len() as i64], bias));
                inputs.push(bias_name);
            }
            tracing::debug!(node = %base, "int8 dynamic: DynamicQuantizeMatMul");
            vec![NodeProto {
                name: Some(base),
                op_type: Some("DynamicQuantizeMatMul".to_owned()),
                domain: Some("com.microsoft".to_owned()),
                input: inputs,
                output: vec![node.output[0].clone()],
                ..Default::default()
            }]
        };
    let top = Scope { layers: Vec::new() };
    let replaced = rewrite_linear_nodes(graph, &top, (reach, &selection), &mut names, &mut report, &mut rewrite);
    if options.quantize_embeddings {
        quantize_embedding_tables(graph, &selection, &mut names, &mut report);
    }
    let absorbed = absorb_bias_adds(graph);
    if absorbed > 0 {
        tracing::debug!(absorbed, "int8 dynamic: bias Adds moved into DynamicQuantizeMatMul");
    }
    report.weight_bytes_before += bytes_before;
    report.weight_bytes_after += bytes_after;
    let rewrote_any = report.quantized.len() > quantized_before;
    finish_contrib_rewrite(model, &replaced, rewrote_any);
    Ok(report)
}

/// Stores the tables of embedding lookups (Gather along axis 0 of a constant [V, D] float
/// matrix) as int8 with a symmetric scale per row: Gather(int8 table) -> Cast -> Mul by the
/// gathered row scales. A table read by other nodes too, or the op/node rules exclude, stays.
fn quantize_embedding_tables(
    graph: &mut GraphProto,
    selection: &Selection,
    names: &mut NameGenerator,
    report: &mut Int8Report,
) {
    let index = GraphIndex::build(graph);
    let none = HashSet::new();
    let mut rebuilt = Vec::with_capacity(graph.node.len());
    let mut new_initializers = Vec::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let mut quantized_tables: std::collections::HashMap<String, (String, String)> = Default::default();
    for (position, node) in graph.node.iter().enumerate() {
        let table_name = node.input.first().cloned().unwrap_or_default();
        let table = graph
            .initializer
            .iter()
            .find(|t| t.name() == table_name && t.data_type() == elem::FLOAT && t.dims.len() == 2);
        let only_lookups = index.consumers(&table_name).iter().all(|&c| graph.node[c].op_type() == "Gather");
        let eligible = node.op_type() == "Gather"
            && node.domain().is_empty()
            && int_attribute(node, "axis", 0) == 0
            && table.is_some()
            && only_lookups;
        if !eligible {
            rebuilt.push(node.clone());
            continue;
        }
        if let Some(reason) = selection.skip_reason(node, &none, &none, position) {
            report.skipped.push((node.name().to_owned(), "Gather".to_owned(), reason));
            rebuilt.push(node.clone());
            continue;
        }
        let Some(values) = table.and_then(f32_values) else {
            rebuilt.push(node.clone());
            continue;
        };
        let Some((rows, columns)) = table.map(|t| (t.dims[0], t.dims[1])) else { continue };
        let (int8_name, scales_name) = quantized_tables
            .entry(table_name.clone())
            .or_insert_with(|| {
                let (scales, quantized) = per_channel_symmetric(&values, &[rows as usize, columns as usize], 0, false);
                let int8_name = names.fresh(&format!("{table_name}_int8"));
                let scales_name = names.fresh(&format!("{table_name}_row_scales"));
                new_initializers.push(int8_tensor(&int8_name, vec![rows, columns], &quantized));
                new_initializers.push(float_tensor(&scales_name, vec![rows, 1], &scales));
                report.weight_bytes_before += values.len() * 4;
                report.weight_bytes_after += quantized.len() + scales.len() * 4;
                (int8_name, scales_name)
            })
            .clone();
        let base = if node.name().is_empty() { node.output[0].clone() } else { node.name().to_owned() };
        let indices = node.input[1].clone();
        let codes = names.fresh(&format!("{base}_int8_rows"));
        let floats = names.fresh(&format!("{base}_rows_float"));
        let row_scales = names.fresh(&format!("{base}_row_scales"));
        let plain = |op: &str, name: String, input: Vec<String>, output: String| NodeProto {
            name: Some(name),
            op_type: Some(op.to_owned()),
            input,
            output: vec![output],
            ..Default::default()
        };
        rebuilt.push(plain("Gather", base.clone(), vec![int8_name, indices.clone()], codes.clone()));
        rebuilt.push(plain(
            "Gather",
            names.fresh(&format!("{base}_scales")),
            vec![scales_name, indices],
            row_scales.clone(),
        ));
        let mut cast = plain("Cast", names.fresh(&format!("{base}_cast")), vec![codes], floats.clone());
        cast.attribute.push(AttributeProto {
            name: Some("to".to_owned()),
            r#type: Some(2),
            i: Some(i64::from(elem::FLOAT)),
            ..Default::default()
        });
        rebuilt.push(cast);
        rebuilt.push(plain(
            "Mul",
            names.fresh(&format!("{base}_dequantize")),
            vec![floats, row_scales],
            node.output[0].clone(),
        ));
        report.quantized.push((node.name().to_owned(), "Gather".to_owned()));
        replaced.insert(table_name);
    }
    graph.node = rebuilt;
    graph.initializer.extend(new_initializers);
    drop_unread_initializers(graph, &replaced);
}

/// Moves an Add of a constant bias vector that alone reads a DynamicQuantizeMatMul's output
/// into the node's own bias input (any activation rank: the bias broadcasts over the last
/// axis), saving a pass over the output. Returns how many were moved.
fn absorb_bias_adds(graph: &mut GraphProto) -> usize {
    let index = GraphIndex::build(graph);
    let mut merges: Vec<(usize, usize, String)> = Vec::new();
    for (position, node) in graph.node.iter().enumerate() {
        if node.op_type() != "DynamicQuantizeMatMul" || node.input.len() > 4 {
            continue;
        }
        let columns = graph.initializer.iter().find(|t| t.name() == node.input[1]).and_then(|w| w.dims.get(1));
        if let (Some(&columns), Some((add, bias))) = (columns, crate::graph::sole_bias_add(graph, &index, node))
            && bias.dims == [columns]
        {
            merges.push((position, add, bias.name().to_owned()));
        }
    }
    crate::graph::fold_bias_adds(graph, &merges, |node, bias| {
        node.input.resize(4, String::new());
        node.input.push(bias);
    });
    merges.len()
}

/// Drops the initializers of a subgraph that a rewrite replaced and nothing reads any more.
fn drop_unread_initializers(graph: &mut GraphProto, replaced: &HashSet<String>) {
    let index = GraphIndex::build(graph);
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    graph.initializer.retain(|t| {
        !replaced.contains(t.name()) || !index.consumers(t.name()).is_empty() || outputs.contains(t.name())
    });
}

/// Drops the FP32 weights the rewritten nodes no longer read and declares the com.microsoft
/// opset their replacements need.
fn finish_contrib_rewrite(model: &mut ModelProto, replaced_weights: &HashSet<String>, rewrote_any: bool) {
    if let Some(graph) = model.graph.as_mut() {
        drop_unread_initializers(graph, replaced_weights);
    }
    if rewrote_any {
        ensure_opset(model, "com.microsoft", 1);
    }
}

/// Block-wise quantization of a [K, N] matrix in MatMulNBits' layout: for each column n and
/// block b of `block_size` rows, a scale and a zero point; values packed as
/// [N][blocks][block_size * bits / 8] bytes (4-bit: two per byte, low nibble first).
pub(crate) struct BlockQuantized {
    pub packed: Vec<u8>,
    pub scales: Vec<f32>,
    /// Packed zero points, `None` when symmetric (MatMulNBits then assumes 2^(bits-1)).
    pub zero_points: Option<Vec<u8>>,
    pub blocks: usize,
}

pub(crate) fn quantize_blocks(
    values: &[f32],
    k: usize,
    n: usize,
    bits: u8,
    block_size: usize,
    symmetric: bool,
) -> BlockQuantized {
    let blocks = k.div_ceil(block_size);
    let levels = (1u32 << bits) as f32;
    let middle = (1u32 << (bits - 1)) as f32;
    let mut codes = vec![0u8; n * blocks * block_size];
    let mut scales = vec![0f32; n * blocks];
    let mut zeros = vec![0u8; n * blocks];
    for column in 0..n {
        for block in 0..blocks {
            let rows = block * block_size..((block + 1) * block_size).min(k);
            let weights: Vec<f32> = rows.clone().map(|row| values[row * n + column]).collect();
            let (scale, zero) = if symmetric {
                let max = weights.iter().fold(0f32, |m, w| m.max(w.abs()));
                (if max > 0.0 { max / middle } else { 1.0 }, middle)
            } else {
                let lo = weights.iter().fold(0f32, |m, &w| m.min(w));
                let hi = weights.iter().fold(0f32, |m, &w| m.max(w));
                let scale = if hi > lo { (hi - lo) / (levels - 1.0) } else { 1.0 };
                (scale, (-lo / scale).round_ties_even().clamp(0.0, levels - 1.0))
            };
            let at = column * blocks + block;
            scales[at] = scale;
            zeros[at] = zero as u8;
            for (offset, weight) in weights.iter().enumerate() {
                let code = (weight / scale).round_ties_even() + zero;
                codes[at * block_size + offset] = code.clamp(0.0, levels - 1.0) as u8;
            }
        }
    }
    let pack = |values: &[u8]| -> Vec<u8> {
        values.chunks(2).map(|pair| pair[0] | (pair.get(1).copied().unwrap_or(0) << 4)).collect()
    };
    let (packed, zero_points) = if bits == 4 {
        let zero_points = (!symmetric).then(|| zeros.chunks(blocks).flat_map(pack).collect());
        (pack(&codes), zero_points)
    } else {
        (codes, (!symmetric).then_some(zeros))
    };
    BlockQuantized { packed, scales, zero_points, blocks }
}

/// Weight-only block-wise quantization: MatMul/Gemm with constant weights become
/// com.microsoft.MatMulNBits (4- or 8-bit weights, one scale per block along K); activations
/// stay float. Meant for large MatMul-bound models whose weights dominate memory traffic.
/// Covers If/Loop/Scan subgraphs too.
pub fn quantize_weight_only(model: &mut ModelProto, options: &Int8Options) -> Result<Int8Report, Int8Error> {
    validate_options(options)?;
    let selection = Selection::new(options)?;
    let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
    let mut names = NameGenerator::for_graph(graph);
    let mut report = Int8Report::default();
    let (bits, block_size, symmetric) = (options.weight_bits, options.block_size, options.weight_symmetric);
    let (mut bytes_before, mut bytes_after) = (0, 0);
    let mut rewrite =
        |node: &NodeProto, weights: &LinearWeights, names: &mut NameGenerator, initializers: &mut Vec<TensorProto>| {
            let quantized = quantize_blocks(&weights.values, weights.k, weights.n, bits, block_size, symmetric);
            let base = if node.name().is_empty() { node.output[0].clone() } else { node.name().to_owned() };
            let b_name = names.fresh(&format!("{base}_weight_q{bits}"));
            let s_name = names.fresh(&format!("{base}_weight_scales"));
            let blob = block_size * usize::from(bits) / 8;
            initializers.push(TensorProto {
                name: Some(b_name.clone()),
                dims: vec![weights.n as i64, quantized.blocks as i64, blob as i64],
                data_type: Some(elem::UINT8),
                raw_data: Some(quantized.packed.clone()),
                ..Default::default()
            });
            initializers.push(float_tensor(&s_name, vec![quantized.scales.len() as i64], &quantized.scales));
            let mut inputs = vec![node.input[0].clone(), b_name, s_name];
            if let Some(zero_points) = &quantized.zero_points {
                let z_name = names.fresh(&format!("{base}_weight_zero_points"));
                initializers.push(TensorProto {
                    name: Some(z_name.clone()),
                    dims: vec![zero_points.len() as i64],
                    data_type: Some(elem::UINT8),
                    raw_data: Some(zero_points.clone()),
                    ..Default::default()
                });
                inputs.push(z_name);
            }
            bytes_before += weights.values.len() * 4;
            bytes_after += quantized.packed.len() + quantized.scales.len() * 4;
            let int_attribute = |name: &str, value: i64| AttributeProto {
                name: Some(name.to_owned()),
                r#type: Some(2),
                i: Some(value),
                ..Default::default()
            };
            let output = node.output[0].clone();
            let matmul_output =
                if weights.bias.is_some() { names.fresh(&format!("{output}_before_bias")) } else { output.clone() };
            let mut nodes = vec![NodeProto {
                name: Some(base.clone()),
                op_type: Some("MatMulNBits".to_owned()),
                domain: Some("com.microsoft".to_owned()),
                input: inputs,
                output: vec![matmul_output.clone()],
                attribute: vec![
                    int_attribute("K", weights.k as i64),
                    int_attribute("N", weights.n as i64),
                    int_attribute("bits", i64::from(bits)),
                    int_attribute("block_size", block_size as i64),
                ],
                ..Default::default()
            }];
            if let Some(bias) = &weights.bias {
                let bias_name = names.fresh(&format!("{base}_bias"));
                initializers.push(float_tensor(&bias_name, vec![bias.len() as i64], bias));
                nodes.push(NodeProto {
                    name: Some(names.fresh(&format!("{base}_bias_add"))),
                    op_type: Some("Add".to_owned()),
                    input: vec![matmul_output, bias_name],
                    output: vec![output],
                    ..Default::default()
                });
            }
            nodes
        };
    let top = Scope { layers: Vec::new() };
    let replaced =
        rewrite_linear_nodes(graph, &top, (Reach::Everywhere, &selection), &mut names, &mut report, &mut rewrite);
    if options.quantize_embeddings {
        quantize_embedding_tables(graph, &selection, &mut names, &mut report);
    }
    report.weight_bytes_before += bytes_before;
    report.weight_bytes_after += bytes_after;
    let rewrote_any = !report.quantized.is_empty();
    finish_contrib_rewrite(model, &replaced, rewrote_any);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_pack_two_4_bit_codes_per_byte_low_nibble_first() {
        // K = 4, N = 1, one block of 4: symmetric 4-bit, scale = max|w| / 8, zero 8.
        let q = quantize_blocks(&[8.0, -8.0, 4.0, 0.0], 4, 1, 4, 4, true);
        assert_eq!(q.scales, vec![1.0]);
        // codes: 8+8 -> clamp 15, -8+8 = 0, 4+8 = 12, 0+8 = 8
        assert_eq!(q.packed, vec![15, 8 << 4 | 12]);
        assert_eq!(q.zero_points, None);
    }

    #[test]
    fn asymmetric_blocks_carry_zero_points_and_reconstruct_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0).collect();
        let q = quantize_blocks(&values, 32, 2, 8, 16, false);
        assert_eq!(q.blocks, 2);
        let zeros = q.zero_points.as_ref().unwrap();
        for column in 0..2 {
            for row in 0..32 {
                let at = column * 2 + row / 16;
                let code = f32::from(q.packed[at * 16 + row % 16]);
                let restored = (code - f32::from(zeros[at])) * q.scales[at];
                assert!((restored - values[row * 2 + column]).abs() <= q.scales[at] / 2.0 + 1e-6);
            }
        }
    }
}
