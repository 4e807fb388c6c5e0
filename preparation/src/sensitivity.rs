//! How sensitive each quantized node is to INT8, from a few instrumented runs instead of one
//! full evaluation per node.
//!
//! The measure is each node's *local* error: its quantized form (Q/DQ'd inputs, dequantized
//! int8 weights, the node, its output's Q/DQ pair: what downstream reads) fed the FP32
//! model's own tensors, compared with the FP32 node's output as SQNR over the holdout
//! samples. It is measured on a shadow model: the FP32 graph plus, for each node, a copy of
//! its quantized form that reads the FP32 graph's tensors, so one run gives every node's error
//! free of what the nodes before it got wrong.
//!
//! The other measure within a couple of runs, comparing each node's output in the plain
//! quantized model with FP32 (the error accumulated up to that node), ranks poorly: a node
//! inherits the error of everything before it, so deep nodes rank first whatever their own
//! share, and keeping them FP32 removes little. Measured on the holdout data with the budget
//! search's bisection (nodes kept FP32 to reach the budget): PP-OCRv4 recognition at cosine
//! 0.99, 9 of 49 with local SQNR, 46 with accumulated SQNR, 36 with the drop in SQNR across
//! each node; MiniLM-L6 at 0.995, 14 of 44 local, 35 accumulated. Local error ignores how much
//! later layers amplify a node's error; the bisection that follows measures whole models, so
//! a ranking that is slightly off costs a few extra FP32 nodes, never a missed budget.
//!
//! Copies are added in groups, each group one session declaring its copies' outputs beside
//! the FP32 tensors they are compared with: ONNX Runtime keeps every declared output alive
//! until a run ends, so groups are sized, as calibration's are, by what one FP32 inference
//! adds to the process.

use std::collections::{BTreeSet, HashMap, HashSet};

use mantissa_quantize::graph::GraphIndex;
use mantissa_quantize::onnx::{GraphProto, ModelProto, NodeProto};
use mantissa_quantize::rewrite::NameGenerator;
use mantissa_runtime::{Environment, InferenceRequest, OutputTensor, execute, open_internal_session};

use crate::accuracy::DriftAccumulator;
use crate::calibrate::add_float_outputs;
use crate::error::PrepareError;

/// One quantized node's measured sensitivity.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSensitivity {
    pub node: String,
    /// SQNR of the node's quantized output over the holdout samples (dB; lower is more
    /// sensitive; `None` when the node could not be measured).
    pub sqnr_db: Option<f64>,
}

/// What ranking the nodes took.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// Most sensitive first; nodes that could not be measured last, in the pass's order.
    pub nodes: Vec<NodeSensitivity>,
    /// Sessions run over the holdout samples (one per group of copies).
    pub runs: usize,
}

/// The inputs of the measurement: the FP32 model, the plain recipe's quantized model and its
/// quantized nodes (name, op), and the holdout samples with the FP32 model's inputs.
#[derive(Debug, Clone, Copy)]
pub struct SensitivityJob<'a> {
    pub fp32: &'a ModelProto,
    pub quantized: &'a ModelProto,
    pub nodes: &'a [(String, String)],
    pub samples: &'a [InferenceRequest],
    /// Bytes of extra outputs one run may hold.
    pub group_budget_bytes: usize,
}

/// Where a quantized node's local copy comes from in the quantized graph.
#[derive(Debug, Clone)]
struct CopyPlan {
    node: String,
    /// Position of the node in the quantized graph.
    position: usize,
    /// The FP32 tensor its output is compared with.
    reference: String,
    /// Q/DQ nodes (positions) between the FP32 tensors and initializers it reads and its
    /// inputs; they read FP32 tensors in the shadow model, so they keep their names and are
    /// shared between copies.
    glue: Vec<usize>,
    /// The QuantizeLinear/DequantizeLinear pair on its output, if any (positions).
    output_pair: Option<(usize, usize)>,
}

fn is_qdq(node: &NodeProto) -> bool {
    matches!(node.op_type(), "QuantizeLinear" | "DequantizeLinear")
}

/// Names the FP32 graph defines: inputs, initializers and node outputs.
fn defined_names(graph: &GraphProto) -> HashSet<&str> {
    graph
        .input
        .iter()
        .map(|i| i.name())
        .chain(graph.initializer.iter().map(|t| t.name()))
        .chain(graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)))
        .collect()
}

