//! Building graphs: nodes, attributes, tensors, declared values and a `Graph` builder.

use mantissa_quantize::elem::{FLOAT, INT64};
use mantissa_quantize::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    type_proto,
};
use mantissa_quantize::passes::fp16::Fp16Options;

/// `AttributeProto.AttributeType` numbers.
pub(crate) const ATTR_INT: i32 = 2;
pub(crate) const ATTR_TENSOR: i32 = 4;
pub(crate) const ATTR_GRAPH: i32 = 5;

pub(crate) fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.to_owned()),
        op_type: Some(op.to_owned()),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

pub(crate) fn with_attribute(mut node: NodeProto, attribute: AttributeProto) -> NodeProto {
    node.attribute.push(attribute);
    node
}

pub(crate) fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_INT), i: Some(value), ..Default::default() }
}

pub(crate) fn tensor_attribute(name: &str, tensor: TensorProto) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_TENSOR), t: Some(tensor), ..Default::default() }
}

pub(crate) fn graph_attribute(name: &str, graph: GraphProto) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_GRAPH), g: Some(graph), ..Default::default() }
}

pub(crate) fn cast(name: &str, input: &str, output: &str, to: i32) -> NodeProto {
    with_attribute(node(name, "Cast", &[input], &[output]), int_attribute("to", i64::from(to)))
}

pub(crate) fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(FLOAT),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub(crate) fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(INT64),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A 2x2 FLOAT weight.
pub(crate) fn weight(name: &str) -> TensorProto {
    float_tensor(name, &[2, 2], &[0.5, -1.0, 2.0, 0.25])
}

pub(crate) fn value(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem_type), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds a `GraphProto` one declaration at a time.
pub(crate) struct Graph(pub(crate) GraphProto);

impl Graph {
    pub(crate) fn new(name: &str) -> Self {
        Graph(GraphProto { name: Some(name.to_owned()), ..Default::default() })
    }

    pub(crate) fn input(mut self, name: &str, elem_type: i32) -> Self {
        self.0.input.push(value(name, elem_type));
        self
    }

    pub(crate) fn output(mut self, name: &str, elem_type: i32) -> Self {
        self.0.output.push(value(name, elem_type));
        self
    }

    pub(crate) fn value_info(mut self, name: &str, elem_type: i32) -> Self {
        self.0.value_info.push(value(name, elem_type));
        self
    }

    pub(crate) fn initializer(mut self, tensor: TensorProto) -> Self {
        self.0.initializer.push(tensor);
        self
    }

    pub(crate) fn node(mut self, node: NodeProto) -> Self {
        self.0.node.push(node);
        self
    }

    pub(crate) fn build(self) -> GraphProto {
        self.0
    }

    pub(crate) fn model(self) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(self.0),
            ..Default::default()
        }
    }
}

/// x -> MatMul(w1) -> Relu -> MatMul(w2) -> Softmax -> MatMul(w3) -> y, with the Relu output
/// `r` exposed as a second model output.
pub(crate) fn chain() -> Graph {
    Graph::new("chain")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .output("r", FLOAT)
        .initializer(weight("w1"))
        .initializer(weight("w2"))
        .initializer(weight("w3"))
        .node(node("mm1", "MatMul", &["x", "w1"], &["a"]))
        .node(node("relu", "Relu", &["a"], &["r"]))
        .node(node("mm2", "MatMul", &["r", "w2"], &["m"]))
        .node(node("softmax", "Softmax", &["m"], &["s"]))
        .node(node("mm3", "MatMul", &["s", "w3"], &["y"]))
}

pub(crate) fn no_first_last() -> Fp16Options {
    Fp16Options { keep_first_and_last_layers: false, ..Default::default() }
}
