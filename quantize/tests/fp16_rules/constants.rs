//! 7. Constant and ConstantOfShape nodes.

use mantissa_quantize::elem::{FLOAT, FLOAT16, INT64};
use mantissa_quantize::onnx::AttributeProto;
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{Graph, float_tensor, int64_tensor, no_first_last, node, tensor_attribute, weight, with_attribute};
use crate::inspect::{f16_values, tensor_of};
use crate::run::convert;

#[test]
fn constant_read_by_a_converted_matmul_is_narrowed() {
    let graph = Graph::new("constant")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(node("w", "Constant", &[], &["w_out"]), tensor_attribute("value", weight(""))))
        .node(node("mm", "MatMul", &["x", "w_out"], &["y"]));
    let converted = convert(graph, &no_first_last());

    converted.assert_converted("mm");
    converted.assert_converted("w");
    let value = tensor_of(converted.node("w"), "value");
    assert_eq!(f16_values(value), vec![0.5, -1.0, 2.0, 0.25]);
    assert_eq!(converted.node("mm").input[1], "w_out");
}

#[test]
fn constant_value_float_read_by_a_converted_node_becomes_an_fp16_tensor() {
    let graph = Graph::new("value_float")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("two", "Constant", &[], &["two_out"]),
            AttributeProto {
                name: Some("value_float".to_owned()),
                r#type: Some(1),
                f: Some(2.0),
                ..Default::default()
            },
        ))
        .node(node("mul", "Mul", &["x", "two_out"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("mul");
    let value = tensor_of(converted.node("two"), "value");
    assert!(value.dims.is_empty());
    assert_eq!(f16_values(value), vec![2.0]);
}

#[test]
fn constant_read_by_a_kept_softmax_stays_float() {
    let graph = Graph::new("constant_fp32")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("logits", "Constant", &[], &["l"]),
            tensor_attribute("value", float_tensor("", &[2], &[1.0, 3.0])),
        ))
        .node(node("softmax", "Softmax", &["l"], &["p"]))
        .node(node("add", "Add", &["x", "p"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("logits", KeepReason::FeedsFp32);
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert_eq!(tensor_of(converted.node("logits"), "value").data_type(), FLOAT);
    converted.assert_converted("add");
}

#[test]
fn constant_shared_by_kept_and_converted_readers_stays_float_and_is_cast() {
    let graph = Graph::new("constant_shared")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("c", "Constant", &[], &["c_out"]),
            tensor_attribute("value", float_tensor("", &[2], &[1.0, 3.0])),
        ))
        .node(node("softmax", "Softmax", &["c_out"], &["p"]))
        .node(node("add", "Add", &["x", "c_out"], &["q"]))
        .node(node("mul", "Mul", &["p", "q"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("c", KeepReason::FeedsFp32);
    converted.assert_converted("add");
    let add_reads = &converted.node("add").input[1];
    assert_ne!(add_reads, "c_out");
    assert_eq!(converted.types[add_reads], FLOAT16);
}

#[test]
fn constant_of_shape_with_a_float_value_follows_its_converted_reader() {
    let graph = Graph::new("fill")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(with_attribute(
            node("fill", "ConstantOfShape", &["shape"], &["c"]),
            tensor_attribute("value", float_tensor("", &[1], &[0.5])),
        ))
        .node(node("add", "Add", &["x", "c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("add");
    assert_eq!(converted.kept("fill"), None);
    assert_eq!(f16_values(tensor_of(converted.node("fill"), "value")), vec![0.5]);
    assert_eq!(converted.types["c"], FLOAT16);
    assert_eq!(converted.initializer("shape").data_type(), INT64);
}

#[test]
fn constant_of_shape_without_value_gets_an_fp16_zero_when_converted() {
    let graph = Graph::new("zeros")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(node("zeros", "ConstantOfShape", &["shape"], &["c"]))
        .node(node("add", "Add", &["x", "c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("add");
    assert_eq!(f16_values(tensor_of(converted.node("zeros"), "value")), vec![0.0]);
}

#[test]
fn constant_of_shape_read_by_a_kept_node_stays_float() {
    let graph = Graph::new("fill_fp32")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(with_attribute(
            node("fill", "ConstantOfShape", &["shape"], &["c"]),
            tensor_attribute("value", float_tensor("", &[1], &[0.5])),
        ))
        .node(node("softmax", "Softmax", &["c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("fill", KeepReason::FeedsFp32);
    assert_eq!(tensor_of(converted.node("fill"), "value").data_type(), FLOAT);
}
