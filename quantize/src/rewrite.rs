//! Rewrite helpers the passes share: unique names, declared-type updates, renaming a value
//! through nested subgraphs, inserting a node on an edge, folding bias Adds into the node
//! before them, and removing what a rewrite left unread. They build on the read-only
//! [`crate::graph`] index.

use std::collections::HashSet;

use crate::graph::GraphIndex;
use crate::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, type_proto};

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

/// Renames every read of `from` in `graph` (node inputs, value_info and nested subgraphs,
/// including what a subgraph returns) and its definition, if this graph defines it. The
/// graph's own outputs are renamed only when `rename_outputs` is set: a main graph keeps its
/// output names, a subgraph that returns an outer value must return the renamed one.
pub(crate) fn rename_value(graph: &mut GraphProto, from: &str, to: &str, rename_outputs: bool) {
    for node in &mut graph.node {
        for name in node.input.iter_mut().chain(node.output.iter_mut()) {
            if name == from {
                *name = to.to_owned();
            }
        }
        for attribute in &mut node.attribute {
            for subgraph in attribute.g.iter_mut().chain(attribute.graphs.iter_mut()) {
                let shadows = subgraph.input.iter().any(|i| i.name() == from)
                    || subgraph.initializer.iter().any(|t| t.name() == from);
                if !shadows {
                    rename_value(subgraph, from, to, true);
                }
            }
        }
    }
    let outputs = graph.output.iter_mut().filter(|_| rename_outputs);
    for info in graph.value_info.iter_mut().chain(outputs) {
        if info.name() == from {
            info.name = Some(to.to_owned());
        }
    }
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

/// Drops the initializers a rewrite replaced (`replaced`) that nothing reads any more; other
/// unread initializers are left alone, as the model had them.
pub(crate) fn drop_unread_initializers(graph: &mut GraphProto, replaced: &HashSet<String>) {
    let index = GraphIndex::build(graph);
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name().to_owned()).collect();
    graph.initializer.retain(|t| {
        !replaced.contains(t.name()) || !index.consumers(t.name()).is_empty() || outputs.contains(t.name())
    });
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

/// A node of the default domain with one output and no attributes.
pub(crate) fn simple_node(name: String, op: &str, inputs: Vec<String>, output: String) -> NodeProto {
    NodeProto {
        name: Some(name),
        op_type: Some(op.to_owned()),
        input: inputs,
        output: vec![output],
        ..Default::default()
    }
}

/// Declares `domain` at `version` unless the model already imports that domain (contrib ops
/// such as com.microsoft.DynamicQuantizeMatMul need their opset declared to load).
pub(crate) fn ensure_opset(model: &mut ModelProto, domain: &str, version: i64) {
    if !model.opset_import.iter().any(|o| o.domain() == domain) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(domain.to_owned()), version: Some(version) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::topological_order;
    use crate::test_support::{graph, node};

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
