//! Which nodes the FP16 pass converts, keeps in FP32 (and why) or leaves alone because they
//! carry no float tensors. A node is judged on its own first (domain, block lists, control
//! flow, type-boundary casts, unknown input types, first/last layer, embeddings, attention,
//! normalisation patterns); then the attention rule extends to the ops between a Softmax and
//! its kept MatMul, and constants follow their readers.

use std::collections::HashSet;

use regex::Regex;

use super::options::{DEFAULT_OP_BLOCK_LIST, Fp16Error, Fp16Options, KeepReason};
use crate::graph::{GraphIndex, first_and_last_compute, node_reads};
use crate::onnx::{GraphProto, NodeProto};
use crate::types::{ElemTypes, is_float};

/// Ops that pass a tensor through unchanged in value, for pattern matching.
const PASS_THROUGH_OPS: &[&str] = &["Cast", "Dropout", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze"];

/// The options in the form the decisions use: the block list as a set, node patterns compiled.
pub(super) struct Rules<'a> {
    pub(super) options: &'a Fp16Options,
    blocked_ops: HashSet<String>,
    node_patterns: Vec<(String, Option<Regex>)>,
}

impl<'a> Rules<'a> {
    pub(super) fn new(options: &'a Fp16Options) -> Result<Self, Fp16Error> {
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

/// Which graph is being converted: the main graph, or a subgraph of If/Loop/Scan, whose inputs
/// and outputs stay FP32 and which has no first or last layer of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Main,
    Subgraph,
}

/// What happens to one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    Convert,
    Keep(KeepReason),
    /// No float tensor in or out.
    Neutral,
}

/// Whether the node holds a subgraph (If/Loop/Scan and other control flow).
pub(super) fn has_subgraph(node: &NodeProto) -> bool {
    node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
}

fn is_constant_like(node: &NodeProto) -> bool {
    node.domain().is_empty() && matches!(node.op_type(), "Constant" | "ConstantOfShape")
}

/// One decision per node of `graph` (positions as stored, already in topological order).
pub(super) fn decide(
    graph: &GraphProto,
    types: &ElemTypes,
    index: &GraphIndex,
    rules: &Rules<'_>,
    scope: Scope,
) -> Vec<Decision> {
    let options = rules.options;
    let (first, last) = if scope == Scope::Main && options.keep_first_and_last_layers {
        first_and_last_compute(graph)
    } else {
        (HashSet::new(), HashSet::new())
    };
    let normalization =
        if options.keep_normalization_subgraphs { normalization_subgraph_nodes(graph, index) } else { HashSet::new() };
    let initializers = graph.initializer.iter().map(|t| t.name()).collect();
    let judge = NodeJudge { graph, types, index, rules, first, last, normalization, initializers };
    let mut decisions: Vec<Decision> =
        graph.node.iter().enumerate().map(|(position, node)| judge.decide(position, node)).collect();
    keep_attention_paths(graph, index, &mut decisions);
    keep_constants_read_in_fp32(graph, index, &mut decisions);
    decisions
}

/// What deciding one node on its own needs to know about the graph.
struct NodeJudge<'g, 'r> {
    graph: &'g GraphProto,
    types: &'g ElemTypes,
    index: &'g GraphIndex,
    rules: &'g Rules<'r>,
    /// First and last compute layers (empty when that rule is off or in a subgraph).
    first: HashSet<usize>,
    last: HashSet<usize>,
    /// Nodes of primitive-op normalisation patterns (empty when that rule is off).
    normalization: HashSet<usize>,
    initializers: HashSet<&'g str>,
}

impl NodeJudge<'_, '_> {
    /// The decision for `node` at `position`, by the first rule that applies.
    fn decide(&self, position: usize, node: &NodeProto) -> Decision {
        let (types, options) = (self.types, self.rules.options);
        let touches_float = node.input.iter().chain(&node.output).any(|name| is_float(types, name))
            || (has_subgraph(node) && node_reads(node).iter().any(|name| is_float(types, name)));
        if !touches_float {
            return Decision::Neutral;
        }
        let domain = node.domain();
        // Custom-domain kernels (com.microsoft's quantized and fused ops among them) are
        // registered for the types they were exported with; feeding them FP16 breaks loading.
        if !(domain.is_empty() || domain == "ai.onnx") {
            return Decision::Keep(KeepReason::ForeignDomain);
        }
        let op = node.op_type();
        if self.rules.blocked_ops.contains(op) {
            return Decision::Keep(KeepReason::OpBlockList);
        }
        if let Some(pattern) = self.rules.node_pattern(node.name()) {
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
        if self.first.contains(&position) {
            return Decision::Keep(KeepReason::FirstLayer);
        }
        if self.last.contains(&position) {
            return Decision::Keep(KeepReason::LastLayer);
        }
        if options.keep_embeddings
            && op == "Gather"
            && node.input.first().is_some_and(|i| self.initializers.contains(i.as_str()) && is_float(types, i))
        {
            return Decision::Keep(KeepReason::Embedding);
        }
        if options.keep_attention_probabilities
            && matches!(op, "MatMul" | "Einsum")
            && node.input.iter().any(|input| path_from_softmax(self.graph, self.index, input).is_some())
        {
            return Decision::Keep(KeepReason::AttentionProbabilities);
        }
        if self.normalization.contains(&position) {
            return Decision::Keep(KeepReason::NormalizationSubgraph);
        }
        Decision::Convert
    }
}

/// The probabilities reach a kept attention MatMul through FP32 pass-through ops too, or a
/// Transpose in between would round them to FP16 and back.
fn keep_attention_paths(graph: &GraphProto, index: &GraphIndex, decisions: &mut [Decision]) {
    for position in 0..graph.node.len() {
        if decisions[position] != Decision::Keep(KeepReason::AttentionProbabilities) {
            continue;
        }
        for input in &graph.node[position].input {
            for on_path in path_from_softmax(graph, index, input).unwrap_or_default() {
                if decisions[on_path] == Decision::Convert {
                    decisions[on_path] = Decision::Keep(KeepReason::AttentionProbabilities);
                }
            }
        }
    }
}

/// Constants follow their readers: narrowing a constant only FP32 work reads would round it
/// for nothing.
fn keep_constants_read_in_fp32(graph: &GraphProto, index: &GraphIndex, decisions: &mut [Decision]) {
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
    for (position, node) in graph.node.iter().enumerate() {
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
