//! Dynamic INT8: MatMul/Gemm with constant weights become com.microsoft.DynamicQuantizeMatMul
//! (int8 weights per output column; activations quantized by the node on every run), a bias
//! Add that follows is moved into the node, and embedding tables are quantized (unless turned off).
//! Where several of them read one activation (the query, key and value projections of an
//! attention block), the main graph quantizes it once instead: one DynamicQuantizeLinear feeds
//! a com.microsoft.MatMulIntegerToFloat per weight (see [`share_activation_quantization`]).
//! Static mode uses the same rewrite for the subgraphs its calibration cannot observe.

use std::collections::{HashMap, HashSet};

use super::checked::checked_pass;
use super::embeddings::quantize_embedding_tables;
use super::linear_walker::{LinearWeights, Reach, finish_contrib_rewrite, rewrite_linear_nodes};
use super::options::{Int8Error, Int8Mode, Int8Options, Int8Report, Selection, WeightSettings};
use crate::graph::GraphIndex;
use crate::onnx::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::quant_params::per_channel_symmetric;
use crate::rewrite::{NameGenerator, fold_bias_adds, simple_node, sole_bias_add};
use crate::tensor::{float_tensor, int8_tensor};

/// Dynamic INT8: rewrites MatMul/Gemm with constant weights as DynamicQuantizeMatMul, in the
/// main graph and in If/Loop/Scan subgraphs.
pub fn quantize_dynamic(model: &mut ModelProto, options: &Int8Options) -> Result<Int8Report, Int8Error> {
    checked_pass(Int8Mode::Dynamic, model, |model| {
        quantize_dynamic_within(model, options, Reach::Everywhere, Int8Report::default())
    })
}

/// Static mode's companion: calibration cannot observe tensors inside If/Loop/Scan subgraphs
/// (ONNX Runtime exposes only main-graph values as outputs), so their MatMul/Gemm nodes are
/// quantized dynamically instead of being left FP32. Adds to `report`.
pub(super) fn quantize_subgraphs_dynamic(
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
    let settings = WeightSettings { per_channel: options.per_channel, reduce_range: options.effective_reduce_range() };
    let quantized_before = report.quantized.len();
    let mut bytes = (0, 0);
    // The int8 weights this pass made, so that only its own nodes are regrouped below (not
    // DynamicQuantizeMatMul nodes the model came with).
    let mut made_weights: HashSet<String> = HashSet::new();
    let mut rewrite =
        |node: &NodeProto, weights: &LinearWeights, names: &mut NameGenerator, initializers: &mut Vec<TensorProto>| {
            let nodes = dynamic_quantize_matmul(node, weights, settings, names, initializers, &mut bytes);
            made_weights.extend(nodes.iter().map(|n| n.input[1].clone()));
            nodes
        };
    let replaced = rewrite_linear_nodes(graph, reach, &selection, &mut names, &mut report, &mut rewrite);
    if options.quantize_embeddings {
        quantize_embedding_tables(graph, &selection, &mut names, &mut report);
    }
    let absorbed = absorb_bias_adds(graph);
    if absorbed > 0 {
        tracing::debug!(absorbed, "int8 dynamic: bias Adds moved into DynamicQuantizeMatMul");
    }
    if default_opset(model) >= DYNAMIC_QUANTIZE_LINEAR_SINCE {
        let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
        let shared = share_activation_quantization(graph, &made_weights, &mut names);
        if shared > 0 {
            tracing::debug!(shared, "int8 dynamic: activations quantized once for several MatMulIntegerToFloat");
        }
    }
    let (bytes_before, bytes_after) = bytes;
    report.weight_bytes_before += bytes_before;
    report.weight_bytes_after += bytes_after;
    let rewrote_any = report.quantized.len() > quantized_before;
    finish_contrib_rewrite(model, &replaced, rewrote_any);
    Ok(report)
}

/// The DynamicQuantizeMatMul replacing `node`, adding its int8 weights, scales and bias to
/// `initializers` and the weight sizes before and after to `bytes`.
fn dynamic_quantize_matmul(
    node: &NodeProto,
    weights: &LinearWeights,
    WeightSettings { per_channel, reduce_range }: WeightSettings,
    names: &mut NameGenerator,
    initializers: &mut Vec<TensorProto>,
    bytes: &mut (usize, usize),
) -> Vec<NodeProto> {
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
    bytes.0 += weights.values.len() * 4;
    bytes.1 += quantized.len() + scales.len() * 4;
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
        if let (Some(&columns), Some((add, bias))) = (columns, sole_bias_add(graph, &index, node))
            && bias.dims == [columns]
        {
            merges.push((position, add, bias.name().to_owned()));
        }
    }
    fold_bias_adds(graph, &merges, |node, bias| {
        node.input.resize(4, String::new());
        node.input.push(bias);
    });
    merges.len()
}

