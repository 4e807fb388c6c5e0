//! Collection: runs every sample once through the FP32 model (with the tensors the report looks at
//! added as graph outputs) and once through its static INT8 twin, and keeps only fixed-size
//! statistics from one sample to the next. Nothing here decides what is flagged: `report` reads
//! the trackers this pass leaves behind.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use mantissa_quantize::elem;
use mantissa_quantize::graph::GraphIndex;
use mantissa_quantize::load_model;
use mantissa_quantize::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use mantissa_quantize::passes::canonicalize::{constants_to_initializers, sort_topologically};
use mantissa_quantize::passes::int8::{Int8Mode, Int8Options};
use mantissa_quantize::passes::int8::{quantize_static, tensors_to_calibrate};
use mantissa_quantize::tensor::f32_values;
use mantissa_quantize::types::{ElemTypes, attribute, infer_elem_types};

use mantissa_preparation::accuracy::DriftAccumulator;
use mantissa_preparation::calibrate::{CalibrationJob, add_float_outputs, calibrate};
use mantissa_preparation::output_parts::PartFinder;
use mantissa_runtime::DataType;
use mantissa_runtime::InferenceRequest;
use mantissa_runtime::ModelSignature;
use mantissa_runtime::TensorData;
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{Environment, OutputTensor, Session, execute, open_internal_session};

use super::trackers::{
    ActivationSpreadTracker, DeadTracker, InputTracker, JoinTracker, Observed, Sample, SaturationTracker,
    SensitivityTracker, WeightRanges, weight_ranges,
};

/// Inputs of Sigmoid beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
const SIGMOID_LIMIT: f32 = mantissa_quantize::calibration::SIGMOID_INPUT_LIMIT;
/// Inputs of Tanh beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
const TANH_LIMIT: f32 = mantissa_quantize::calibration::TANH_INPUT_LIMIT;

const COMPUTE_OPS: &[&str] = &["Conv", "MatMul", "Gemm"];

/// Everything the pass over the samples leaves behind, one field per report section.
pub(super) struct Collected {
    /// Sample files read.
    pub(super) samples: usize,
    /// Items over all samples (rows along a dynamic first dimension; 1 per file otherwise).
    pub(super) items: u64,
    pub(super) inputs: Vec<InputTracker>,
    pub(super) weight_spread: Vec<WeightRanges>,
    pub(super) activation_spread: Vec<ActivationSpreadTracker>,
    pub(super) joins: Vec<JoinTracker>,
    pub(super) dead: Vec<DeadTracker>,
    pub(super) saturation: Vec<SaturationTracker>,
    /// MACCs of every compute node, counted on the first sample (`None` without samples).
    pub(super) maccs: Option<MaccsCount>,
    pub(super) sensitivity: Sensitivity,
    /// The model's own outputs, each with the channel ranges its FP32 values showed, in
    /// graph order: the parts the drift check would measure them by.
    pub(super) output_parts: Vec<(String, PartFinder)>,
}

/// MACCs of the compute nodes, from the shapes of one sample.
pub(super) struct MaccsCount {
    /// Items in the sample the shapes were taken from.
    pub(super) batch: u64,
    pub(super) nodes: Vec<NodeMaccs>,
}

pub(super) struct NodeMaccs {
    pub(super) node: NodeProto,
    /// Per item; `None` when a shape was not observed.
    pub(super) maccs: Option<u64>,
}

/// The comparison of the static INT8 twin with FP32, node by node.
pub(super) struct Sensitivity {
    pub(super) trackers: Vec<SensitivityTracker>,
    /// Why the INT8 model could not be built or run, if it could not.
    pub(super) error: Option<String>,
    pub(super) quantized_nodes: usize,
}

