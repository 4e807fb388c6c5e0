//! Rules of the FP32 -> FP16 pass, checked on small hand-built graphs: which nodes are
//! converted or kept in FP32 (and why), where Casts go, what happens to initializers,
//! constants, declared types and control-flow subgraphs.
//!
//! Every converted graph also goes through `check_graph`, which fails the test when a node
//! reads a value before it is produced, when operands that must share a type do not, or when
//! a declared type (graph input/output, value_info, subgraph input/output) disagrees with the
//! value it describes. This is pure graph rewriting: numerical checks live elsewhere.

use std::collections::HashMap;

use half::f16;
use mantissa_quantize::elem::{BOOL, FLOAT, FLOAT16, INT64};
use mantissa_quantize::fp16::{Fp16Error, Fp16Options, Fp16Report, KeepReason, convert_to_fp16};
use mantissa_quantize::graph::GraphError;
use mantissa_quantize::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
    type_proto,
};
use mantissa_quantize::types::declared_elem_type;

// ---------------------------------------------------------------------------------------------
// Building graphs
// ---------------------------------------------------------------------------------------------

/// `AttributeProto.AttributeType` numbers.
const ATTR_INT: i32 = 2;
const ATTR_TENSOR: i32 = 4;
const ATTR_GRAPH: i32 = 5;

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.to_owned()),
        op_type: Some(op.to_owned()),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn with_attribute(mut node: NodeProto, attribute: AttributeProto) -> NodeProto {
    node.attribute.push(attribute);
    node
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_INT), i: Some(value), ..Default::default() }
}

fn tensor_attribute(name: &str, tensor: TensorProto) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_TENSOR), t: Some(tensor), ..Default::default() }
}

