//! The walk the INT8 weight passes share: every MatMul/Gemm with constant weights that the
//! selection rules allow, in the main graph and, recursively, in If/Loop/Scan subgraphs, is
//! handed to a pass-specific rewrite with its weights as a [K, N] matrix. Constant nodes are
//! made initializers first (see [`crate::passes::canonicalize`]) so weights are found however
//! they were stored, and weights may live in the graph or in one around it.

use std::collections::HashSet;

use super::options::{Int8Report, Selection, SkipReason};
use crate::elem;
use crate::graph::{first_and_last_compute, model_ends};
use crate::onnx::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::passes::canonicalize::constants_to_initializers;
use crate::rewrite::{NameGenerator, drop_unread_initializers, ensure_opset};
use crate::tensor::f32_values;
use crate::types::{float_attribute_or, int_attribute_or};

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

/// The weight of a MatMul/Gemm as a [K, N] matrix, plus an optional bias of N.
pub(super) struct LinearWeights {
    pub(super) k: usize,
    pub(super) n: usize,
    /// Row-major [K, N].
    pub(super) values: Vec<f32>,
    pub(super) bias: Option<Vec<f32>>,
}

fn linear_weights(scope: &Scope, node: &NodeProto) -> Result<LinearWeights, String> {
    let weight_name = node.input.get(1).ok_or("no weight input")?;
    let (values, rows, cols) = matrix(scope, weight_name)
        .ok_or_else(|| format!("weight '{weight_name}' is not a constant 2-D float initializer"))?;
    match node.op_type() {
        "MatMul" => Ok(LinearWeights { k: rows, n: cols, values, bias: None }),
        "Gemm" => {
            if float_attribute_or(node, "alpha", 1.0) != 1.0 || int_attribute_or(node, "transA", 0) != 0 {
                return Err("Gemm with alpha != 1 or transA".to_owned());
            }
            let (k, n, values) = if int_attribute_or(node, "transB", 0) != 0 {
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
                    let beta = float_attribute_or(node, "beta", 1.0);
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
pub(super) enum Reach {
    /// The main graph and every If/Loop/Scan subgraph.
    Everywhere,
    /// Subgraphs only (static mode, whose QDQ pass covers the main graph).
    SubgraphsOnly,
}

/// Rewrites one MatMul/Gemm with constant weights into the nodes that replace it, adding the
/// initializers they read.
pub(super) type LinearRewrite<'r> =
    dyn FnMut(&NodeProto, &LinearWeights, &mut NameGenerator, &mut Vec<TensorProto>) -> Vec<NodeProto> + 'r;

/// Applies `rewrite` to every MatMul/Gemm with constant weights that the selection rules allow
/// and `reach` covers (see [`rewrite_within`]). Returns the names of the FP32 weights some
/// rewritten node no longer reads.
pub(super) fn rewrite_linear_nodes(
    graph: &mut GraphProto,
    reach: Reach,
    selection: &Selection,
    names: &mut NameGenerator,
    report: &mut Int8Report,
    rewrite: &mut LinearRewrite,
) -> HashSet<String> {
    let top = Scope { layers: Vec::new() };
    rewrite_within(graph, &top, (reach, selection), names, report, rewrite)
}

/// Applies `rewrite` to every MatMul/Gemm with constant weights that the selection rules allow,
/// in `graph` and, recursively, in the subgraphs of its If/Loop/Scan nodes. Inside a subgraph
/// the first/last-layer rule does not apply (a branch body is not an end of the model); the
/// op and node-name rules do. Weights may live in the subgraph or in a graph around it.
/// Returns the names of the FP32 weights some rewritten node no longer reads.
fn rewrite_within(
    graph: &mut GraphProto,
    outer: &Scope,
    (reach, selection): (Reach, &Selection),
    names: &mut NameGenerator,
    report: &mut Int8Report,
    rewrite: &mut LinearRewrite,
) -> HashSet<String> {
    constants_to_initializers(graph);
    let in_subgraph = !outer.layers.is_empty();
    let mut replaced: HashSet<String> = HashSet::new();
    if reach == Reach::Everywhere || in_subgraph {
        let (first, last) = match (in_subgraph, selection.ends_only) {
            (true, _) => Default::default(),
            (false, true) => model_ends(graph),
            (false, false) => first_and_last_compute(graph),
        };
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
                let inner = rewrite_within(subgraph, &scope, (reach, selection), names, report, rewrite);
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

/// Drops the FP32 weights the rewritten nodes no longer read and declares the com.microsoft
/// opset their replacements need.
pub(super) fn finish_contrib_rewrite(model: &mut ModelProto, replaced_weights: &HashSet<String>, rewrote_any: bool) {
    if let Some(graph) = model.graph.as_mut() {
        drop_unread_initializers(graph, replaced_weights);
    }
    if rewrote_any {
        ensure_opset(model, "com.microsoft", 1);
    }
}
