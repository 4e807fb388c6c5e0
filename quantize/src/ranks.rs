//! Rank inference: the number of dimensions of the values of a graph, from declared shapes
//! (inputs, value_info, outputs), initializers and per-operator rules for common ops. Passes
//! use it where ONNX Runtime treats ranks differently (it fuses MatMul + Add into Gemm only for
//! 2-D inputs). A value whose rank no rule determines is absent.

use std::collections::HashMap;

use crate::onnx::{GraphProto, NodeProto, ValueInfoProto, type_proto};
use crate::types::attribute;

/// Value name -> rank.
pub type Ranks = HashMap<String, usize>;

fn declared_rank(info: &ValueInfoProto) -> Option<usize> {
    match info.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(tensor) => tensor.shape.as_ref().map(|shape| shape.dim.len()),
        _ => None,
    }
}

/// Ops whose outputs have their first input's rank.
const SAME_RANK: &[&str] = &[
    "Abs",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Ceil",
    "Clip",
    "Concat",
    "Conv",
    "ConvTranspose",
    "CumSum",
    "DequantizeLinear",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LRN",
    "MaxPool",
    "Mish",
    "Neg",
    "Not",
    "Pad",
    "QuantizeLinear",
    "Reciprocal",
    "Relu",
    "Resize",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Sin",
    "Cos",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Tanh",
    "Tile",
    "Transpose",
];
/// Elementwise ops with broadcasting: the largest input rank.
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "Pow",
    "PRelu",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

/// Ranks of every value of `graph` that declared shapes and the operator rules determine.
pub fn infer_ranks(graph: &GraphProto) -> Ranks {
    let mut ranks = Ranks::new();
    for info in graph.input.iter().chain(&graph.value_info).chain(&graph.output) {
        if let Some(rank) = declared_rank(info) {
            ranks.insert(info.name().to_owned(), rank);
        }
    }
    let mut lengths: HashMap<&str, usize> = HashMap::new();
    for tensor in &graph.initializer {
        ranks.insert(tensor.name().to_owned(), tensor.dims.len());
        if tensor.dims.len() == 1 {
            lengths.insert(tensor.name(), tensor.dims[0] as usize);
        }
    }
    // Two sweeps cover graphs whose nodes are not stored in topological order.
    for _ in 0..2 {
        for node in &graph.node {
            if let Some(rank) = output_rank(node, &ranks, &lengths) {
                for output in node.output.iter().filter(|o| !o.is_empty()) {
                    ranks.entry(output.clone()).or_insert(rank);
                }
            }
        }
    }
    ranks
}

fn output_rank(node: &NodeProto, ranks: &Ranks, lengths: &HashMap<&str, usize>) -> Option<usize> {
    if !node.domain().is_empty() && node.domain() != "ai.onnx" {
        return None;
    }
    let input = |index: usize| node.input.get(index).filter(|n| !n.is_empty()).and_then(|n| ranks.get(n)).copied();
    let length = |index: usize| node.input.get(index).and_then(|n| lengths.get(n.as_str())).copied();
    let axes = || attribute(node, "axes").map(|a| a.ints.len()).or_else(|| length(1));
    let op = node.op_type();
    if SAME_RANK.contains(&op) {
        return input(0);
    }
    if BROADCAST.contains(&op) {
        let known: Vec<usize> = (0..node.input.len()).map(input).collect::<Option<_>>()?;
        return known.into_iter().max();
    }
    match op {
        "MatMul" => match (input(0)?, input(1)?) {
            (1, 1) => Some(0),
            (1, b) => Some(b - 1),
            (a, 1) => Some(a - 1),
            (a, b) => Some(a.max(b)),
        },
        "Gemm" | "Flatten" => Some(2),
        "Shape" | "Range" | "NonZero" => Some(1),
        "Size" => Some(0),
        "Reshape" => length(1),
        "Expand" => Some(input(0)?.max(length(1)?)),
        "Gather" => Some(input(0)? + input(1)? - 1),
        "Unsqueeze" => Some(input(0)? + axes()?),
        "Squeeze" => input(0)?.checked_sub(axes()?),
        op if op.starts_with("Reduce") => {
            let keep = attribute(node, "keepdims").and_then(|a| a.i).unwrap_or(1) != 0;
            if keep {
                input(0)
            } else {
                match axes() {
                    Some(axes) => input(0)?.checked_sub(axes),
                    None => Some(0),
                }
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{TensorProto, TensorShapeProto, TypeProto, tensor_shape_proto};

    fn value(name: &str, rank: usize) -> ValueInfoProto {
        let dim = vec![tensor_shape_proto::Dimension::default(); rank];
        ValueInfoProto {
            name: Some(name.to_owned()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.to_owned()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_owned()],
            ..Default::default()
        }
    }

    fn initializer(name: &str, dims: &[i64]) -> TensorProto {
        TensorProto { name: Some(name.to_owned()), dims: dims.to_vec(), data_type: Some(1), ..Default::default() }
    }

    #[test]
    fn ranks_follow_matmul_reshape_gather_and_broadcasting() {
        let graph = GraphProto {
            input: vec![value("tokens", 2), value("x", 2)],
            initializer: vec![
                initializer("table", &[100, 16]),
                initializer("w", &[16, 16]),
                initializer("b", &[16]),
                initializer("shape", &[2]),
            ],
            node: vec![
                node("Gather", &["table", "tokens"], "embedded"),
                node("MatMul", &["embedded", "w"], "projected"),
                node("Add", &["projected", "b"], "biased"),
                node("MatMul", &["x", "w"], "x_projected"),
                node("Relu", &["x_projected"], "x_relu"),
                node("Reshape", &["biased", "shape"], "flat"),
                node("Mystery", &["flat"], "unknown"),
            ],
            ..Default::default()
        };
        let ranks = infer_ranks(&graph);
        assert_eq!(ranks["embedded"], 3);
        assert_eq!(ranks["biased"], 3);
        assert_eq!(ranks["x_relu"], 2);
        assert_eq!(ranks["flat"], 2);
        assert!(!ranks.contains_key("unknown"));
    }
}