impl Sensitivity {
    fn observe(&mut self, sample: &Sample, quantized: &Sample) {
        for tracker in &mut self.trackers {
            if let (Some(reference), Some(variant)) =
                (sample.get(&tracker.tensor), quantized.get(&tracker.compared_with))
            {
                tracker.accumulator.add(&reference.values, &variant.values, None);
            }
        }
    }
}

/// Clip's bounds: inputs 1 and 2 when constant (opset 11 on), else the `min`/`max` attributes.
fn clip_bounds(node: &NodeProto, initializers: &HashMap<String, &TensorProto>) -> (Option<f32>, Option<f32>) {
    let input = |slot: usize| {
        node.input
            .get(slot)
            .filter(|name| !name.is_empty())
            .and_then(|name| initializers.get(name.as_str()))
            .and_then(|tensor| f32_values(tensor))
            .and_then(|values| values.first().copied())
    };
    let attr = |name: &str| attribute(node, name).and_then(|a| a.f);
    (input(1).or_else(|| attr("min")), input(2).or_else(|| attr("max")))
}

/// MACCs of one Conv/MatMul/Gemm over a whole observed sample (all items).
fn node_maccs(node: &NodeProto, sample: &Sample, initializers: &HashMap<String, &TensorProto>) -> Option<u64> {
    let shape = |name: &String| -> Option<Vec<u64>> {
        let shape = match sample.get(name) {
            Some(observed) => observed.shape.clone(),
            None => initializers.get(name.as_str())?.dims.clone(),
        };
        Some(shape.iter().map(|&d| d.max(0) as u64).collect())
    };
    let output: u64 = shape(node.output.first()?)?.iter().product();
    let per_output: u64 = match node.op_type() {
        // Kernel elements x input channels per group: the weight's dims after the first.
        "Conv" => shape(node.input.get(1)?)?.iter().skip(1).product(),
        "MatMul" => *shape(node.input.first()?)?.last()?,
        "Gemm" => {
            let a = shape(node.input.first()?)?;
            let trans_a = attribute(node, "transA").and_then(|a| a.i).unwrap_or(0) != 0;
            if a.len() != 2 {
                return None;
            }
            if trans_a { a[0] } else { a[1] }
        }
        _ => return None,
    };
    Some(output * per_output)
}

/// What a sample can show of the (constant-folded, sorted) graph.
struct GraphView<'g> {
    graph: &'g GraphProto,
    types: ElemTypes,
    initializers: HashMap<String, &'g TensorProto>,
    /// Graph inputs that are not initializers: a sample shows them without being asked to.
    input_names: HashSet<&'g str>,
}

impl<'g> GraphView<'g> {
    fn new(graph: &'g GraphProto) -> Self {
        let types = infer_elem_types(graph, &Default::default());
        let initializers: HashMap<String, &TensorProto> =
            graph.initializer.iter().map(|t| (t.name().to_owned(), t)).collect();
        let graph_inputs: Vec<&ValueInfoProto> =
            graph.input.iter().filter(|i| !initializers.contains_key(i.name())).collect();
        let input_names: HashSet<&str> = graph_inputs.iter().map(|i| i.name()).collect();
        Self { graph, types, initializers, input_names }
    }

    /// Tensors a sample shows: float graph inputs, and float node outputs added as graph outputs.
    fn observable(&self, name: &str) -> bool {
        !name.is_empty() && self.types.get(name) == Some(&elem::FLOAT) && !self.initializers.contains_key(name)
    }
}

/// What each section watches, read off the graph before any sample runs.
struct Plan<'g> {
    weight_spread: Vec<WeightRanges>,
    activation_spread: Vec<ActivationSpreadTracker>,
    dead: Vec<DeadTracker>,
    saturation: Vec<SaturationTracker>,
    joins: Vec<JoinTracker>,
    compute_nodes: Vec<&'g NodeProto>,
    /// Tensors to add as outputs of the FP32 model, each once, in the order first asked for.
    watched: Vec<String>,
}

