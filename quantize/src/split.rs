//! Cutting a model into consecutive segments, each a model of its own, so that running the
//! segments one after another (each fed the tensors earlier segments computed) computes what
//! the whole model computes.
//!
//! Calibration uses this to observe every activation of a sample in one pass over the graph
//! without asking ONNX Runtime to keep all of them alive at once: a session keeps each declared
//! output until its run ends, so declaring all activations of a large detector as outputs of
//! one session costs gigabytes, while each segment declares only its own.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::graph::{GraphError, node_reads, topological_order};
use crate::onnx::{GraphProto, ModelProto, TypeProto, ValueInfoProto, type_proto};
use crate::types::{ElemTypes, infer_elem_types};

/// Why a model cannot be cut where asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("model has no graph")]
    NoGraph,
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("tensor '{0}' crosses a segment boundary but its element type is unknown")]
    UnknownType(String),
    #[error("tensor '{0}' is wanted but no node of the graph produces it")]
    NotProduced(String),
}

/// One segment: a model whose inputs are graph inputs or tensors of earlier segments, and whose
/// outputs are the wanted tensors it produces and the tensors later segments read.
#[derive(Debug, Clone)]
pub struct Segment {
    pub model: ModelProto,
    /// Of its outputs, those that later segments read (the others are only wanted).
    pub hands_on: Vec<String>,
}

/// A tensor type with an element type and no shape (ONNX Runtime takes any shape then).
fn tensor_info(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem_type), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A model prepared for cutting: its nodes in topological order, where each wanted tensor is
/// produced, and what every node reads. Segments are cut one after another, each starting where
/// the previous one ended, so a caller can size the next segment from what the previous ones
/// measured.
pub struct Splitter<'m> {
    graph: &'m GraphProto,
    shell: ModelProto,
    order: Vec<usize>,
    /// Reads of the node at each position of `order`.
    reads: Vec<Vec<String>>,
    produced_at: HashMap<String, usize>,
    wanted: HashSet<String>,
    types: ElemTypes,
}

impl<'m> Splitter<'m> {
    /// Every tensor of `wanted` must be produced by a node (graph inputs are read from the
    /// request itself).
    pub fn new(model: &'m ModelProto, wanted: &[String]) -> Result<Self, SplitError> {
        let graph = model.graph.as_ref().ok_or(SplitError::NoGraph)?;
        let order = topological_order(graph)?;
        let mut produced_at = HashMap::new();
        for (at, &node) in order.iter().enumerate() {
            for output in graph.node[node].output.iter().filter(|n| !n.is_empty()) {
                produced_at.insert(output.clone(), at);
            }
        }
        if let Some(missing) = wanted.iter().find(|t| !produced_at.contains_key(t.as_str())) {
            return Err(SplitError::NotProduced(missing.clone()));
        }
        Ok(Self {
            graph,
            shell: ModelProto { graph: None, ..model.clone() },
            reads: order.iter().map(|&node| node_reads(&graph.node[node])).collect(),
            order,
            produced_at,
            wanted: wanted.iter().cloned().collect(),
            types: infer_elem_types(graph, &ElemTypes::new()),
        })
    }

    /// Position (in topological order) of the node producing `tensor`.
    pub fn position(&self, tensor: &str) -> Option<usize> {
        self.produced_at.get(tensor).copied()
    }

    /// For every value some node reads, the last position (in topological order) reading it:
    /// after the segment ending there, the value is no longer needed.
    pub fn last_reads(&self) -> HashMap<String, usize> {
        let mut last = HashMap::new();
        for (at, reads) in self.reads.iter().enumerate() {
            for name in reads {
                last.insert(name.clone(), at);
            }
        }
        last
    }

    /// The segment of the nodes from position `start` up to and including the producer of the
    /// last-produced tensor of `until` (at least one node when any remain), with the position
    /// where the next segment starts. It outputs every wanted tensor its nodes produce and
    /// every tensor of its nodes that a node after it reads.
    pub fn segment(&self, start: usize, until: &[String]) -> Result<(Segment, usize), SplitError> {
        let mut end = (start + 1).min(self.order.len());
        for tensor in until {
            let at = self.position(tensor).ok_or_else(|| SplitError::NotProduced(tensor.clone()))?;
            end = end.max(at + 1);
        }
        let reads: BTreeSet<String> = self.reads[start..end].iter().flatten().cloned().collect();
        let later_reads: HashSet<&str> = self.reads[end..].iter().flatten().map(String::as_str).collect();
        let span = SegmentSpan { nodes: &self.order[start..end], reads: &reads, wanted: &self.wanted };
        let segment = build_segment(&self.shell, self.graph, span, &later_reads, &self.types)?;
        Ok((segment, end))
    }
}

/// The nodes of one segment, what they read, and the tensors wanted (from any segment).
struct SegmentSpan<'a> {
    nodes: &'a [usize],
    reads: &'a BTreeSet<String>,
    wanted: &'a HashSet<String>,
}

