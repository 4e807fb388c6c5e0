//! Shapes of graphs that broke the pass on real third-party models (the corpus of
//! `scripts/corpus`), reduced to a few nodes each.

use mantissa_quantize::elem::{BOOL, FLOAT, FLOAT16};
use mantissa_quantize::onnx::GraphProto;
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason, convert_to_fp16};
use mantissa_quantize::types::{ElemTypes, infer_elem_types};

use crate::build::{Graph, graph_attribute, int64_tensor, node, weight, with_attribute};
use crate::inspect::declared;
use crate::run::convert;

/// An If branch returning Relu(h) with its output left undeclared, as the spox and PyTorch
/// exporters of Silero VAD leave them.
fn undeclared_branch(name: &str) -> GraphProto {
    let mut branch =
        Graph::new(name).node(node(&format!("{name}_relu"), "Relu", &["h"], &[&format!("{name}_out")])).build();
    branch
        .output
        .push(mantissa_quantize::onnx::ValueInfoProto { name: Some(format!("{name}_out")), ..Default::default() });
    branch
}

#[test]
fn if_outputs_left_undeclared_are_float_so_their_converted_readers_get_a_cast() {
    // Silero VAD at opset 15: the LSTM state leaves an If whose branch outputs declare no
    // type, goes through Unsqueeze (axes int64) and Concat, and meets an FP32 value in an Add.
    // The pass took the Unsqueeze output for int64 (its axes' type), converted the Add and fed
    // it float and float16 at once; ONNX Runtime refused the model.
    let if_node = with_attribute(
        with_attribute(node("if", "If", &["cond"], &["s"]), graph_attribute("then_branch", undeclared_branch("then"))),
        graph_attribute("else_branch", undeclared_branch("else")),
    );
    let graph = Graph::new("vad_state")
        .input("x", FLOAT)
        .input("cond", BOOL)
        .output("y", FLOAT)
        .initializer(int64_tensor("axes", &[1], &[0]))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(if_node)
        .node(node("unsqueeze", "Unsqueeze", &["s", "axes"], &["u"]))
        .node(node("concat", "Concat", &["u", "u"], &["c"]))
        .node(node("scale", "Relu", &["x"], &["r"]))
        .node(node("add", "Add", &["c", "r"], &["y"]));
    let options = Fp16Options { keep_first_and_last_layers: false, ..Default::default() };
    let converted = convert(graph, &options);

    let inferred = infer_elem_types(&converted.graph, &ElemTypes::new());
    assert_eq!(inferred["s"], FLOAT, "the If output is inferred from its branch");
    assert!(matches!(inferred["u"], FLOAT | FLOAT16), "Unsqueeze follows its data, not its int64 axes");
    assert_eq!(converted.kept("if"), Some(&KeepReason::ControlFlow));
    converted.assert_converted("add");
}

#[test]
fn com_microsoft_operators_keep_their_input_and_output_types() {
    // ddddocr's already-quantized OCR model: a com.microsoft.DynamicQuantizeLSTM, whose kernel
    // takes float only, was fed float16.
    let mut lstm = node("lstm_quant", "DynamicQuantizeLSTM", &["h", "w"], &["seq"]);
    lstm.domain = Some("com.microsoft".to_owned());
    let graph = Graph::new("quantized_lstm")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .value_info("seq", FLOAT)
        .initializer(weight("w"))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(lstm)
        .node(node("out", "Relu", &["seq"], &["y"]));
    let options = Fp16Options { keep_first_and_last_layers: false, ..Default::default() };
    let converted = convert(graph, &options);

    assert_eq!(converted.kept("lstm_quant"), Some(&KeepReason::ForeignDomain));
    assert_eq!(converted.float_types("lstm_quant"), vec![FLOAT, FLOAT, FLOAT]);
    assert_eq!(converted.initializer("w").data_type(), FLOAT);
    converted.assert_converted("relu");
}

#[test]
fn a_narrowed_initializer_declared_in_value_info_is_declared_float16() {
    // The MiniLM exports declare some initializers in value_info as well; after narrowing, the
    // declaration still said float and onnx.checker rejected the model.
    let graph = Graph::new("declared_initializer")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .value_info("w", FLOAT)
        .initializer(weight("w"))
        .node(node("mm", "MatMul", &["x", "w"], &["m"]))
        .node(node("relu", "Relu", &["m"], &["y"]));
    let mut model = graph.model();
    let options = Fp16Options { keep_first_and_last_layers: false, keep_io_types: true, ..Default::default() };
    convert_to_fp16(&mut model, &options).expect("conversion succeeds");
    let graph = model.graph.expect("graph kept");

    let initializer = graph.initializer.iter().find(|t| t.name() == "w").expect("w kept");
    assert_eq!(initializer.data_type(), FLOAT16);
    assert_eq!(declared(&graph, "w"), Some(FLOAT16));
}