impl<'g> Plan<'g> {
    fn new(view: &GraphView<'g>) -> Self {
        let mut plan = Self {
            weight_spread: Vec::new(),
            activation_spread: Vec::new(),
            dead: Vec::new(),
            saturation: Vec::new(),
            joins: Vec::new(),
            compute_nodes: Vec::new(),
            watched: Vec::new(),
        };
        for node in view.graph.node.iter().filter(|n| n.domain().is_empty()) {
            if COMPUTE_OPS.contains(&node.op_type()) {
                plan.add_compute(view, node);
            }
            match node.op_type() {
                "Relu" | "Clip" => plan.add_dead(view, node),
                "Concat" => plan.add_join(view, node),
                "Sigmoid" | "Tanh" => plan.add_saturation(view, node),
                _ => {}
            }
        }
        plan
    }

    /// Asks for `name` as an FP32 output, unless a sample cannot show it or shows it anyway.
    fn watch(&mut self, view: &GraphView<'_>, name: &str) {
        if view.observable(name) && !view.input_names.contains(name) && !self.watched.iter().any(|w| w == name) {
            self.watched.push(name.to_owned());
        }
    }

    /// A Conv/MatMul/Gemm: the spread of its weight (input 1, when constant) and of the
    /// activations it reads, and its output for the MACC count and the INT8 comparison.
    fn add_compute(&mut self, view: &GraphView<'g>, node: &'g NodeProto) {
        self.compute_nodes.push(node);
        for (slot, input) in node.input.iter().enumerate().take(2) {
            if let Some(weight) = view.initializers.get(input.as_str()) {
                if slot == 1 {
                    self.weight_spread.extend(weight_ranges(node, weight));
                }
            } else if view.observable(input) {
                self.watch(view, input);
                // A computed Conv weight keeps its output channels on axis 0, not on the
                // activation axis, so it gets no activation row.
                if (slot == 0 || node.op_type() != "Conv") && !self.activation_spread.iter().any(|t| &t.tensor == input)
                {
                    self.activation_spread.push(ActivationSpreadTracker::new(input, node));
                }
            }
        }
        if let Some(output) = node.output.first() {
            self.watch(view, output);
        }
    }

    fn add_dead(&mut self, view: &GraphView<'g>, node: &NodeProto) {
        let Some(output) = node.output.first().filter(|o| view.observable(o)) else { return };
        let (low, high) =
            if node.op_type() == "Relu" { (Some(0.0), None) } else { clip_bounds(node, &view.initializers) };
        self.watch(view, output);
        self.dead.push(DeadTracker::new(node, output, low, high));
    }

    /// A Concat of two or more observable inputs: one range per input.
    fn add_join(&mut self, view: &GraphView<'g>, node: &NodeProto) {
        let inputs: Vec<String> = node.input.iter().filter(|i| view.observable(i)).cloned().collect();
        if inputs.len() >= 2 {
            for input in &inputs {
                self.watch(view, input);
            }
            self.joins.push(JoinTracker::new(node, inputs));
        }
    }

    fn add_saturation(&mut self, view: &GraphView<'g>, node: &NodeProto) {
        let Some(input) = node.input.first().filter(|i| view.observable(i)) else { return };
        self.watch(view, input);
        let limit = if node.op_type() == "Sigmoid" { SIGMOID_LIMIT } else { TANH_LIMIT };
        self.saturation.push(SaturationTracker::new(node, input, limit));
    }
}

/// The outputs of one run of a probe model on a sample, float tensors only.
fn run_probe(
    session: &mut Session,
    signature: &ModelSignature,
    request: &InferenceRequest,
    file: &Path,
    what: &str,
) -> Result<Sample, String> {
    let mut request = request.clone();
    request.outputs = (0..signature.outputs.len()).collect();
    let outputs = execute(session, signature, &request).map_err(|err| format!("{}: {what}: {err}", file.display()))?;
    Ok(outputs
        .into_iter()
        .filter(|output| matches!(output.datatype, DataType::Fp32 | DataType::Fp16 | DataType::Fp64))
        .map(|output| {
            let values = output.floats();
            (output.name, Observed { shape: output.shape, values })
        })
        .collect())
}

