//! Static INT8 planning: which nodes to quantize and which activation tensors get a Q/DQ pair
//! (and which share another tensor's parameters), before anything is rewritten. The plan is
//! made twice over the same canonical graph: once to tell calibration which tensors need
//! ranges ([`tensors_to_calibrate`]) and once with the ranges, which may keep Concats of mixed
//! ranges in FP32.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::options::{ActivationType, Int8Error, Int8Options, Selection, SkipReason};
use crate::elem;
use crate::graph::{GraphIndex, first_and_last_compute};
use crate::onnx::{GraphProto, ModelProto, NodeProto};
use crate::passes::canonicalize::canonicalize;
use crate::ranks::{Ranks, infer_ranks};
use crate::rewrite::{fold_bias_adds, sole_bias_add};
use crate::types::{ElemTypes, attribute, infer_elem_types, is_float};

/// Ops with integer kernels whose weights and activations are quantized.
pub(super) const QDQ_COMPUTE_OPS: &[&str] = &["Conv", "MatMul", "Gemm"];
/// Ops that move or select values without computing new ones: they share their input's
/// quantization parameters.
const SHARING_OPS: &[&str] =
    &["MaxPool", "GlobalMaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"];
/// Ops quantized with their own calibrated output range. Concat (QLinearConcat) only while
/// its inputs' ranges are alike; see [`mixed_range_exclusions`].
const RANGED_OPS: &[&str] = &["Relu", "Clip", "GlobalAveragePool", "AveragePool", "Concat"];

/// Calibrated [lo, hi] range per tensor name.
pub type Ranges = HashMap<String, (f32, f32)>;

/// What static quantization will do to a canonical graph.
pub(super) struct Plan {
    /// Nodes to quantize (positions in topological order).
    pub(super) nodes: Vec<usize>,
    /// Activation tensors that get a Q/DQ pair.
    pub(super) tensors: Vec<String>,
    /// Tensor -> the tensor whose parameters it shares.
    pub(super) shares: HashMap<String, String>,
    pub(super) skipped: Vec<(String, String, SkipReason)>,
    /// Constant bias vectors of quantized bias Adds, quantized like activations so that ONNX
    /// Runtime fuses the Add (QLinearAdd).
    pub(super) constants: Vec<String>,
}

fn is_quantizable_op(op: &str) -> bool {
    QDQ_COMPUTE_OPS.contains(&op) || SHARING_OPS.contains(&op) || RANGED_OPS.contains(&op)
}

/// Weight input positions of a compute node (quantized per channel, not as activations).
fn weight_inputs(node: &NodeProto) -> &'static [usize] {
    match node.op_type() {
        "Conv" | "Gemm" => &[1, 2],
        "MatMul" => &[1],
        _ => &[],
    }
}

/// Tensors whose ranges static quantization needs, in a stable order.
pub fn tensors_to_calibrate(model: &ModelProto, options: &Int8Options) -> Result<Vec<String>, Int8Error> {
    let (_, _, plan) = canonical_plan(model, options)?;
    Ok(own_ranges(&plan))
}

/// A copy of `model`'s graph in canonical form (the one [`plan_for_ranges`] rewrites, so tensor
/// names match), its element types, and the plan for `options` over it.
fn canonical_plan(model: &ModelProto, options: &Int8Options) -> Result<(GraphProto, ElemTypes, Plan), Int8Error> {
    let mut sorted = model.graph.as_ref().ok_or(Int8Error::NoGraph)?.clone();
    canonicalize(&mut sorted)?;
    let types = infer_elem_types(&sorted, &ElemTypes::new());
    let plan = plan_with_gemm_folds(&mut sorted, &types, options)?;
    Ok((sorted, types, plan))
}

/// The planned tensors with a range of their own (not sharing another tensor's), in plan order.
fn own_ranges(plan: &Plan) -> Vec<String> {
    plan.tensors.iter().filter(|t| !plan.shares.contains_key(*t)).cloned().collect()
}

