//! 4-5. Block lists.

use mantissa_quantize::elem::{FLOAT, FLOAT16};
use mantissa_quantize::passes::fp16::{Fp16Error, Fp16Options, KeepReason, convert_to_fp16};

use crate::build::{Graph, node};
use crate::run::convert;

/// x -> stem/relu -> block/add -> block/relu -> head/sigmoid[0] -> y.
fn named_layers() -> Graph {
    Graph::new("named")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("stem/relu", "Relu", &["x"], &["a"]))
        .node(node("block/add", "Add", &["a", "a"], &["b"]))
        .node(node("block/relu", "Relu", &["b"], &["c"]))
        .node(node("head/sigmoid[0]", "Sigmoid", &["c"], &["y"]))
}

#[test]
fn node_block_list_keeps_a_node_by_exact_name_even_with_regex_characters() {
    let options = Fp16Options { node_block_list: vec!["head/sigmoid[0]".to_owned()], ..Default::default() };
    let converted = convert(named_layers(), &options);

    converted.assert_kept("head/sigmoid[0]", KeepReason::NodeBlockList("head/sigmoid[0]".to_owned()));
    for name in ["stem/relu", "block/add", "block/relu"] {
        converted.assert_converted(name);
    }
}

#[test]
fn node_block_list_regex_keeps_every_node_whose_whole_name_matches() {
    let options = Fp16Options { node_block_list: vec!["block/.*".to_owned()], ..Default::default() };
    let converted = convert(named_layers(), &options);

    let reason = KeepReason::NodeBlockList("block/.*".to_owned());
    converted.assert_kept("block/add", reason.clone());
    converted.assert_kept("block/relu", reason);
    converted.assert_converted("stem/relu");
    converted.assert_converted("head/sigmoid[0]");
}

#[test]
fn node_block_list_regex_must_match_the_whole_name() {
    let options = Fp16Options { node_block_list: vec!["block".to_owned(), "relu".to_owned()], ..Default::default() };
    let converted = convert(named_layers(), &options);

    assert!(converted.report.nodes_kept.is_empty());
    assert_eq!(converted.report.nodes_converted, 4);
}

#[test]
fn invalid_node_block_list_regex_is_an_error_and_leaves_the_model_alone() {
    let options = Fp16Options { node_block_list: vec!["block/(".to_owned()], ..Default::default() };
    let mut model = named_layers().model();
    let error = convert_to_fp16(&mut model, &options).expect_err("bad pattern");

    assert!(matches!(&error, Fp16Error::BadPattern { pattern, .. } if pattern == "block/("), "{error:?}");
    assert_eq!(model, named_layers().model());
}

/// x -> relu -> softmax -> y.
fn relu_softmax() -> Graph {
    Graph::new("relu_softmax")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("relu", "Relu", &["x"], &["a"]))
        .node(node("softmax", "Softmax", &["a"], &["y"]))
}

#[test]
fn op_block_list_add_keeps_extra_operators() {
    let options = Fp16Options { op_block_list_add: vec!["Relu".to_owned()], ..Default::default() };
    let converted = convert(relu_softmax(), &options);

    converted.assert_kept("relu", KeepReason::OpBlockList);
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert!(converted.casts().is_empty());
}

#[test]
fn op_block_list_remove_converts_softmax() {
    let options = Fp16Options { op_block_list_remove: vec!["Softmax".to_owned()], ..Default::default() };
    let converted = convert(relu_softmax(), &options);

    converted.assert_converted("relu");
    converted.assert_converted("softmax");
    // Only the model boundary needs Casts.
    assert_eq!(
        converted.cast_sources(),
        vec![("softmax".to_owned(), i64::from(FLOAT)), ("x".to_owned(), i64::from(FLOAT16)),]
    );
}