/// DynamicQuantizeLinear joined the default domain at opset 11.
const DYNAMIC_QUANTIZE_LINEAR_SINCE: i64 = 11;

/// The model's default-domain opset (1 when it declares none, as ONNX reads it).
fn default_opset(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain().is_empty() || o.domain() == "ai.onnx").map_or(1, |o| o.version())
}

/// Where two or more DynamicQuantizeMatMul nodes that this pass made (their int8 weights are in
/// `made_weights`) read the same activation, quantizes that activation once: one
/// DynamicQuantizeLinear (uint8, one scale and zero point per run) placed before the first of
/// them, and each becomes a com.microsoft.MatMulIntegerToFloat reading its codes, scale and zero
/// point, with the same int8 weights, per-column scales and bias. Each DynamicQuantizeMatMul
/// scans and quantizes its input on its own, so the query, key and value projections of a
/// transformer layer quantized the same hidden state three times; ONNX Runtime's optimizer runs
/// this form as it is (a lone DynamicQuantizeLinear + MatMulIntegerToFloat it fuses back into
/// DynamicQuantizeMatMul, which is why single readers keep that op). Main graph only: the nodes
/// made inside If/Loop/Scan bodies stay DynamicQuantizeMatMul. Returns how many activations
/// are now shared.
fn share_activation_quantization(
    graph: &mut GraphProto,
    made_weights: &HashSet<String>,
    names: &mut NameGenerator,
) -> usize {
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (position, node) in graph.node.iter().enumerate() {
        if node.op_type() == "DynamicQuantizeMatMul"
            && node.domain() == "com.microsoft"
            && node.input.len() >= 3
            && made_weights.contains(&node.input[1])
            // A zero point of its own (the pass writes none) has no place in the shared form.
            && node.input.get(3).is_none_or(|z| z.is_empty())
        {
            readers.entry(node.input[0].as_str()).or_default().push(position);
        }
    }
    // Position of the first reader -> the DynamicQuantizeLinear to insert before it.
    let mut quantizers: HashMap<usize, NodeProto> = HashMap::new();
    // Reader position -> (codes, scale, zero point) it reads instead of the float activation.
    let mut shared: HashMap<usize, [String; 3]> = HashMap::new();
    for (activation, positions) in readers.into_iter().filter(|(_, p)| p.len() > 1) {
        let base = names.fresh(&format!("{activation}_dynamic_quantize"));
        let codes = names.fresh(&format!("{activation}_uint8"));
        let scale = names.fresh(&format!("{activation}_scale"));
        let zero_point = names.fresh(&format!("{activation}_zero_point"));
        let mut quantizer = simple_node(base, "DynamicQuantizeLinear", vec![activation.to_owned()], codes.clone());
        quantizer.output.extend([scale.clone(), zero_point.clone()]);
        quantizers.insert(positions[0], quantizer);
        for &position in &positions {
            shared.insert(position, [codes.clone(), scale.clone(), zero_point.clone()]);
        }
    }
    let count = quantizers.len();
    let nodes = std::mem::take(&mut graph.node);
    for (position, mut node) in nodes.into_iter().enumerate() {
        if let Some(quantizer) = quantizers.remove(&position) {
            graph.node.push(quantizer);
        }
        if let Some([codes, scale, zero_point]) = shared.remove(&position) {
            // DynamicQuantizeMatMul (A, B, b_scale, b_zero_point, bias) ->
            // MatMulIntegerToFloat (A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias).
            let bias = node.input.get(4).cloned().unwrap_or_default();
            let (weight, weight_scale) = (node.input[1].clone(), node.input[2].clone());
            node.op_type = Some("MatMulIntegerToFloat".to_owned());
            node.input = vec![codes, weight, scale, weight_scale, zero_point, String::new()];
            if !bias.is_empty() {
                node.input.push(bias);
            }
        }
        graph.node.push(node);
    }
    count
}

#[cfg(test)]
#[path = "dynamic_tests.rs"]
mod tests;