/// Ops whose output is the extreme of their input: a calibrated range that clips the tail
/// clips exactly the values they return (Magika's GlobalMaxPool under entropy calibration:
/// output cosine 0.73).
const MAX_OPS: &[&str] = &["MaxPool", "GlobalMaxPool", "ReduceMax"];

/// Of `tensors` (calibrated range sources), those whose range must be the observed
/// `[min, max]` whatever the calibration method: the input or output of a max-taking op, or
/// a tensor whose parameters such a tensor shares.
pub fn tensors_needing_full_range(model: &ModelProto, options: &Int8Options) -> Result<Vec<String>, Int8Error> {
    let (sorted, _, plan) = canonical_plan(model, options)?;
    let mut wanted = BTreeSet::new();
    for node in sorted.node.iter().filter(|n| n.domain().is_empty() && MAX_OPS.contains(&n.op_type())) {
        for tensor in node.input.first().into_iter().chain(node.output.first()) {
            wanted.insert(range_source(&plan, tensor).to_owned());
        }
    }
    Ok(own_ranges(&plan).into_iter().filter(|t| wanted.contains(t)).collect())
}

/// Tensors whose ranges static quantization needs for `options` and for the same options
/// with any one planned node kept FP32 besides: what an accuracy-budget search calibrates, so
/// that keeping a node (which can unfuse a Conv from its Relu, or end the sharing of a
/// Reshape's parameters) finds its neighbours' ranges already measured.
pub fn tensors_to_calibrate_for_search(model: &ModelProto, options: &Int8Options) -> Result<Vec<String>, Int8Error> {
    let (sorted, types, base) = canonical_plan(model, options)?;
    let mut tensors: BTreeSet<String> = own_ranges(&base).into_iter().collect();
    let mut ordered: Vec<String> = own_ranges(&base);
    for &position in &base.nodes {
        let excluded = HashMap::from([(position, SkipReason::ExcludedNode(sorted.node[position].name().to_owned()))]);
        for tensor in own_ranges(&plan(&sorted, &types, options, &excluded)?) {
            if tensors.insert(tensor.clone()) {
                ordered.push(tensor);
            }
        }
    }
    Ok(ordered)
}

/// Canonicalises `graph` (as [`tensors_to_calibrate`] did, so tensor names match) and plans
/// with the calibrated `ranges`: Concats whose inputs' ranges differ too much, and what reads
/// them, stay FP32. A planned node that would need a range calibration did not take (when
/// `options` exclude nodes the calibrated plan quantized, the plan's fusions change) stays FP32
/// too, with that reason.
pub(super) fn plan_for_ranges(
    graph: &mut GraphProto,
    options: &Int8Options,
    ranges: &Ranges,
) -> Result<Plan, Int8Error> {
    canonicalize(graph)?;
    let types = infer_elem_types(graph, &ElemTypes::new());
    let first_plan = plan_with_gemm_folds(graph, &types, options)?;
    let mut excluded = mixed_range_exclusions(graph, &first_plan, ranges, options.max_concat_range_ratio);
    let mut current = if excluded.is_empty() { first_plan } else { plan(graph, &types, options, &excluded)? };
    // Each round keeps FP32 at least one more node, so this ends; the bound is a guard.
    for _ in 0..graph.node.len() + 1 {
        let missing: HashSet<&str> = current
            .tensors
            .iter()
            .filter(|t| !current.shares.contains_key(*t) && !ranges.contains_key(*t))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(current);
        }
        let before = excluded.len();
        for &position in &current.nodes {
            let node = &graph.node[position];
            if let Some(tensor) = node.input.iter().chain(&node.output).find(|n| missing.contains(n.as_str())) {
                tracing::info!(
                    node = node.name(),
                    tensor = tensor.as_str(),
                    "int8 static: kept FP32: no calibrated range"
                );
                excluded.entry(position).or_insert_with(|| SkipReason::NoCalibratedRange(tensor.clone()));
            }
        }
        if excluded.len() == before {
            return Err(Int8Error::MissingRanges(missing.len()));
        }
        current = plan(graph, &types, options, &excluded)?;
    }
    Err(Int8Error::MissingRanges(current.tensors.len()))
}