fn graph_attribute(name: &str, graph: GraphProto) -> AttributeProto {
    AttributeProto { name: Some(name.to_owned()), r#type: Some(ATTR_GRAPH), g: Some(graph), ..Default::default() }
}

fn cast(name: &str, input: &str, output: &str, to: i32) -> NodeProto {
    with_attribute(node(name, "Cast", &[input], &[output]), int_attribute("to", i64::from(to)))
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(FLOAT),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(INT64),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A 2x2 FLOAT weight.
fn weight(name: &str) -> TensorProto {
    float_tensor(name, &[2, 2], &[0.5, -1.0, 2.0, 0.25])
}

fn value(name: &str, elem_type: i32) -> ValueInfoProto {
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
struct Graph(GraphProto);

impl Graph {
    fn new(name: &str) -> Self {
        Graph(GraphProto { name: Some(name.to_owned()), ..Default::default() })
    }

    fn input(mut self, name: &str, elem_type: i32) -> Self {
        self.0.input.push(value(name, elem_type));
        self
    }

    fn output(mut self, name: &str, elem_type: i32) -> Self {
        self.0.output.push(value(name, elem_type));
        self
    }

    fn value_info(mut self, name: &str, elem_type: i32) -> Self {
        self.0.value_info.push(value(name, elem_type));
        self
    }

    fn initializer(mut self, tensor: TensorProto) -> Self {
        self.0.initializer.push(tensor);
        self
    }

    fn node(mut self, node: NodeProto) -> Self {
        self.0.node.push(node);
        self
    }

    fn build(self) -> GraphProto {
        self.0
    }

    fn model(self) -> ModelProto {
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
fn chain() -> Graph {
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

fn no_first_last() -> Fp16Options {
    Fp16Options { keep_first_and_last_layers: false, ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// Running the pass and inspecting the result
// ---------------------------------------------------------------------------------------------

/// A converted model with the report and the element type of every value of its main graph.
struct Converted {
    graph: GraphProto,
    report: Fp16Report,
    types: Types,
}

/// Runs the pass and checks the result is well formed.
fn convert(graph: Graph, options: &Fp16Options) -> Converted {
    let mut model = graph.model();
    let report = convert_to_fp16(&mut model, options).expect("conversion succeeds");
    let graph = model.graph.expect("graph kept");
    let types = check_graph(&graph, &Types::new());
    Converted { graph, report, types }
}

fn convert_error(graph: Graph, options: &Fp16Options) -> Fp16Error {
    convert_to_fp16(&mut graph.model(), options).expect_err("conversion fails")
}

impl Converted {
    fn node(&self, name: &str) -> &NodeProto {
        find_node(&self.graph, name)
    }

    fn position(&self, name: &str) -> usize {
        self.graph.node.iter().position(|n| n.name() == name).unwrap_or_else(|| panic!("no node '{name}'"))
    }

    fn kept(&self, name: &str) -> Option<&KeepReason> {
        self.report.nodes_kept.iter().find(|(node, _, _)| node == name).map(|(_, _, reason)| reason)
    }

    fn initializer(&self, name: &str) -> &TensorProto {
        find_initializer(&self.graph, name)
    }

    /// The element type of every float-typed input and output of a node.
    fn float_types(&self, name: &str) -> Vec<i32> {
        float_types(self.node(name), &self.types)
    }

    /// Asserts the node was converted: not reported kept, float inputs and outputs FP16.
    fn assert_converted(&self, name: &str) {
        assert_eq!(self.kept(name), None, "node '{name}' should be converted");
        let types = self.float_types(name);
        assert!(
            !types.is_empty() && types.iter().all(|&t| t == FLOAT16),
            "node '{name}' should read and write FP16, types {types:?}"
        );
    }

    /// Asserts the node stayed FP32 for `reason`: float inputs and outputs FLOAT.
    fn assert_kept(&self, name: &str, reason: KeepReason) {
        assert_eq!(self.kept(name), Some(&reason), "node '{name}'");
        let types = self.float_types(name);
        assert!(
            !types.is_empty() && types.iter().all(|&t| t == FLOAT),
            "node '{name}' should read and write FLOAT, types {types:?}"
        );
    }

    fn casts(&self) -> Vec<&NodeProto> {
        casts(&self.graph)
    }

    /// Every Cast as (what it reads: producer node, or the value when no node produces it, `to`).
    fn cast_sources(&self) -> Vec<(String, i64)> {
        cast_sources(&self.graph)
    }
}

fn find_node<'g>(graph: &'g GraphProto, name: &str) -> &'g NodeProto {
    graph
        .node
        .iter()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node '{name}' in graph '{}'", graph.name()))
}

fn find_initializer<'g>(graph: &'g GraphProto, name: &str) -> &'g TensorProto {
    graph
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer '{name}' in graph '{}'", graph.name()))
}

fn subgraph<'n>(node: &'n NodeProto, attribute: &str) -> &'n GraphProto {
    node.attribute
        .iter()
        .find(|a| a.name() == attribute)
        .and_then(|a| a.g.as_ref())
        .unwrap_or_else(|| panic!("node '{}' has no graph '{attribute}'", node.name()))
}

fn tensor_of<'n>(node: &'n NodeProto, attribute: &str) -> &'n TensorProto {
    node.attribute
        .iter()
        .find(|a| a.name() == attribute)
        .and_then(|a| a.t.as_ref())
        .unwrap_or_else(|| panic!("node '{}' has no tensor '{attribute}'", node.name()))
}

fn cast_to(node: &NodeProto) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name() == "to")
        .and_then(|a| a.i)
        .unwrap_or_else(|| panic!("Cast '{}' has no 'to'", node.name()))
}

fn casts(graph: &GraphProto) -> Vec<&NodeProto> {
    graph.node.iter().filter(|n| n.op_type() == "Cast").collect()
}

