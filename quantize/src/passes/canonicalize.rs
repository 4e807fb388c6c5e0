//! Canonicalisation: the normal form a pass rewrites from, so that what it finds does not
//! depend on how the exporter happened to store the graph.
//!
//! - [`constants_to_initializers`]: `Constant` nodes holding a tensor become initializers, so
//!   constant weights are found whichever way they were stored. The INT8 weight rewrites
//!   (dynamic, weight-only, and static mode's dynamic pass over subgraphs) apply it to every
//!   graph they visit, subgraphs included.
//! - [`sort_topologically`]: nodes in an order where every value is produced before it is
//!   read, keeping the stored order where it is already valid. The FP16 pass sorts each graph
//!   it converts (main graph and subgraphs); it leaves Constant nodes where they are and
//!   narrows them together with their readers.
//! - [`canonicalize`]: both, in that order, with BatchNormalization after Conv folded into the
//!   Conv in between ([`super::batch_norm_folding`]), on one graph: what static INT8 planning
//!   and rewriting start from, so both see the same node positions.
//!
//! Names are not rewritten: each pass draws the names it adds from one
//! [`crate::rewrite::NameGenerator`] over the whole model, so existing names stay and new ones
//! cannot collide with them.

use crate::graph::{GraphError, topological_order};
use crate::onnx::{GraphProto, NodeProto};

/// Constant nodes to initializers, Conv + BatchNormalization folded, then topological order
/// (see the module docs).
pub fn canonicalize(graph: &mut GraphProto) -> Result<(), GraphError> {
    constants_to_initializers(graph);
    super::batch_norm_folding::fold_batch_norms(graph);
    sort_topologically(graph)
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

/// Reorders `graph.node` topologically.
pub fn sort_topologically(graph: &mut GraphProto) -> Result<(), GraphError> {
    let order = topological_order(graph)?;
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
    graph.node = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{AttributeProto, TensorProto};
    use crate::test_support::{graph, node};

    #[test]
    fn sorting_puts_producers_first() {
        let mut g = graph(vec![node("b", "Relu", &["a"], &["y"]), node("a", "MatMul", &["x", "w"], &["a"])]);
        sort_topologically(&mut g).unwrap();
        assert_eq!(g.node[0].name(), "a");
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
}