/// Plans, then folds into Gemm every planned bias Add whose output no quantized node reads,
/// and plans again. Quantizing such an Add would also round its MatMul's output, which
/// nothing downstream needs in integers; left as MatMul + float Add, ONNX Runtime would fuse
/// the pair into an FP32 Gemm dequantizing its weights every run. As a Gemm with an int32
/// bias it runs as QGemm with a float output instead.
fn plan_with_gemm_folds(graph: &mut GraphProto, types: &ElemTypes, options: &Int8Options) -> Result<Plan, Int8Error> {
    let first = plan(graph, types, options, &HashMap::new())?;
    let index = GraphIndex::build(graph);
    let planned: HashSet<usize> = first.nodes.iter().copied().collect();
    let mut merges: Vec<(usize, usize, String)> = Vec::new();
    for &position in &first.nodes {
        let node = &graph.node[position];
        if node.op_type() != "MatMul" {
            continue;
        }
        let Some((add, bias)) = sole_bias_add(graph, &index, node) else { continue };
        let is_planned_bias_add = planned.contains(&add) && first.constants.iter().any(|c| c == bias.name());
        let output_read_quantized = index.consumers(&graph.node[add].output[0]).iter().any(|c| planned.contains(c));
        if is_planned_bias_add && !output_read_quantized {
            merges.push((position, add, bias.name().to_owned()));
        }
    }
    if merges.is_empty() {
        return Ok(first);
    }
    tracing::debug!(folded = merges.len(), "int8 static: MatMul + bias Add read by FP32 work folded into Gemm");
    fold_bias_adds(graph, &merges, |node, bias| {
        node.op_type = Some("Gemm".to_owned());
        node.input.push(bias);
    });
    plan(graph, types, options, &HashMap::new())
}

/// Which nodes to quantize and which tensors get Q/DQ pairs. `excluded` forces nodes (by
/// position) to stay FP32, with the reason recorded.
fn plan(
    graph: &GraphProto,
    types: &ElemTypes,
    options: &Int8Options,
    excluded: &HashMap<usize, SkipReason>,
) -> Result<Plan, Int8Error> {
    let selection = Selection::new(options)?;
    let planner = Planner::new(graph, types);
    let (candidates, skipped) = planner.candidates(&selection, excluded);
    let nodes = planner.drop_isolated(candidates);
    let quantized: HashSet<usize> = nodes.iter().copied().collect();
    let constants = planner.bias_constants(&nodes);
    let fused_into_relu = if options.activation_type == ActivationType::Uint8 {
        planner.outputs_fused_into_relu(&nodes, &quantized)
    } else {
        HashSet::new()
    };
    let (tensors, shares) = planner.qdq_tensors(&nodes, &quantized, &fused_into_relu);
    Ok(Plan { nodes, tensors, shares, skipped, constants })
}

/// What planning reads of the graph, computed once.
struct Planner<'g> {
    graph: &'g GraphProto,
    types: &'g ElemTypes,
    index: GraphIndex,
    ranks: Ranks,
    initializers: HashSet<&'g str>,
    /// Bias Adds of 2-D MatMuls (position -> bias initializer); see [`bias_adds_of_2d_matmuls`].
    bias_adds: HashMap<usize, String>,
}

impl<'g> Planner<'g> {
    fn new(graph: &'g GraphProto, types: &'g ElemTypes) -> Self {
        let initializers = graph.initializer.iter().map(|t| t.name()).collect();
        let index = GraphIndex::build(graph);
        let ranks = infer_ranks(graph);
        let bias_adds = bias_adds_of_2d_matmuls(graph, &index, &ranks);
        Planner { graph, types, index, ranks, initializers, bias_adds }
    }

