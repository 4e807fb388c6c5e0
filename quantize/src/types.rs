//! Element-type inference: the ONNX element type of every value in a graph, from declared
//! types (inputs, initializers, value_info, outputs) and per-operator rules for the ops that
//! change types. Passes use it to tell float tensors from index and shape tensors.

use std::collections::HashMap;

use crate::elem;
use crate::onnx::type_proto;
use crate::onnx::{AttributeProto, GraphProto, NodeProto, ValueInfoProto};

/// Value name -> ONNX element type (`TensorProto.DataType`).
pub type ElemTypes = HashMap<String, i32>;

/// The element type a `ValueInfoProto` declares, if it is a tensor with a known type.
pub fn declared_elem_type(info: &ValueInfoProto) -> Option<i32> {
    match info.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(tensor) => tensor.elem_type.filter(|&t| t != 0),
        _ => None,
    }
}

/// The attribute of `node` named `name`, if the node sets it.
pub fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|attribute| attribute.name() == name)
}

/// An integer attribute of `node`, or `default` (the operator's default) when not set.
pub(crate) fn int_attribute_or(node: &NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).and_then(|a| a.i).unwrap_or(default)
}

/// A float attribute of `node`, or `default` (the operator's default) when not set.
pub(crate) fn float_attribute_or(node: &NodeProto, name: &str, default: f32) -> f32 {
    attribute(node, name).and_then(|a| a.f).unwrap_or(default)
}

fn attribute_int(node: &NodeProto, name: &str) -> Option<i64> {
    attribute(node, name).and_then(|a| a.i)
}

/// Whether `name` is a FLOAT (FP32) value: the values the precision passes rewrite.
pub(crate) fn is_float(types: &ElemTypes, name: &str) -> bool {
    !name.is_empty() && types.get(name) == Some(&elem::FLOAT)
}

/// Infers element types for `graph`, seeded with the types of outer-scope values.
pub fn infer_elem_types(graph: &GraphProto, outer: &ElemTypes) -> ElemTypes {
    let mut types = outer.clone();
    for info in graph.input.iter().chain(&graph.value_info).chain(&graph.output) {
        if let Some(elem_type) = declared_elem_type(info) {
            types.insert(info.name().to_owned(), elem_type);
        }
    }
    for tensor in &graph.initializer {
        types.insert(tensor.name().to_owned(), tensor.data_type());
    }
    // Two sweeps cover graphs whose nodes are not stored in topological order.
    for _ in 0..2 {
        for node in &graph.node {
            let outputs = node_output_types(node, &types);
            for (name, elem_type) in node.output.iter().zip(outputs) {
                if let (false, Some(elem_type)) = (name.is_empty(), elem_type) {
                    types.entry(name.clone()).or_insert(elem_type);
                }
            }
        }
    }
    types
}

fn input_type(node: &NodeProto, index: usize, types: &ElemTypes) -> Option<i32> {
    node.input.get(index).filter(|name| !name.is_empty()).and_then(|name| types.get(name)).copied()
}

/// The element types a control-flow node's outputs take from its subgraph's outputs (after
/// skipping `skip` loop-carried condition outputs). Exporters often leave subgraph outputs
/// undeclared; those are inferred inside the subgraph, which sees the enclosing `types`.
fn subgraph_output_types(node: &NodeProto, attribute_name: &str, skip: usize, types: &ElemTypes) -> Vec<Option<i32>> {
    let Some(graph) = attribute(node, attribute_name).and_then(|a| a.g.as_ref()) else {
        return Vec::new();
    };
    let declared: Vec<Option<i32>> = graph.output.iter().skip(skip).map(declared_elem_type).collect();
    if declared.iter().all(Option::is_some) {
        return declared;
    }
    let inner = infer_elem_types(graph, types);
    graph.output.iter().skip(skip).zip(declared).map(|(o, d)| d.or_else(|| inner.get(o.name()).copied())).collect()
}

/// Ops whose listed inputs share one type parameter with the first output (all inputs when
/// the list is empty). Elsewhere an op's first output follows its first input only: the later
/// inputs of Reshape, Unsqueeze, Slice, Gather, Expand, Tile and the like are int64 indices
/// or shapes, and taking their type would call a float tensor int64.
pub(crate) const SHARED_TYPE_INPUTS: &[(&str, &[usize])] = &[
    ("Add", &[]),
    ("Sub", &[]),
    ("Mul", &[]),
    ("Div", &[]),
    ("Max", &[]),
    ("Min", &[]),
    ("Sum", &[]),
    ("Mean", &[]),
    ("Mod", &[]),
    ("Concat", &[]),
    ("MatMul", &[]),
    ("Gemm", &[]),
    ("PRelu", &[]),
    ("Einsum", &[]),
    ("Clip", &[]),
    ("Range", &[]),
    ("Conv", &[]),
    ("ConvTranspose", &[]),
    ("InstanceNormalization", &[]),
    ("LayerNormalization", &[0, 1, 2]),
    ("Where", &[1, 2]),
    ("Pad", &[0, 2]),
    ("ScatterND", &[0, 2]),
    ("ScatterElements", &[0, 2]),
    ("LSTM", &[0, 1, 2, 3, 5, 6, 7]),
    ("GRU", &[0, 1, 2, 3, 5]),
    ("RNN", &[0, 1, 2, 3, 5]),
];

