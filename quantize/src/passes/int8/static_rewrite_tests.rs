//! The QDQ rewrite's output form.

use super::*;
use crate::onnx::{OperatorSetIdProto, ValueInfoProto};
use crate::tensor::float_tensor;
use crate::test_support::{node, typed_value};

/// x -> Conv (2 output channels, 1x1) -> Relu -> Conv -> y at the given opset.
fn two_convs(opset: i64) -> ModelProto {
    let weight = |name: &str| float_tensor(name, vec![2, 2, 1, 1], &[0.5, -0.25, 0.01, 0.02]);
    ModelProto {
        ir_version: Some(7),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: vec![
                node("conv1", "Conv", &["x", "w1"], &["c1"]),
                node("relu", "Relu", &["c1"], &["r"]),
                node("conv2", "Conv", &["r", "w2"], &["y"]),
            ],
            input: vec![typed_value("x", elem::FLOAT)],
            output: vec![typed_value("y", elem::FLOAT)],
            initializer: vec![weight("w1"), weight("w2")],
            value_info: Vec::<ValueInfoProto>::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantized(opset: i64) -> ModelProto {
    let mut model = two_convs(opset);
    let options = Int8Options { mode: Int8Mode::Static, keep_first_and_last_layers: false, ..Default::default() };
    let tensors = super::super::tensors_to_calibrate(&model, &options).unwrap();
    let ranges: Ranges = tensors.into_iter().map(|t| (t, (-1.0, 1.0))).collect();
    quantize_static(&mut model, &options, &ranges).unwrap();
    model
}

fn weight_dequantizers(model: &ModelProto) -> Vec<&NodeProto> {
    model.graph.as_ref().unwrap().node.iter().filter(|n| n.name().contains("_weight_DequantizeLinear")).collect()
}

#[test]
fn below_opset_13_per_channel_weights_use_the_com_microsoft_dequantizer() {
    // A PP-OCR recogniser exported at opset 12 lost most of its accuracy (cosine 0.53) when
    // its weights fell back to one scale per tensor.
    let model = quantized(12);
    let dequantizers = weight_dequantizers(&model);
    assert_eq!(dequantizers.len(), 2);
    for dq in dequantizers {
        assert_eq!(dq.domain(), "com.microsoft");
        assert_eq!(attribute(dq, "axis").and_then(|a| a.i), Some(0));
    }
    assert!(model.opset_import.iter().any(|o| o.domain() == "com.microsoft"));
    let default = model.opset_import.iter().find(|o| o.domain().is_empty()).unwrap();
    assert_eq!(default.version, Some(12), "the model's own opset is left alone");
}

#[test]
fn from_opset_13_per_channel_weights_use_onnx_dequantizer() {
    let model = quantized(13);
    for dq in weight_dequantizers(&model) {
        assert_eq!(dq.domain(), "");
        assert!(attribute(dq, "axis").is_some());
    }
    assert!(!model.opset_import.iter().any(|o| o.domain() == "com.microsoft"));
}
