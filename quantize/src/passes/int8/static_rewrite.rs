//! Static INT8 in QDQ form: QuantizeLinear/DequantizeLinear pairs placed so that ONNX Runtime
//! fuses them onto its integer kernels (QLinearConv, QLinearMatMul, QGemm, ...).
//!
//! The pass is pure: calibrated activation ranges in, model out. Callers first ask
//! [`tensors_to_calibrate`](super::tensors_to_calibrate) which tensors need ranges, run the
//! FP32 model to collect them (see [`crate::calibration`]), then call [`quantize_static`].
//! Planning is `static_plan`; this file turns a plan into Q/DQ nodes and quantized weights.
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

use super::checked::checked_pass;
use super::dynamic::quantize_subgraphs_dynamic;
use super::options::{ActivationType, Int8Error, Int8Mode, Int8Options, Int8Report, WeightSettings};
use super::static_plan::{Plan, QDQ_COMPUTE_OPS, Ranges, plan_for_ranges, range_source};
use crate::calibration::clip_for_consumers;
use crate::elem;
use crate::graph::GraphIndex;
use crate::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::quant_params::{QuantParams, per_channel_symmetric, quantize_bias_int32};
use crate::rewrite::{NameGenerator, ensure_opset, simple_node};
use crate::tensor::{f32_values, float_tensor, int8_tensor};
use crate::types::attribute;

/// Static INT8 with the given calibrated ranges (keys: tensor names from
/// [`tensors_to_calibrate`](super::tensors_to_calibrate)).
pub fn quantize_static(
    model: &mut ModelProto,
    options: &Int8Options,
    ranges: &Ranges,
) -> Result<Int8Report, Int8Error> {
    checked_pass(Int8Mode::Static, model, |model| quantize_static_unchecked(model, options, ranges))
}

fn quantize_static_unchecked(
    model: &mut ModelProto,
    options: &Int8Options,
    ranges: &Ranges,
) -> Result<Int8Report, Int8Error> {
    log_settings(options);
    let opset = model.opset_import.iter().find(|o| o.domain().is_empty()).and_then(|o| o.version).unwrap_or(1);
    let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
    let plan = plan_for_ranges(graph, options, ranges)?;
    let settings = WeightSettings { per_channel: options.per_channel, reduce_range: options.effective_reduce_range() };
    let per_axis_domain = per_axis_domain(options, opset);
    let index = GraphIndex::build(graph);
    let mut added = Additions {
        names: NameGenerator::for_graph(graph),
        initializers: Vec::new(),
        report: Int8Report { skipped: plan.skipped.clone(), ..Default::default() },
        per_axis_domain,
    };
    let params = activation_params(graph, &index, &plan, ranges, options);
    let (dequantized, pending_pairs) = qdq_pairs(&plan, &params, &mut added);
    let mut rebuilt = Vec::with_capacity(graph.node.len() + plan.tensors.len() * 2);
    let constant_dequantized =
        dequantized_bias_constants(graph, &plan, options.activation_type, &mut added, &mut rebuilt);
    let wiring = Wiring { dequantized, pending_pairs, constant_dequantized };
    rebuild_nodes(graph, &plan, &params, wiring, settings, &mut added, &mut rebuilt);
    graph.node = rebuilt;
    graph.initializer.extend(added.initializers);
    let index = GraphIndex::build(graph);
    graph
        .initializer
        .retain(|t| !index.consumers(t.name()).is_empty() || graph.output.iter().any(|o| o.name() == t.name()));
    if !per_axis_domain.is_empty() {
        ensure_opset(model, per_axis_domain, 1);
    }
    quantize_subgraphs_dynamic(model, options, added.report)
}

/// What the rewrite adds as it goes: fresh names, new initializers and the report.
struct Additions {
    names: NameGenerator,
    initializers: Vec<TensorProto>,
    report: Int8Report,
    /// The domain of per-axis DequantizeLinear nodes (see [`per_axis_domain`]).
    per_axis_domain: &'static str,
}

/// How planned tensors are wired into the graph.
struct Wiring {
    /// Tensor -> its dequantized value, which every reader of the tensor reads instead.
    dequantized: HashMap<String, String>,
    /// Tensor -> its QuantizeLinear/DequantizeLinear pair, placed right after the producer.
    pending_pairs: HashMap<String, Vec<NodeProto>>,
    /// Bias constant -> its dequantized value, read by the quantized bias Add.
    constant_dequantized: HashMap<String, String>,
}

/// Logs the settings whose cost the user should know: 7-bit weights on CPUs without VNNI, and
/// int8 (S8S8) activations, which ONNX Runtime fuses less than uint8.
fn log_settings(options: &Int8Options) {
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
}

