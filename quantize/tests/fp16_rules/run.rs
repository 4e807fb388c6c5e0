//! Running the pass and inspecting the result.

use mantissa_quantize::elem::{FLOAT, FLOAT16};
use mantissa_quantize::onnx::{GraphProto, NodeProto, TensorProto};
use mantissa_quantize::passes::fp16::{Fp16Error, Fp16Options, Fp16Report, KeepReason, convert_to_fp16};

use crate::build::Graph;
use crate::inspect::{Types, cast_sources, casts, find_initializer, find_node, float_types};
use crate::well_formed::check_graph;

/// A converted model with the report and the element type of every value of its main graph.
pub(crate) struct Converted {
    pub(crate) graph: GraphProto,
    pub(crate) report: Fp16Report,
    pub(crate) types: Types,
}

/// Runs the pass and checks the result is well formed.
pub(crate) fn convert(graph: Graph, options: &Fp16Options) -> Converted {
    let mut model = graph.model();
    let report = convert_to_fp16(&mut model, options).expect("conversion succeeds");
    let graph = model.graph.expect("graph kept");
    let types = check_graph(&graph, &Types::new());
    Converted { graph, report, types }
}

pub(crate) fn convert_error(graph: Graph, options: &Fp16Options) -> Fp16Error {
    convert_to_fp16(&mut graph.model(), options).expect_err("conversion fails")
}

impl Converted {
    pub(crate) fn node(&self, name: &str) -> &NodeProto {
        find_node(&self.graph, name)
    }

    pub(crate) fn position(&self, name: &str) -> usize {
        self.graph.node.iter().position(|n| n.name() == name).unwrap_or_else(|| panic!("no node '{name}'"))
    }

    pub(crate) fn kept(&self, name: &str) -> Option<&KeepReason> {
        self.report.nodes_kept.iter().find(|(node, _, _)| node == name).map(|(_, _, reason)| reason)
    }

    pub(crate) fn initializer(&self, name: &str) -> &TensorProto {
        find_initializer(&self.graph, name)
    }

    /// The element type of every float-typed input and output of a node.
    pub(crate) fn float_types(&self, name: &str) -> Vec<i32> {
        float_types(self.node(name), &self.types)
    }

    /// Asserts the node was converted: not reported kept, float inputs and outputs FP16.
    pub(crate) fn assert_converted(&self, name: &str) {
        assert_eq!(self.kept(name), None, "node '{name}' should be converted");
        let types = self.float_types(name);
        assert!(
            !types.is_empty() && types.iter().all(|&t| t == FLOAT16),
            "node '{name}' should read and write FP16, types {types:?}"
        );
    }

    /// Asserts the node stayed FP32 for `reason`: float inputs and outputs FLOAT.
    pub(crate) fn assert_kept(&self, name: &str, reason: KeepReason) {
        assert_eq!(self.kept(name), Some(&reason), "node '{name}'");
        let types = self.float_types(name);
        assert!(
            !types.is_empty() && types.iter().all(|&t| t == FLOAT),
            "node '{name}' should read and write FLOAT, types {types:?}"
        );
    }

    pub(crate) fn casts(&self) -> Vec<&NodeProto> {
        casts(&self.graph)
    }

    /// Every Cast as (what it reads: producer node, or the value when no node produces it, `to`).
    pub(crate) fn cast_sources(&self) -> Vec<(String, i64)> {
        cast_sources(&self.graph)
    }
}