fn build_segment(
    shell: &ModelProto,
    graph: &GraphProto,
    span: SegmentSpan<'_>,
    later_reads: &HashSet<&str>,
    types: &ElemTypes,
) -> Result<Segment, SplitError> {
    let typed = |name: &str| {
        types
            .get(name)
            .map(|&elem_type| tensor_info(name, elem_type))
            .ok_or_else(|| SplitError::UnknownType(name.into()))
    };
    let nodes: Vec<_> = span.nodes.iter().map(|&node| graph.node[node].clone()).collect();
    let produced: HashSet<&str> = nodes.iter().flat_map(|node| node.output.iter().map(String::as_str)).collect();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let graph_inputs: HashMap<&str, &ValueInfoProto> = graph.input.iter().map(|v| (v.name(), v)).collect();

    let mut inputs = Vec::new();
    for name in span.reads.iter().filter(|name| !produced.contains(name.as_str())) {
        if initializers.contains(name.as_str()) {
            continue;
        }
        match graph_inputs.get(name.as_str()) {
            Some(info) => inputs.push((*info).clone()),
            None => inputs.push(typed(name)?),
        }
    }
    let mut outputs = Vec::new();
    let mut hands_on = Vec::new();
    let mut declared = HashSet::new();
    for node in &nodes {
        for name in node.output.iter().map(String::as_str).filter(|n| span.wanted.contains(*n)) {
            if declared.insert(name) {
                outputs.push(typed(name)?);
            }
        }
    }
    for node in &nodes {
        for name in node.output.iter().map(String::as_str).filter(|n| !n.is_empty() && later_reads.contains(n)) {
            hands_on.push(name.to_owned());
            if declared.insert(name) {
                outputs.push(typed(name)?);
            }
        }
    }
    let needed: HashSet<&str> = span.reads.iter().map(String::as_str).collect();
    // Shapes ONNX Runtime may use inside the segment (declared outputs carry their own type).
    let value_info = graph
        .value_info
        .iter()
        .filter(|info| produced.contains(info.name()) && !declared.contains(info.name()))
        .cloned()
        .collect();
    let segment_graph = GraphProto {
        name: graph.name.clone(),
        node: nodes,
        initializer: graph.initializer.iter().filter(|t| needed.contains(t.name())).cloned().collect(),
        sparse_initializer: graph
            .sparse_initializer
            .iter()
            .filter(|s| s.values.as_ref().is_some_and(|values| needed.contains(values.name())))
            .cloned()
            .collect(),
        input: inputs,
        output: outputs,
        value_info,
        ..Default::default()
    };
    Ok(Segment { model: ModelProto { graph: Some(segment_graph), ..shell.clone() }, hands_on })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem;
    use crate::onnx::NodeProto;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(outputs[0].to_owned()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// x -> a = Relu(x); b = Relu(a); c = Add(a, b); d = Relu(c) -> y = Identity(d).
    fn chain() -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![
                    node("Relu", &["x"], &["a"]),
                    node("Relu", &["a"], &["b"]),
                    node("Add", &["a", "b"], &["c"]),
                    node("Relu", &["c"], &["d"]),
                    node("Identity", &["d"], &["y"]),
                ],
                input: vec![tensor_info("x", elem::FLOAT)],
                output: vec![tensor_info("y", elem::FLOAT)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(infos: &[ValueInfoProto]) -> Vec<&str> {
        infos.iter().map(|v| v.name()).collect()
    }

    fn wanted(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn segments_hand_on_what_later_segments_read() {
        let model = chain();
        let splitter = Splitter::new(&model, &wanted(&["a", "b", "c", "d"])).unwrap();
        let (first, next) = splitter.segment(0, &wanted(&["a"])).unwrap();
        let (second, next) = splitter.segment(next, &wanted(&["c"])).unwrap();
        let (third, next) = splitter.segment(next, &wanted(&["d"])).unwrap();
        assert_eq!(next, 4, "the Identity after the last wanted tensor is left out");
        let graph = |segment: &Segment| segment.model.graph.clone().unwrap();
        assert_eq!((names(&graph(&first).input), names(&graph(&first).output)), (vec!["x"], vec!["a"]));
        assert_eq!(first.hands_on, ["a"]);
        // `a` is read by the Add of the second segment; `c` by the third.
        assert_eq!((names(&graph(&second).input), names(&graph(&second).output)), (vec!["a"], vec!["b", "c"]));
        assert_eq!(second.hands_on, ["c"]);
        assert_eq!(graph(&third).node.len(), 1);
        assert_eq!((names(&graph(&third).input), names(&graph(&third).output)), (vec!["c"], vec!["d"]));
    }

    #[test]
    fn a_tensor_nothing_produces_is_an_error() {
        assert!(matches!(Splitter::new(&chain(), &wanted(&["x"])), Err(SplitError::NotProduced(name)) if name == "x"));
    }

    #[test]
    fn initializers_go_only_where_they_are_read() {
        let mut model = chain();
        let graph = model.graph.as_mut().unwrap();
        graph.node[3] = node("Add", &["c", "w"], &["d"]);
        graph.initializer.push(crate::onnx::TensorProto {
            name: Some("w".into()),
            data_type: Some(elem::FLOAT),
            float_data: vec![1.0],
            ..Default::default()
        });
        let splitter = Splitter::new(&model, &wanted(&["a", "d"])).unwrap();
        let (first, next) = splitter.segment(0, &wanted(&["a"])).unwrap();
        let (second, _) = splitter.segment(next, &wanted(&["d"])).unwrap();
        assert!(first.model.graph.unwrap().initializer.is_empty());
        assert_eq!(second.model.graph.unwrap().initializer.len(), 1);
    }
}
