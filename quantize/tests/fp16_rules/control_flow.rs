//! 9. Control flow.

use mantissa_quantize::elem::{BOOL, FLOAT, FLOAT16, INT64};
use mantissa_quantize::onnx::GraphProto;
use mantissa_quantize::passes::fp16::{Fp16Options, KeepReason};

use crate::build::{Graph, graph_attribute, node, weight, with_attribute};
use crate::inspect::{
    assert_casts_precede_first_consumer, cast_sources, cast_to, declared_types, find_node, float_types, subgraph,
};
use crate::run::convert;
use crate::well_formed::check_graph;

/// A branch computing MatMul(h, w) from the outer activation `h` and outer initializer `w`.
fn matmul_branch(name: &str, output: &str) -> GraphProto {
    Graph::new(name).output(output, FLOAT).node(node(&format!("{name}_mm"), "MatMul", &["h", "w"], &[output])).build()
}

/// h = Relu(x) (converted); y = If(cond) { MatMul(h, w) } else { MatMul(h, w) }.
fn if_model(else_branch: GraphProto) -> Graph {
    let if_node = with_attribute(
        with_attribute(
            node("if", "If", &["cond"], &["y"]),
            graph_attribute("then_branch", matmul_branch("then", "then_out")),
        ),
        graph_attribute("else_branch", else_branch),
    );
    Graph::new("if")
        .input("x", FLOAT)
        .input("cond", BOOL)
        .output("y", FLOAT)
        .initializer(weight("w"))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(if_node)
}

#[test]
fn if_stays_fp32_at_its_boundary_and_converts_each_branch_inside() {
    let converted = convert(if_model(matmul_branch("else", "else_out")), &Fp16Options::default());

    converted.assert_converted("relu");
    assert_eq!(converted.kept("if"), Some(&KeepReason::ControlFlow));
    assert_eq!(converted.types["y"], FLOAT);
    assert_eq!(converted.initializer("w").data_type(), FLOAT);

    // `h` is produced in FP16: the branches read an FP32 Cast of it, placed before the If.
    let h_fp32 = converted.graph.node.iter().find(|n| n.op_type() == "Cast" && n.input == ["h"]).expect("a Cast of h");
    assert_eq!(cast_to(h_fp32), i64::from(FLOAT));
    assert!(converted.position(h_fp32.name()) < converted.position("if"));
    let h_outer = &h_fp32.output[0];

    let if_node = converted.node("if");
    for (attribute, branch_name, output) in [("then_branch", "then", "then_out"), ("else_branch", "else", "else_out")] {
        let branch = subgraph(if_node, attribute);
        let types = check_graph(branch, &converted.types);
        let mm = find_node(branch, &format!("{branch_name}_mm"));
        assert!(float_types(mm, &types).iter().all(|&t| t == FLOAT16));
        // Inside: h and w are cast to FP16, the result back to FLOAT.
        let mut expected = vec![
            (format!("{branch_name}_mm"), i64::from(FLOAT)),
            (h_outer.clone(), i64::from(FLOAT16)),
            ("w".to_owned(), i64::from(FLOAT16)),
        ];
        expected.sort();
        assert_eq!(cast_sources(branch), expected);
        assert_eq!(declared_types(&branch.output), vec![(output.to_owned(), Some(FLOAT))]);
        assert_casts_precede_first_consumer(branch);
    }
    assert_eq!(converted.report.nodes_converted, 3);
    assert_eq!(converted.report.casts_inserted, 2 + 3 + 3);
}

#[test]
fn if_branch_returning_an_outer_activation_directly_returns_it_in_fp32() {
    // else: return h (no node). The branch must return the FP32 version of the outer `h`,
    // since it declares FLOAT.
    let passthrough = Graph::new("else").output("h", FLOAT).build();
    let converted = convert(if_model(passthrough), &Fp16Options::default());

    let else_branch = subgraph(converted.node("if"), "else_branch");
    let returned = else_branch.output[0].name();
    assert_eq!(converted.types[returned], FLOAT);
}

#[test]
fn loop_body_keeps_float_types_for_its_carried_state() {
    let body = Graph::new("body")
        .input("i", INT64)
        .input("go_in", BOOL)
        .input("v_in", FLOAT)
        .output("go_out", BOOL)
        .output("v_out", FLOAT)
        .node(node("body_mm", "MatMul", &["v_in", "w"], &["mm"]))
        .node(node("body_relu", "Relu", &["mm"], &["v_out"]))
        .node(node("body_go", "Identity", &["go_in"], &["go_out"]))
        .build();
    let graph = Graph::new("loop")
        .input("x", FLOAT)
        .input("trips", INT64)
        .input("go", BOOL)
        .output("v_final", FLOAT)
        .initializer(weight("w"))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(with_attribute(node("loop", "Loop", &["trips", "go", "h"], &["v_final"]), graph_attribute("body", body)));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("relu");
    assert_eq!(converted.kept("loop"), Some(&KeepReason::ControlFlow));
    // The initial state arrives in FP32 (check_graph also matched it to the body input).
    let initial = &converted.node("loop").input[2];
    assert_ne!(initial, "h");
    assert_eq!(converted.types[initial], FLOAT);

    let body = subgraph(converted.node("loop"), "body");
    assert_eq!(
        declared_types(&body.input),
        vec![("i".to_owned(), Some(INT64)), ("go_in".to_owned(), Some(BOOL)), ("v_in".to_owned(), Some(FLOAT)),]
    );
    assert_eq!(
        declared_types(&body.output),
        vec![("go_out".to_owned(), Some(BOOL)), ("v_out".to_owned(), Some(FLOAT)),]
    );
    let types = check_graph(body, &converted.types);
    for name in ["body_mm", "body_relu"] {
        assert!(float_types(find_node(body, name), &types).iter().all(|&t| t == FLOAT16));
    }
    assert_eq!(
        cast_sources(body),
        vec![
            ("body_relu".to_owned(), i64::from(FLOAT)),
            ("v_in".to_owned(), i64::from(FLOAT16)),
            ("w".to_owned(), i64::from(FLOAT16)),
        ]
    );
}