/// Adds the sample's own inputs to what the FP32 model returned, as the input trackers read them.
fn add_inputs(sample: &mut Sample, signature: &ModelSignature, request: &InferenceRequest) {
    for (spec, input) in signature.inputs.iter().zip(&request.inputs) {
        if let TensorData::Raw(raw) = &input.data {
            let tensor = OutputTensor {
                name: spec.name.clone(),
                datatype: input.datatype,
                shape: input.shape.clone(),
                raw: raw.clone(),
            };
            let values = tensor.floats();
            if !values.is_empty() || raw.is_empty() {
                sample.insert(spec.name.clone(), Observed { shape: input.shape.clone(), values });
            }
        }
    }
}

/// The tensor of the quantized graph that readers of `tensor` see: the output of the
/// DequantizeLinear behind the QuantizeLinear reading `tensor`, if there is such a pair.
fn dequantized_name(graph: &GraphProto, index: &GraphIndex, tensor: &str) -> Option<String> {
    let quantize = index
        .consumers(tensor)
        .iter()
        .map(|&c| &graph.node[c])
        .find(|n| n.op_type() == "QuantizeLinear" && n.input.first().is_some_and(|i| i == tensor))?;
    let quantized = quantize.output.first()?;
    let dequantize = index
        .consumers(quantized)
        .iter()
        .map(|&c| &graph.node[c])
        .find(|n| n.op_type() == "DequantizeLinear" && n.input.first() == Some(quantized))?;
    dequantize.output.first().cloned()
}

/// The quantized model (static INT8, every compute node a candidate) and what it quantized, as
/// (node of `graph`, output tensor, tensor of the quantized graph to compare it with).
fn build_quantized(
    environment: &Environment,
    base: &ModelProto,
    graph: &GraphProto,
    data: &Path,
    observable: &dyn Fn(&str) -> bool,
) -> Result<(ModelProto, Vec<SensitivityTracker>), String> {
    let options = Int8Options {
        mode: Int8Mode::Static,
        keep_first_and_last_layers: false,
        calibration_data: Some(data.to_owned()),
        ..Int8Options::default()
    };
    let mut quantized = base.clone();
    let tensors = tensors_to_calibrate(&quantized, &options).map_err(|err| format!("int8 static: {err}"))?;
    let ranges = calibrate(
        environment,
        &CalibrationJob {
            model: &quantized,
            tensors: &tensors,
            full_range: &[],
            data,
            options: &options.calibration,
            label: "analyze",
        },
    )
    .map_err(|err| err.to_string())?;
    let report = quantize_static(&mut quantized, &options, &ranges).map_err(|err| format!("int8 static: {err}"))?;
    let qgraph = quantized.graph.as_ref().ok_or("quantized model has no graph")?;
    let index = GraphIndex::build(qgraph);
    let produced: HashSet<&str> = qgraph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    // The pass walks the same topologically sorted nodes, so its report follows this order.
    let mut pending = report.quantized.iter().peekable();
    let mut trackers = Vec::new();
    for node in graph.node.iter().filter(|n| n.domain().is_empty() && COMPUTE_OPS.contains(&n.op_type())) {
        let Some((name, op)) = pending.peek() else { break };
        if name != node.name() || op != node.op_type() {
            continue;
        }
        pending.next();
        let Some(tensor) = node.output.first().filter(|t| observable(t)) else { continue };
        let compared_with = match dequantized_name(qgraph, &index, tensor) {
            Some(name) => name,
            None if produced.contains(tensor.as_str()) => tensor.clone(),
            None => continue,
        };
        trackers.push(SensitivityTracker {
            node: node.clone(),
            tensor: tensor.clone(),
            compared_with,
            accumulator: DriftAccumulator::default(),
        });
    }
    Ok((quantized, trackers))
}

