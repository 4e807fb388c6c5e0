//! Static INT8 in QDQ form: QuantizeLinear/DequantizeLinear pairs placed so that ONNX Runtime
//! fuses them onto its integer kernels (QLinearConv, QLinearMatMul, QGemm, ...).
//!
//! The pass is pure: calibrated activation ranges in, model out. Callers first ask
//! [`tensors_to_calibrate`] which tensors need ranges, run the FP32 model to collect them
//! (see `calibration`), then call [`quantize_static`].
//!
//! Placement: every float activation read or written by a quantized node gets one Q/DQ pair
//! and all of its readers read the dequantized value, so each quantized node sits between
//! DequantizeLinear inputs and a QuantizeLinear output, the pattern ONNX Runtime fuses.
//! Weights become int8 per output channel behind a DequantizeLinear; biases become int32 with
//! scale input_scale x weight_scale. Ops that only move data (MaxPool, Reshape, Transpose, ...)
//! share their input's scale instead of calibrating their own, so the fusion drops their pairs.
//! MatMul/Gemm nodes inside If/Loop/Scan subgraphs, whose tensors calibration cannot observe,
//! are quantized dynamically.

use std::collections::{HashMap, HashSet};

use crate::calibration::{
    clip_for_consumers, int8_symmetric, per_channel_symmetric, quantize_bias_int32, uint8_asymmetric,
};
use crate::elem;
use crate::graph::{GraphIndex, NameGenerator};
use crate::int8::{
    ActivationType, Int8Error, Int8Options, Int8Report, Selection, SkipReason, first_and_last_compute, float_tensor,
    int8_tensor,
};
use crate::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::tensor::f32_values;
use crate::types::{ElemTypes, attribute, infer_elem_types};

/// Ops with integer kernels whose weights and activations are quantized.
const COMPUTE_OPS: &[&str] = &["Conv", "MatMul", "Gemm"];
/// Ops that move or select values without computing new ones: they share their input's
/// quantization parameters.
const SHARING_OPS: &[&str] =
    &["MaxPool", "GlobalMaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"];
/// Ops quantized with their own calibrated output range. Concat (QLinearConcat) only while
/// its inputs' ranges are alike; see [`mixed_range_exclusions`].
const RANGED_OPS: &[&str] = &["Relu", "Clip", "GlobalAveragePool", "AveragePool", "Concat"];

/// Calibrated [lo, hi] range per tensor name.
pub type Ranges = HashMap<String, (f32, f32)>;

struct Plan {
    /// Nodes to quantize (positions in topological order).
    nodes: Vec<usize>,
    /// Activation tensors that get a Q/DQ pair.
    tensors: Vec<String>,
    /// Tensor -> the tensor whose parameters it shares.
    shares: HashMap<String, String>,
    skipped: Vec<(String, String, SkipReason)>,
    /// Constant bias vectors of quantized bias Adds, quantized like activations so that ONNX
    /// Runtime fuses the Add (QLinearAdd).
    constants: Vec<String>,
}

fn is_quantizable_op(op: &str) -> bool {
    COMPUTE_OPS.contains(&op) || SHARING_OPS.contains(&op) || RANGED_OPS.contains(&op)
}

