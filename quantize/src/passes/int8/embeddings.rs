//! Embedding tables (Gather along axis 0 of a constant [V, D] float matrix) stored as int8
//! with one symmetric scale per row, dequantized after the lookup, so every use of the rows is
//! FP32 arithmetic as the precision rules want of a model end (see
//! [`Int8Options::quantize_embeddings`](super::Int8Options::quantize_embeddings)).

use std::collections::{HashMap, HashSet};

use super::options::{Int8Report, Selection};
use crate::elem;
use crate::graph::GraphIndex;
use crate::onnx::{AttributeProto, GraphProto, NodeProto, TensorProto};
use crate::quant_params::per_channel_symmetric;
use crate::rewrite::{NameGenerator, drop_unread_initializers, simple_node};
use crate::tensor::{f32_values, float_tensor, int8_tensor};
use crate::types::int_attribute_or;

/// Tables with narrower rows stay FP32.
const MIN_ROW_WIDTH: i64 = 8;

/// Stores the tables of embedding lookups (Gather along axis 0 of a constant [V, D] float
/// matrix) as int8 with a symmetric scale per row: Gather(int8 table) -> Cast -> Mul by the
/// gathered row scales. A table read by other nodes too, or the op/node rules exclude, stays.
pub(super) fn quantize_embedding_tables(
    graph: &mut GraphProto,
    selection: &Selection,
    names: &mut NameGenerator,
    report: &mut Int8Report,
) {
    let index = GraphIndex::build(graph);
    let none = HashSet::new();
    let mut rebuilt = Vec::with_capacity(graph.node.len());
    let mut new_initializers = Vec::new();
    let mut replaced: HashSet<String> = HashSet::new();
    // Table name -> (int8 table, row scales), shared by every lookup of one table.
    let mut quantized_tables: HashMap<String, (String, String)> = HashMap::new();
    for (position, node) in graph.node.iter().enumerate() {
        let table_name = node.input.first().cloned().unwrap_or_default();
        let table = graph
            .initializer
            .iter()
            .find(|t| t.name() == table_name && t.data_type() == elem::FLOAT && t.dims.len() == 2)
            // A row needs a 4-byte scale: narrow tables (such as the row scales of a table
            // quantized before) would only grow.
            .filter(|t| t.dims[1] >= MIN_ROW_WIDTH);
        let only_lookups = index.consumers(&table_name).iter().all(|&c| graph.node[c].op_type() == "Gather");
        let eligible = node.op_type() == "Gather"
            && node.domain().is_empty()
            && int_attribute_or(node, "axis", 0) == 0
            && table.is_some()
            && only_lookups;
        if !eligible {
            rebuilt.push(node.clone());
            continue;
        }
        if let Some(reason) = selection.skip_reason(node, &none, &none, position) {
            report.skipped.push((node.name().to_owned(), "Gather".to_owned(), reason));
            rebuilt.push(node.clone());
            continue;
        }
        let Some(values) = table.and_then(f32_values) else {
            rebuilt.push(node.clone());
            continue;
        };
        let Some(shape) = table.map(|t| (t.dims[0], t.dims[1])) else { continue };
        let (int8_name, scales_name) = quantized_tables
            .entry(table_name.clone())
            .or_insert_with(|| store_int8_table(&table_name, &values, shape, names, &mut new_initializers, report))
            .clone();
        rebuilt.extend(dequantizing_lookup(node, int8_name, scales_name, names));
        report.quantized.push((node.name().to_owned(), "Gather".to_owned()));
        replaced.insert(table_name);
    }
    graph.node = rebuilt;
    graph.initializer.extend(new_initializers);
    drop_unread_initializers(graph, &replaced);
}

/// Adds the int8 table and its [rows, 1] scales as initializers; returns their names.
fn store_int8_table(
    table_name: &str,
    values: &[f32],
    (rows, columns): (i64, i64),
    names: &mut NameGenerator,
    initializers: &mut Vec<TensorProto>,
    report: &mut Int8Report,
) -> (String, String) {
    let (scales, quantized) = per_channel_symmetric(values, &[rows as usize, columns as usize], 0, false);
    let int8_name = names.fresh(&format!("{table_name}_int8"));
    let scales_name = names.fresh(&format!("{table_name}_row_scales"));
    initializers.push(int8_tensor(&int8_name, vec![rows, columns], &quantized));
    initializers.push(float_tensor(&scales_name, vec![rows, 1], &scales));
    report.weight_bytes_before += values.len() * 4;
    report.weight_bytes_after += quantized.len() + scales.len() * 4;
    (int8_name, scales_name)
}

/// The nodes replacing one lookup: gather the int8 rows and their scales with the same
/// indices, cast the rows to float and multiply, writing the original output.
fn dequantizing_lookup(
    node: &NodeProto,
    int8_name: String,
    scales_name: String,
    names: &mut NameGenerator,
) -> [NodeProto; 4] {
    let base = if node.name().is_empty() { node.output[0].clone() } else { node.name().to_owned() };
    let indices = node.input[1].clone();
    let codes = names.fresh(&format!("{base}_int8_rows"));
    let floats = names.fresh(&format!("{base}_rows_float"));
    let row_scales = names.fresh(&format!("{base}_row_scales"));
    let gather_rows = simple_node(base.clone(), "Gather", vec![int8_name, indices.clone()], codes.clone());
    let gather_scales =
        simple_node(names.fresh(&format!("{base}_scales")), "Gather", vec![scales_name, indices], row_scales.clone());
    let mut cast = simple_node(names.fresh(&format!("{base}_cast")), "Cast", vec![codes], floats.clone());
    cast.attribute.push(AttributeProto {
        name: Some("to".to_owned()),
        r#type: Some(2),
        i: Some(i64::from(elem::FLOAT)),
        ..Default::default()
    });
    let dequantize = simple_node(
        names.fresh(&format!("{base}_dequantize")),
        "Mul",
        vec![floats, row_scales],
        node.output[0].clone(),
    );
    [gather_rows, gather_scales, cast, dequantize]
}
