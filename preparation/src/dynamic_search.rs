//! The drift budget for the dynamic INT8 form: keep in FP32 the fewest MatMul/Gemm nodes whose
//! dynamic quantization loses the most, as the static search does for its form.
//!
//! Nodes are ranked without a full evaluation per node. Dynamic quantization rounds each
//! node's input activation with a per-run uint8 scale and its weights with per-column int8
//! scales; the two noises add. So one pass over the holdout samples (the graph run in
//! segments, see [`crate::segmented`]) measures each quantized node's input SQNR under per-run
//! uint8 rounding, the weights' SQNR is computed from the initializer, and nodes are ranked by
//! the sum of the two noise-to-signal ratios. The number kept is then found by galloping and
//! bisection ([`crate::prefix_search`]), one full evaluation per probe.

use std::collections::HashMap;
use std::time::Instant;

use mantissa_quantize::onnx::{GraphProto, ModelProto};
use mantissa_quantize::passes::int8::{Int8Options, Int8Report, quantize_dynamic};
use mantissa_quantize::tensor::f32_values;
use mantissa_runtime::Environment;
use mantissa_runtime::samples::{load_sample, sample_files};

use crate::accuracy::{DriftReport, Measures};
use crate::calibrate::measure_inference;
use crate::error::PrepareError;
use crate::prefix_search::{Probe, smallest_meeting_prefix};
use crate::search::{BudgetSearch, Evaluator, SearchReport};
use crate::segmented::SegmentedObserver;

/// Signal and rounding-noise energy of one tensor under per-run uint8 quantization.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct NoiseTally {
    signal: f64,
    noise: f64,
}

impl NoiseTally {
    /// Adds one run's values, rounded as DynamicQuantizeLinear does: the range [min, max]
    /// widened to include 0, 255 steps.
    fn add(&mut self, values: impl Iterator<Item = f32> + Clone) {
        let (lo, hi) = values.clone().fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let scale = (hi - lo) / 255.0;
        if scale <= 0.0 || !scale.is_finite() {
            return;
        }
        let zero = (-lo / scale).round();
        for v in values {
            let code = ((v / scale).round() + zero).clamp(0.0, 255.0);
            let back = (code - zero) * scale;
            self.signal += f64::from(v) * f64::from(v);
            self.noise += f64::from(v - back) * f64::from(v - back);
        }
    }

    fn noise_ratio(&self) -> f64 {
        if self.signal > 0.0 { self.noise / self.signal } else { 0.0 }
    }
}

/// Noise-to-signal ratio of int8 weights with one symmetric scale per output column (the last
/// axis of a MatMul's [K, N] weight).
fn weight_noise_ratio(values: &[f32], columns: usize) -> f64 {
    if columns == 0 || !values.len().is_multiple_of(columns) {
        return 0.0;
    }
    let mut scale = vec![0f32; columns];
    for (index, v) in values.iter().enumerate() {
        scale[index % columns] = scale[index % columns].max(v.abs() / 127.0);
    }
    let (mut signal, mut noise) = (0f64, 0f64);
    for (index, &v) in values.iter().enumerate() {
        let s = scale[index % columns];
        let back = if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) * s } else { 0.0 };
        signal += f64::from(v) * f64::from(v);
        noise += f64::from(v - back) * f64::from(v - back);
    }
    if signal > 0.0 { noise / signal } else { 0.0 }
}

/// The quantized nodes of the main graph with their activation input and weight noise ratio.
fn node_inputs(graph: &GraphProto, quantized: &[(String, String)]) -> Vec<(String, String, f64)> {
    let initializers: HashMap<&str, _> = graph.initializer.iter().map(|t| (t.name(), t)).collect();
    quantized
        .iter()
        .filter_map(|(name, _)| {
            let node = graph.node.iter().find(|n| n.name() == name)?;
            let (activation, weight) = (node.input.first()?, node.input.get(1)?);
            let tensor = initializers.get(weight.as_str())?;
            let columns = tensor.dims.last().copied().unwrap_or(0).max(0) as usize;
            let ratio = f32_values(tensor).map_or(0.0, |values| weight_noise_ratio(&values, columns));
            Some((name.clone(), activation.clone(), ratio))
        })
        .collect()
}