/// The INT8 twin with the compared tensors as outputs, and its trackers. A twin that cannot be
/// built is not an error: the report says why in its sensitivity section.
fn quantized_probe(
    environment: &Environment,
    base: &ModelProto,
    graph: &GraphProto,
    data: &Path,
    observable: &dyn Fn(&str) -> bool,
) -> Result<(Option<ModelProto>, Sensitivity), String> {
    match build_quantized(environment, base, graph, data, observable) {
        Ok((mut model, trackers)) => {
            let compared: Vec<String> = trackers.iter().map(|t| t.compared_with.clone()).collect();
            add_float_outputs(&mut model, &compared).map_err(|err| err.to_string())?;
            let quantized_nodes = trackers.len();
            Ok((Some(model), Sensitivity { trackers, error: None, quantized_nodes }))
        }
        Err(err) => Ok((None, Sensitivity { trackers: Vec::new(), error: Some(err), quantized_nodes: 0 })),
    }
}

/// A session on the INT8 twin; when it does not load, the comparison is dropped and `sensitivity`
/// says why.
fn open_quantized(
    environment: &Environment,
    model: Option<&ModelProto>,
    sensitivity: &mut Sensitivity,
) -> Option<(Session, ModelSignature)> {
    match open_internal_session(environment, model?) {
        Ok(session) => Some(session),
        Err(err) => {
            sensitivity.error = Some(format!("the INT8 model does not load: {err}"));
            sensitivity.trackers.clear();
            sensitivity.quantized_nodes = 0;
            None
        }
    }
}

/// The model with Constant nodes folded into initializers and nodes in topological order, and
/// a copy of that graph the trackers borrow from.
fn load_sorted(path: &Path) -> Result<(ModelProto, GraphProto), String> {
    let mut base = load_model(path).map_err(|err| err.to_string())?;
    let graph = base.graph.as_mut().ok_or_else(|| format!("{}: model has no graph", path.display()))?;
    constants_to_initializers(graph);
    sort_topologically(graph).map_err(|err| format!("{}: {err}", path.display()))?;
    let graph = graph.clone();
    Ok((base, graph))
}

/// The sessions every sample runs through, and the graph facts read along with them.
struct Pass<'a> {
    initializers: &'a HashMap<String, &'a TensorProto>,
    compute_nodes: &'a [&'a NodeProto],
    session: Session,
    signature: ModelSignature,
    /// The INT8 twin, when it could be built and loaded.
    quantized: Option<(Session, ModelSignature)>,
    /// The first input's first dimension is dynamic, so a sample holds that many items.
    batched: bool,
}

impl Pass<'_> {
    /// Runs one sample file through both models and feeds every tracker.
    fn observe(&mut self, file: &Path, collected: &mut Collected) -> Result<(), String> {
        let request = load_sample(file, &self.signature).map_err(|err| err.to_string())?;
        let batch = if self.batched {
            request.inputs.first().and_then(|i| i.shape.first()).map_or(1, |&d| d.max(1) as u64)
        } else {
            1
        };
        collected.items += batch;
        let mut sample = run_probe(&mut self.session, &self.signature, &request, file, "FP32 model")?;
        add_inputs(&mut sample, &self.signature, &request);
        collected.observe(&sample).map_err(|err| format!("{}: {err}", file.display()))?;
        if collected.maccs.is_none() {
            collected.maccs = Some(self.maccs(&sample, batch));
        }
        if let Some((session, signature)) = self.quantized.as_mut() {
            let quantized = run_probe(session, signature, &request, file, "INT8 model")?;
            collected.sensitivity.observe(&sample, &quantized);
        }
        Ok(())
    }

    fn maccs(&self, sample: &Sample, batch: u64) -> MaccsCount {
        let nodes = self
            .compute_nodes
            .iter()
            .map(|&node| NodeMaccs {
                node: node.clone(),
                maccs: node_maccs(node, sample, self.initializers).map(|m| m / batch),
            })
            .collect();
        MaccsCount { batch, nodes }
    }
}