    /// Nodes of a quantizable op (or planned bias Adds) that the selection rules and the
    /// weight checks allow, and the skipped ones with their reasons.
    fn candidates(
        &self,
        selection: &Selection,
        excluded: &HashMap<usize, SkipReason>,
    ) -> (Vec<usize>, Vec<(String, String, SkipReason)>) {
        let graph = self.graph;
        let (first, last) = first_and_last_compute(graph);
        let mut nodes = Vec::new();
        let mut skipped = Vec::new();
        for (position, node) in graph.node.iter().enumerate() {
            let op = node.op_type();
            if !node.domain().is_empty() || !(is_quantizable_op(op) || self.bias_adds.contains_key(&position)) {
                continue;
            }
            if let Some(reason) =
                excluded.get(&position).cloned().or_else(|| selection.skip_reason(node, &first, &last, position))
            {
                skipped.push((node.name().to_owned(), op.to_owned(), reason));
                continue;
            }
            if QDQ_COMPUTE_OPS.contains(&op)
                && let Err(why) = compute_node_supported(graph, node, &self.initializers)
            {
                skipped.push((node.name().to_owned(), op.to_owned(), SkipReason::Unsupported(why)));
                continue;
            }
            nodes.push(position);
        }
        (nodes, skipped)
    }

    /// Data-movement and activation ops are worth quantizing only next to quantized work.
    /// Ops that share scales (free once fused) stay when they read from or feed a quantized
    /// node; ops with their own range (Relu, pooling, Concat) only when they read from one,
    /// since after an FP32 producer they would just add a quantize-dequantize round trip.
    /// Dropping one can strand another, so this repeats until nothing changes.
    fn drop_isolated(&self, mut nodes: Vec<usize>) -> Vec<usize> {
        let (graph, index) = (self.graph, &self.index);
        loop {
            let quantized: HashSet<usize> = nodes.iter().copied().collect();
            let reads_quantized =
                |node: &NodeProto| node.input.iter().filter_map(|i| index.producer(i)).any(|p| quantized.contains(&p));
            let feeds_quantized =
                |node: &NodeProto| node.output.iter().flat_map(|o| index.consumers(o)).any(|c| quantized.contains(c));
            let kept: Vec<usize> = nodes
                .iter()
                .copied()
                .filter(|&p| {
                    let node = &graph.node[p];
                    let op = node.op_type();
                    QDQ_COMPUTE_OPS.contains(&op)
                        || (SHARING_OPS.contains(&op) && (reads_quantized(node) || feeds_quantized(node)))
                        || ((RANGED_OPS.contains(&op) || self.bias_adds.contains_key(&p)) && reads_quantized(node))
                })
                .collect();
            if kept.len() == nodes.len() {
                return nodes;
            }
            nodes = kept;
        }
    }

    /// The bias constants of the planned bias Adds, sorted by name.
    fn bias_constants(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().filter_map(|p| self.bias_adds.get(p)).cloned().collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// A compute output read only by a quantized Relu gets no pair of its own: with uint8
    /// activations the Relu's QuantizeLinear (zero point 0) clamps at zero exactly as the Relu
    /// does, so ONNX Runtime drops the Relu and fuses Conv/Gemm straight into its output
    /// quantization, without a dequantize-requantize step between them.
    fn outputs_fused_into_relu(&self, nodes: &[usize], quantized: &HashSet<usize>) -> HashSet<&'g str> {
        let (graph, index) = (self.graph, &self.index);
        let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
        nodes
            .iter()
            .map(|&p| &graph.node[p])
            .filter(|n| QDQ_COMPUTE_OPS.contains(&n.op_type()) || n.op_type() == "Add")
            .filter_map(|n| n.output.first())
            .filter(|o| !graph_outputs.contains(o.as_str()))
            .filter(|o| match index.consumers(o) {
                // The Relu must quantize its own output, i.e. a quantized node reads it.
                &[reader] => {
                    let relu = &graph.node[reader];
                    quantized.contains(&reader)
                        && relu.op_type() == "Relu"
                        && index.consumers(&relu.output[0]).iter().any(|c| quantized.contains(c))
                }
                _ => false,
            })
            .map(String::as_str)
            .collect()
    }