/// The Q/DQ nodes behind `inputs` up to tensors the FP32 graph defines or initializers of the
/// quantized graph; `None` when an input comes from anything else (a tensor the pass made).
fn glue_behind(
    quantized: &GraphProto,
    index: &GraphIndex,
    fp32_names: &HashSet<&str>,
    initializers: &HashSet<&str>,
    inputs: &[String],
) -> Option<Vec<usize>> {
    let mut glue = BTreeSet::new();
    let mut pending: Vec<&str> = inputs.iter().map(String::as_str).collect();
    while let Some(tensor) = pending.pop() {
        if tensor.is_empty() || fp32_names.contains(tensor) || initializers.contains(tensor) {
            continue;
        }
        let producer = index.producer(tensor)?;
        let node = &quantized.node[producer];
        if !is_qdq(node) {
            return None;
        }
        if glue.insert(producer) {
            pending.extend(node.input.iter().map(String::as_str));
        }
    }
    Some(glue.into_iter().collect())
}

/// The QuantizeLinear reading `tensor` and the DequantizeLinear reading it, if the pass put a
/// pair there.
fn output_pair(quantized: &GraphProto, index: &GraphIndex, tensor: &str) -> Option<(usize, usize)> {
    let reads_first = |position: &&usize, op: &str, input: &str| {
        quantized.node[**position].op_type() == op
            && quantized.node[**position].input.first().is_some_and(|i| i == input)
    };
    let quantize = *index.consumers(tensor).iter().find(|p| reads_first(p, "QuantizeLinear", tensor))?;
    let quantized_name = quantized.node[quantize].output.first()?;
    let dequantize =
        *index.consumers(quantized_name).iter().find(|p| reads_first(p, "DequantizeLinear", quantized_name))?;
    Some((quantize, dequantize))
}

/// A copy plan for every node that can be measured, and the names of those that cannot.
fn plan_copies(fp32: &GraphProto, quantized: &GraphProto, nodes: &[(String, String)]) -> (Vec<CopyPlan>, Vec<String>) {
    let index = GraphIndex::build(quantized);
    let fp32_names = defined_names(fp32);
    let initializers: HashSet<&str> = quantized.initializer.iter().map(|t| t.name()).collect();
    let mut plans = Vec::new();
    let mut unmeasured = Vec::new();
    for (name, op) in nodes {
        let plan = quantized.node.iter().position(|n| n.name() == name && n.op_type() == op).and_then(|position| {
            let node = &quantized.node[position];
            let reference = node.output.first().filter(|o| fp32_names.contains(o.as_str()))?.clone();
            let glue = glue_behind(quantized, &index, &fp32_names, &initializers, &node.input)?;
            let output_pair = output_pair(quantized, &index, &reference);
            Some(CopyPlan { node: name.clone(), position, reference, glue, output_pair })
        });
        match plan {
            Some(plan) => plans.push(plan),
            None => unmeasured.push(name.clone()),
        }
    }
    (plans, unmeasured)
}

/// One copy in a shadow model: the node, the FP32 tensor and the copy's tensor compared.
#[derive(Debug, Clone)]
struct Compared {
    node: String,
    reference: String,
    local: String,
}

/// The FP32 model plus the local copies of `plans`, with the compared tensors as outputs.
fn shadow_model(
    fp32: &ModelProto,
    quantized: &ModelProto,
    plans: &[CopyPlan],
) -> Result<(ModelProto, Vec<Compared>), PrepareError> {
    let no_graph = || PrepareError::Observation("model has no graph".to_owned());
    let source = quantized.graph.as_ref().ok_or_else(no_graph)?;
    let mut shadow = fp32.clone();
    for opset in &quantized.opset_import {
        if !shadow.opset_import.iter().any(|o| o.domain() == opset.domain()) {
            shadow.opset_import.push(opset.clone());
        }
    }
    let graph = shadow.graph.as_mut().ok_or_else(no_graph)?;
    let glue: BTreeSet<usize> = plans.iter().flat_map(|p| p.glue.iter().copied()).collect();
    graph.node.extend(glue.iter().map(|&position| source.node[position].clone()));
    let copied: Vec<&NodeProto> = plans
        .iter()
        .flat_map(|p| std::iter::once(p.position).chain(p.output_pair.into_iter().flat_map(|(q, d)| [q, d])))
        .map(|position| &source.node[position])
        .collect();
    add_initializers_read(graph, source, &copied);
    // Names drawn after the glue and initializers are in, so copies cannot collide with them.
    let mut names = NameGenerator::for_graph(graph);
    let mut rename = |base: &str| names.fresh(&format!("{base}_local"));
    let mut compared = Vec::with_capacity(plans.len());
    for plan in plans {
        let mut node = source.node[plan.position].clone();
        node.name = Some(rename(&plan.node));
        for output in node.output.iter_mut().filter(|o| !o.is_empty()) {
            *output = rename(output);
        }
        let mut local = node.output[0].clone();
        graph.node.push(node);
        // The copy's own output pair (the original pair reads the FP32 tensor, as glue).
        for position in plan.output_pair.into_iter().flat_map(|(q, d)| [q, d]) {
            let mut pair_node = source.node[position].clone();
            pair_node.name = Some(rename(pair_node.name()));
            pair_node.input[0] = local;
            pair_node.output.truncate(1);
            pair_node.output[0] = rename(&pair_node.output[0]);
            local = pair_node.output[0].clone();
            graph.node.push(pair_node);
        }
        compared.push(Compared { node: plan.node.clone(), reference: plan.reference.clone(), local });
    }
    let outputs: Vec<String> = compared.iter().flat_map(|c| [c.reference.clone(), c.local.clone()]).collect();
    add_float_outputs(&mut shadow, &outputs)?;
    Ok((shadow, compared))
}

