//! 10-12. keep_io_types: false, node order, declared value_info types.

use mantissa_quantize::elem::{FLOAT, FLOAT16, INT64};
use mantissa_quantize::graph::GraphError;
use mantissa_quantize::passes::fp16::{Fp16Error, Fp16Options, KeepReason};

use crate::build::{Graph, float_tensor, node};
use crate::inspect::{assert_casts_precede_first_consumer, declared, declared_types};
use crate::run::{convert, convert_error};

#[test]
fn without_keep_io_types_float_io_is_fp16_and_needs_no_boundary_casts() {
    let graph = Graph::new("fp16_io")
        .input("x", FLOAT)
        .input("ids", INT64)
        .output("y", FLOAT)
        .output("z", FLOAT)
        .output("ids_out", INT64)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("relu", "Relu", &["x"], &["a"]))
        .node(node("add", "Add", &["a", "b"], &["y"]))
        .node(node("softmax", "Softmax", &["a"], &["z"]))
        .node(node("ids_copy", "Identity", &["ids"], &["ids_out"]));
    let options = Fp16Options { keep_io_types: false, ..Default::default() };
    let converted = convert(graph, &options);

    assert_eq!(
        declared_types(&converted.graph.input),
        vec![("x".to_owned(), Some(FLOAT16)), ("ids".to_owned(), Some(INT64))]
    );
    assert_eq!(
        declared_types(&converted.graph.output),
        vec![("y".to_owned(), Some(FLOAT16)), ("z".to_owned(), Some(FLOAT16)), ("ids_out".to_owned(), Some(INT64)),]
    );
    converted.assert_converted("relu");
    converted.assert_converted("add");
    assert_eq!(converted.node("relu").input, ["x"]);
    assert_eq!(converted.node("add").output, ["y"]);
    // Only the kept Softmax needs Casts: FP16 `a` in, its FP32 result out to FP16 `z`.
    assert_eq!(
        converted.cast_sources(),
        vec![("relu".to_owned(), i64::from(FLOAT)), ("softmax".to_owned(), i64::from(FLOAT16)),]
    );
    converted.assert_kept("softmax", KeepReason::OpBlockList);
}

// 11. Node order

#[test]
fn nodes_stored_out_of_order_are_sorted_before_conversion() {
    let graph = Graph::new("unsorted")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("softmax", "Softmax", &["b"], &["y"]))
        .node(node("add", "Add", &["a", "a"], &["b"]))
        .node(node("relu", "Relu", &["x"], &["a"]));
    let converted = convert(graph, &Fp16Options::default());

    assert!(converted.position("relu") < converted.position("add"));
    assert!(converted.position("add") < converted.position("softmax"));
    converted.assert_converted("relu");
    converted.assert_converted("add");
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert_casts_precede_first_consumer(&converted.graph);
}

#[test]
fn a_cycle_is_an_error() {
    let graph = Graph::new("cyclic")
        .input("x", FLOAT)
        .output("b", FLOAT)
        .node(node("add", "Add", &["x", "c"], &["b"]))
        .node(node("relu", "Relu", &["b"], &["c"]));
    let error = convert_error(graph, &Fp16Options::default());

    assert!(matches!(&error, Fp16Error::Graph(GraphError::Cycle { graph, .. }) if graph == "cyclic"), "{error:?}");
}

// 12. Declared value_info types

#[test]
fn value_info_of_a_converted_intermediate_becomes_fp16() {
    let graph = Graph::new("value_info")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .value_info("a", FLOAT)
        .value_info("b", FLOAT)
        .value_info("s", FLOAT)
        .node(node("relu", "Relu", &["x"], &["a"]))
        .node(node("add", "Add", &["a", "a"], &["b"]))
        .node(node("softmax", "Softmax", &["b"], &["s"]))
        .node(node("neg", "Neg", &["s"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(declared(&converted.graph, "a"), Some(FLOAT16));
    assert_eq!(declared(&converted.graph, "b"), Some(FLOAT16));
    // Produced by the kept Softmax: still FLOAT.
    assert_eq!(declared(&converted.graph, "s"), Some(FLOAT));
    assert_eq!(converted.graph.value_info.len(), 3);
}
