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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::elem;
use crate::graph::{
    GraphError, GraphIndex, NameGenerator, first_and_last_compute, node_reads, set_declared_elem_type,
    topological_order,
};
use crate::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::tensor::narrow_to_f16;
use crate::types::{ElemTypes, attribute, infer_elem_types};

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

/// Ops that pass a tensor through unchanged in value, for pattern matching.
const PASS_THROUGH_OPS: &[&str] = &["Cast", "Dropout", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze"];

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
    /// Operator of a domain the pass does not know (e.g. ai.onnx.ml).
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
            KeepReason::ForeignDomain => f.write_str("operator domain not converted"),
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

/// Checks options without converting anything (e.g. the node_block_list patterns).
pub fn validate_options(options: &Fp16Options) -> Result<(), Fp16Error> {
    Rules::new(options).map(|_| ())
}

/// Converts `model` to FP16 in place.
pub fn convert_to_fp16(model: &mut ModelProto, options: &Fp16Options) -> Result<Fp16Report, Fp16Error> {
    let rules = Rules::new(options)?;
    let graph = model.graph.as_mut().ok_or(Fp16Error::NoGraph)?;
    let mut report = Fp16Report::default();
    let mut names = NameGenerator::for_graph(graph);
    convert_graph(graph, &ElemTypes::new(), &rules, Scope::Main, &mut names, &mut report)?;
    Ok(report)
}

struct Rules<'a> {
    options: &'a Fp16Options,
    blocked_ops: HashSet<String>,
    node_patterns: Vec<(String, Option<Regex>)>,
}