/// Copies into `graph` the initializers of `source` that its nodes or `extra` read and that it
/// does not define (the FP32 graph may hold as a Constant node what the quantized graph holds
/// as an initializer of the same name).
fn add_initializers_read(graph: &mut GraphProto, source: &GraphProto, extra: &[&NodeProto]) {
    let defined: HashSet<String> = defined_names(graph).into_iter().map(str::to_owned).collect();
    let read: HashSet<&str> =
        graph.node.iter().chain(extra.iter().copied()).flat_map(|n| n.input.iter().map(String::as_str)).collect();
    let missing: Vec<_> =
        source.initializer.iter().filter(|t| read.contains(t.name()) && !defined.contains(t.name())).cloned().collect();
    graph.initializer.extend(missing);
}

/// Runs one shadow model over the samples and adds each copy's error to `sums`. Returns the
/// largest output seen, in bytes.
fn run_group(
    environment: &Environment,
    shadow: &ModelProto,
    compared: &[Compared],
    samples: &[InferenceRequest],
    sums: &mut HashMap<String, DriftAccumulator>,
) -> Result<usize, PrepareError> {
    let (mut session, signature) = open_internal_session(environment, shadow)?;
    let position = |name: &str| {
        signature
            .outputs
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| PrepareError::Observation(format!("tensor '{name}' is not observable")))
    };
    let wanted: Vec<(usize, usize)> = compared
        .iter()
        .map(|c| Ok((position(&c.reference)?, position(&c.local)?)))
        .collect::<Result<_, PrepareError>>()?;
    let mut largest = 0;
    for sample in samples {
        let mut request = sample.clone();
        request.outputs = wanted.iter().flat_map(|&(r, l)| [r, l]).collect();
        let outputs: Vec<OutputTensor> = execute(&mut session, &signature, &request)?;
        for (pair, copy) in outputs.chunks_exact(2).zip(compared) {
            largest = largest.max(pair[0].raw.len()).max(pair[1].raw.len());
            let (reference, local) = (pair[0].floats(), pair[1].floats());
            if reference.len() == local.len() {
                sums.entry(copy.node.clone()).or_default().add(&reference, &local, None);
            }
        }
    }
    Ok(largest)
}

/// Measures every quantized node of the job and ranks them, most sensitive (lowest SQNR) first.
pub fn rank_by_local_sqnr(environment: &Environment, job: &SensitivityJob<'_>) -> Result<Ranking, PrepareError> {
    let no_graph = || PrepareError::Observation("model has no graph".to_owned());
    let fp32_graph = job.fp32.graph.as_ref().ok_or_else(no_graph)?;
    let quantized_graph = job.quantized.graph.as_ref().ok_or_else(no_graph)?;
    let (plans, unmeasured) = plan_copies(fp32_graph, quantized_graph, job.nodes);
    if !unmeasured.is_empty() {
        tracing::info!(nodes = ?unmeasured, "mixed precision: nodes without a local copy rank last");
    }
    let mut sums: HashMap<String, DriftAccumulator> = HashMap::new();
    let mut pending: &[CopyPlan] = &plans;
    let (mut group_len, mut runs) = (1, 0);
    while !pending.is_empty() {
        let (group, rest) = pending.split_at(group_len.min(pending.len()));
        let (shadow, compared) = shadow_model(job.fp32, job.quantized, group)?;
        let largest = run_group(environment, &shadow, &compared, job.samples, &mut sums)?;
        drop(shadow);
        mantissa_runtime::memory::release_free_memory();
        runs += 1;
        pending = rest;
        // Two declared outputs per copy: the FP32 tensor and the copy's.
        group_len = (job.group_budget_bytes / (2 * largest).max(1)).max(1);
    }
    let mut nodes: Vec<NodeSensitivity> = plans
        .iter()
        .map(|p| NodeSensitivity { node: p.node.clone(), sqnr_db: sums.get(&p.node).map(|s| s.figures().sqnr_db) })
        .collect();
    // Lowest SQNR first; a node with no error (infinite SQNR) or no figure goes last.
    nodes.sort_by(|a, b| {
        let key = |n: &NodeSensitivity| n.sqnr_db.filter(|s| s.is_finite()).unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b))
    });
    nodes.extend(unmeasured.into_iter().map(|node| NodeSensitivity { node, sqnr_db: None }));
    Ok(Ranking { nodes, runs })
}
