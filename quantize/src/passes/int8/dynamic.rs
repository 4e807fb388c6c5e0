//! Dynamic INT8: MatMul/Gemm with constant weights become com.microsoft.DynamicQuantizeMatMul
//! (int8 weights per output column; activations quantized by the node on every run), a bias
//! Add that follows is moved into the node, and embedding tables are quantized (unless turned off).
//! Static mode uses the same rewrite for the subgraphs its calibration cannot observe.

use super::checked::checked_pass;
use super::embeddings::quantize_embedding_tables;
use super::linear_walker::{LinearWeights, Reach, finish_contrib_rewrite, rewrite_linear_nodes};
use super::options::{Int8Error, Int8Mode, Int8Options, Int8Report, Selection, WeightSettings};
use crate::graph::GraphIndex;
use crate::onnx::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::quant_params::per_channel_symmetric;
use crate::rewrite::{NameGenerator, fold_bias_adds, sole_bias_add};
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
    let mut rewrite =
        |node: &NodeProto, weights: &LinearWeights, names: &mut NameGenerator, initializers: &mut Vec<TensorProto>| {
            dynamic_quantize_matmul(node, weights, settings, names, initializers, &mut bytes)
        };
    let replaced = rewrite_linear_nodes(graph, reach, &selection, &mut names, &mut report, &mut rewrite);
    if options.quantize_embeddings {
        quantize_embedding_tables(graph, &selection, &mut names, &mut report);
    }
    let absorbed = absorb_bias_adds(graph);
    if absorbed > 0 {
        tracing::debug!(absorbed, "int8 dynamic: bias Adds moved into DynamicQuantizeMatMul");
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
