//! 8. Embeddings, attention probabilities, normalization subgraphs.

use mantissa_quantize::elem::{FLOAT, FLOAT16, INT64};
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{Graph, float_tensor, no_first_last, node};
use crate::run::convert;

fn embedding() -> Graph {
    Graph::new("embedding")
        .input("ids", INT64)
        .output("y", FLOAT)
        .initializer(float_tensor("table", &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
        .node(node("gather", "Gather", &["table", "ids"], &["e"]))
        .node(node("relu", "Relu", &["e"], &["y"]))
}

#[test]
fn gather_on_a_float_initializer_is_kept_as_an_embedding() {
    let converted = convert(embedding(), &Fp16Options::default());

    converted.assert_kept("gather", KeepReason::Embedding);
    assert_eq!(converted.initializer("table").data_type(), FLOAT);
    assert_eq!(converted.node("gather").input[1], "ids");
    converted.assert_converted("relu");
}

#[test]
fn gather_on_a_float_initializer_is_converted_without_keep_embeddings() {
    let options = Fp16Options { keep_embeddings: false, ..Default::default() };
    let converted = convert(embedding(), &options);

    converted.assert_converted("gather");
    assert_eq!(converted.initializer("table").data_type(), FLOAT16);
    assert_eq!(converted.types["ids"], INT64);
}

/// q -> Softmax -> Transpose -> MatMul(., v) -> y, beside an unrelated MatMul(v, v).
fn attention() -> Graph {
    Graph::new("attention")
        .input("q", FLOAT)
        .input("v", FLOAT)
        .output("y", FLOAT)
        .output("z", FLOAT)
        .node(node("softmax", "Softmax", &["q"], &["p"]))
        .node(node("transpose", "Transpose", &["p"], &["pt"]))
        .node(node("probs_v", "MatMul", &["pt", "v"], &["y"]))
        .node(node("v_v", "MatMul", &["v", "v"], &["z"]))
}

#[test]
fn matmul_of_softmax_output_through_transpose_is_kept_as_attention_probabilities() {
    let converted = convert(attention(), &no_first_last());

    converted.assert_kept("probs_v", KeepReason::AttentionProbabilities);
    converted.assert_converted("v_v");
}

#[test]
fn attention_probabilities_reach_the_kept_matmul_without_an_fp16_round_trip() {
    // Softmax (FP32) -> Transpose -> MatMul (FP32): the Transpose is converted, so the
    // probabilities go through Cast to FP16 and Cast back to FLOAT before the kept MatMul.
    let converted = convert(attention(), &no_first_last());

    assert!(converted.float_types("transpose").iter().all(|&t| t == FLOAT));
    assert!(converted.cast_sources().iter().all(|(source, _)| source != "softmax"));
}

#[test]
fn matmul_of_softmax_output_is_converted_without_keep_attention_probabilities() {
    let options =
        Fp16Options { keep_first_and_last_layers: false, keep_attention_probabilities: false, ..Default::default() };
    let converted = convert(attention(), &options);

    converted.assert_converted("probs_v");
}

#[test]
fn rms_norm_pattern_is_kept_as_a_normalization_subgraph() {
    let graph = Graph::new("rms_norm")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("eps", &[1], &[1e-6]))
        .initializer(float_tensor("gamma", &[2], &[1.0, 2.0]))
        .node(node("square", "Mul", &["x", "x"], &["x2"]))
        .node(node("mean", "ReduceMean", &["x2"], &["ms"]))
        .node(node("add_eps", "Add", &["ms", "eps"], &["var"]))
        .node(node("sqrt", "Sqrt", &["var"], &["rms"]))
        .node(node("div", "Div", &["x", "rms"], &["normed"]))
        .node(node("scale", "Mul", &["normed", "gamma"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    for name in ["square", "mean", "add_eps", "sqrt", "div"] {
        converted.assert_kept(name, KeepReason::NormalizationSubgraph);
    }
    assert_eq!(converted.report.nodes_kept.len(), 5);
    converted.assert_converted("scale");
    assert_eq!(converted.initializer("eps").data_type(), FLOAT);
    assert_eq!(converted.initializer("gamma").data_type(), FLOAT16);
}
