//! Graph index and rewrite tools: producers and consumers of every value (including the
//! outer-scope values subgraphs read), topological order, unique names, value-type updates,
//! insertion of nodes on an edge and removal of dead nodes and initializers.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::onnx::{GraphProto, NodeProto, TensorProto, type_proto};

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

/// Reorders `graph.node` topologically.
pub fn sort_topologically(graph: &mut GraphProto) -> Result<(), GraphError> {
    let order = topological_order(graph)?;
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
    graph.node = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    Ok(())
}

/// Hands out names not used anywhere in a graph (nor in its subgraphs), with predictable
/// suffixes: `base`, then `base_1`, `base_2`, ...
#[derive(Debug, Default, Clone)]
pub struct NameGenerator {
    used: HashSet<String>,
}

impl NameGenerator {
    pub fn for_graph(graph: &GraphProto) -> Self {
        let mut generator = NameGenerator::default();
        generator.collect(graph);
        generator
    }

    fn collect(&mut self, graph: &GraphProto) {
        self.used.extend(graph.input.iter().chain(&graph.output).chain(&graph.value_info).map(|v| v.name().to_owned()));
        self.used.extend(graph.initializer.iter().map(|t| t.name().to_owned()));
        for node in &graph.node {
            self.used.insert(node.name().to_owned());
            self.used.extend(node.input.iter().chain(&node.output).cloned());
            for attribute in &node.attribute {
                for subgraph in attribute.g.iter().chain(&attribute.graphs) {
                    self.collect(subgraph);
                }
            }
        }
    }

    pub fn fresh(&mut self, base: &str) -> String {
        let mut candidate = base.to_owned();
        let mut counter = 0;
        while self.used.contains(&candidate) {
            counter += 1;
            candidate = format!("{base}_{counter}");
        }
        self.used.insert(candidate.clone());
        candidate
    }
}

/// Sets the element type recorded for `value` in the graph's inputs, outputs or value_info.
/// Returns whether a declaration was found.
pub fn set_declared_elem_type(graph: &mut GraphProto, value: &str, elem_type: i32) -> bool {
    let mut found = false;
    for info in graph.input.iter_mut().chain(graph.output.iter_mut()).chain(graph.value_info.iter_mut()) {
        if info.name() != value {
            continue;
        }
        if let Some(type_proto::Value::TensorType(tensor)) = info.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            tensor.elem_type = Some(elem_type);
            found = true;
        }
    }
    found
}

/// Routes `value` through `node` for the consumers at `consumer_positions`: the node reads
/// `value` and writes `new_value`, those consumers read `new_value` instead, and the node is
/// placed right before the first of them.
pub fn insert_on_edge(
    graph: &mut GraphProto,
    value: &str,
    new_value: &str,
    consumer_positions: &[usize],
    node: NodeProto,
) {
    for &position in consumer_positions {
        for input in graph.node[position].input.iter_mut().filter(|input| input.as_str() == value) {
            *input = new_value.to_owned();
        }
    }
    let at = consumer_positions.iter().copied().min().unwrap_or(graph.node.len());
    graph.node.insert(at, node);
}

/// Removes nodes whose outputs nobody reads (graph outputs count as read), repeatedly, and
/// then initializers nobody reads. Returns (nodes, initializers) removed.
pub fn remove_dead(graph: &mut GraphProto) -> (usize, usize) {
    let mut removed_nodes = 0;
    loop {
        let index = GraphIndex::build(graph);
        let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name()).collect();
        let before = graph.node.len();
        graph.node.retain(|node| {
            node.output
                .iter()
                .any(|o| !o.is_empty() && (outputs.contains(o.as_str()) || !index.consumers(o).is_empty()))
        });
        let removed = before - graph.node.len();
        removed_nodes += removed;
        if removed == 0 {
            break;
        }
    }
    let index = GraphIndex::build(graph);
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    let before = graph.initializer.len();
    graph.initializer.retain(|t| !index.consumers(t.name()).is_empty() || outputs.contains(t.name()));
    (removed_nodes, before - graph.initializer.len())
}

/// The Add that alone reads `node`'s output and adds a float initializer to it (a bias), as
/// (the Add's position, the initializer's name). `None` when the output is a graph output.
pub fn sole_bias_add<'g>(
    graph: &'g GraphProto,
    index: &GraphIndex,
    node: &NodeProto,
) -> Option<(usize, &'g TensorProto)> {
    let output = node.output.first()?;
    if graph.output.iter().any(|o| o.name() == output) {
        return None;
    }
    let &[add] = index.consumers(output) else { return None };
    let add_node = &graph.node[add];
    if add_node.op_type() != "Add" || !add_node.domain().is_empty() || add_node.input.len() != 2 {
        return None;
    }
    let bias = if &add_node.input[0] == output { &add_node.input[1] } else { &add_node.input[0] };
    let tensor = graph.initializer.iter().find(|t| t.name() == bias && t.data_type() == crate::elem::FLOAT)?;
    Some((add, tensor))
}