/// The inputs of a default-domain `op` that share the type of its first output, if it has such a rule.
pub(crate) fn shared_type_inputs(node: &NodeProto) -> Option<Vec<&str>> {
    let domain = node.domain();
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    let (_, positions) = SHARED_TYPE_INPUTS.iter().find(|(op, _)| *op == node.op_type())?;
    let named = |position: usize| node.input.get(position).map(String::as_str).filter(|n| !n.is_empty());
    Some(if positions.is_empty() {
        node.input.iter().map(String::as_str).filter(|n| !n.is_empty()).collect()
    } else {
        positions.iter().filter_map(|&p| named(p)).collect()
    })
}

/// Output element types of one node, by operator rule. `None` where unknown.
pub fn node_output_types(node: &NodeProto, types: &ElemTypes) -> Vec<Option<i32>> {
    let count = node.output.len();
    let all = |elem_type: Option<i32>| vec![elem_type; count];
    let first_known = || match shared_type_inputs(node) {
        Some(shared) => shared.iter().find_map(|n| types.get(*n)).copied(),
        None => input_type(node, 0, types),
    };
    let domain = node.domain();
    if !(domain.is_empty() || domain == "ai.onnx" || domain == "com.microsoft") {
        return all(None);
    }
    match node.op_type() {
        "Cast" => all(attribute_int(node, "to").map(|t| t as i32)),
        "CastLike" => all(input_type(node, 1, types)),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" | "NonMaxSuppression" => all(Some(elem::INT64)),
        "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "Not" | "And" | "Or" | "Xor" | "IsNaN"
        | "IsInf" => all(Some(elem::BOOL)),
        "TopK" => vec![input_type(node, 0, types), Some(elem::INT64)],
        "Unique" => {
            let mut out = all(Some(elem::INT64));
            if let Some(first) = out.first_mut() {
                *first = input_type(node, 0, types);
            }
            out
        }
        "Constant" => all(constant_type(node)),
        "ConstantOfShape" => {
            all(Some(attribute(node, "value").and_then(|a| a.t.as_ref()).map_or(elem::FLOAT, |t| t.data_type())))
        }
        "RandomNormal" | "RandomUniform" => all(Some(attribute_int(node, "dtype").map_or(elem::FLOAT, |t| t as i32))),
        "EyeLike" | "RandomNormalLike" | "RandomUniformLike" | "Bernoulli" => {
            all(attribute_int(node, "dtype").map(|t| t as i32).or_else(|| input_type(node, 0, types)))
        }
        "Multinomial" => all(Some(attribute_int(node, "dtype").map_or(elem::INT32, |t| t as i32))),
        "QuantizeLinear" => all(input_type(node, 2, types).or(Some(elem::UINT8))),
        "DequantizeLinear" => all(input_type(node, 1, types).or(Some(elem::FLOAT))),
        "DynamicQuantizeLinear" => vec![Some(elem::UINT8), Some(elem::FLOAT), Some(elem::UINT8)],
        "MatMulInteger" | "ConvInteger" => all(Some(elem::INT32)),
        // com.microsoft: integer inputs, output of the scales' float type.
        "MatMulIntegerToFloat" => all(input_type(node, 2, types).or(Some(elem::FLOAT))),
        "QLinearConv" => all(input_type(node, 7, types).or(Some(elem::UINT8))),
        "QLinearMatMul" => all(input_type(node, 7, types).or(Some(elem::UINT8))),
        "Where" => all(first_known()),
        "OneHot" => all(input_type(node, 2, types)),
        "If" => subgraph_output_types(node, "then_branch", 0, types),
        "Loop" => subgraph_output_types(node, "body", 1, types),
        "Scan" => subgraph_output_types(node, "body", 0, types),
        // Every output has the data's type.
        "Split" | "LSTM" | "GRU" | "RNN" | "BatchNormalization" | "LayerNormalization" => all(first_known()),
        "MaxPool" => vec![first_known(), Some(elem::INT64)],
        "Dropout" => vec![first_known(), Some(elem::BOOL)],
        // Elsewhere only the first output is known to follow the inputs; extra outputs of an
        // op without a rule stay unknown rather than guessed.
        _ => {
            let mut out = vec![None; count];
            if let Some(first) = out.first_mut() {
                *first = first_known();
            }
            out
        }
    }
}

fn constant_type(node: &NodeProto) -> Option<i32> {
    let attribute = node.attribute.first()?;
    Some(match attribute.name() {
        "value" => attribute.t.as_ref()?.data_type(),
        "value_float" | "value_floats" => elem::FLOAT,
        "value_int" | "value_ints" => elem::INT64,
        "value_string" | "value_strings" => elem::STRING,
        _ => return None,
    })
}