    /// The activation tensors of the planned nodes that get a Q/DQ pair, in first-use order,
    /// and for outputs of scale-sharing ops the tensor whose parameters they share.
    fn qdq_tensors(
        &self,
        nodes: &[usize],
        quantized: &HashSet<usize>,
        fused_into_relu: &HashSet<&str>,
    ) -> (Vec<String>, HashMap<String, String>) {
        let (graph, index) = (self.graph, &self.index);
        let mut tensors = Vec::new();
        let mut seen = HashSet::new();
        let mut shares = HashMap::new();
        for &position in nodes {
            let node = &graph.node[position];
            let weights = weight_inputs(node);
            for (slot, input) in node.input.iter().enumerate() {
                if weights.contains(&slot)
                    || !is_float(self.types, input)
                    || self.initializers.contains(input.as_str())
                    || fused_into_relu.contains(input.as_str())
                {
                    continue;
                }
                // Sharing ops: only the data input.
                if SHARING_OPS.contains(&node.op_type()) && slot > 0 {
                    continue;
                }
                if seen.insert(input.clone()) {
                    tensors.push(input.clone());
                }
            }
            for output in
                node.output.iter().take(1).filter(|o| is_float(self.types, o) && !fused_into_relu.contains(o.as_str()))
            {
                // An output needs a Q/DQ pair when a quantized node reads it, or when the producer
                // is a Conv (QLinearConv needs a quantized output to fuse). A MatMul/Gemm whose
                // readers all stay FP32 keeps a float output, which ONNX Runtime still runs on
                // integer kernels (MatMulIntegerToFloat) without rounding the result.
                let read_by_quantized = index.consumers(output).iter().any(|c| quantized.contains(c));
                // A MatMul of unknown rank read by an Add may be 2-D, which ONNX Runtime would fuse
                // into an FP32 Gemm with dequantized weights: quantizing its output prevents that.
                let may_become_gemm = node.op_type() == "MatMul"
                    && !self.ranks.contains_key(&node.input[0])
                    && index.consumers(output).iter().any(|&c| graph.node[c].op_type() == "Add");
                if !read_by_quantized
                    && !may_become_gemm
                    && node.op_type() != "Conv"
                    && !SHARING_OPS.contains(&node.op_type())
                {
                    continue;
                }
                if seen.insert(output.clone()) {
                    tensors.push(output.clone());
                }
                if SHARING_OPS.contains(&node.op_type())
                    && let Some(input) = node.input.first()
                {
                    shares.insert(output.clone(), input.clone());
                }
            }
        }
        (tensors, shares)
    }
}

/// Add nodes that add a constant bias vector to the output of a MatMul on 2-D activations
/// with a constant [K, N] weight (position -> the bias initializer's name).
///
/// Why they are quantized (QLinearMatMul + QLinearAdd) when a quantized node reads their
/// output: left in float, ONNX Runtime fuses MatMul + Add into an FP32 Gemm before it fuses
/// Q/DQ patterns, and the Gemm dequantizes its weights on every run; folded into a Gemm, the
/// layer runs as QGemm, which measured 5-15% slower than QLinearMatMul + QLinearAdd on ONNX
/// Runtime 1.31 on this x86 CPU (see [`plan_with_gemm_folds`] for Adds read by FP32 work).
/// Higher-rank MatMuls (transformers) are not fused by ONNX Runtime and keep a float output
/// (MatMulIntegerToFloat) and a float Add.
fn bias_adds_of_2d_matmuls(graph: &GraphProto, index: &GraphIndex, ranks: &Ranks) -> HashMap<usize, String> {
    let mut adds = HashMap::new();
    for node in &graph.node {
        if node.op_type() != "MatMul" || !node.domain().is_empty() || node.input.len() != 2 {
            continue;
        }
        let weight = graph
            .initializer
            .iter()
            .find(|t| t.name() == node.input[1] && t.data_type() == elem::FLOAT && t.dims.len() == 2);
        if ranks.get(&node.input[0]) != Some(&2) {
            continue;
        }
        if let (Some(weight), Some((add, bias))) = (weight, sole_bias_add(graph, index, node))
            && (bias.dims == [weight.dims[1]] || bias.dims == [1, weight.dims[1]])
        {
            adds.insert(add, bias.name().to_owned());
        }
    }
    adds
}

