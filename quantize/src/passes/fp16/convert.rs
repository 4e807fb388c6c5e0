//! Rewriting one graph from its decisions: graph outputs produced in the other precision get a
//! Cast back to their declared type, every float value gets a home precision, each node reads
//! its inputs in its own precision (through an FP16 initializer copy or a Cast made once per
//! value and precision), converted nodes have their attributes narrowed, and subgraphs are
//! converted afterwards with every outer value they see in FP32.

use std::collections::{HashMap, HashSet};

use super::decisions::{Decision, Rules, Scope, decide, has_subgraph};
use super::options::{Fp16Error, Fp16Report};
use crate::elem;
use crate::graph::{GraphIndex, node_reads};
use crate::onnx::{AttributeProto, GraphProto, NodeProto, TensorProto};
use crate::passes::canonicalize::sort_topologically;
use crate::rewrite::{NameGenerator, rename_value, set_declared_elem_type};
use crate::tensor::narrow_to_f16;
use crate::types::{ElemTypes, attribute, infer_elem_types, is_float};

/// The precision a float value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Precision {
    Fp32,
    Fp16,
}

/// Casts to insert right after a node (by position), restoring graph outputs it produces in
/// the other precision.
type OutputCasts = HashMap<usize, Vec<NodeProto>>;

/// Converts `graph` (sorted topologically first) and then its subgraphs. `outer_types` are the
/// element types of the enclosing graphs' values (empty for the main graph), which the
/// subgraph reads in FP32.
pub(super) fn convert_graph(
    graph: &mut GraphProto,
    outer_types: &ElemTypes,
    rules: &Rules<'_>,
    scope: Scope,
    names: &mut NameGenerator,
    report: &mut Fp16Report,
) -> Result<(), Fp16Error> {
    sort_topologically(graph)?;
    let types = infer_elem_types(graph, outer_types);
    let index = GraphIndex::build(graph);
    let decisions = decide(graph, &types, &index, rules, scope);
    let keep_io = scope == Scope::Subgraph || rules.options.keep_io_types;
    let io_precision = if keep_io { Precision::Fp32 } else { Precision::Fp16 };
    let (types, output_casts) = restore_output_types(graph, &types, &index, &decisions, io_precision, names, report);
    let home = home_precisions(graph, &types, &decisions, io_precision, report);
    let mut rewriter =
        Rewriter { names, home, types: &types, initializer_copies: HashMap::new(), casts: HashMap::new(), report };
    let subgraph_positions = rewriter.rewrite_nodes(graph, &decisions, output_casts);
    rewriter.convert_subgraphs(graph, &subgraph_positions, rules)
}

/// Graph outputs whose producer runs in the other precision: the producer writes a renamed
/// value and a Cast after it restores the declared name and type. Returns the element types
/// with the renamed values added, and the Casts to place after each producer.
fn restore_output_types(
    graph: &mut GraphProto,
    types: &ElemTypes,
    index: &GraphIndex,
    decisions: &[Decision],
    io_precision: Precision,
    names: &mut NameGenerator,
    report: &mut Fp16Report,
) -> (ElemTypes, OutputCasts) {
    let mut after_node = OutputCasts::new();
    let output_names: Vec<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    let mut renamed_types = types.clone();
    for output in &output_names {
        if !is_float(types, output) {
            continue;
        }
        let Some(producer) = index.producer(output) else {
            continue;
        };
        let produced = if decisions[producer] == Decision::Convert { Precision::Fp16 } else { Precision::Fp32 };
        if produced == io_precision {
            continue;
        }
        let internal = names.fresh(&format!("{output}_{}", suffix(produced)));
        rename_value(graph, output, &internal, false);
        renamed_types.insert(internal.clone(), elem::FLOAT);
        after_node.entry(producer).or_default().push(cast_node(names, &internal, output, io_precision));
        report.casts_inserted += 1;
        if io_precision == Precision::Fp16 {
            set_declared_elem_type(graph, output, elem::FLOAT16);
        }
    }
    (renamed_types, after_node)
}

/// The home precision of graph inputs (that of the model's interface) and of float
/// initializers, narrowing in place those that only converted nodes read.
fn home_precisions(
    graph: &mut GraphProto,
    types: &ElemTypes,
    decisions: &[Decision],
    io_precision: Precision,
    report: &mut Fp16Report,
) -> HashMap<String, Precision> {
    let index = GraphIndex::build(graph);
    let mut home: HashMap<String, Precision> = HashMap::new();
    let input_names: Vec<String> = graph.input.iter().map(|i| i.name().to_owned()).collect();
    for input in input_names.iter().filter(|name| is_float(types, name)) {
        home.insert(input.clone(), io_precision);
        if io_precision == Precision::Fp16 {
            set_declared_elem_type(graph, input, elem::FLOAT16);
        }
    }
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    let mut narrowed = Vec::new();
    for tensor in &mut graph.initializer {
        // An initializer also declared as a graph input (IR < 4 style) can be overridden by the
        // caller, so it keeps the input's type.
        if tensor.data_type() != elem::FLOAT || input_names.iter().any(|name| name == tensor.name()) {
            continue;
        }
        let name = tensor.name().to_owned();
        let readers = index.consumers(&name);
        let all_converted = !readers.is_empty() && readers.iter().all(|&r| decisions[r] == Decision::Convert);
        if all_converted && !graph_outputs.contains(name.as_str()) {
            report.values_clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
            report.initializers_converted += 1;
            home.insert(name.clone(), Precision::Fp16);
            narrowed.push(name);
        } else {
            home.insert(name, Precision::Fp32);
        }
    }
    // Exporters sometimes declare initializers in value_info too; the declaration follows.
    for name in &narrowed {
        set_declared_elem_type(graph, name, elem::FLOAT16);
    }
    home
}

