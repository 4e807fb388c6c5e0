//! The graph index: producers and consumers of every value (including the outer-scope values
//! subgraphs read), topological order, and the first/last compute layers the precision rules
//! single out. Everything here only reads a graph; [`crate::rewrite`] and the passes change it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::onnx::{GraphProto, NodeProto};

/// A graph whose nodes have no valid order: passes need producers before readers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphError {
    #[error("graph '{graph}' has a cycle or a value used before it is produced (involving node '{node}')")]
    Cycle { graph: String, node: String },
}

/// Every name a node reads: its inputs and the outer-scope values its subgraphs use.
pub fn node_reads(node: &NodeProto) -> Vec<String> {
    let mut reads: Vec<String> = node.input.iter().filter(|name| !name.is_empty()).cloned().collect();
    for attribute in &node.attribute {
        for graph in attribute.g.iter().chain(&attribute.graphs) {
            reads.extend(outer_references(graph));
        }
    }
    reads
}

/// Names a subgraph reads that it does not define itself (recursively), i.e. its implicit
/// inputs from enclosing scopes.
pub fn outer_references(graph: &GraphProto) -> BTreeSet<String> {
    let mut defined: HashSet<&str> = graph.input.iter().map(|v| v.name()).collect();
    defined.extend(graph.initializer.iter().map(|t| t.name()));
    defined.extend(graph.sparse_initializer.iter().filter_map(|s| s.values.as_ref()).map(|t| t.name()));
    for node in &graph.node {
        defined.extend(node.output.iter().map(String::as_str));
    }
    let mut references = BTreeSet::new();
    for node in &graph.node {
        for name in node_reads(node) {
            if !defined.contains(name.as_str()) {
                references.insert(name);
            }
        }
    }
    for output in &graph.output {
        if !defined.contains(output.name()) {
            references.insert(output.name().to_owned());
        }
    }
    references
}

/// Producers and consumers of every value of one graph (not descending into subgraphs; a
/// node whose subgraph reads an outer value counts as that value's consumer).
#[derive(Debug, Default, Clone)]
pub struct GraphIndex {
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
}

impl GraphIndex {
    pub fn build(graph: &GraphProto) -> Self {
        let mut index = GraphIndex::default();
        for (position, node) in graph.node.iter().enumerate() {
            for output in node.output.iter().filter(|name| !name.is_empty()) {
                index.producer.insert(output.clone(), position);
            }
            let mut seen = HashSet::new();
            for name in node_reads(node) {
                if seen.insert(name.clone()) {
                    index.consumers.entry(name).or_default().push(position);
                }
            }
        }
        index
    }

    pub fn producer(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }
}