/// Quantized nodes, most sensitive first: by the sum of their input's and their weights'
/// noise-to-signal ratios over the holdout samples. Nodes the pass quantized inside subgraphs
/// (not observable) come last, in the pass's order.
fn rank(
    environment: &Environment,
    fp32: &ModelProto,
    holdout: &std::path::Path,
    quantized: &[(String, String)],
) -> Result<Vec<String>, PrepareError> {
    let graph = fp32.graph.as_ref().ok_or_else(|| PrepareError::Observation("model has no graph".into()))?;
    let nodes = node_inputs(graph, quantized);
    let mut activations: Vec<String> = nodes.iter().map(|(_, activation, _)| activation.clone()).collect();
    activations.sort();
    activations.dedup();
    let yardstick = measure_inference(environment, fp32, holdout)?;
    let inputs: Vec<String> = yardstick.signature.inputs.iter().map(|spec| spec.name.clone()).collect();
    let mut observer = SegmentedObserver::new(environment, fp32, &activations, &inputs, yardstick.budget_bytes)?;
    let mut tallies: HashMap<String, NoiseTally> = HashMap::new();
    for file in sample_files(holdout)? {
        let sample = load_sample(&file, &yardstick.signature)?;
        observer.observe(&yardstick.signature, sample, &mut |name, bytes| {
            let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            tallies.entry(name.to_owned()).or_default().add(values);
        })?;
    }
    let mut scored: Vec<(String, f64)> = nodes
        .iter()
        .map(|(name, activation, weight)| {
            (name.clone(), tallies.get(activation).map_or(0.0, NoiseTally::noise_ratio) + weight)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut ranked: Vec<String> = scored.into_iter().map(|(name, _)| name).collect();
    ranked.extend(quantized.iter().map(|(name, _)| name.clone()).filter(|name| !nodes.iter().any(|n| &n.0 == name)));
    Ok(ranked)
}

/// The dynamic form that meets the budget with the fewest nodes kept FP32, with the search's
/// report; `Ok(None)` when even the cap on nodes kept FP32 misses.
pub(crate) fn search_dynamic(
    environment: &Environment,
    fp32: &ModelProto,
    options: &Int8Options,
    search: &BudgetSearch<'_>,
    label: &str,
) -> Result<(ModelProto, Int8Report, Option<SearchReport>), PrepareError> {
    let started = Instant::now();
    let build = |kept: &[String]| -> Result<(ModelProto, Int8Report), PrepareError> {
        let mut options = options.clone();
        options.nodes_exclude.extend(kept.iter().map(|name| regex::escape(name)));
        let mut model = fp32.clone();
        let report = quantize_dynamic(&mut model, &options)
            .map_err(|source| PrepareError::Int8 { mode: "int8 dynamic", source })?;
        Ok((model, report))
    };
    let (plain, plain_report) = build(&[])?;
    let measures = Measures { class_outputs: search.class_outputs, parts: Some(&search.budget.parts) };
    let evaluator = Evaluator::new(environment, fp32, search.holdout, measures)?;
    let initial = evaluator.score(&plain)?;
    if plain_report.quantized.is_empty() || initial.meets(search.budget) {
        return Ok((plain, plain_report, None));
    }
    let ranked = rank(environment, fp32, search.holdout, &plain_report.quantized)?;
    let candidates = ranked.len();
    let cap = search
        .budget
        .max_fp32_fraction
        .map_or(candidates, |fraction| ((fraction * candidates as f64) + 1e-9).floor() as usize);
    let mut met: Option<(usize, ModelProto, Int8Report, DriftReport)> = None;
    let mut evaluations = 1;
    smallest_meeting_prefix(cap, |probe: Probe| {
        let (model, report) = build(&ranked[..probe.k])?;
        let score = evaluator.score(&model)?;
        evaluations += 1;
        let meets = score.meets(search.budget);
        tracing::info!(
            variant = label,
            pass = "int8 dynamic budget search",
            kept_fp32 = probe.k,
            cosine = score.worst_cosine(),
            meets,
            evaluations_left = probe.left - 1,
            "budget search"
        );
        if meets {
            met = Some((probe.k, model, report, score));
        }
        Ok::<_, PrepareError>(meets)
    })?;
    let Some((k, model, report, score)) = met else {
        tracing::info!(variant = label, cap, "int8 dynamic budget search: even the cap misses the budget");
        return Ok((plain, plain_report, None));
    };
    let searched = SearchReport {
        kept_fp32: ranked[..k].to_vec(),
        candidates,
        cosine: score.worst_cosine(),
        tightest: score.tightest(search.budget).map(|t| t.to_string()),
        top1_agreement: score.worst_top1(),
        initial_cosine: initial.worst_cosine(),
        initial_top1_agreement: initial.worst_top1(),
        evaluations,
        sensitivity_runs: 1,
        elapsed: started.elapsed(),
        time_limited: false,
    };
    tracing::info!(variant = label, kept_fp32 = ?searched.kept_fp32, cosine = searched.cosine, evaluations, "int8 dynamic: budget met");
    Ok((model, report, Some(searched)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outlier_costs_the_rest_of_the_tensor_its_resolution() {
        let plain: Vec<f32> = (0..1000).map(|i| (i as f32 / 999.0) * 2.0 - 1.0).collect();
        let mut outlier = plain.clone();
        outlier[0] = 100.0;
        let (mut a, mut b) = (NoiseTally::default(), NoiseTally::default());
        a.add(plain.iter().copied());
        b.add(outlier.iter().copied());
        // 255 steps over [-1, 1]: noise ~ step^2 / 12 per value against a signal of ~1/3.
        assert!(a.noise_ratio() < 1e-4, "{}", a.noise_ratio());
        // Over [-1, 100] the step is 50x wider: the small values lose most of their precision.
        assert!(b.noise > a.noise * 100.0, "{} {}", a.noise, b.noise);
    }

    #[test]
    fn one_scale_per_column_keeps_a_small_column_exact_enough() {
        // Two columns: one in 0..1, one in 0..1000; per-column scales keep both fine.
        let values: Vec<f32> = (0..200).map(|i| if i % 2 == 0 { (i as f32) / 200.0 } else { i as f32 * 5.0 }).collect();
        assert!(weight_noise_ratio(&values, 2) < 1e-4);
        // One column over all of them (a per-tensor scale) loses the small values.
        assert!(weight_noise_ratio(&values, 1) > weight_noise_ratio(&values, 2));
    }
}