/// The domain of per-axis DequantizeLinear nodes: ONNX's from opset 13, which added `axis`;
/// below it com.microsoft's, which has had `axis` all along and which ONNX Runtime fuses the
/// same way. Per-tensor weights instead would cost real models most of their accuracy (a
/// PP-OCR recogniser at opset 12: output cosine 0.53 with per-tensor Conv weights).
fn per_axis_domain(options: &Int8Options, opset: i64) -> &'static str {
    if options.per_channel && opset < 13 {
        tracing::info!(opset, "model opset < 13: per-channel weights dequantized by com.microsoft.DequantizeLinear");
        "com.microsoft"
    } else {
        ""
    }
}

/// Activation parameters for `activation_type` and the range `[lo, hi]`.
fn params_for(activation_type: ActivationType, lo: f32, hi: f32) -> QuantParams {
    match activation_type {
        ActivationType::Uint8 => QuantParams::uint8(lo, hi),
        ActivationType::Int8 => QuantParams::int8(lo, hi),
    }
}

/// Activation parameters of every planned tensor, following shared tensors back to their
/// source and clipping inputs of Sigmoid/Tanh when the options ask.
fn activation_params(
    graph: &GraphProto,
    index: &GraphIndex,
    plan: &Plan,
    ranges: &Ranges,
    options: &Int8Options,
) -> HashMap<String, QuantParams> {
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    let mut params: HashMap<String, QuantParams> = HashMap::new();
    for tensor in &plan.tensors {
        let (mut lo, mut hi) = ranges.get(range_source(plan, tensor)).copied().unwrap_or((0.0, 0.0));
        if options.calibration.clip_saturating_inputs && !plan.shares.contains_key(tensor) {
            let mut consumers: Vec<&str> = index.consumers(tensor).iter().map(|&c| graph.node[c].op_type()).collect();
            // A graph output is read by the caller too: never clip it.
            if graph_outputs.contains(tensor) {
                consumers.push("GraphOutput");
            }
            (lo, hi) = clip_for_consumers((lo, hi), &consumers);
        }
        params.insert(tensor.clone(), params_for(options.activation_type, lo, hi));
    }
    params
}

/// A QuantizeLinear/DequantizeLinear pair (and its scale and zero-point initializers) for each
/// planned tensor. Returns tensor -> dequantized value, and tensor -> its pair.
fn qdq_pairs(
    plan: &Plan,
    params: &HashMap<String, QuantParams>,
    added: &mut Additions,
) -> (HashMap<String, String>, HashMap<String, Vec<NodeProto>>) {
    let names = &mut added.names;
    let mut dequantized: HashMap<String, String> = HashMap::new();
    let mut pending_pairs: HashMap<String, Vec<NodeProto>> = HashMap::new();
    for tensor in &plan.tensors {
        let p = &params[tensor];
        let scale_name = names.fresh(&format!("{tensor}_scale"));
        let zero_name = names.fresh(&format!("{tensor}_zero_point"));
        added.initializers.extend(p.initializers(&scale_name, &zero_name));
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
        added.report.activations_quantized += 1;
    }
    (dequantized, pending_pairs)
}

/// Constant biases of quantized bias Adds, stored quantized like an activation: an int8/uint8
/// initializer behind a DequantizeLinear (pushed to `rebuilt`). Returns constant -> its
/// dequantized value.
fn dequantized_bias_constants(
    graph: &GraphProto,
    plan: &Plan,
    activation_type: ActivationType,
    added: &mut Additions,
    rebuilt: &mut Vec<NodeProto>,
) -> HashMap<String, String> {
    let names = &mut added.names;
    let mut constant_dequantized: HashMap<String, String> = HashMap::new();
    for constant in &plan.constants {
        let Some(tensor) = graph.initializer.iter().find(|t| t.name() == constant) else { continue };
        let Some(values) = f32_values(tensor) else { continue };
        let (lo, hi) = values.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let p = params_for(activation_type, lo, hi);
        let (q_name, s_name, z_name, dq_name) = (
            names.fresh(&format!("{constant}_quantized")),
            names.fresh(&format!("{constant}_scale")),
            names.fresh(&format!("{constant}_zero_point")),
            names.fresh(&format!("{constant}_dequantized")),
        );
        added.initializers.push(TensorProto {
            name: Some(q_name.clone()),
            dims: tensor.dims.clone(),
            data_type: Some(p.zero_point_type),
            raw_data: Some(values.iter().map(|&v| p.code(v)).collect()),
            ..Default::default()
        });
        added.initializers.extend(p.initializers(&s_name, &z_name));
        rebuilt.push(simple_node(
            names.fresh(&format!("{constant}_DequantizeLinear")),
            "DequantizeLinear",
            vec![q_name, s_name, z_name],
            dq_name.clone(),
        ));
        constant_dequantized.insert(constant.clone(), dq_name);
    }
    constant_dequantized
}