impl<'a> Rules<'a> {
    fn new(options: &'a Fp16Options) -> Result<Self, Fp16Error> {
        let mut blocked_ops: HashSet<String> = DEFAULT_OP_BLOCK_LIST.iter().map(|s| (*s).to_owned()).collect();
        blocked_ops.extend(options.op_block_list_add.iter().cloned());
        for removed in &options.op_block_list_remove {
            blocked_ops.remove(removed);
        }
        let node_patterns = options
            .node_block_list
            .iter()
            .map(|pattern| {
                Regex::new(&format!("^(?:{pattern})$"))
                    .map(|regex| (pattern.clone(), Some(regex)))
                    .map_err(|err| Fp16Error::BadPattern { pattern: pattern.clone(), reason: err.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { options, blocked_ops, node_patterns })
    }

    fn node_pattern(&self, name: &str) -> Option<&str> {
        self.node_patterns
            .iter()
            .find(|(pattern, regex)| pattern == name || regex.as_ref().is_some_and(|r| r.is_match(name)))
            .map(|(pattern, _)| pattern.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Main,
    Subgraph,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Convert,
    Keep(KeepReason),
    /// No float tensor in or out.
    Neutral,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Precision {
    Fp32,
    Fp16,
}

fn is_float(types: &ElemTypes, name: &str) -> bool {
    !name.is_empty() && types.get(name) == Some(&elem::FLOAT)
}

fn has_subgraph(node: &NodeProto) -> bool {
    node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
}

fn is_constant_like(node: &NodeProto) -> bool {
    node.domain().is_empty() && matches!(node.op_type(), "Constant" | "ConstantOfShape")
}

fn convert_graph(
    graph: &mut GraphProto,
    outer_types: &ElemTypes,
    rules: &Rules<'_>,
    scope: Scope,
    names: &mut NameGenerator,
    report: &mut Fp16Report,
) -> Result<(), Fp16Error> {
    let order = topological_order(graph)?;
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
    graph.node = order.iter().filter_map(|&i| nodes[i].take()).collect();

    let types = infer_elem_types(graph, outer_types);
    let index = GraphIndex::build(graph);
    let decisions = decide(graph, &types, &index, rules, scope);
    let keep_io = scope == Scope::Subgraph || rules.options.keep_io_types;

    // Graph outputs whose producer runs in the other precision: the producer writes a renamed
    // value and a Cast restores the declared name and type after it.
    let io_precision = if keep_io { Precision::Fp32 } else { Precision::Fp16 };
    let mut after_node: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let output_names: Vec<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    let mut renamed_types = types.clone();
    for output in &output_names {
        if !is_float(&types, output) {
            continue;
        }
        let Some(producer) = index.producer(output) else {
            continue;
        };
        let produced = if decisions[producer] == Decision::Convert { Precision::Fp16 } else { Precision::Fp32 };
        if produced == io_precision {
            continue;
        }
        let internal = names.fresh(&format!("{output}_{}", suffix(produced)));
        rename_value(graph, output, &internal, false);
        renamed_types.insert(internal.clone(), elem::FLOAT);
        after_node.entry(producer).or_default().push(cast_node(names, &internal, output, io_precision));
        report.casts_inserted += 1;
        if io_precision == Precision::Fp16 {
            set_declared_elem_type(graph, output, elem::FLOAT16);
        }
    }
    let types = renamed_types;
    let index = GraphIndex::build(graph);

    // Home precision of every float value.
    let mut home: HashMap<String, Precision> = HashMap::new();
    let input_names: Vec<String> = graph.input.iter().map(|i| i.name().to_owned()).collect();
    for input in input_names.iter().filter(|name| is_float(&types, name)) {
        let precision = if keep_io { Precision::Fp32 } else { Precision::Fp16 };
        home.insert(input.clone(), precision);
        if precision == Precision::Fp16 {
            set_declared_elem_type(graph, input, elem::FLOAT16);
        }
    }
    let graph_outputs: HashSet<&str> = output_names.iter().map(String::as_str).collect();
    let mut narrowed_initializers = HashSet::new();
    for tensor in &mut graph.initializer {
        // An initializer also declared as a graph input (IR < 4 style) can be overridden by the
        // caller, so it keeps the input's type.
        if tensor.data_type() != elem::FLOAT || input_names.iter().any(|name| name == tensor.name()) {
            continue;
        }
        let name = tensor.name().to_owned();
        let readers = index.consumers(&name);
        let all_converted = !readers.is_empty() && readers.iter().all(|&r| decisions[r] == Decision::Convert);
        if all_converted && !graph_outputs.contains(name.as_str()) {
            report.values_clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
            report.initializers_converted += 1;
            narrowed_initializers.insert(name.clone());
            home.insert(name, Precision::Fp16);
        } else {
            home.insert(name, Precision::Fp32);
        }
    }

    let mut rewriter =
        Rewriter { names, home, types: &types, initializer_copies: HashMap::new(), casts: HashMap::new(), report };
    let original = std::mem::take(&mut graph.node);
    let mut rebuilt = Vec::with_capacity(original.len());
    let mut new_initializers = Vec::new();
    let mut subgraph_jobs = Vec::new();
    for (position, mut node) in original.into_iter().enumerate() {
        let decision = &decisions[position];
        let wanted = match decision {
            Decision::Convert => Some(Precision::Fp16),
            Decision::Keep(_) => Some(Precision::Fp32),
            Decision::Neutral => None,
        };
        match decision {
            Decision::Convert => {
                rewriter.report.nodes_converted += 1;
                tracing::debug!(node = node.name(), op = node.op_type(), "fp16: converted");
            }
            Decision::Keep(reason) => {
                tracing::debug!(node = node.name(), op = node.op_type(), %reason, "fp16: kept FP32");
                rewriter.report.nodes_kept.push((node.name().to_owned(), node.op_type().to_owned(), reason.clone()));
            }
            Decision::Neutral => {}
        }
        if let Some(precision) = wanted {
            for slot in 0..node.input.len() {
                let name = node.input[slot].clone();
                if !is_float(&types, &name) {
                    continue;
                }
                let resolved = rewriter.resolve(&name, precision, graph, &mut new_initializers, &mut rebuilt);
                node.input[slot] = resolved;
            }
            if has_subgraph(&node) {
                // Outer values a subgraph reads must arrive in FP32, like explicit inputs.
                let reads: Vec<String> = node_reads(&node).into_iter().filter(|n| is_float(&types, n)).collect();
                for name in reads {
                    if node.input.contains(&name) {
                        continue;
                    }
                    let resolved = rewriter.resolve(&name, Precision::Fp32, graph, &mut new_initializers, &mut rebuilt);
                    if resolved != name {
                        for attribute in &mut node.attribute {
                            for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                                rename_value(subgraph, &name, &resolved, true);
                            }
                        }
                    }
                }
                subgraph_jobs.push(rebuilt.len());
            }
            for output in node.output.iter().filter(|o| is_float(&types, o)) {
                rewriter.home.insert(output.clone(), precision);
                if precision == Precision::Fp16 {
                    set_declared_elem_type(graph, output, elem::FLOAT16);
                }
            }
            if precision == Precision::Fp16 {
                rewriter.report.values_clamped += convert_node_attributes(&mut node);
            }
        }
        rebuilt.push(node);
        if let Some(casts) = after_node.remove(&position) {
            rebuilt.extend(casts);
        }
    }
    graph.node = rebuilt;
    graph.initializer.extend(new_initializers);

    // Subgraphs see every outer float value in FP32 (ensured above).
    let mut subgraph_outer = types.clone();
    for (name, precision) in &rewriter.home {
        if *precision == Precision::Fp32 {
            subgraph_outer.insert(name.clone(), elem::FLOAT);
        }
    }
    for position in subgraph_jobs {
        let node = &mut graph.node[position];
        for attribute in &mut node.attribute {
            for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                convert_graph(subgraph, &subgraph_outer, rules, Scope::Subgraph, rewriter.names, rewriter.report)?;
            }
        }
    }
    Ok(())
}

fn suffix(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "fp32",
        Precision::Fp16 => "fp16",
    }
}

fn cast_node(names: &mut NameGenerator, from: &str, to: &str, precision: Precision) -> NodeProto {
    let target = match precision {
        Precision::Fp32 => elem::FLOAT,
        Precision::Fp16 => elem::FLOAT16,
    };
    NodeProto {
        name: Some(names.fresh(&format!("{to}_cast"))),
        op_type: Some("Cast".to_owned()),
        input: vec![from.to_owned()],
        output: vec![to.to_owned()],
        attribute: vec![AttributeProto {
            name: Some("to".to_owned()),
            r#type: Some(2),
            i: Some(i64::from(target)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct Rewriter<'a, 'r> {
    names: &'a mut NameGenerator,
    home: HashMap<String, Precision>,
    types: &'a ElemTypes,
    initializer_copies: HashMap<String, String>,
    casts: HashMap<(String, Precision), String>,
    report: &'r mut Fp16Report,
}

impl Rewriter<'_, '_> {
    /// The name under which `value` is available in `precision`, adding an FP16 initializer
    /// copy or a Cast (emitted into `nodes`) the first time it is needed.
    fn resolve(
        &mut self,
        value: &str,
        precision: Precision,
        graph: &GraphProto,
        new_initializers: &mut Vec<TensorProto>,
        nodes: &mut Vec<NodeProto>,
    ) -> String {
        debug_assert!(self.types.contains_key(value));
        // Values with no recorded home come from an outer scope, which provides FP32.
        let home = self.home.get(value).copied().unwrap_or(Precision::Fp32);
        if home == precision {
            return value.to_owned();
        }
        if precision == Precision::Fp16
            && let Some(tensor) = graph.initializer.iter().find(|t| t.name() == value)
        {
            if let Some(copy) = self.initializer_copies.get(value) {
                return copy.clone();
            }
            let mut copy = tensor.clone();
            let name = self.names.fresh(&format!("{value}_fp16"));
            copy.name = Some(name.clone());
            self.report.values_clamped += narrow_to_f16(&mut copy).map_or(0, |n| n.clamped);
            self.report.initializer_copies += 1;
            new_initializers.push(copy);
            self.initializer_copies.insert(value.to_owned(), name.clone());
            self.home.insert(name.clone(), Precision::Fp16);
            return name;
        }
        if let Some(existing) = self.casts.get(&(value.to_owned(), precision)) {
            return existing.clone();
        }
        let name = self.names.fresh(&format!("{value}_{}", suffix(precision)));
        nodes.push(cast_node(self.names, value, &name, precision));
        self.report.casts_inserted += 1;
        self.casts.insert((value.to_owned(), precision), name.clone());
        self.home.insert(name.clone(), precision);
        name
    }
}

/// Renames every read of `from` in `graph` (node inputs, value_info and nested subgraphs,
/// including what a subgraph returns) and its definition, if this graph defines it. The
/// graph's own outputs are renamed only when `rename_outputs` is set: a main graph keeps its
/// output names, a subgraph that returns an outer value must return the renamed one.
fn rename_value(graph: &mut GraphProto, from: &str, to: &str, rename_outputs: bool) {
    for node in &mut graph.node {
        for name in node.input.iter_mut().chain(node.output.iter_mut()) {
            if name == from {
                *name = to.to_owned();
            }
        }
        for attribute in &mut node.attribute {
            for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                let shadows = subgraph.input.iter().any(|i| i.name() == from)
                    || subgraph.initializer.iter().any(|t| t.name() == from);
                if !shadows {
                    rename_value(subgraph, from, to, true);
                }
            }
        }
    }
    let outputs = graph.output.iter_mut().filter(|_| rename_outputs);
    for info in graph.value_info.iter_mut().chain(outputs) {
        if info.name() == from {
            info.name = Some(to.to_owned());
        }
    }
}

/// Narrows float tensor attributes and float dtype attributes of a converted node. Returns
/// the number of clamped values.
fn convert_node_attributes(node: &mut NodeProto) -> usize {
    let mut clamped = 0;
    let op = node.op_type().to_owned();
    if op == "Cast" {
        if let Some(to) = node.attribute.iter_mut().find(|a| a.name() == "to") {
            to.i = Some(i64::from(elem::FLOAT16));
        }
        return 0;
    }
    if op == "ConstantOfShape" && attribute(node, "value").is_none() {
        node.attribute.push(AttributeProto {
            name: Some("value".to_owned()),
            r#type: Some(4),
            t: Some(TensorProto {
                dims: vec![1],
                data_type: Some(elem::FLOAT16),
                raw_data: Some(vec![0, 0]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for attribute in &mut node.attribute {
        match attribute.name() {
            "dtype" if attribute.i == Some(i64::from(elem::FLOAT)) => attribute.i = Some(i64::from(elem::FLOAT16)),
            "value_float" | "value_floats" if op == "Constant" => {
                let values: Vec<f32> = attribute.f.map(|f| vec![f]).unwrap_or_else(|| attribute.floats.clone());
                let dims = if attribute.name() == "value_float" { vec![] } else { vec![values.len() as i64] };
                let mut tensor =
                    TensorProto { dims, data_type: Some(elem::FLOAT), float_data: values, ..Default::default() };
                clamped += narrow_to_f16(&mut tensor).map_or(0, |n| n.clamped);
                *attribute = AttributeProto {
                    name: Some("value".to_owned()),
                    r#type: Some(4),
                    t: Some(tensor),
                    ..Default::default()
                };
            }
            _ => {
                if let Some(tensor) = attribute.t.as_mut() {
                    clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
                }
                for tensor in &mut attribute.tensors {
                    clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
                }
            }
        }
    }
    clamped
}

fn decide(graph: &GraphProto, types: &ElemTypes, index: &GraphIndex, rules: &Rules<'_>, scope: Scope) -> Vec<Decision> {
    let options = rules.options;
    let nodes = &graph.node;
    let touches_float = |node: &NodeProto| {
        node.input.iter().chain(&node.output).any(|name| is_float(types, name))
            || (has_subgraph(node) && node_reads(node).iter().any(|name| is_float(types, name)))
    };
    let (first, last) = if scope == Scope::Main && options.keep_first_and_last_layers {
        first_and_last_compute(graph)
    } else {
        (HashSet::new(), HashSet::new())
    };
    let norm_nodes =
        if options.keep_normalization_subgraphs { normalization_subgraph_nodes(graph, index) } else { HashSet::new() };
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();

    let mut decisions: Vec<Decision> = nodes
        .iter()
        .enumerate()
        .map(|(position, node)| {
            if !touches_float(node) {
                return Decision::Neutral;
            }
            let domain = node.domain();
            if !(domain.is_empty() || domain == "ai.onnx" || domain == "com.microsoft") {
                return Decision::Keep(KeepReason::ForeignDomain);
            }
            let op = node.op_type();
            if rules.blocked_ops.contains(op) {
                return Decision::Keep(KeepReason::OpBlockList);
            }
            if let Some(pattern) = rules.node_pattern(node.name()) {
                return Decision::Keep(KeepReason::NodeBlockList(pattern.to_owned()));
            }
            if has_subgraph(node) {
                return Decision::Keep(KeepReason::ControlFlow);
            }
            if matches!(op, "Cast" | "CastLike") {
                let from_float = node.input.first().is_some_and(|i| is_float(types, i));
                let to_float = node.output.first().is_some_and(|o| is_float(types, o));
                if from_float != to_float {
                    return Decision::Keep(KeepReason::TypeBoundaryCast);
                }
            }
            if node.input.iter().any(|input| !input.is_empty() && !types.contains_key(input)) {
                return Decision::Keep(KeepReason::UnknownInputType);
            }
            if first.contains(&position) {
                return Decision::Keep(KeepReason::FirstLayer);
            }
            if last.contains(&position) {
                return Decision::Keep(KeepReason::LastLayer);
            }
            if options.keep_embeddings
                && op == "Gather"
                && node.input.first().is_some_and(|i| initializers.contains(i.as_str()) && is_float(types, i))
            {
                return Decision::Keep(KeepReason::Embedding);
            }
            if options.keep_attention_probabilities
                && matches!(op, "MatMul" | "Einsum")
                && node.input.iter().any(|input| path_from_softmax(graph, index, input).is_some())
            {
                return Decision::Keep(KeepReason::AttentionProbabilities);
            }
            if norm_nodes.contains(&position) {
                return Decision::Keep(KeepReason::NormalizationSubgraph);
            }
            Decision::Convert
        })
        .collect();

    // The probabilities reach a kept attention MatMul through FP32 pass-through ops too, or a
    // Transpose in between would round them to FP16 and back.
    for position in 0..nodes.len() {
        if decisions[position] != Decision::Keep(KeepReason::AttentionProbabilities) {
            continue;
        }
        for input in &nodes[position].input {
            for on_path in path_from_softmax(graph, index, input).unwrap_or_default() {
                if decisions[on_path] == Decision::Convert {
                    decisions[on_path] = Decision::Keep(KeepReason::AttentionProbabilities);
                }
            }
        }
    }

    // Constants follow their readers: narrowing a constant only FP32 work reads would round
    // it for nothing.
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
    for (position, node) in nodes.iter().enumerate() {
        if decisions[position] != Decision::Convert || !is_constant_like(node) {
            continue;
        }
        let Some(output) = node.output.first() else {
            continue;
        };
        let readers = index.consumers(output);
        if outputs.contains(output.as_str())
            || readers.is_empty()
            || readers.iter().any(|&r| decisions[r] != Decision::Convert)
        {
            decisions[position] = Decision::Keep(KeepReason::FeedsFp32);
        }
    }
    decisions
}

/// When `value` is a Softmax output, possibly through pass-through ops, the positions of
/// those pass-through nodes (empty for a direct Softmax output).
fn path_from_softmax(graph: &GraphProto, index: &GraphIndex, value: &str) -> Option<Vec<usize>> {
    let mut current = value.to_owned();
    let mut path = Vec::new();
    for _ in 0..4 {
        let producer = index.producer(&current)?;
        let node = &graph.node[producer];
        match node.op_type() {
            "Softmax" => return Some(path),
            op if PASS_THROUGH_OPS.contains(&op) => {
                path.push(producer);
                current = node.input.first()?.clone();
            }
            _ => return None,
        }
    }
    None
}

/// Nodes of RMSNorm/LayerNorm-like subgraphs built from primitives: the square (Pow or
/// Mul(x, x)), its ReduceMean, and the Add/Sqrt/Reciprocal/Div/Mul chain that follows.
fn normalization_subgraph_nodes(graph: &GraphProto, index: &GraphIndex) -> HashSet<usize> {
    let nodes = &graph.node;
    let mut marked = HashSet::new();
    for (position, node) in nodes.iter().enumerate() {
        if node.op_type() != "ReduceMean" {
            continue;
        }
        let Some(square) = node.input.first().and_then(|input| index.producer(input)) else {
            continue;
        };
        let square_node = &nodes[square];
        let is_square = match square_node.op_type() {
            "Pow" => true,
            "Mul" => square_node.input.len() == 2 && square_node.input[0] == square_node.input[1],
            _ => false,
        };
        if !is_square {
            continue;
        }
        marked.insert(square);
        marked.insert(position);
        let mut frontier = vec![position];
        for _ in 0..4 {
            let mut next = Vec::new();
            for &at in &frontier {
                for output in &nodes[at].output {
                    for &consumer in index.consumers(output) {
                        let op = nodes[consumer].op_type();
                        if matches!(op, "Add" | "Sqrt" | "Reciprocal" | "Div" | "Mul")
                            && marked.insert(consumer)
                            && !matches!(op, "Div" | "Mul")
                        {
                            next.push(consumer);
                        }
                    }
                }
            }
            frontier = next;
        }
    }
    marked
}
