//! Weight-only quantization: MatMul/Gemm with constant weights become com.microsoft.MatMulNBits
//! (4- or 8-bit weights, one scale per block along K, optional zero points); activations stay
//! float, so nothing needs calibrating. Meant for large MatMul-bound models whose weights
//! dominate memory traffic.

use super::checked::checked_pass;
use super::embeddings::quantize_embedding_tables;
use super::linear_walker::{LinearWeights, Reach, finish_contrib_rewrite, rewrite_linear_nodes};
use super::options::{Int8Error, Int8Mode, Int8Options, Int8Report, Selection, validate_options};
use crate::elem;
use crate::onnx::{AttributeProto, ModelProto, NodeProto, TensorProto};
use crate::quant_params::quantize_blocks;
use crate::rewrite::NameGenerator;
use crate::tensor::float_tensor;

/// Weight-only block-wise quantization: MatMul/Gemm with constant weights become
/// com.microsoft.MatMulNBits (4- or 8-bit weights, one scale per block along K); activations
/// stay float. Meant for large MatMul-bound models whose weights dominate memory traffic.
/// Covers If/Loop/Scan subgraphs too.
pub fn quantize_weight_only(model: &mut ModelProto, options: &Int8Options) -> Result<Int8Report, Int8Error> {
    checked_pass(Int8Mode::WeightOnly, model, |model| quantize_weight_only_unchecked(model, options))
}

fn quantize_weight_only_unchecked(model: &mut ModelProto, options: &Int8Options) -> Result<Int8Report, Int8Error> {
    validate_options(options)?;
    let selection = Selection::new(options)?;
    let graph = model.graph.as_mut().ok_or(Int8Error::NoGraph)?;
    let mut names = NameGenerator::for_graph(graph);
    let mut report = Int8Report::default();
    let format =
        BlockFormat { bits: options.weight_bits, block_size: options.block_size, symmetric: options.weight_symmetric };
    let mut bytes = (0, 0);
    let mut rewrite =
        |node: &NodeProto, weights: &LinearWeights, names: &mut NameGenerator, initializers: &mut Vec<TensorProto>| {
            matmul_nbits(node, weights, format, names, initializers, &mut bytes)
        };
    let replaced = rewrite_linear_nodes(graph, Reach::Everywhere, &selection, &mut names, &mut report, &mut rewrite);
    if options.quantize_embeddings {
        quantize_embedding_tables(graph, &selection, &mut names, &mut report);
    }
    let (bytes_before, bytes_after) = bytes;
    report.weight_bytes_before += bytes_before;
    report.weight_bytes_after += bytes_after;
    let rewrote_any = !report.quantized.is_empty();
    finish_contrib_rewrite(model, &replaced, rewrote_any);
    Ok(report)
}

/// How weights are stored: bits per weight, weights per block along K, and whether blocks are
/// symmetric (zero point fixed at the middle) or span their own min/max.
#[derive(Debug, Clone, Copy)]
struct BlockFormat {
    bits: u8,
    block_size: usize,
    symmetric: bool,
}

/// The MatMulNBits node replacing `node` (and an Add for a Gemm's bias), adding its packed
/// weights, scales and zero points to `initializers` and the weight sizes before and after to
/// `bytes`.
fn matmul_nbits(
    node: &NodeProto,
    weights: &LinearWeights,
    format: BlockFormat,
    names: &mut NameGenerator,
    initializers: &mut Vec<TensorProto>,
    bytes: &mut (usize, usize),
) -> Vec<NodeProto> {
    let BlockFormat { bits, block_size, symmetric } = format;
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
    bytes.0 += weights.values.len() * 4;
    bytes.1 += quantized.packed.len() + quantized.scales.len() * 4;
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
}
