//! The element-type check every pass runs on its own output: a pass that leaves a node reading
//! float16 on one input and float on another, or feeds a custom operator a type it did not
//! have before, has a bug. The check turns that into an error naming the node, instead of a
//! model ONNX Runtime refuses to load (or, worse, loads and runs wrongly).
//!
//! Two rules, applied to the main graph and every subgraph:
//! - the inputs of a default-domain op that share one type parameter (see
//!   [`crate::types::SHARED_TYPE_INPUTS`]) have one element type;
//! - a node of another domain (com.microsoft and the rest) that existed before the pass reads
//!   and writes the element types it did before: the pass does not know its kernels' types.

use std::collections::HashMap;

use crate::onnx::{GraphProto, ModelProto, NodeProto};
use crate::types::{ElemTypes, infer_elem_types, shared_type_inputs};

/// What the check found wrong, with the node it found it at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("element types after {pass} are inconsistent at node '{node}' ({op}): {detail}")]
pub struct TypeCheckError {
    pub pass: String,
    pub node: String,
    pub op: String,
    pub detail: String,
}

/// The element types of a non-default-domain node's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForeignSignature {
    op: String,
    inputs: Vec<Option<i32>>,
    outputs: Vec<Option<i32>>,
}

/// The signatures of every non-default-domain node of a model, taken before a pass runs, keyed
/// by the node's first output (names survive passes; node names are optional).
#[derive(Debug, Clone, Default)]
pub struct ForeignSignatures {
    by_output: HashMap<String, ForeignSignature>,
}

impl ForeignSignatures {
    /// Records the signatures of `model`'s non-default-domain nodes, subgraphs included.
    pub fn of(model: &ModelProto) -> Self {
        let mut signatures = Self::default();
        if let Some(graph) = &model.graph {
            walk(graph, &ElemTypes::new(), &mut |node, types| {
                if is_foreign(node)
                    && let Some(first) = node.output.first().filter(|o| !o.is_empty())
                {
                    signatures.by_output.insert(first.clone(), signature(node, types));
                }
            });
        }
        signatures
    }
}

fn is_foreign(node: &NodeProto) -> bool {
    let domain = node.domain();
    !(domain.is_empty() || domain == "ai.onnx")
}

fn signature(node: &NodeProto, types: &ElemTypes) -> ForeignSignature {
    let of = |names: &[String]| names.iter().map(|n| if n.is_empty() { None } else { types.get(n).copied() }).collect();
    ForeignSignature { op: node.op_type().to_owned(), inputs: of(&node.input), outputs: of(&node.output) }
}

/// Calls `visit` on every node of `graph` and its subgraphs with the element types in scope.
fn walk(graph: &GraphProto, outer: &ElemTypes, visit: &mut dyn FnMut(&NodeProto, &ElemTypes)) {
    let types = infer_elem_types(graph, outer);
    for node in &graph.node {
        visit(node, &types);
        for attribute in &node.attribute {
            for subgraph in attribute.g.iter().chain(&attribute.graphs) {
                walk(subgraph, &types, visit);
            }
        }
    }
}

/// ONNX's name of an element type, for messages.
fn type_name(elem_type: Option<i32>) -> String {
    let name = match elem_type {
        None => return "unknown".to_owned(),
        Some(1) => "float",
        Some(2) => "uint8",
        Some(3) => "int8",
        Some(6) => "int32",
        Some(7) => "int64",
        Some(9) => "bool",
        Some(10) => "float16",
        Some(11) => "double",
        Some(16) => "bfloat16",
        Some(other) => return format!("type {other}"),
    };
    name.to_owned()
}