/// Weight input positions of a compute node (quantized per channel, not as activations).
fn weight_inputs(node: &NodeProto) -> &'static [usize] {
    match node.op_type() {
        "Conv" | "Gemm" => &[1, 2],
        "MatMul" => &[1],
        _ => &[],
    }
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
    let (first, last) = first_and_last_compute(graph);
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let is_float = |name: &str| !name.is_empty() && types.get(name) == Some(&elem::FLOAT);
    let index = GraphIndex::build(graph);
    let ranks = crate::ranks::infer_ranks(graph);
    let bias_adds = bias_adds_of_2d_matmuls(graph, &index, &ranks);
    let mut nodes = Vec::new();
    let mut skipped = Vec::new();
    for (position, node) in graph.node.iter().enumerate() {
        let op = node.op_type();
        if !node.domain().is_empty() || !(is_quantizable_op(op) || bias_adds.contains_key(&position)) {
            continue;
        }
        if let Some(reason) =
            excluded.get(&position).cloned().or_else(|| selection.skip_reason(node, &first, &last, position))
        {
            skipped.push((node.name().to_owned(), op.to_owned(), reason));
            continue;
        }
        if COMPUTE_OPS.contains(&op)
            && let Err(why) = compute_node_supported(graph, node, &initializers)
        {
            skipped.push((node.name().to_owned(), op.to_owned(), SkipReason::Unsupported(why)));
            continue;
        }
        nodes.push(position);
    }
    // Data-movement and activation ops are worth quantizing only next to quantized work.
    // Ops that share scales (free once fused) stay when they read from or feed a quantized
    // node; ops with their own range (Relu, pooling, Concat) only when they read from one,
    // since after an FP32 producer they would just add a quantize-dequantize round trip.
    // Dropping one can strand another, so this repeats until nothing changes.
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
                COMPUTE_OPS.contains(&op)
                    || (SHARING_OPS.contains(&op) && (reads_quantized(node) || feeds_quantized(node)))
                    || ((RANGED_OPS.contains(&op) || bias_adds.contains_key(&p)) && reads_quantized(node))
            })
            .collect();
        if kept.len() == nodes.len() {
            break;
        }
        nodes = kept;
    }

    let quantized: HashSet<usize> = nodes.iter().copied().collect();
    let constants: Vec<String> = nodes
        .iter()
        .filter_map(|p| bias_adds.get(p))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut tensors = Vec::new();
    let mut seen = HashSet::new();
    let mut shares = HashMap::new();
    // A compute output read only by a quantized Relu gets no pair of its own: with uint8
    // activations the Relu's QuantizeLinear (zero point 0) clamps at zero exactly as the Relu
    // does, so ONNX Runtime drops the Relu and fuses Conv/Gemm straight into its output
    // quantization, without a dequantize-requantize step between them.
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
    let fused_into_relu: HashSet<&str> = if options.activation_type == ActivationType::Uint8 {
        nodes
            .iter()
            .map(|&p| &graph.node[p])
            .filter(|n| COMPUTE_OPS.contains(&n.op_type()) || n.op_type() == "Add")
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
    } else {
        HashSet::new()
    };
    for &position in &nodes {
        let node = &graph.node[position];
        let weights = weight_inputs(node);
        for (slot, input) in node.input.iter().enumerate() {
            if weights.contains(&slot)
                || !is_float(input)
                || initializers.contains(input.as_str())
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
        for output in node.output.iter().take(1).filter(|o| is_float(o) && !fused_into_relu.contains(o.as_str())) {
            // An output needs a Q/DQ pair when a quantized node reads it, or when the producer
            // is a Conv (QLinearConv needs a quantized output to fuse). A MatMul/Gemm whose
            // readers all stay FP32 keeps a float output, which ONNX Runtime still runs on
            // integer kernels (MatMulIntegerToFloat) without rounding the result.
            let read_by_quantized = index.consumers(output).iter().any(|c| quantized.contains(c));
            // A MatMul of unknown rank read by an Add may be 2-D, which ONNX Runtime would fuse
            // into an FP32 Gemm with dequantized weights: quantizing its output prevents that.
            let may_become_gemm = node.op_type() == "MatMul"
                && !ranks.contains_key(&node.input[0])
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
    Ok(Plan { nodes, tensors, shares, skipped, constants })
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
fn bias_adds_of_2d_matmuls(
    graph: &GraphProto,
    index: &GraphIndex,
    ranks: &crate::ranks::Ranks,
) -> HashMap<usize, String> {
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
        if let (Some(weight), Some((add, bias))) = (weight, crate::graph::sole_bias_add(graph, index, node))
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

/// Tensors whose ranges static quantization needs, in a stable order.
pub fn tensors_to_calibrate(model: &ModelProto, options: &Int8Options) -> Result<Vec<String>, Int8Error> {
    let graph = model.graph.as_ref().ok_or(Int8Error::NoGraph)?;
    let mut sorted = graph.clone();
    prepare(&mut sorted)?;
    let types = infer_elem_types(&sorted, &ElemTypes::new());
    let plan = plan_with_gemm_folds(&mut sorted, &types, options)?;
    Ok(plan.tensors.into_iter().filter(|t| !plan.shares.contains_key(t)).collect())
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
        let Some((add, bias)) = crate::graph::sole_bias_add(graph, &index, node) else { continue };
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
    crate::graph::fold_bias_adds(graph, &merges, |node, bias| {
        node.op_type = Some("Gemm".to_owned());
        node.input.push(bias);
    });
    plan(graph, types, options, &HashMap::new())
}

/// The FP32 rewrites both planning and quantizing start from, so both see the same graph:
/// Constant weights become initializers and nodes are sorted topologically.
fn prepare(graph: &mut GraphProto) -> Result<(), Int8Error> {
    crate::graph::constants_to_initializers(graph);
    crate::graph::sort_topologically(graph)?;
    Ok(())
}

struct QuantParams {
    scale: f32,
    /// The zero point's byte and its element type (UINT8 or INT8).
    zero_point: u8,
    zero_point_type: i32,
}

impl QuantParams {
    /// Activation parameters for the range [lo, hi]: uint8 asymmetric or int8 symmetric.
    fn for_range(activation_type: ActivationType, lo: f32, hi: f32) -> Self {
        match activation_type {
            ActivationType::Uint8 => {
                let (scale, zero_point) = uint8_asymmetric(lo, hi, false);
                QuantParams { scale, zero_point, zero_point_type: elem::UINT8 }
            }
            ActivationType::Int8 => {
                let (scale, zero_point) = int8_symmetric(lo, hi, false);
                QuantParams { scale, zero_point: zero_point as u8, zero_point_type: elem::INT8 }
            }
        }
    }

    /// One value's code, as the byte QuantizeLinear would store.
    fn code(&self, value: f32) -> u8 {
        let (low, high) = if self.zero_point_type == elem::UINT8 { (0.0, 255.0) } else { (-127.0, 127.0) };
        let zero_point = if self.zero_point_type == elem::UINT8 {
            f32::from(self.zero_point)
        } else {
            f32::from(self.zero_point as i8)
        };
        let code = ((value / self.scale).round_ties_even() + zero_point).clamp(low, high);
        if self.zero_point_type == elem::UINT8 { code as u8 } else { code as i8 as u8 }
    }

    /// The scale and zero-point initializers, named `scale_name` and `zero_name`.
    fn initializers(&self, scale_name: &str, zero_name: &str) -> [TensorProto; 2] {
        [
            float_tensor(scale_name, vec![], &[self.scale]),
            TensorProto {
                name: Some(zero_name.to_owned()),
                data_type: Some(self.zero_point_type),
                raw_data: Some(vec![self.zero_point]),
                ..Default::default()
            },
        ]
    }
}

/// Static INT8 with the given calibrated ranges (keys: tensor names from
/// [`tensors_to_calibrate`]).
pub fn quantize_static(
    model: &mut ModelProto,
    options: &Int8Options,
    ranges: &Ranges,
) -> Result<Int8Report, Int8Error> {
    if options.effective_reduce_range() {
        tracing::info!(
            "7-bit weights (reduce_range): this CPU has no VNNI, whose absence makes 8-bit u8 x s8 products saturate"
        );
    }
    if options.activation_type == ActivationType::Int8 {
        tracing::warn!(
            "int8 (S8S8) activations: ONNX Runtime on x86 fuses fewer ops around them (bias Adds, Relus stay outside the integer kernels) than with uint8 (U8S8), which runs faster"
        );
    }
    let opset = model.opset_import.iter().find(|o| o.domain().is_empty()).and_then(|o| o.version).unwrap_or(1);
    let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
    prepare(graph)?;
    let types = infer_elem_types(graph, &ElemTypes::new());
    let first_plan = plan_with_gemm_folds(graph, &types, options)?;
    let excluded = mixed_range_exclusions(graph, &first_plan, ranges, options.max_concat_range_ratio);
    let plan = if excluded.is_empty() { first_plan } else { plan(graph, &types, options, &excluded)? };
    let missing = plan.tensors.iter().filter(|t| !plan.shares.contains_key(*t) && !ranges.contains_key(*t)).count();
    if missing > 0 {
        return Err(Int8Error::MissingRanges(missing));
    }
    // Per-axis DequantizeLinear needs opset 13; older models get per-tensor weights.
    let per_channel = options.per_channel && opset >= 13;
    if options.per_channel && !per_channel {
        tracing::warn!(opset, "model opset < 13: per-channel weights need opset 13, using per-tensor weights");
    }
    let index = GraphIndex::build(graph);
    let mut names = NameGenerator::for_graph(graph);
    let mut report = Int8Report { skipped: plan.skipped.clone(), ..Default::default() };

    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    // Activation parameters, following shared tensors back to their source.
    let mut params: HashMap<String, QuantParams> = HashMap::new();
    for tensor in &plan.tensors {
        let (mut lo, mut hi) = ranges.get(range_source(&plan, tensor)).copied().unwrap_or((0.0, 0.0));
        if options.calibration.clip_saturating_inputs && !plan.shares.contains_key(tensor) {
            let mut consumers: Vec<&str> = index.consumers(tensor).iter().map(|&c| graph.node[c].op_type()).collect();
            // A graph output is read by the caller too: never clip it.
            if graph_outputs.contains(tensor) {
                consumers.push("GraphOutput");
            }
            (lo, hi) = clip_for_consumers((lo, hi), &consumers);
        }
        params.insert(tensor.clone(), QuantParams::for_range(options.activation_type, lo, hi));
    }

    let mut new_initializers: Vec<TensorProto> = Vec::new();
    let mut dequantized: HashMap<String, String> = HashMap::new();
    let mut pending_pairs: HashMap<String, Vec<NodeProto>> = HashMap::new();
    for tensor in &plan.tensors {
        let p = &params[tensor];
        let scale_name = names.fresh(&format!("{tensor}_scale"));
        let zero_name = names.fresh(&format!("{tensor}_zero_point"));
        new_initializers.extend(p.initializers(&scale_name, &zero_name));
        let quantized_name = names.fresh(&format!("{tensor}_quantized"));
        let dequantized_name = names.fresh(&format!("{tensor}_dequantized"));
        let pair = vec![
            simple_node(
                names.fresh(&format!("{tensor}_QuantizeLinear")),
                "QuantizeLinear",
                vec![tensor.clone(), scale_name.clone(), zero_name.clone()],
                quantized_name.clone(),
            ),
            simple_node(
                names.fresh(&format!("{tensor}_DequantizeLinear")),
                "DequantizeLinear",
                vec![quantized_name, scale_name, zero_name],
                dequantized_name.clone(),
            ),
        ];
        pending_pairs.insert(tensor.clone(), pair);
        dequantized.insert(tensor.clone(), dequantized_name);
        report.activations_quantized += 1;
    }

    // Constant biases of quantized bias Adds: stored quantized, like an activation.
    let mut rebuilt = Vec::with_capacity(graph.node.len() + plan.tensors.len() * 2);
    let mut constant_dequantized: HashMap<String, String> = HashMap::new();
    for constant in &plan.constants {
        let Some(tensor) = graph.initializer.iter().find(|t| t.name() == constant) else { continue };
        let Some(values) = f32_values(tensor) else { continue };
        let (lo, hi) = values.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let p = QuantParams::for_range(options.activation_type, lo, hi);
        let (q_name, s_name, z_name, dq_name) = (
            names.fresh(&format!("{constant}_quantized")),
            names.fresh(&format!("{constant}_scale")),
            names.fresh(&format!("{constant}_zero_point")),
            names.fresh(&format!("{constant}_dequantized")),
        );
        new_initializers.push(TensorProto {
            name: Some(q_name.clone()),
            dims: tensor.dims.clone(),
            data_type: Some(p.zero_point_type),
            raw_data: Some(values.iter().map(|&v| p.code(v)).collect()),
            ..Default::default()
        });
        new_initializers.extend(p.initializers(&s_name, &z_name));
        rebuilt.push(simple_node(
            names.fresh(&format!("{constant}_DequantizeLinear")),
            "DequantizeLinear",
            vec![q_name, s_name, z_name],
            dq_name.clone(),
        ));
        constant_dequantized.insert(constant.clone(), dq_name);
    }

    // Weights and biases of quantized compute nodes.
    let quantized_nodes: HashSet<usize> = plan.nodes.iter().copied().collect();
    let mut weight_nodes: Vec<NodeProto> = Vec::new();
    let originals = std::mem::take(&mut graph.node);
    // Q/DQ pairs of graph inputs go first.
    for input in graph.input.iter().map(|i| i.name().to_owned()).collect::<Vec<_>>() {
        if let Some(pair) = pending_pairs.remove(&input) {
            rebuilt.extend(pair);
        }
    }
    for (position, mut node) in originals.into_iter().enumerate() {
        if quantized_nodes.contains(&position) && COMPUTE_OPS.contains(&node.op_type()) {
            let input_scale = node.input.first().and_then(|i| params.get(i)).map(|p| p.scale);
            quantize_weights(
                graph,
                &mut node,
                input_scale,
                WeightSettings { per_channel, reduce_range: options.effective_reduce_range() },
                &mut names,
                &mut new_initializers,
                &mut weight_nodes,
                &mut report,
            );
            report.quantized.push((node.name().to_owned(), node.op_type().to_owned()));
        }
        // Every reader of a quantized tensor reads its dequantized value, so the producer's
        // only consumer is the QuantizeLinear (the shape ONNX Runtime fuses).
        let quantized_add = quantized_nodes.contains(&position) && node.op_type() == "Add";
        for input in node.input.iter_mut() {
            if let Some(replacement) = dequantized.get(input.as_str()) {
                *input = replacement.clone();
            } else if let Some(replacement) = constant_dequantized.get(input.as_str()).filter(|_| quantized_add) {
                *input = replacement.clone();
            }
        }
        rebuilt.append(&mut weight_nodes);
        let outputs = node.output.clone();
        rebuilt.push(node);
        for output in outputs {
            if let Some(pair) = pending_pairs.remove(&output) {
                rebuilt.extend(pair);
            }
        }
    }
    graph.node = rebuilt;
    graph.initializer.extend(new_initializers);
    let index = GraphIndex::build(graph);
    graph
        .initializer
        .retain(|t| !index.consumers(t.name()).is_empty() || graph.output.iter().any(|o| o.name() == t.name()));
    crate::int8::quantize_subgraphs_dynamic(model, options, report)
}

/// The tensor whose calibrated range `tensor` uses (itself, or the source it shares with).
fn range_source<'p>(plan: &'p Plan, tensor: &'p str) -> &'p str {
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

fn simple_node(name: String, op: &str, inputs: Vec<String>, output: String) -> NodeProto {
    NodeProto {
        name: Some(name),
        op_type: Some(op.to_owned()),
        input: inputs,
        output: vec![output],
        ..Default::default()
    }
}

fn axis_attribute(axis: i64) -> AttributeProto {
    AttributeProto { name: Some("axis".to_owned()), r#type: Some(2), i: Some(axis), ..Default::default() }
}

/// How weights are quantized.
#[derive(Debug, Clone, Copy)]
struct WeightSettings {
    per_channel: bool,
    reduce_range: bool,
}

#[allow(clippy::too_many_arguments)]
fn quantize_weights(
    graph: &GraphProto,
    node: &mut NodeProto,
    input_scale: Option<f32>,
    WeightSettings { per_channel, reduce_range }: WeightSettings,
    names: &mut NameGenerator,
    initializers: &mut Vec<TensorProto>,
    nodes: &mut Vec<NodeProto>,
    report: &mut Int8Report,
) {
    let Some(weight_name) = node.input.get(1).cloned() else { return };
    let Some(weight) = graph.initializer.iter().find(|t| t.name() == weight_name) else { return };
    let Some(values) = f32_values(weight) else { return };
    let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
    // The output-channel axis: Conv [M, C, ...] and Gemm with transB [N, K]: 0; MatMul/Gemm [K, N]: 1.
    let trans_b = attribute(node, "transB").and_then(|a| a.i).unwrap_or(0) != 0;
    let axis = match node.op_type() {
        "Conv" => 0,
        "Gemm" if trans_b => 0,
        _ => dims.len().saturating_sub(1),
    };
    if dims.is_empty() || (node.op_type() == "MatMul" && dims.len() != 2) {
        return;
    }
    let (scales, quantized) = if per_channel {
        per_channel_symmetric(&values, &dims, axis, reduce_range)
    } else {
        per_channel_symmetric(&values, &[1, values.len()], 0, reduce_range)
    };
    report.weight_bytes_before += values.len() * 4;
    report.weight_bytes_after += quantized.len() + scales.len() * 4;
    let base = if node.name().is_empty() { node.output[0].clone() } else { node.name().to_owned() };
    let q_name = names.fresh(&format!("{weight_name}_int8"));
    let s_name = names.fresh(&format!("{weight_name}_scale"));
    let z_name = names.fresh(&format!("{weight_name}_zero_point"));
    let dq_name = names.fresh(&format!("{weight_name}_dequantized"));
    initializers.push(int8_tensor(&q_name, weight.dims.clone(), &quantized));
    let scale_dims = if scales.len() == 1 { vec![] } else { vec![scales.len() as i64] };
    initializers.push(float_tensor(&s_name, scale_dims.clone(), &scales));
    initializers.push(int8_tensor(&z_name, scale_dims.clone(), &vec![0; scales.len()]));
    let mut dq = simple_node(
        names.fresh(&format!("{base}_weight_DequantizeLinear")),
        "DequantizeLinear",
        vec![q_name, s_name, z_name],
        dq_name.clone(),
    );
    if scales.len() > 1 {
        dq.attribute.push(axis_attribute(axis as i64));
    }
    nodes.push(dq);
    node.input[1] = dq_name;

    // Bias: int32 with scale input_scale x weight_scale, so the integer kernel adds it directly.
    let Some(bias_name) = node.input.get(2).filter(|n| !n.is_empty()).cloned() else { return };
    let Some(input_scale) = input_scale else { return };
    let Some(bias) = graph.initializer.iter().find(|t| t.name() == bias_name).and_then(f32_values) else { return };
    let channel_scales: Vec<f32> = if scales.len() == 1 { vec![scales[0]; bias.len()] } else { scales.clone() };
    if channel_scales.len() != bias.len() {
        return;
    }
    let quantized_bias = quantize_bias_int32(&bias, input_scale, &channel_scales);
    // One bias scale per output channel with per-channel weights; with per-tensor weights a
    // single scale, so the DequantizeLinear needs no `axis` (which opsets below 13 lack).
    let bias_scales: Vec<f32> = if scales.len() == 1 {
        vec![scales[0] * input_scale]
    } else {
        channel_scales.iter().map(|s| s * input_scale).collect()
    };
    let scale_dims = if bias_scales.len() == 1 { vec![] } else { vec![bias_scales.len() as i64] };
    let qb = names.fresh(&format!("{bias_name}_int32"));
    let sb = names.fresh(&format!("{bias_name}_scale"));
    let zb = names.fresh(&format!("{bias_name}_zero_point"));
    let db = names.fresh(&format!("{bias_name}_dequantized"));
    initializers.push(TensorProto {
        name: Some(qb.clone()),
        dims: vec![bias.len() as i64],
        data_type: Some(elem::INT32),
        raw_data: Some(quantized_bias.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    });
    initializers.push(float_tensor(&sb, scale_dims.clone(), &bias_scales));
    initializers.push(TensorProto {
        name: Some(zb.clone()),
        dims: scale_dims,
        data_type: Some(elem::INT32),
        raw_data: Some(vec![0; bias_scales.len() * 4]),
        ..Default::default()
    });
    let mut dq = simple_node(
        names.fresh(&format!("{base}_bias_DequantizeLinear")),
        "DequantizeLinear",
        vec![qb, sb, zb],
        db.clone(),
    );
    if bias_scales.len() > 1 {
        dq.attribute.push(axis_attribute(0));
    }
    nodes.push(dq);
    node.input[2] = db;
}