fn cast_sources(graph: &GraphProto) -> Vec<(String, i64)> {
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

fn declared_types(infos: &[ValueInfoProto]) -> Vec<(String, Option<i32>)> {
    infos.iter().map(|info| (info.name().to_owned(), declared_elem_type(info))).collect()
}

fn declared(graph: &GraphProto, name: &str) -> Option<i32> {
    graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
        .find(|info| info.name() == name)
        .and_then(declared_elem_type)
}

fn f16_values(tensor: &TensorProto) -> Vec<f32> {
    assert_eq!(tensor.data_type(), FLOAT16, "tensor '{}'", tensor.name());
    tensor.raw_data().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn float_types(node: &NodeProto, types: &Types) -> Vec<i32> {
    node.input
        .iter()
        .chain(&node.output)
        .filter_map(|name| types.get(name).copied())
        .filter(|&t| t == FLOAT || t == FLOAT16)
        .collect()
}

/// Asserts each inserted Cast sits right before its first consumer: only Casts in between.
fn assert_casts_precede_first_consumer(graph: &GraphProto) {
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

// ---------------------------------------------------------------------------------------------
// Well-formedness: order, operand types, declared types
// ---------------------------------------------------------------------------------------------

/// Value name -> element type (0 where this checker cannot tell).
type Types = HashMap<String, i32>;

/// Checks `graph` (and, recursively, its subgraphs) and returns the element type of each of
/// its values. `outer` holds the values of enclosing scopes.
fn check_graph(graph: &GraphProto, outer: &Types) -> Types {
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

fn check_tensor_size(tensor: &TensorProto) {
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
fn same_type_inputs(node: &NodeProto) -> Vec<usize> {
    match node.op_type() {
        "Add" | "Sub" | "Mul" | "Div" | "MatMul" | "Gemm" | "Sum" | "Max" | "Min" | "Concat" => {
            (0..node.input.len()).collect()
        }
        "Where" => vec![1, 2],
        "MaxUnpool" => vec![0],
        _ => Vec::new(),
    }
}

fn check_operands(node: &NodeProto, types: &Types) {
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

fn check_subgraphs(node: &NodeProto, types: &Types) {
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
fn output_types(node: &NodeProto, types: &Types) -> Vec<i32> {
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

// ---------------------------------------------------------------------------------------------
// 1. A MatMul -> Relu -> MatMul -> Softmax -> MatMul chain
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 2-3. Initializers: shared copies, clamping
// ---------------------------------------------------------------------------------------------

#[test]
fn initializer_shared_by_converted_and_kept_nodes_gets_an_fp16_copy() {
    let graph = Graph::new("shared")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("add", "Add", &["x", "b"], &["a"]))
        .node(node("keep_sub", "Sub", &["a", "b"], &["y"]));
    let options = Fp16Options { node_block_list: vec!["keep_sub".to_owned()], ..Default::default() };
    let converted = convert(graph, &options);

    converted.assert_converted("add");
    converted.assert_kept("keep_sub", KeepReason::NodeBlockList("keep_sub".to_owned()));
    assert_eq!(converted.initializer("b").data_type(), FLOAT);
    assert_eq!(converted.report.initializer_copies, 1);
    assert_eq!(converted.report.initializers_converted, 0);
    assert_eq!(converted.graph.initializer.len(), 2);

    let copy_name = &converted.node("add").input[1];
    assert_ne!(copy_name, "b");
    let copy = converted.initializer(copy_name);
    assert_eq!(f16_values(copy), vec![1.0, 2.0]);
    assert_eq!(copy.dims, vec![2]);
    assert_eq!(converted.node("keep_sub").input[1], "b");
}

#[test]
fn out_of_range_initializer_values_are_clamped_and_counted() {
    let graph = Graph::new("clamp")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("big", &[4], &[1.0, 1e5, -7e4, 65504.0]))
        .node(node("add", "Add", &["x", "big"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    let big = converted.initializer("big");
    assert_eq!(f16_values(big), vec![1.0, 65504.0, -65504.0, 65504.0]);
    assert_eq!(converted.report.values_clamped, 2);
}

#[test]
fn out_of_range_values_in_an_fp16_copy_are_clamped_and_counted() {
    let graph = Graph::new("clamp_copy")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("big", &[2], &[-1e6, 3.0]))
        .node(node("add", "Add", &["x", "big"], &["a"]))
        .node(node("softmax", "Softmax", &["big"], &["s"]))
        .node(node("mul", "Mul", &["a", "s"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.report.initializer_copies, 1);
    let copy = converted.initializer(&converted.node("add").input[1]);
    assert_eq!(f16_values(copy), vec![-65504.0, 3.0]);
    assert_eq!(converted.initializer("big"), &float_tensor("big", &[2], &[-1e6, 3.0]));
    assert_eq!(converted.report.values_clamped, 1);
}

// ---------------------------------------------------------------------------------------------
// 4-5. Block lists
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 6. Casts across float and non-float types
// ---------------------------------------------------------------------------------------------

#[test]
fn cast_from_int64_to_float_stays_fp32_and_reaches_a_converted_add_through_a_cast() {
    let graph = Graph::new("int_cast")
        .input("ids", INT64)
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(cast("to_float", "ids", "f", FLOAT))
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(node("add", "Add", &["h", "f"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("to_float"), Some(&KeepReason::TypeBoundaryCast));
    assert_eq!(cast_to(converted.node("to_float")), i64::from(FLOAT));
    assert_eq!(converted.types["f"], FLOAT);
    converted.assert_converted("add");
    // The Add reads `f` through a Cast to FP16 (check_graph verified the operand types).
    let f_reader =
        converted.graph.node.iter().find(|n| n.name() != "add" && n.input.contains(&"f".to_owned())).unwrap();
    assert_eq!(f_reader.op_type(), "Cast");
    assert_eq!(cast_to(f_reader), i64::from(FLOAT16));
    assert_eq!(converted.node("add").input[1], f_reader.output[0]);
}

#[test]
fn cast_from_float_to_int64_reads_the_fp32_value() {
    let graph = Graph::new("float_to_int")
        .input("x", FLOAT)
        .output("ids", INT64)
        .node(node("relu", "Relu", &["x"], &["h"]))
        .node(cast("to_int", "h", "ids", INT64));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("to_int"), Some(&KeepReason::TypeBoundaryCast));
    converted.assert_converted("relu");
    let input = &converted.node("to_int").input[0];
    assert_eq!(converted.types[input], FLOAT);
}

// ---------------------------------------------------------------------------------------------
// 7. Constant and ConstantOfShape nodes
// ---------------------------------------------------------------------------------------------

#[test]
fn constant_read_by_a_converted_matmul_is_narrowed() {
    let graph = Graph::new("constant")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(node("w", "Constant", &[], &["w_out"]), tensor_attribute("value", weight(""))))
        .node(node("mm", "MatMul", &["x", "w_out"], &["y"]));
    let converted = convert(graph, &no_first_last());

    converted.assert_converted("mm");
    converted.assert_converted("w");
    let value = tensor_of(converted.node("w"), "value");
    assert_eq!(f16_values(value), vec![0.5, -1.0, 2.0, 0.25]);
    assert_eq!(converted.node("mm").input[1], "w_out");
}

#[test]
fn constant_value_float_read_by_a_converted_node_becomes_an_fp16_tensor() {
    let graph = Graph::new("value_float")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("two", "Constant", &[], &["two_out"]),
            AttributeProto {
                name: Some("value_float".to_owned()),
                r#type: Some(1),
                f: Some(2.0),
                ..Default::default()
            },
        ))
        .node(node("mul", "Mul", &["x", "two_out"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("mul");
    let value = tensor_of(converted.node("two"), "value");
    assert!(value.dims.is_empty());
    assert_eq!(f16_values(value), vec![2.0]);
}

#[test]
fn constant_read_by_a_kept_softmax_stays_float() {
    let graph = Graph::new("constant_fp32")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("logits", "Constant", &[], &["l"]),
            tensor_attribute("value", float_tensor("", &[2], &[1.0, 3.0])),
        ))
        .node(node("softmax", "Softmax", &["l"], &["p"]))
        .node(node("add", "Add", &["x", "p"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("logits", KeepReason::FeedsFp32);
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert_eq!(tensor_of(converted.node("logits"), "value").data_type(), FLOAT);
    converted.assert_converted("add");
}

#[test]
fn constant_shared_by_kept_and_converted_readers_stays_float_and_is_cast() {
    let graph = Graph::new("constant_shared")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(with_attribute(
            node("c", "Constant", &[], &["c_out"]),
            tensor_attribute("value", float_tensor("", &[2], &[1.0, 3.0])),
        ))
        .node(node("softmax", "Softmax", &["c_out"], &["p"]))
        .node(node("add", "Add", &["x", "c_out"], &["q"]))
        .node(node("mul", "Mul", &["p", "q"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("c", KeepReason::FeedsFp32);
    converted.assert_converted("add");
    let add_reads = &converted.node("add").input[1];
    assert_ne!(add_reads, "c_out");
    assert_eq!(converted.types[add_reads], FLOAT16);
}

#[test]
fn constant_of_shape_with_a_float_value_follows_its_converted_reader() {
    let graph = Graph::new("fill")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(with_attribute(
            node("fill", "ConstantOfShape", &["shape"], &["c"]),
            tensor_attribute("value", float_tensor("", &[1], &[0.5])),
        ))
        .node(node("add", "Add", &["x", "c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("add");
    assert_eq!(converted.kept("fill"), None);
    assert_eq!(f16_values(tensor_of(converted.node("fill"), "value")), vec![0.5]);
    assert_eq!(converted.types["c"], FLOAT16);
    assert_eq!(converted.initializer("shape").data_type(), INT64);
}

#[test]
fn constant_of_shape_without_value_gets_an_fp16_zero_when_converted() {
    let graph = Graph::new("zeros")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(node("zeros", "ConstantOfShape", &["shape"], &["c"]))
        .node(node("add", "Add", &["x", "c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_converted("add");
    assert_eq!(f16_values(tensor_of(converted.node("zeros"), "value")), vec![0.0]);
}

#[test]
fn constant_of_shape_read_by_a_kept_node_stays_float() {
    let graph = Graph::new("fill_fp32")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(int64_tensor("shape", &[1], &[2]))
        .node(with_attribute(
            node("fill", "ConstantOfShape", &["shape"], &["c"]),
            tensor_attribute("value", float_tensor("", &[1], &[0.5])),
        ))
        .node(node("softmax", "Softmax", &["c"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    converted.assert_kept("fill", KeepReason::FeedsFp32);
    assert_eq!(tensor_of(converted.node("fill"), "value").data_type(), FLOAT);
}

// ---------------------------------------------------------------------------------------------
// 8. Embeddings, attention probabilities, normalization subgraphs
// ---------------------------------------------------------------------------------------------

fn embedding() -> Graph {
    Graph::new("embedding")
        .input("ids", INT64)
        .output("y", FLOAT)
        .initializer(float_tensor("table", &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
        .node(node("gather", "Gather", &["table", "ids"], &["e"]))
        .node(node("relu", "Relu", &["e"], &["y"]))
}

#[test]
fn gather_on_a_float_initializer_is_kept_as_an_embedding() {
    let converted = convert(embedding(), &Fp16Options::default());

    converted.assert_kept("gather", KeepReason::Embedding);
    assert_eq!(converted.initializer("table").data_type(), FLOAT);
    assert_eq!(converted.node("gather").input[1], "ids");
    converted.assert_converted("relu");
}

#[test]
fn gather_on_a_float_initializer_is_converted_without_keep_embeddings() {
    let options = Fp16Options { keep_embeddings: false, ..Default::default() };
    let converted = convert(embedding(), &options);

    converted.assert_converted("gather");
    assert_eq!(converted.initializer("table").data_type(), FLOAT16);
    assert_eq!(converted.types["ids"], INT64);
}

/// q -> Softmax -> Transpose -> MatMul(., v) -> y, beside an unrelated MatMul(v, v).
fn attention() -> Graph {
    Graph::new("attention")
        .input("q", FLOAT)
        .input("v", FLOAT)
        .output("y", FLOAT)
        .output("z", FLOAT)
        .node(node("softmax", "Softmax", &["q"], &["p"]))
        .node(node("transpose", "Transpose", &["p"], &["pt"]))
        .node(node("probs_v", "MatMul", &["pt", "v"], &["y"]))
        .node(node("v_v", "MatMul", &["v", "v"], &["z"]))
}

#[test]
fn matmul_of_softmax_output_through_transpose_is_kept_as_attention_probabilities() {
    let converted = convert(attention(), &no_first_last());

    converted.assert_kept("probs_v", KeepReason::AttentionProbabilities);
    converted.assert_converted("v_v");
}

#[test]
fn attention_probabilities_reach_the_kept_matmul_without_an_fp16_round_trip() {
    // Softmax (FP32) -> Transpose -> MatMul (FP32): the Transpose is converted, so the
    // probabilities go through Cast to FP16 and Cast back to FLOAT before the kept MatMul.
    let converted = convert(attention(), &no_first_last());

    assert!(converted.float_types("transpose").iter().all(|&t| t == FLOAT));
    assert!(converted.cast_sources().iter().all(|(source, _)| source != "softmax"));
}

#[test]
fn matmul_of_softmax_output_is_converted_without_keep_attention_probabilities() {
    let options =
        Fp16Options { keep_first_and_last_layers: false, keep_attention_probabilities: false, ..Default::default() };
    let converted = convert(attention(), &options);

    converted.assert_converted("probs_v");
}

#[test]
fn rms_norm_pattern_is_kept_as_a_normalization_subgraph() {
    let graph = Graph::new("rms_norm")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("eps", &[1], &[1e-6]))
        .initializer(float_tensor("gamma", &[2], &[1.0, 2.0]))
        .node(node("square", "Mul", &["x", "x"], &["x2"]))
        .node(node("mean", "ReduceMean", &["x2"], &["ms"]))
        .node(node("add_eps", "Add", &["ms", "eps"], &["var"]))
        .node(node("sqrt", "Sqrt", &["var"], &["rms"]))
        .node(node("div", "Div", &["x", "rms"], &["normed"]))
        .node(node("scale", "Mul", &["normed", "gamma"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    for name in ["square", "mean", "add_eps", "sqrt", "div"] {
        converted.assert_kept(name, KeepReason::NormalizationSubgraph);
    }
    assert_eq!(converted.report.nodes_kept.len(), 5);
    converted.assert_converted("scale");
    assert_eq!(converted.initializer("eps").data_type(), FLOAT);
    assert_eq!(converted.initializer("gamma").data_type(), FLOAT16);
}

// ---------------------------------------------------------------------------------------------
// 9. Control flow
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 10. keep_io_types: false
// ---------------------------------------------------------------------------------------------

#[test]
fn without_keep_io_types_float_io_is_fp16_and_needs_no_boundary_casts() {
    let graph = Graph::new("fp16_io")
        .input("x", FLOAT)
        .input("ids", INT64)
        .output("y", FLOAT)
        .output("z", FLOAT)
        .output("ids_out", INT64)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("relu", "Relu", &["x"], &["a"]))
        .node(node("add", "Add", &["a", "b"], &["y"]))
        .node(node("softmax", "Softmax", &["a"], &["z"]))
        .node(node("ids_copy", "Identity", &["ids"], &["ids_out"]));
    let options = Fp16Options { keep_io_types: false, ..Default::default() };
    let converted = convert(graph, &options);

    assert_eq!(
        declared_types(&converted.graph.input),
        vec![("x".to_owned(), Some(FLOAT16)), ("ids".to_owned(), Some(INT64))]
    );
    assert_eq!(
        declared_types(&converted.graph.output),
        vec![("y".to_owned(), Some(FLOAT16)), ("z".to_owned(), Some(FLOAT16)), ("ids_out".to_owned(), Some(INT64)),]
    );
    converted.assert_converted("relu");
    converted.assert_converted("add");
    assert_eq!(converted.node("relu").input, ["x"]);
    assert_eq!(converted.node("add").output, ["y"]);
    // Only the kept Softmax needs Casts: FP16 `a` in, its FP32 result out to FP16 `z`.
    assert_eq!(
        converted.cast_sources(),
        vec![("relu".to_owned(), i64::from(FLOAT)), ("softmax".to_owned(), i64::from(FLOAT16)),]
    );
    converted.assert_kept("softmax", KeepReason::OpBlockList);
}

// ---------------------------------------------------------------------------------------------
// 11. Node order
// ---------------------------------------------------------------------------------------------

#[test]
fn nodes_stored_out_of_order_are_sorted_before_conversion() {
    let graph = Graph::new("unsorted")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("softmax", "Softmax", &["b"], &["y"]))
        .node(node("add", "Add", &["a", "a"], &["b"]))
        .node(node("relu", "Relu", &["x"], &["a"]));
    let converted = convert(graph, &Fp16Options::default());

    assert!(converted.position("relu") < converted.position("add"));
    assert!(converted.position("add") < converted.position("softmax"));
    converted.assert_converted("relu");
    converted.assert_converted("add");
    converted.assert_kept("softmax", KeepReason::OpBlockList);
    assert_casts_precede_first_consumer(&converted.graph);
}

#[test]
fn a_cycle_is_an_error() {
    let graph = Graph::new("cyclic")
        .input("x", FLOAT)
        .output("b", FLOAT)
        .node(node("add", "Add", &["x", "c"], &["b"]))
        .node(node("relu", "Relu", &["b"], &["c"]));
    let error = convert_error(graph, &Fp16Options::default());

    assert!(matches!(&error, Fp16Error::Graph(GraphError::Cycle { graph, .. }) if graph == "cyclic"), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// 12. Declared value_info types
// ---------------------------------------------------------------------------------------------

#[test]
fn value_info_of_a_converted_intermediate_becomes_fp16() {
    let graph = Graph::new("value_info")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .value_info("a", FLOAT)
        .value_info("b", FLOAT)
        .value_info("s", FLOAT)
        .node(node("relu", "Relu", &["x"], &["a"]))
        .node(node("add", "Add", &["a", "a"], &["b"]))
        .node(node("softmax", "Softmax", &["b"], &["s"]))
        .node(node("neg", "Neg", &["s"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(declared(&converted.graph, "a"), Some(FLOAT16));
    assert_eq!(declared(&converted.graph, "b"), Some(FLOAT16));
    // Produced by the kept Softmax: still FLOAT.
    assert_eq!(declared(&converted.graph, "s"), Some(FLOAT));
    assert_eq!(converted.graph.value_info.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Operators of other domains
// ---------------------------------------------------------------------------------------------

/// x -> ai.onnx.ml Scaler -> c; y = Add(c, x).
fn foreign() -> Graph {
    let mut scaler = node("scaler", "Scaler", &["x"], &["c"]);
    scaler.domain = Some("ai.onnx.ml".to_owned());
    Graph::new("foreign").input("x", FLOAT).output("y", FLOAT).node(scaler).node(node(
        "add",
        "Add",
        &["c", "x"],
        &["y"],
    ))
}

#[test]
fn foreign_domain_node_is_kept_and_its_declared_float_output_is_cast_for_converted_readers() {
    let converted = convert(foreign().value_info("c", FLOAT), &Fp16Options::default());

    converted.assert_kept("scaler", KeepReason::ForeignDomain);
    converted.assert_converted("add");
    assert_ne!(converted.node("add").input[0], "c");
}

// ---------------------------------------------------------------------------------------------
// Edge cases: legacy initializer inputs, CastLike, multi-output ops, undeclared types,
// values returned straight from a subgraph, attention paths
// ---------------------------------------------------------------------------------------------

#[test]
fn initializer_also_declared_as_a_graph_input_keeps_a_matching_type() {
    // IR < 4 exporters list every initializer in graph.input too (an overridable default).
    let graph = Graph::new("initializer_input")
        .input("x", FLOAT)
        .input("b", FLOAT)
        .output("y", FLOAT)
        .initializer(float_tensor("b", &[2], &[1.0, 2.0]))
        .node(node("add", "Add", &["x", "b"], &["y"]));
    let mut model = graph.model();
    convert_to_fp16(&mut model, &Fp16Options::default()).unwrap();
    let graph = model.graph.unwrap();

    assert_eq!(declared(&graph, "b"), Some(find_initializer(&graph, "b").data_type()));
}

#[test]
fn castlike_from_int64_to_float_is_kept_like_cast() {
    let graph = Graph::new("castlike")
        .input("ids", INT64)
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("like", "CastLike", &["ids", "x"], &["f"]))
        .node(node("add", "Add", &["x", "f"], &["y"]));
    let converted = convert(graph, &Fp16Options::default());

    assert_eq!(converted.kept("like"), Some(&KeepReason::TypeBoundaryCast));
    assert_eq!(converted.types["f"], FLOAT);
}

#[test]
fn maxpool_indices_stay_int64() {
    // MaxPool's second output (Indices) is INT64 and must not be cast.
    let graph = Graph::new("maxpool")
        .input("x", FLOAT)
        .output("y", FLOAT)
        .node(node("pool", "MaxPool", &["x"], &["p", "idx"]))
        .node(node("unpool", "MaxUnpool", &["p", "idx"], &["y"]));
    let options = Fp16Options { node_block_list: vec!["unpool".to_owned()], ..Default::default() };
    let converted = convert(graph, &options);

    assert_eq!(converted.node("unpool").input[1], "idx");
}

#[test]
fn a_reader_of_an_undeclared_foreign_output_stays_fp32() {
    // `c` has no declared type: the Add that reads it stays FP32 rather than mixing an
    // unknown-typed value with FP16 operands.
    let converted = convert(foreign(), &Fp16Options::default());

    converted.assert_kept("scaler", KeepReason::ForeignDomain);
    converted.assert_kept("add", KeepReason::UnknownInputType);
    assert_eq!(converted.node("add").input, vec!["c", "x"]);
}