/// The name suffix of values made for `precision`.
fn suffix(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "fp32",
        Precision::Fp16 => "fp16",
    }
}

/// A Cast reading `from` and writing `to` in `precision`.
fn cast_node(names: &mut NameGenerator, from: &str, to: &str, precision: Precision) -> NodeProto {
    let target = match precision {
        Precision::Fp32 => elem::FLOAT,
        Precision::Fp16 => elem::FLOAT16,
    };
    NodeProto {
        name: Some(names.fresh(&format!("{to}_cast"))),
        op_type: Some("Cast".to_owned()),
        input: vec![from.to_owned()],
        output: vec![to.to_owned()],
        attribute: vec![AttributeProto {
            name: Some("to".to_owned()),
            r#type: Some(2),
            i: Some(i64::from(target)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The state of one graph's rewrite: where each value lives and the copies and Casts made so
/// far, so each value is copied or cast at most once per precision.
struct Rewriter<'a, 'r> {
    names: &'a mut NameGenerator,
    home: HashMap<String, Precision>,
    types: &'a ElemTypes,
    initializer_copies: HashMap<String, String>,
    casts: HashMap<(String, Precision), String>,
    report: &'r mut Fp16Report,
}

impl Rewriter<'_, '_> {
    /// The name under which `value` is available in `precision`, adding an FP16 initializer
    /// copy or a Cast (emitted into `nodes`) the first time it is needed.
    fn resolve(
        &mut self,
        value: &str,
        precision: Precision,
        graph: &GraphProto,
        new_initializers: &mut Vec<TensorProto>,
        nodes: &mut Vec<NodeProto>,
    ) -> String {
        debug_assert!(self.types.contains_key(value));
        // Values with no recorded home come from an outer scope, which provides FP32.
        let home = self.home.get(value).copied().unwrap_or(Precision::Fp32);
        if home == precision {
            return value.to_owned();
        }
        if precision == Precision::Fp16
            && let Some(tensor) = graph.initializer.iter().find(|t| t.name() == value)
        {
            if let Some(copy) = self.initializer_copies.get(value) {
                return copy.clone();
            }
            let mut copy = tensor.clone();
            let name = self.names.fresh(&format!("{value}_fp16"));
            copy.name = Some(name.clone());
            self.report.values_clamped += narrow_to_f16(&mut copy).map_or(0, |n| n.clamped);
            self.report.initializer_copies += 1;
            new_initializers.push(copy);
            self.initializer_copies.insert(value.to_owned(), name.clone());
            self.home.insert(name.clone(), Precision::Fp16);
            return name;
        }
        if let Some(existing) = self.casts.get(&(value.to_owned(), precision)) {
            return existing.clone();
        }
        let name = self.names.fresh(&format!("{value}_{}", suffix(precision)));
        nodes.push(cast_node(self.names, value, &name, precision));
        self.report.casts_inserted += 1;
        self.casts.insert((value.to_owned(), precision), name.clone());
        self.home.insert(name.clone(), precision);
        name
    }

    /// Rebuilds the node list: each node gets its inputs in the precision of its decision, its
    /// outputs are recorded at that precision, and the output Casts follow their producers.
    /// Returns the positions (in the new list) of the nodes whose subgraphs are to be converted.
    fn rewrite_nodes(
        &mut self,
        graph: &mut GraphProto,
        decisions: &[Decision],
        mut output_casts: OutputCasts,
    ) -> Vec<usize> {
        let original = std::mem::take(&mut graph.node);
        let mut rebuilt = Vec::with_capacity(original.len());
        let mut new_initializers = Vec::new();
        let mut subgraph_positions = Vec::new();
        for (position, mut node) in original.into_iter().enumerate() {
            if let Some(precision) = self.record_decision(&node, &decisions[position]) {
                self.place_node(&mut node, precision, graph, &mut new_initializers, &mut rebuilt);
                if has_subgraph(&node) {
                    subgraph_positions.push(rebuilt.len());
                }
            }
            rebuilt.push(node);
            if let Some(casts) = output_casts.remove(&position) {
                rebuilt.extend(casts);
            }
        }
        graph.node = rebuilt;
        graph.initializer.extend(new_initializers);
        subgraph_positions
    }

    /// Counts and logs the decision; the precision the node runs in, if it carries floats.
    fn record_decision(&mut self, node: &NodeProto, decision: &Decision) -> Option<Precision> {
        match decision {
            Decision::Convert => {
                self.report.nodes_converted += 1;
                tracing::debug!(node = node.name(), op = node.op_type(), "fp16: converted");
                Some(Precision::Fp16)
            }
            Decision::Keep(reason) => {
                tracing::debug!(node = node.name(), op = node.op_type(), %reason, "fp16: kept FP32");
                self.report.nodes_kept.push((node.name().to_owned(), node.op_type().to_owned(), reason.clone()));
                Some(Precision::Fp32)
            }
            Decision::Neutral => None,
        }
    }

    /// Makes `node` read its float inputs (and the outer values its subgraphs read) in
    /// `precision`, records its float outputs there and narrows its attributes when FP16.
    /// Casts it needs are appended to `rebuilt`, ahead of the node.
    fn place_node(
        &mut self,
        node: &mut NodeProto,
        precision: Precision,
        graph: &mut GraphProto,
        new_initializers: &mut Vec<TensorProto>,
        rebuilt: &mut Vec<NodeProto>,
    ) {
        for slot in 0..node.input.len() {
            let name = node.input[slot].clone();
            if !is_float(self.types, &name) {
                continue;
            }
            let resolved = self.resolve(&name, precision, graph, new_initializers, rebuilt);
            node.input[slot] = resolved;
        }
        if has_subgraph(node) {
            // Outer values a subgraph reads must arrive in FP32, like explicit inputs.
            let reads: Vec<String> = node_reads(node).into_iter().filter(|n| is_float(self.types, n)).collect();
            for name in reads {
                if node.input.contains(&name) {
                    continue;
                }
                let resolved = self.resolve(&name, Precision::Fp32, graph, new_initializers, rebuilt);
                if resolved != name {
                    for attribute in &mut node.attribute {
                        for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                            rename_value(subgraph, &name, &resolved, true);
                        }
                    }
                }
            }
        }
        for output in node.output.iter().filter(|o| is_float(self.types, o)) {
            self.home.insert(output.clone(), precision);
            if precision == Precision::Fp16 {
                set_declared_elem_type(graph, output, elem::FLOAT16);
            }
        }
        if precision == Precision::Fp16 {
            self.report.values_clamped += convert_node_attributes(node);
        }
    }

    /// Converts the subgraphs of the nodes at `positions`. They see every outer float value in
    /// FP32 (ensured by [`Self::place_node`]).
    fn convert_subgraphs(
        self,
        graph: &mut GraphProto,
        positions: &[usize],
        rules: &Rules<'_>,
    ) -> Result<(), Fp16Error> {
        let mut subgraph_outer = self.types.clone();
        for (name, precision) in &self.home {
            if *precision == Precision::Fp32 {
                subgraph_outer.insert(name.clone(), elem::FLOAT);
            }
        }
        for &position in positions {
            let node = &mut graph.node[position];
            for attribute in &mut node.attribute {
                for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                    convert_graph(subgraph, &subgraph_outer, rules, Scope::Subgraph, self.names, self.report)?;
                }
            }
        }
        Ok(())
    }
}

/// Narrows float tensor attributes and float dtype attributes of a converted node. Returns
/// the number of clamped values.
fn convert_node_attributes(node: &mut NodeProto) -> usize {
    let mut clamped = 0;
    let op = node.op_type().to_owned();
    if op == "Cast" {
        if let Some(to) = node.attribute.iter_mut().find(|a| a.name() == "to") {
            to.i = Some(i64::from(elem::FLOAT16));
        }
        return 0;
    }
    if op == "ConstantOfShape" && attribute(node, "value").is_none() {
        node.attribute.push(AttributeProto {
            name: Some("value".to_owned()),
            r#type: Some(4),
            t: Some(TensorProto {
                dims: vec![1],
                data_type: Some(elem::FLOAT16),
                raw_data: Some(vec![0, 0]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for attribute in &mut node.attribute {
        match attribute.name() {
            "dtype" if attribute.i == Some(i64::from(elem::FLOAT)) => attribute.i = Some(i64::from(elem::FLOAT16)),
            "value_float" | "value_floats" if op == "Constant" => {
                let values: Vec<f32> = attribute.f.map(|f| vec![f]).unwrap_or_else(|| attribute.floats.clone());
                let dims = if attribute.name() == "value_float" { vec![] } else { vec![values.len() as i64] };
                let mut tensor =
                    TensorProto { dims, data_type: Some(elem::FLOAT), float_data: values, ..Default::default() };
                clamped += narrow_to_f16(&mut tensor).map_or(0, |n| n.clamped);
                *attribute = AttributeProto {
                    name: Some("value".to_owned()),
                    r#type: Some(4),
                    t: Some(tensor),
                    ..Default::default()
                };
            }
            _ => {
                if let Some(tensor) = attribute.t.as_mut() {
                    clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
                }
                for tensor in &mut attribute.tensors {
                    clamped += narrow_to_f16(tensor).map_or(0, |n| n.clamped);
                }
            }
        }
    }
    clamped
}
