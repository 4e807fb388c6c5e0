//! Planning against calibrated ranges when the options keep nodes FP32 that calibration
//! planned as quantized: what the accuracy-budget search does on every step.

use super::*;
use crate::onnx::{OperatorSetIdProto, TensorProto};
use crate::passes::int8::quantize_static;
use crate::tensor::float_tensor;
use crate::test_support::{node, typed_value};

/// x -> Conv -> Relu -> Conv -> Relu -> Conv -> y, 1x1 convolutions over 2 channels.
fn conv_relu_chain() -> ModelProto {
    let weight = |name: &str| float_tensor(name, vec![2, 2, 1, 1], &[0.5, -0.25, 0.75, 1.0]);
    let nodes = vec![
        node("conv1", "Conv", &["x", "w1"], &["c1"]),
        node("relu1", "Relu", &["c1"], &["r1"]),
        node("conv2", "Conv", &["r1", "w2"], &["c2"]),
        node("relu2", "Relu", &["c2"], &["r2"]),
        node("conv3", "Conv", &["r2", "w3"], &["y"]),
    ];
    let initializer: Vec<TensorProto> = ["w1", "w2", "w3"].into_iter().map(weight).collect();
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(GraphProto {
            node: nodes,
            input: vec![typed_value("x", elem::FLOAT)],
            output: vec![typed_value("y", elem::FLOAT)],
            initializer,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn options_keeping(nodes: &[&str]) -> Int8Options {
    Int8Options {
        mode: super::super::Int8Mode::Static,
        keep_first_and_last_layers: false,
        nodes_exclude: nodes.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn unit_ranges(tensors: &[String]) -> Ranges {
    tensors.iter().map(|t| (t.clone(), (0.0, 1.0))).collect()
}

#[test]
fn a_node_kept_fp32_after_calibration_keeps_its_neighbours_fp32_instead_of_failing() {
    let model = conv_relu_chain();
    let plain = tensors_to_calibrate(&model, &options_keeping(&[])).unwrap();
    // Fused into Relu, conv1's output needs no range of its own in the plain plan.
    assert!(!plain.contains(&"c1".to_owned()), "{plain:?}");

    let mut keeping_relu = model.clone();
    let report = quantize_static(&mut keeping_relu, &options_keeping(&["relu1"]), &unit_ranges(&plain))
        .expect("planning keeps what it has no range for in FP32");
    let no_range: Vec<&str> = report
        .skipped
        .iter()
        .filter(|(_, _, reason)| matches!(reason, SkipReason::NoCalibratedRange(_)))
        .map(|(name, _, _)| name.as_str())
        .collect();
    assert_eq!(no_range, ["conv1"], "{:?}", report.skipped);
    assert!(report.quantized.iter().any(|(name, _)| name == "conv2"));
}

#[test]
fn search_calibration_covers_every_single_node_kept_fp32() {
    let model = conv_relu_chain();
    let tensors = tensors_to_calibrate_for_search(&model, &options_keeping(&[])).unwrap();
    assert!(tensors.contains(&"c1".to_owned()), "{tensors:?}");
    for kept in ["conv1", "relu1", "conv2", "relu2", "conv3"] {
        let mut candidate = model.clone();
        let report = quantize_static(&mut candidate, &options_keeping(&[kept]), &unit_ranges(&tensors)).unwrap();
        assert!(
            !report.skipped.iter().any(|(_, _, reason)| matches!(reason, SkipReason::NoCalibratedRange(_))),
            "keeping {kept}: {:?}",
            report.skipped
        );
    }
}

#[test]
fn what_a_max_pool_reads_keeps_its_full_range() {
    // Magika: Conv -> GlobalMaxPool; a clipped range for the Conv output clips the very
    // maxima the pool returns.
    let mut model = conv_relu_chain();
    let graph = model.graph.as_mut().unwrap();
    graph.node.insert(4, node("pool", "GlobalMaxPool", &["r2"], &["p"]));
    graph.node[5].input[0] = "p".to_owned();
    let options = options_keeping(&[]);
    let calibrated = tensors_to_calibrate(&model, &options).unwrap();
    let full = tensors_needing_full_range(&model, &options).unwrap();
    assert_eq!(full, ["r2"], "calibrated: {calibrated:?}");
}