/// Node positions in a topological order, keeping the stored order where it is already valid.
pub fn topological_order(graph: &GraphProto) -> Result<Vec<usize>, GraphError> {
    let index = GraphIndex::build(graph);
    let mut pending: Vec<usize> = graph
        .node
        .iter()
        .map(|node| {
            let reads: HashSet<String> = node_reads(node).into_iter().collect();
            reads.iter().filter(|name| index.producer(name).is_some()).count()
        })
        .collect();
    let mut ready: VecDeque<usize> = (0..graph.node.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(graph.node.len());
    let mut done = vec![false; graph.node.len()];
    while let Some(position) = ready.pop_front() {
        if done[position] {
            continue;
        }
        done[position] = true;
        order.push(position);
        let mut released = Vec::new();
        for output in graph.node[position].output.iter().filter(|n| !n.is_empty()) {
            for &consumer in index.consumers(output) {
                pending[consumer] -= 1;
                if pending[consumer] == 0 {
                    released.push(consumer);
                }
            }
        }
        released.sort_unstable();
        ready.extend(released);
    }
    if order.len() != graph.node.len() {
        let stuck = (0..graph.node.len()).find(|&i| !done[i]).unwrap_or(0);
        return Err(GraphError::Cycle { graph: graph.name().to_owned(), node: graph.node[stuck].name().to_owned() });
    }
    Ok(order)
}

/// Ops whose FLOPs make a layer "compute" for the first/last-layer rules of the passes.
pub const COMPUTE_OPS: &[&str] = &["Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "LSTM", "GRU", "RNN"];

/// Compute nodes with no compute node upstream (first) and none downstream (last), following
/// inputs and the outer values subgraphs read.
pub fn first_and_last_compute(graph: &GraphProto) -> (HashSet<usize>, HashSet<usize>) {
    let index = GraphIndex::build(graph);
    let nodes = &graph.node;
    let is_compute = |n: &NodeProto| COMPUTE_OPS.contains(&n.op_type());
    let order = topological_order(graph).unwrap_or_else(|_| (0..nodes.len()).collect());
    let mut upstream = vec![false; nodes.len()];
    for &position in &order {
        upstream[position] = node_reads(&nodes[position])
            .iter()
            .filter_map(|input| index.producer(input))
            .any(|producer| upstream[producer] || is_compute(&nodes[producer]));
    }
    let mut downstream = vec![false; nodes.len()];
    for &position in order.iter().rev() {
        downstream[position] = nodes[position]
            .output
            .iter()
            .flat_map(|output| index.consumers(output))
            .any(|&consumer| downstream[consumer] || is_compute(&nodes[consumer]));
    }
    let first = (0..nodes.len()).filter(|&i| is_compute(&nodes[i]) && !upstream[i]).collect();
    let last = (0..nodes.len()).filter(|&i| is_compute(&nodes[i]) && !downstream[i]).collect();
    (first, last)
}

/// The ends of the model among the first and last compute nodes (see
/// [`first_and_last_compute`]): a first one whose data comes from one graph input along a
/// single path, and a last one whose result alone makes a graph output. Each node on such a
/// path has one data input; constants and values computed from shapes alone (Shape, Size and
/// what follows from them) do not count as data. A compute node reading a join of several
/// paths (the sum of a transformer's word and position embeddings) is inside the model, as is
/// one whose result joins a residual sum before the output: the layers the precision rules
/// keep FP32 at the ends (embedding lookups, output heads) are the ones at the boundary.
pub fn model_ends(graph: &GraphProto) -> (HashSet<usize>, HashSet<usize>) {
    let (first, last) = first_and_last_compute(graph);
    let index = GraphIndex::build(graph);
    let nodes = &graph.node;
    let order = topological_order(graph).unwrap_or_else(|_| (0..nodes.len()).collect());
    let constant: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    // Values that depend on data only through shapes.
    let mut shape_only: HashSet<&str> = HashSet::new();
    for &position in &order {
        let node = &nodes[position];
        let from_shapes = matches!(node.op_type(), "Shape" | "Size")
            || node
                .input
                .iter()
                .filter(|i| !i.is_empty())
                .all(|i| constant.contains(i.as_str()) || shape_only.contains(i.as_str()));
        if from_shapes {
            shape_only.extend(node.output.iter().map(String::as_str));
        }
    }
    fn data<'g>(node: &'g NodeProto, constant: &HashSet<&str>, shape_only: &HashSet<&str>) -> Vec<&'g str> {
        node.input
            .iter()
            .map(String::as_str)
            .filter(|i| !i.is_empty() && !constant.contains(i) && !shape_only.contains(i))
            .collect()
    }
    let is_compute = |n: &NodeProto| COMPUTE_OPS.contains(&n.op_type());
    // Values that are a graph input or follow from exactly one along single-input nodes.
    let mut from_input: HashSet<&str> = graph.input.iter().map(|v| v.name()).collect();
    for &position in &order {
        let node = &nodes[position];
        if !is_compute(node)
            && matches!(data(node, &constant, &shape_only).as_slice(), [only] if from_input.contains(only))
        {
            from_input.extend(node.output.iter().map(String::as_str));
        }
    }
    // Values that alone make a graph output: an output itself, or read only by single-input
    // nodes one of whose outputs does.
    let outputs: HashSet<&str> = graph.output.iter().map(|v| v.name()).collect();
    let mut to_output: HashSet<&str> = HashSet::new();
    for &position in order.iter().rev() {
        for value in &nodes[position].output {
            let consumers = index.consumers(value);
            let alone = outputs.contains(value.as_str())
                || (!consumers.is_empty()
                    && consumers.iter().all(|&c| {
                        let consumer = &nodes[c];
                        !is_compute(consumer)
                            && data(consumer, &constant, &shape_only).len() == 1
                            && consumer.output.iter().any(|o| to_output.contains(o.as_str()))
                    }));
            if alone {
                to_output.insert(value.as_str());
            }
        }
    }
    let first = first
        .into_iter()
        .filter(|&i| data(&nodes[i], &constant, &shape_only).iter().any(|v| from_input.contains(v)))
        .collect();
    let last = last.into_iter().filter(|&i| nodes[i].output.iter().any(|o| to_output.contains(o.as_str()))).collect();
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{AttributeProto, TensorProto};
    use crate::test_support::{graph, node, value};

    #[test]
    fn index_and_topological_order() {
        let g = graph(vec![node("b", "Relu", &["a"], &["y"]), node("a", "MatMul", &["x", "w"], &["a"])]);
        let index = GraphIndex::build(&g);
        assert_eq!(index.producer("a"), Some(1));
        assert_eq!(index.consumers("w"), &[1]);
        assert_eq!(topological_order(&g).unwrap(), vec![1, 0]);
    }

    #[test]
    fn cycles_are_reported() {
        let g = graph(vec![node("a", "Add", &["x", "c"], &["b"]), node("c", "Relu", &["b"], &["c"])]);
        assert!(matches!(topological_order(&g), Err(GraphError::Cycle { .. })));
    }

    #[test]
    fn subgraph_outer_references_make_the_parent_a_consumer() {
        let body = GraphProto {
            node: vec![node("inner", "Add", &["w", "x"], &["z"])],
            output: vec![value("z")],
            ..Default::default()
        };
        let mut if_node = node("if", "If", &["cond"], &["y"]);
        if_node.attribute.push(AttributeProto {
            name: Some("then_branch".into()),
            g: Some(body),
            ..Default::default()
        });
        let g = graph(vec![if_node]);
        assert_eq!(
            outer_references(g.node[0].attribute[0].g.as_ref().unwrap()).into_iter().collect::<Vec<_>>(),
            ["w", "x"]
        );
        assert_eq!(GraphIndex::build(&g).consumers("w"), &[0]);
    }

    /// Two tiny encoders over input `x` (initializers `w`, `t`, `b`): in the first, MatMul
    /// `first` reads a reshape of `x` (its shape taken from `x`) and `last` writes `y` through a
    /// bias Add; in the second, `first` reads a sum of two lookups and `last` joins a residual.
    #[test]
    fn model_ends_are_the_boundary_layers() {
        let with_t = |mut g: GraphProto| {
            g.initializer.push(TensorProto { name: Some("t".into()), ..Default::default() });
            g.initializer.push(TensorProto { name: Some("b".into()), ..Default::default() });
            g
        };
        let plain = with_t(graph(vec![
            node("shape", "Shape", &["x"], &["s"]),
            node("reshape", "Reshape", &["x", "s"], &["r"]),
            node("first", "MatMul", &["r", "w"], &["h"]),
            node("act", "Relu", &["h"], &["a"]),
            node("last", "MatMul", &["a", "w"], &["l"]),
            node("bias", "Add", &["l", "b"], &["y"]),
        ]));
        let (first, last) = model_ends(&plain);
        assert_eq!((first.into_iter().collect::<Vec<_>>(), last.into_iter().collect::<Vec<_>>()), (vec![2], vec![4]));

        let residual = with_t(graph(vec![
            node("word", "Gather", &["t", "x"], &["e1"]),
            node("position", "Gather", &["t", "x"], &["e2"]),
            node("sum", "Add", &["e1", "e2"], &["e"]),
            node("first", "MatMul", &["e", "w"], &["h"]),
            node("last", "MatMul", &["h", "w"], &["l"]),
            node("skip", "Add", &["l", "e"], &["y"]),
        ]));
        let (all_first, all_last) = first_and_last_compute(&residual);
        assert!(all_first.contains(&3) && all_last.contains(&4));
        let (first, last) = model_ends(&residual);
        assert!(first.is_empty() && last.is_empty(), "{first:?} {last:?}");
    }
}
