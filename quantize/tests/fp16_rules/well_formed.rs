//! Well-formedness: order, operand types, declared types, recursively through subgraphs.

use mantissa_quantize::elem::{BOOL, FLOAT, FLOAT16, INT64};
use mantissa_quantize::onnx::{GraphProto, NodeProto, TensorProto};
use mantissa_quantize::types::declared_elem_type;

use crate::inspect::{Types, cast_to, declared_types, subgraph, tensor_of};

/// Checks `graph` (and, recursively, its subgraphs) and returns the element type of each of
/// its values. `outer` holds the values of enclosing scopes.
pub(crate) fn check_graph(graph: &GraphProto, outer: &Types) -> Types {
    let graph_name = graph.name();
    let mut types = outer.clone();
    for info in &graph.input {
        types.insert(info.name().to_owned(), declared_elem_type(info).unwrap_or(0));
    }
    for tensor in &graph.initializer {
        check_tensor_size(tensor);
        types.insert(tensor.name().to_owned(), tensor.data_type());
    }
    for node in &graph.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            assert!(
                types.contains_key(input),
                "graph '{graph_name}': node '{}' reads '{input}' before it is produced",
                node.name()
            );
        }
        check_operands(node, &types);
        check_subgraphs(node, &types);
        for (output, elem_type) in node.output.iter().zip(output_types(node, &types)) {
            if output.is_empty() {
                continue;
            }
            assert!(
                types.insert(output.clone(), elem_type).is_none(),
                "graph '{graph_name}': '{output}' is defined twice"
            );
        }
    }
    for info in &graph.output {
        assert!(types.contains_key(info.name()), "graph '{graph_name}': output '{}' is never produced", info.name());
    }
    for info in graph.output.iter().chain(&graph.value_info) {
        if let (Some(declared), Some(&actual)) = (declared_elem_type(info), types.get(info.name())) {
            assert_eq!(
                declared,
                actual,
                "graph '{graph_name}': '{}' is declared {declared} but holds {actual}",
                info.name()
            );
        }
    }
    types
}

pub(crate) fn check_tensor_size(tensor: &TensorProto) {
    let width = match tensor.data_type() {
        FLOAT => 4,
        FLOAT16 => 2,
        INT64 => 8,
        _ => return,
    };
    if let Some(raw) = &tensor.raw_data {
        let count: i64 = tensor.dims.iter().product();
        assert_eq!(
            raw.len(),
            count as usize * width,
            "tensor '{}' has the wrong byte length for its type",
            tensor.name()
        );
    }
}

/// Operators whose listed inputs must all have the same element type.
pub(crate) fn same_type_inputs(node: &NodeProto) -> Vec<usize> {
    match node.op_type() {
        "Add" | "Sub" | "Mul" | "Div" | "MatMul" | "Gemm" | "Sum" | "Max" | "Min" | "Concat" => {
            (0..node.input.len()).collect()
        }
        "Where" => vec![1, 2],
        "MaxUnpool" => vec![0],
        _ => Vec::new(),
    }
}

pub(crate) fn check_operands(node: &NodeProto, types: &Types) {
    let operand_types: Vec<(&str, i32)> = same_type_inputs(node)
        .into_iter()
        .filter_map(|i| node.input.get(i))
        .filter(|name| !name.is_empty())
        .map(|name| (name.as_str(), types[name]))
        .collect();
    assert!(
        operand_types.windows(2).all(|w| w[0].1 == w[1].1),
        "node '{}' ({}) mixes operand types {operand_types:?}",
        node.name(),
        node.op_type()
    );
    if node.op_type() == "MaxUnpool" {
        let indices = &node.input[1];
        assert_eq!(types[indices], INT64, "MaxUnpool indices '{indices}'");
    }
}

pub(crate) fn check_subgraphs(node: &NodeProto, types: &Types) {
    match node.op_type() {
        "If" => {
            let then_branch = subgraph(node, "then_branch");
            let else_branch = subgraph(node, "else_branch");
            check_graph(then_branch, types);
            check_graph(else_branch, types);
            assert_eq!(
                declared_types(&then_branch.output).into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
                declared_types(&else_branch.output).into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
                "If '{}': branch output types differ",
                node.name()
            );
        }
        "Loop" => {
            let body = subgraph(node, "body");
            check_graph(body, types);
            // Loop inputs (M, cond, v...) map onto body inputs (iter, cond, v...); body
            // outputs (cond, v..., scan...) carry v back.
            for (k, input) in node.input.iter().enumerate().skip(2) {
                let body_input = declared_elem_type(&body.input[k]);
                assert_eq!(
                    Some(types[input]),
                    body_input,
                    "Loop '{}': initial value '{input}' vs body input",
                    node.name()
                );
                assert_eq!(
                    declared_elem_type(&body.output[k - 1]),
                    body_input,
                    "Loop '{}': carried value {k} changes type",
                    node.name()
                );
            }
        }
        _ => {
            for attribute in &node.attribute {
                for graph in attribute.g.iter().chain(&attribute.graphs) {
                    check_graph(graph, types);
                }
            }
        }
    }
}

/// Output element types by operator (the rules the models below need).
pub(crate) fn output_types(node: &NodeProto, types: &Types) -> Vec<i32> {
    let count = node.output.len();
    let first_input = node.input.iter().find(|i| !i.is_empty()).map_or(0, |i| types[i]);
    let subgraph_outputs = |attribute: &str, skip: usize| -> Vec<i32> {
        subgraph(node, attribute).output.iter().skip(skip).map(|o| declared_elem_type(o).unwrap_or(0)).collect()
    };
    let elem_type = match node.op_type() {
        "Cast" => cast_to(node) as i32,
        "Constant" => match node.attribute.first().map(|a| a.name()) {
            Some("value") => tensor_of(node, "value").data_type(),
            Some("value_float" | "value_floats") => FLOAT,
            Some("value_int" | "value_ints") => INT64,
            _ => 0,
        },
        "ConstantOfShape" => node
            .attribute
            .iter()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.as_ref())
            .map_or(FLOAT, |t| t.data_type()),
        "CastLike" => types[&node.input[1]],
        "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" => INT64,
        "Equal" | "Less" | "Greater" | "Not" => BOOL,
        "If" => return subgraph_outputs("then_branch", 0),
        "Loop" => return subgraph_outputs("body", 1),
        "MaxPool" => return [first_input, INT64][..count].to_vec(),
        _ => first_input,
    };
    vec![elem_type; count]
}