/// Checks `model` after `pass` against the rules above; `before` holds the foreign-node
/// signatures taken before the pass ran.
pub fn check_types(pass: &str, model: &ModelProto, before: &ForeignSignatures) -> Result<(), TypeCheckError> {
    let Some(graph) = &model.graph else {
        return Ok(());
    };
    let mut found: Option<TypeCheckError> = None;
    walk(graph, &ElemTypes::new(), &mut |node, types| {
        if found.is_none() {
            found = check_node(node, types, before).map(|detail| TypeCheckError {
                pass: pass.to_owned(),
                node: node.name().to_owned(),
                op: node.op_type().to_owned(),
                detail,
            });
        }
    });
    found.map_or(Ok(()), Err)
}

/// What is wrong with one node's types, if anything.
fn check_node(node: &NodeProto, types: &ElemTypes, before: &ForeignSignatures) -> Option<String> {
    if is_foreign(node) {
        let previous = node.output.first().and_then(|o| before.by_output.get(o))?;
        let now = signature(node, types);
        if previous.op != now.op {
            return None;
        }
        let changed = |was: &[Option<i32>], is: &[Option<i32>], side: &str, names: &[String]| {
            was.iter().zip(is).zip(names).find(|((w, i), _)| w.is_some() && i.is_some() && w != i).map(
                |((w, i), name)| {
                    format!("{side} '{name}' was {} before the pass and is {} now", type_name(*w), type_name(*i))
                },
            )
        };
        return changed(&previous.inputs, &now.inputs, "input", &node.input)
            .or_else(|| changed(&previous.outputs, &now.outputs, "output", &node.output));
    }
    let shared = shared_type_inputs(node)?;
    let known: Vec<(&str, i32)> = shared.iter().filter_map(|n| types.get(*n).map(|t| (*n, *t))).collect();
    let (first_name, first_type) = *known.first()?;
    known.iter().find(|(_, t)| *t != first_type).map(|(name, t)| {
        format!(
            "inputs share one type but '{first_name}' is {} and '{name}' is {}",
            type_name(Some(first_type)),
            type_name(Some(*t))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{TensorProto, ValueInfoProto};
    use crate::test_support::{node, typed_value};

    fn model_with(nodes: Vec<NodeProto>, inputs: Vec<ValueInfoProto>, initializer: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto { node: nodes, input: inputs, initializer, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn mixed_float_and_float16_inputs_of_add_are_reported_with_names() {
        let half = TensorProto { name: Some("h".into()), data_type: Some(10), dims: vec![1], ..Default::default() };
        let model = model_with(vec![node("add", "Add", &["x", "h"], &["y"])], vec![typed_value("x", 1)], vec![half]);
        let error = check_types("fp16", &model, &ForeignSignatures::default()).unwrap_err();
        assert_eq!(error.node, "add");
        assert!(error.to_string().contains("'x' is float and 'h' is float16"), "{error}");
    }

    #[test]
    fn index_inputs_do_not_take_part() {
        let axes = TensorProto { name: Some("axes".into()), data_type: Some(7), dims: vec![1], ..Default::default() };
        let model =
            model_with(vec![node("u", "Unsqueeze", &["x", "axes"], &["y"])], vec![typed_value("x", 1)], vec![axes]);
        assert_eq!(check_types("fp16", &model, &ForeignSignatures::default()), Ok(()));
    }

    #[test]
    fn a_custom_op_fed_another_type_than_before_is_reported() {
        let mut custom = node("lstm", "DynamicQuantizeLSTM", &["x"], &["y"]);
        custom.domain = Some("com.microsoft".into());
        let before = model_with(vec![custom.clone()], vec![typed_value("x", 1)], vec![]);
        let signatures = ForeignSignatures::of(&before);
        let mut cast = node("to_half", "Cast", &["x"], &["x16"]);
        cast.attribute.push(crate::onnx::AttributeProto {
            name: Some("to".into()),
            r#type: Some(2),
            i: Some(10),
            ..Default::default()
        });
        custom.input = vec!["x16".into()];
        let after = model_with(vec![cast, custom], vec![typed_value("x", 1)], vec![]);
        let error = check_types("fp16", &after, &signatures).unwrap_err();
        assert!(error.to_string().contains("input 'x16' was float before the pass and is float16 now"), "{error}");
    }
}
