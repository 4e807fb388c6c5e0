//! Operators of other domains, and edge cases: legacy initializer inputs, CastLike,
//! multi-output ops, undeclared types, values returned straight from a subgraph, attention
//! paths.

use mantissa_quantize::elem::{FLOAT, INT64};
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason, convert_to_fp16};

use crate::build::{Graph, float_tensor, node};
use crate::inspect::{declared, find_initializer};
use crate::run::convert;

/// x -> ai.onnx.ml Scaler -> c; y = Add(c, x).
fn foreign() -> Graph {
    let mut scaler = node("scaler", "Scaler", &["x"], &["c"]);
    scaler.domain = Some("ai.onnx.ml".to_owned());
    Graph::new("foreign").input("x", FLOAT).output("y", FLOAT).node(scaler).node(node(
        "add",
        "Add",
        &["c", "x"],
        &["y"],
    ))
}

#[test]
fn foreign_domain_node_is_kept_and_its_declared_float_output_is_cast_for_converted_readers() {
    let converted = convert(foreign().value_info("c", FLOAT), &Fp16Options::default());

    converted.assert_kept("scaler", KeepReason::ForeignDomain);
    converted.assert_converted("add");
    assert_ne!(converted.node("add").input[0], "c");
}

// Edge cases: legacy initializer inputs, CastLike, multi-output ops, undeclared types,
// values returned straight from a subgraph, attention paths

#[test]
fn initializer_also_declared_as_a_graph_input_keeps_a_matching_type() {
    // IR < 4 exporters list every initializer in graph.input too (an overridable default).
    let graph = Graph::new("initializer_input")
        .input("x", FLOAT)
        .input("b", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("add", "Add", &["x", "b"], &["y"]));
    let mut model = graph.model();
    convert_to_fp16(&mut model, &Fp16Options::default()).unwrap();
    let graph = model.graph.unwrap();

    assert_eq!(declared(&graph, "b"), Some(find_initializer(&graph, "b").data_type()));
}

#[test]
fn castlike_from_int64_to_float_is_kept_like_cast() {
    let graph = Graph::new("castlike")
        .input("ids", INT64)
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("like", "CastLike", &["ids", "x"], &["f"]))
        .node(node("add", "Add", &["x", "f"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("like"), Some(&KeepReason::TypeBoundaryCast));
    assert_eq!(converted.types["f"], FLOAT);
}

#[test]
fn maxpool_indices_stay_int64() {
    // MaxPool's second output (Indices) is INT64 and must not be cast.
    let graph = Graph::new("maxpool")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("pool", "MaxPool", &["x"], &["p", "idx"]))
        .node(node("unpool", "MaxUnpool", &["p", "idx"], &["y"]));
    let options = Fp16Options { node_block_list: vec!["unpool".to_owned()], ..Default::default() };
    let converted = convert(graph, &options);

    assert_eq!(converted.node("unpool").input[1], "idx");
}

#[test]
fn a_reader_of_an_undeclared_foreign_output_stays_fp32() {
    // `c` has no declared type: the Add that reads it stays FP32 rather than mixing an
    // unknown-typed value with FP16 operands.
    let converted = convert(foreign(), &Fp16Options::default());

    converted.assert_kept("scaler", KeepReason::ForeignDomain);
    converted.assert_kept("add", KeepReason::UnknownInputType);
    assert_eq!(converted.node("add").input, vec!["c", "x"]);
}
