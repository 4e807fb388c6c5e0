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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::AttributeProto;
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
}
