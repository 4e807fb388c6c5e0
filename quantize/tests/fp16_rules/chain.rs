//! 1. A MatMul -> Relu -> MatMul -> Softmax -> MatMul chain.

use mantissa_quantize::elem::{FLOAT, FLOAT16};
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{chain, no_first_last};
use crate::inspect::{assert_casts_precede_first_consumer, cast_to, declared_types, f16_values, find_initializer};
use crate::run::convert;

#[test]
fn chain_keeps_graph_inputs_and_outputs_names_order_and_float_types() {
    let original = chain().build();
    let converted = convert(chain(), &Fp16Options::default());

    assert_eq!(declared_types(&converted.graph.input), declared_types(&original.input));
    assert_eq!(
        declared_types(&converted.graph.output),
        vec![("y".to_owned(), Some(FLOAT)), ("r".to_owned(), Some(FLOAT))]
    );
    // The exposed Relu output is restored under its own name by a Cast after the Relu.
    let r_writer = converted.graph.node.iter().find(|n| n.output.contains(&"r".to_owned())).unwrap();
    assert_eq!(r_writer.op_type(), "Cast");
    assert_eq!(cast_to(r_writer), i64::from(FLOAT));
    assert_eq!(converted.types["r"], FLOAT);
}

#[test]
fn chain_keeps_softmax_and_the_first_and_last_compute_layers_by_default() {
    let converted = convert(chain(), &Fp16Options::default());

    converted.assert_kept("mm1", KeepReason::FirstLayer);
    converted.assert_converted("relu");
    converted.assert_converted("mm2");
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    converted.assert_kept("mm3", KeepReason::LastLayer);
    assert_eq!(converted.report.nodes_converted, 2);
    assert_eq!(converted.report.nodes_kept.len(), 3);
}

#[test]
fn chain_inserts_casts_exactly_at_precision_boundaries() {
    let converted = convert(chain(), &Fp16Options::default());

    // mm1 (FP32) -> relu (FP16); relu -> the FLOAT output `r`; mm2 (FP16) -> softmax (FP32).
    assert_eq!(
        converted.cast_sources(),
        vec![
            ("mm1".to_owned(), i64::from(FLOAT16)),
            ("mm2".to_owned(), i64::from(FLOAT)),
            ("relu".to_owned(), i64::from(FLOAT)),
        ]
    );
    assert_eq!(converted.report.casts_inserted, 3);
    for cast in converted.casts() {
        assert!([FLOAT, FLOAT16].map(i64::from).contains(&cast_to(cast)));
    }
    assert_casts_precede_first_consumer(&converted.graph);
    assert!(converted.position("relu") < converted.position("mm2"));
}

#[test]
fn chain_narrows_initializers_read_only_by_converted_nodes() {
    let original = chain().build();
    let converted = convert(chain(), &Fp16Options::default());

    let w2 = converted.initializer("w2");
    assert_eq!(w2.data_type(), FLOAT16);
    assert_eq!(w2.raw_data().len() * 2, find_initializer(&original, "w2").raw_data().len());
    assert_eq!(f16_values(w2), vec![0.5, -1.0, 2.0, 0.25]);
    // Weights of the kept first and last layers are untouched.
    for name in ["w1", "w3"] {
        assert_eq!(converted.initializer(name), find_initializer(&original, name));
    }
    assert_eq!(converted.report.initializers_converted, 1);
    assert_eq!(converted.report.initializer_copies, 0);
    assert_eq!(converted.graph.initializer.len(), 3);
}

#[test]
fn chain_converts_the_first_layer_when_first_and_last_layers_are_not_kept() {
    let converted = convert(chain(), &no_first_last());

    converted.assert_converted("mm1");
    converted.assert_converted("mm2");
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    // The last MatMul still reads Softmax output: the attention rule keeps it.
    converted.assert_kept("mm3", KeepReason::AttentionProbabilities);
    assert_eq!(
        converted.cast_sources(),
        vec![
            ("mm2".to_owned(), i64::from(FLOAT)),
            ("relu".to_owned(), i64::from(FLOAT)),
            ("x".to_owned(), i64::from(FLOAT16)),
        ]
    );
    assert_eq!(converted.initializer("w1").data_type(), FLOAT16);
    assert_eq!(converted.initializer("w3").data_type(), FLOAT);
}

#[test]
fn chain_converts_the_last_layer_when_neither_layer_nor_attention_rule_applies() {
    let options =
        Fp16Options { keep_first_and_last_layers: false, keep_attention_probabilities: false, ..Default::default() };
    let converted = convert(chain(), &options);

    for name in ["mm1", "relu", "mm2", "mm3"] {
        converted.assert_converted(name);
    }
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert_eq!(
        converted.cast_sources(),
        vec![
            ("mm2".to_owned(), i64::from(FLOAT)),
            ("mm3".to_owned(), i64::from(FLOAT)),
            ("relu".to_owned(), i64::from(FLOAT)),
            ("softmax".to_owned(), i64::from(FLOAT16)),
            ("x".to_owned(), i64::from(FLOAT16)),
        ]
    );
    assert_eq!(converted.report.casts_inserted, 5);
    assert_eq!(converted.report.initializers_converted, 3);
    assert_casts_precede_first_consumer(&converted.graph);
    assert_eq!(
        declared_types(&converted.graph.output),
        vec![("y".to_owned(), Some(FLOAT)), ("r".to_owned(), Some(FLOAT))]
    );
}
