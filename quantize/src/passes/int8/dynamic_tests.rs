//! The dynamic rewrite's output form.

use super::*;
use crate::elem;
use crate::onnx::OperatorSetIdProto;
use crate::tensor::float_tensor;
use crate::test_support::{Rng, node, typed_value};

/// x -> LayerNorm-like Relu -> three MatMul + bias Add reading one activation `h` (an attention
/// block's query, key and value projections) summed, then one more MatMul reading the sum alone.
fn projections(opset: i64) -> ModelProto {
    let mut rng = Rng(7);
    let mut weight = |name: &str| float_tensor(name, vec![4, 4], &rng.gaussians(16, 0.5));
    let initializer = vec![
        weight("wq"),
        weight("wk"),
        weight("wv"),
        weight("wo"),
        float_tensor("bq", vec![4], &[0.1, -0.2, 0.3, 0.0]),
        float_tensor("bk", vec![4], &[0.0, 0.5, -0.1, 0.2]),
    ];
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: vec![
                node("act", "Relu", &["x"], &["h"]),
                node("q", "MatMul", &["h", "wq"], &["q0"]),
                node("q_bias", "Add", &["q0", "bq"], &["q1"]),
                node("k", "MatMul", &["h", "wk"], &["k0"]),
                node("k_bias", "Add", &["k0", "bk"], &["k1"]),
                node("v", "MatMul", &["h", "wv"], &["v1"]),
                node("sum_qk", "Add", &["q1", "k1"], &["qk"]),
                node("sum_qkv", "Add", &["qk", "v1"], &["s"]),
                node("o", "MatMul", &["s", "wo"], &["y"]),
            ],
            input: vec![typed_value("x", elem::FLOAT)],
            output: vec![typed_value("y", elem::FLOAT)],
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantized(opset: i64) -> ModelProto {
    let mut model = projections(opset);
    let options = Int8Options { keep_first_and_last_layers: false, reduce_range: Some(false), ..Default::default() };
    quantize_dynamic(&mut model, &options).unwrap();
    model
}

#[test]
fn readers_of_one_activation_share_one_dynamic_quantize_linear() {
    let model = quantized(17);
    let graph = model.graph.as_ref().unwrap();
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops.iter().filter(|&&op| op == "DynamicQuantizeLinear").count(), 1, "{ops:?}");
    assert_eq!(ops.iter().filter(|&&op| op == "MatMulIntegerToFloat").count(), 3, "{ops:?}");
    // The lone reader of `s` quantizes its own input.
    let o = graph.node.iter().find(|n| n.name() == "o").unwrap();
    assert_eq!((o.op_type(), o.domain()), ("DynamicQuantizeMatMul", "com.microsoft"));

    let quantizer = graph.node.iter().position(|n| n.op_type() == "DynamicQuantizeLinear").unwrap();
    let dql = &graph.node[quantizer];
    assert_eq!(dql.input, ["h"]);
    assert_eq!(dql.output.len(), 3);
    for name in ["q", "k", "v"] {
        let position = graph.node.iter().position(|n| n.name() == name).unwrap();
        let matmul = &graph.node[position];
        assert!(position > quantizer, "{name} runs before the quantizer it reads");
        assert_eq!((matmul.op_type(), matmul.domain()), ("MatMulIntegerToFloat", "com.microsoft"));
        // A codes, B int8 weights, a_scale, b_scale per column, a_zero_point, no b_zero_point.
        assert_eq!(matmul.input[0], dql.output[0]);
        assert_eq!(matmul.input[2], dql.output[1]);
        assert_eq!(matmul.input[4], dql.output[2]);
        assert!(matmul.input[5].is_empty());
        let weight = graph.initializer.iter().find(|t| t.name() == matmul.input[1]).unwrap();
        assert_eq!((weight.data_type(), weight.dims.as_slice()), (elem::INT8, &[4i64, 4][..]));
        let scales = graph.initializer.iter().find(|t| t.name() == matmul.input[3]).unwrap();
        assert_eq!(scales.dims, [4]);
    }
    // The bias Adds of q and k moved into their nodes (input 6); v had none.
    let q = graph.node.iter().find(|n| n.name() == "q").unwrap();
    let v = graph.node.iter().find(|n| n.name() == "v").unwrap();
    assert_eq!(q.input.len(), 7);
    assert_eq!(q.output, ["q1"]);
    assert_eq!(v.input.len(), 6);
    assert!(!ops.contains(&"MatMul"));
    assert_eq!(ops.iter().filter(|&&op| op == "Add").count(), 2, "only the sums stay: {ops:?}");
}

#[test]
fn before_opset_11_every_reader_keeps_dynamic_quantize_matmul() {
    let model = quantized(10);
    let graph = model.graph.as_ref().unwrap();
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops.iter().filter(|&&op| op == "DynamicQuantizeMatMul").count(), 4, "{ops:?}");
    assert!(!ops.contains(&"DynamicQuantizeLinear"));
}