impl Collected {
    fn new(
        plan: Plan<'_>,
        sensitivity: Sensitivity,
        signature: &ModelSignature,
        samples: usize,
        outputs: &GraphProto,
    ) -> Self {
        Self {
            samples,
            items: 0,
            inputs: signature.inputs.iter().map(|spec| InputTracker::new(&spec.name, spec.datatype)).collect(),
            weight_spread: plan.weight_spread,
            activation_spread: plan.activation_spread,
            joins: plan.joins,
            dead: plan.dead,
            saturation: plan.saturation,
            maccs: None,
            sensitivity,
            output_parts: outputs.output.iter().map(|o| (o.name().to_owned(), PartFinder::default())).collect(),
        }
    }

    /// Feeds the FP32 side of one sample to the trackers; errors are inconsistent channel counts.
    fn observe(&mut self, sample: &Sample) -> Result<(), String> {
        for tracker in &mut self.inputs {
            if let Some(observed) = sample.get(&tracker.name) {
                tracker.observe(observed);
            }
        }
        for tracker in &mut self.activation_spread {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed)?;
            }
        }
        for tracker in &mut self.dead {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed)?;
            }
        }
        for tracker in &mut self.saturation {
            if let Some(observed) = sample.get(&tracker.tensor) {
                tracker.observe(observed);
            }
        }
        for tracker in &mut self.joins {
            tracker.observe(sample);
        }
        for (output, finder) in &mut self.output_parts {
            if let Some(observed) = sample.get(output) {
                finder.observe(&observed.shape, &observed.values);
            }
        }
        Ok(())
    }
}

/// Runs the model (and its static INT8 twin, calibrated on the same data) on every sample under
/// `data` and returns the statistics (blocking: runs ONNX Runtime on every sample, twice).
pub(super) fn collect(model: &Path, data: &Path, ort_library: Option<&Path>) -> Result<Collected, String> {
    if !data.exists() {
        return Err(format!("data directory {} does not exist", data.display()));
    }
    let files = sample_files(data).map_err(|err| err.to_string())?;
    let (base, graph) = load_sorted(model)?;
    let view = GraphView::new(&graph);
    let observable = |name: &str| view.observable(name);

    let environment = mantissa_runtime::load_environment(ort_library).map_err(|err| err.to_string())?;

    let mut plan = Plan::new(&view);
    // Static INT8 of the same model, calibrated on the same data.
    let (quantized_model, mut sensitivity) = quantized_probe(&environment, &base, &graph, data, &observable)?;
    for tracker in &sensitivity.trackers {
        plan.watch(&view, &tracker.tensor);
    }
    let mut fp32_probe = base.clone();
    add_float_outputs(&mut fp32_probe, &plan.watched).map_err(|err| err.to_string())?;
    let (session, signature) =
        open_internal_session(&environment, &fp32_probe).map_err(|err| format!("{}: {err}", model.display()))?;
    let quantized = open_quantized(&environment, quantized_model.as_ref(), &mut sensitivity);

    let compute_nodes = std::mem::take(&mut plan.compute_nodes);
    let batched = signature.inputs.first().and_then(|spec| spec.dims.first()).is_some_and(|&d| d < 0);
    let mut collected = Collected::new(plan, sensitivity, &signature, files.len(), &graph);
    let mut pass = Pass {
        initializers: &view.initializers,
        compute_nodes: &compute_nodes,
        session,
        signature,
        quantized,
        batched,
    };
    for (done, file) in files.iter().enumerate() {
        pass.observe(file, &mut collected)?;
        tracing::debug!(samples_done = done + 1, samples_total = files.len(), "analyzed");
    }
    Ok(collected)
}
