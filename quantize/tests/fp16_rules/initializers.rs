//! 2-3. Initializers: shared copies, clamping.

use mantissa_quantize::elem::FLOAT;
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{Graph, float_tensor, node};
use crate::inspect::f16_values;
use crate::run::convert;

#[test]
fn initializer_shared_by_converted_and_kept_nodes_gets_an_fp16_copy() {
    let graph = Graph::new("shared")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("add", "Add", &["x", "b"], &["a"]))
        .node(node("keep_sub", "Sub", &["a", "b"], &["y"]));
    let options = Fp16Options { node_block_list: vec!["keep_sub".to_owned()], ..Default::default() };
    let converted = convert(graph, &options);

    converted.assert_converted("add");
    converted.assert_kept("keep_sub", KeepReason::NodeBlockList("keep_sub".to_owned()));
    assert_eq!(converted.initializer("b").data_type(), FLOAT);
    assert_eq!(converted.report.initializer_copies, 1);
    assert_eq!(converted.report.initializers_converted, 0);
    assert_eq!(converted.graph.initializer.len(), 2);

    let copy_name = &converted.node("add").input[1];
    assert_ne!(copy_name, "b");
    let copy = converted.initializer(copy_name);
    assert_eq!(f16_values(copy), vec![1.0, 2.0]);
    assert_eq!(copy.dims, vec![2]);
    assert_eq!(converted.node("keep_sub").input[1], "b");
}

#[test]
fn out_of_range_initializer_values_are_clamped_and_counted() {
    let graph = Graph::new("clamp")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("big", &[4], &[1.0, 1e5, -7e4, 65504.0]))
        .node(node("add", "Add", &["x", "big"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    let big = converted.initializer("big");
    assert_eq!(f16_values(big), vec![1.0, 65504.0, -65504.0, 65504.0]);
    assert_eq!(converted.report.values_clamped, 2);
}

#[test]
fn out_of_range_values_in_an_fp16_copy_are_clamped_and_counted() {
    let graph = Graph::new("clamp_copy")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("big", &[2], &[-1e6, 3.0]))
        .node(node("add", "Add", &["x", "big"], &["a"]))
        .node(node("softmax", "Softmax", &["big"], &["s"]))
        .node(node("mul", "Mul", &["a", "s"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.report.initializer_copies, 1);
    let copy = converted.initializer(&converted.node("add").input[1]);
    assert_eq!(f16_values(copy), vec![-65504.0, 3.0]);
    assert_eq!(converted.initializer("big"), &float_tensor("big", &[2], &[-1e6, 3.0]));
    assert_eq!(converted.report.values_clamped, 1);
}