/// Folds each (node, Add, bias) of `merges` into the node: `attach` gives the node the bias,
/// the node takes over the Add's output, and the Add is removed.
pub fn fold_bias_adds(
    graph: &mut GraphProto,
    merges: &[(usize, usize, String)],
    mut attach: impl FnMut(&mut NodeProto, String),
) {
    let mut removed = HashSet::new();
    for (position, add, bias) in merges {
        let output = graph.node[*add].output[0].clone();
        let node = &mut graph.node[*position];
        attach(node, bias.clone());
        node.output = vec![output];
        removed.insert(*add);
    }
    let mut position = 0;
    graph.node.retain(|_| {
        position += 1;
        !removed.contains(&(position - 1))
    });
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

/// Turns `Constant` nodes holding a tensor into initializers of the same name, so passes that
/// look for constant weights find them whichever way the exporter stored them. Returns how
/// many were moved.
pub fn constants_to_initializers(graph: &mut GraphProto) -> usize {
    let mut moved = 0;
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let tensor = (node.op_type() == "Constant" && node.domain().is_empty() && node.output.len() == 1)
            .then(|| node.attribute.iter().find(|a| a.name() == "value").and_then(|a| a.t.clone()))
            .flatten();
        match tensor {
            Some(mut tensor) => {
                tensor.name = Some(node.output[0].clone());
                graph.initializer.push(tensor);
                moved += 1;
            }
            None => kept.push(node),
        }
    }
    graph.node = kept;
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{AttributeProto, TensorProto, ValueInfoProto};

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto { name: Some(name.into()), ..Default::default() }
    }

    fn graph(nodes: Vec<NodeProto>) -> GraphProto {
        GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![value("x")],
            output: vec![value("y")],
            initializer: vec![TensorProto { name: Some("w".into()), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn index_and_topological_order() {
        let mut g = graph(vec![node("b", "Relu", &["a"], &["y"]), node("a", "MatMul", &["x", "w"], &["a"])]);
        let index = GraphIndex::build(&g);
        assert_eq!(index.producer("a"), Some(1));
        assert_eq!(index.consumers("w"), &[1]);
        assert_eq!(topological_order(&g).unwrap(), vec![1, 0]);
        sort_topologically(&mut g).unwrap();
        assert_eq!(g.node[0].name(), "a");
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

    #[test]
    fn constant_nodes_become_initializers() {
        let mut constant = node("c", "Constant", &[], &["k"]);
        constant.attribute.push(AttributeProto {
            name: Some("value".into()),
            t: Some(TensorProto { dims: vec![1], data_type: Some(1), float_data: vec![2.0], ..Default::default() }),
            ..Default::default()
        });
        let mut g = graph(vec![constant, node("a", "MatMul", &["x", "k"], &["y"])]);
        assert_eq!(constants_to_initializers(&mut g), 1);
        assert_eq!(g.node.len(), 1);
        let moved = g.initializer.iter().find(|t| t.name() == "k").unwrap();
        assert_eq!(moved.float_data, vec![2.0]);
    }

    #[test]
    fn names_are_fresh_and_predictable() {
        let g = graph(vec![node("a", "Relu", &["x"], &["y"])]);
        let mut names = NameGenerator::for_graph(&g);
        assert_eq!(names.fresh("y"), "y_1");
        assert_eq!(names.fresh("y"), "y_2");
        assert_eq!(names.fresh("new"), "new");
    }

    #[test]
    fn insertion_on_an_edge_and_dead_code_removal() {
        let mut g = graph(vec![
            node("a", "MatMul", &["x", "w"], &["a"]),
            node("b", "Relu", &["a"], &["y"]),
            node("dead", "Neg", &["a"], &["unused"]),
        ]);
        insert_on_edge(&mut g, "a", "a_cast", &[1], node("cast", "Cast", &["a"], &["a_cast"]));
        assert_eq!(g.node[1].name(), "cast");
        assert_eq!(g.node[2].input, vec!["a_cast"]);
        g.initializer.push(TensorProto { name: Some("orphan".into()), ..Default::default() });
        assert_eq!(remove_dead(&mut g), (1, 1));
        assert!(topological_order(&g).is_ok());
    }
}