/// The rewritten node list: Q/DQ pairs of graph inputs first, then each node with its weights'
/// DequantizeLinear nodes before it, its inputs reading dequantized values, and the pairs of its
/// outputs after it.
fn rebuild_nodes(
    graph: &mut GraphProto,
    plan: &Plan,
    params: &HashMap<String, QuantParams>,
    mut wiring: Wiring,
    settings: WeightSettings,
    added: &mut Additions,
    rebuilt: &mut Vec<NodeProto>,
) {
    let quantized_nodes: HashSet<usize> = plan.nodes.iter().copied().collect();
    let mut weight_nodes: Vec<NodeProto> = Vec::new();
    let originals = std::mem::take(&mut graph.node);
    // Q/DQ pairs of graph inputs go first.
    for input in graph.input.iter().map(|i| i.name().to_owned()).collect::<Vec<_>>() {
        if let Some(pair) = wiring.pending_pairs.remove(&input) {
            rebuilt.extend(pair);
        }
    }
    for (position, mut node) in originals.into_iter().enumerate() {
        if quantized_nodes.contains(&position) && QDQ_COMPUTE_OPS.contains(&node.op_type()) {
            let input_scale = node.input.first().and_then(|i| params.get(i)).map(|p| p.scale);
            quantize_weights(graph, &mut node, input_scale, settings, added, &mut weight_nodes);
            added.report.quantized.push((node.name().to_owned(), node.op_type().to_owned()));
        }
        // Every reader of a quantized tensor reads its dequantized value, so the producer's
        // only consumer is the QuantizeLinear (the shape ONNX Runtime fuses).
        let quantized_add = quantized_nodes.contains(&position) && node.op_type() == "Add";
        for input in node.input.iter_mut() {
            if let Some(replacement) = wiring.dequantized.get(input.as_str()) {
                *input = replacement.clone();
            } else if let Some(replacement) = wiring.constant_dequantized.get(input.as_str()).filter(|_| quantized_add)
            {
                *input = replacement.clone();
            }
        }
        rebuilt.append(&mut weight_nodes);
        let outputs = node.output.clone();
        rebuilt.push(node);
        for output in outputs {
            if let Some(pair) = wiring.pending_pairs.remove(&output) {
                rebuilt.extend(pair);
            }
        }
    }
}

/// The `axis` attribute of a per-axis DequantizeLinear.
fn axis_attribute(axis: i64) -> AttributeProto {
    AttributeProto { name: Some("axis".to_owned()), r#type: Some(2), i: Some(axis), ..Default::default() }
}

/// Quantizes the weight of a Conv/MatMul/Gemm to int8 (per output channel when `settings`
/// say so) behind a DequantizeLinear, and its bias to int32 when the input's scale is known.
/// The DequantizeLinear nodes go to `nodes`, to be placed before `node`.
fn quantize_weights(
    graph: &GraphProto,
    node: &mut NodeProto,
    input_scale: Option<f32>,
    WeightSettings { per_channel, reduce_range }: WeightSettings,
    added: &mut Additions,
    nodes: &mut Vec<NodeProto>,
) {
    let names = &mut added.names;
    let initializers = &mut added.initializers;
    let report = &mut added.report;
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
        dq.domain = Some(added.per_axis_domain.to_owned());
    }
    nodes.push(dq);
    node.input[1] = dq_name;
    if let Some(input_scale) = input_scale {
        quantize_bias(graph, node, &base, input_scale, &scales, added, nodes);
    }
}

/// Bias: int32 with scale input_scale x weight_scale, so the integer kernel adds it directly.
fn quantize_bias(
    graph: &GraphProto,
    node: &mut NodeProto,
    base: &str,
    input_scale: f32,
    scales: &[f32],
    added: &mut Additions,
    nodes: &mut Vec<NodeProto>,
) {
    let names = &mut added.names;
    let initializers = &mut added.initializers;
    let Some(bias_name) = node.input.get(2).filter(|n| !n.is_empty()).cloned() else { return };
    let Some(bias) = graph.initializer.iter().find(|t| t.name() == bias_name).and_then(f32_values) else { return };
    let channel_scales: Vec<f32> = if scales.len() == 1 { vec![scales[0]; bias.len()] } else { scales.to_vec() };
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
        dq.domain = Some(added.per_axis_domain.to_owned());
    }
    nodes.push(dq);
    node.input[2] = db;
}

#[cfg(test)]
#[path = "static_rewrite_tests.rs"]
mod tests;