fn compute_node_supported(graph: &GraphProto, node: &NodeProto, initializers: &HashSet<&str>) -> Result<(), String> {
    let weight = node.input.get(1).ok_or("no weight input")?;
    let is_initializer = initializers.contains(weight.as_str());
    match node.op_type() {
        "Conv" if !is_initializer => Err(format!("Conv weight '{weight}' is not a constant")),
        "Gemm" => {
            if !is_initializer {
                return Err(format!("Gemm weight '{weight}' is not a constant"));
            }
            let alpha = attribute(node, "alpha").and_then(|a| a.f).unwrap_or(1.0);
            let beta = attribute(node, "beta").and_then(|a| a.f).unwrap_or(1.0);
            let trans_a = attribute(node, "transA").and_then(|a| a.i).unwrap_or(0);
            if alpha != 1.0 || beta != 1.0 || trans_a != 0 {
                return Err("Gemm with alpha/beta != 1 or transA".to_owned());
            }
            let rank = graph.initializer.iter().find(|t| t.name() == weight).map_or(0, |t| t.dims.len());
            if rank != 2 {
                return Err(format!("Gemm weight of rank {rank}"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The tensor whose calibrated range `tensor` uses (itself, or the source it shares with).
pub(super) fn range_source<'p>(plan: &'p Plan, tensor: &'p str) -> &'p str {
    let mut source = tensor;
    while let Some(next) = plan.shares.get(source) {
        source = next;
    }
    source
}

/// Concats of `plan` whose inputs' calibrated ranges differ by more than `limit` (widest over
/// narrowest), and the planned nodes that read their outputs (directly or through ops that
/// share scales): one scale over the joined tensor would leave the narrow parts a few levels,
/// so these stay FP32. Each input keeps the Q/DQ pair its own producer gives it.
fn mixed_range_exclusions(graph: &GraphProto, plan: &Plan, ranges: &Ranges, limit: f32) -> HashMap<usize, SkipReason> {
    let mut mixed: HashMap<String, String> = HashMap::new();
    let mut excluded = HashMap::new();
    for &position in &plan.nodes {
        let node = &graph.node[position];
        if node.op_type() == "Concat" {
            let widths: Vec<(f32, &str)> = node
                .input
                .iter()
                .filter_map(|input| ranges.get(range_source(plan, input)).map(|(lo, hi)| (hi - lo, input.as_str())))
                .filter(|(width, _)| *width > 0.0)
                .collect();
            let widest = widths.iter().copied().fold((0f32, ""), |a, b| if b.0 > a.0 { b } else { a });
            let narrowest = widths.iter().copied().fold((f32::INFINITY, ""), |a, b| if b.0 < a.0 { b } else { a });
            if widths.len() >= 2 && widest.0 > limit * narrowest.0 {
                let why = format!(
                    "Concat inputs '{}' (range width {:.3}) and '{}' (range width {:.3}) differ {:.0}x, over max_concat_range_ratio {limit}",
                    widest.1,
                    widest.0,
                    narrowest.1,
                    narrowest.0,
                    widest.0 / narrowest.0
                );
                tracing::info!(node = node.name(), "int8 static: kept FP32: {why}");
                mixed.insert(node.output[0].clone(), node.name().to_owned());
                excluded.insert(position, SkipReason::MixedRanges(why));
                continue;
            }
        }
        let Some((input, concat)) = node.input.iter().find_map(|i| mixed.get(i).map(|c| (i.clone(), c.clone()))) else {
            continue;
        };
        if SHARING_OPS.contains(&node.op_type()) {
            mixed.insert(node.output[0].clone(), concat.clone());
        }
        let why = format!("reads '{input}', which joins mixed ranges (Concat '{concat}')");
        tracing::info!(node = node.name(), "int8 static: kept FP32: {why}");
        excluded.insert(position, SkipReason::MixedRanges(why));
    }
    excluded
}

#[cfg(test)]
#[path = "static_plan_tests.rs"]
mod tests;
