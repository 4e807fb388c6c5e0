//! Inspecting a converted graph: finding nodes, initializers and subgraphs, Casts and what
//! they read, declared types and FP16 values.

use std::collections::HashMap;

use half::f16;
use mantissa_quantize::elem::{FLOAT, FLOAT16};
use mantissa_quantize::onnx::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use mantissa_quantize::types::declared_elem_type;

/// Value name -> element type (0 where this checker cannot tell).
pub(crate) type Types = HashMap<String, i32>;

pub(crate) fn find_node<'g>(graph: &'g GraphProto, name: &str) -> &'g NodeProto {
    graph
        .node
        .iter()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node '{name}' in graph '{}'", graph.name()))
}

pub(crate) fn find_initializer<'g>(graph: &'g GraphProto, name: &str) -> &'g TensorProto {
    graph
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer '{name}' in graph '{}'", graph.name()))
}

pub(crate) fn subgraph<'n>(node: &'n NodeProto, attribute: &str) -> &'n GraphProto {
    node.attribute
        .iter()
        .find(|a| a.name() == attribute)
        .and_then(|a| a.g.as_ref())
        .unwrap_or_else(|| panic!("node '{}' has no graph '{attribute}'", node.name()))
}

pub(crate) fn tensor_of<'n>(node: &'n NodeProto, attribute: &str) -> &'n TensorProto {
    node.attribute
        .iter()
        .find(|a| a.name() == attribute)
        .and_then(|a| a.t.as_ref())
        .unwrap_or_else(|| panic!("node '{}' has no tensor '{attribute}'", node.name()))
}

pub(crate) fn cast_to(node: &NodeProto) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name() == "to")
        .and_then(|a| a.i)
        .unwrap_or_else(|| panic!("Cast '{}' has no 'to'", node.name()))
}

pub(crate) fn casts(graph: &GraphProto) -> Vec<&NodeProto> {
    graph.node.iter().filter(|n| n.op_type() == "Cast").collect()
}

pub(crate) fn cast_sources(graph: &GraphProto) -> Vec<(String, i64)> {
    let mut sources: Vec<(String, i64)> = casts(graph)
        .into_iter()
        .map(|cast| {
            let input = &cast.input[0];
            let source = graph
                .node
                .iter()
                .find(|n| n.output.contains(input))
                .map_or_else(|| input.clone(), |producer| producer.name().to_owned());
            (source, cast_to(cast))
        })
        .collect();
    sources.sort();
    sources
}

pub(crate) fn declared_types(infos: &[ValueInfoProto]) -> Vec<(String, Option<i32>)> {
    infos.iter().map(|info| (info.name().to_owned(), declared_elem_type(info))).collect()
}

pub(crate) fn declared(graph: &GraphProto, name: &str) -> Option<i32> {
    graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
        .find(|info| info.name() == name)
        .and_then(declared_elem_type)
}

pub(crate) fn f16_values(tensor: &TensorProto) -> Vec<f32> {
    assert_eq!(tensor.data_type(), FLOAT16, "tensor '{}'", tensor.name());
    tensor.raw_data().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

pub(crate) fn float_types(node: &NodeProto, types: &Types) -> Vec<i32> {
    node.input
        .iter()
        .chain(&node.output)
        .filter_map(|name| types.get(name).copied())
        .filter(|&t| t == FLOAT || t == FLOAT16)
        .collect()
}

/// Asserts each inserted Cast sits right before its first consumer: only Casts in between.
pub(crate) fn assert_casts_precede_first_consumer(graph: &GraphProto) {
    for (at, node) in graph.node.iter().enumerate() {
        if node.op_type() != "Cast" {
            continue;
        }
        let Some(first) = graph.node[at + 1..].iter().position(|n| n.input.contains(&node.output[0])) else {
            continue;
        };
        assert!(
            graph.node[at + 1..at + 1 + first].iter().all(|n| n.op_type() == "Cast"),
            "Cast '{}' is not placed right before its first consumer",
            node.name()
        );
    }
}
