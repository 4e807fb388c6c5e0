//! Automatic mixed precision for static INT8: given a drift budget and holdout data, keep the
//! fewest, most sensitive quantized nodes in FP32 until the budget is met.
//!
//! Sensitivity of a node = how much the model's outputs improve when that node alone is left
//! in FP32 (one evaluation per quantized node). Nodes are then kept FP32 greedily, most
//! sensitive first, re-measuring after each, until the budget holds. When even keeping every
//! candidate in FP32 misses the budget, the search fails with the figures rather than
//! returning a silently worse model.

use std::path::Path;

use mantissa_model_store::DriftBudget;
use mantissa_quantize::int8::{Int8Options, Int8Report};
use mantissa_quantize::int8_static::{Ranges, quantize_static};
use mantissa_quantize::onnx::ModelProto;
use ort::environment::Environment;

use crate::calibrate::{load_sample, sample_files};
use crate::drift::{DriftAccumulator, as_f32};
use crate::executor::{OutputTensor, execute, open_internal_session};
use crate::validation::ValidRequest;

/// What the search did.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchReport {
    /// Nodes kept in FP32 by the search (in the order they were added).
    pub kept_fp32: Vec<String>,
    /// Quantized nodes the plain recipe produced.
    pub candidates: usize,
    /// Worst cosine over outputs, and worst top-1 agreement over class outputs, at the end.
    pub cosine: f64,
    pub top1_agreement: Option<f64>,
    /// Same figures for the plain recipe.
    pub initial_cosine: f64,
    pub initial_top1_agreement: Option<f64>,
    pub evaluations: usize,
}

struct Evaluator<'a> {
    environment: &'a Environment,
    samples: Vec<ValidRequest>,
    reference: Vec<Vec<OutputTensor>>,
    class_outputs: &'a [String],
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    cosine: f64,
    top1: Option<f64>,
}

impl Score {
    fn meets(&self, budget: &DriftBudget) -> bool {
        budget.min_cosine.is_none_or(|min| self.cosine >= min)
            && budget.min_top1_agreement.is_none_or(|min| self.top1.is_none_or(|agreement| agreement >= min))
    }

    /// Larger is better: the budget's own measures, cosine first.
    fn key(&self) -> (f64, f64) {
        (self.cosine, self.top1.unwrap_or(1.0))
    }
}

impl<'a> Evaluator<'a> {
    fn new(
        environment: &'a Environment,
        fp32: &ModelProto,
        holdout: &Path,
        class_outputs: &'a [String],
    ) -> Result<Self, String> {
        let (mut session, signature) = open_internal_session(environment, fp32)?;
        let mut samples = Vec::new();
        let mut reference = Vec::new();
        for file in sample_files(holdout)? {
            let mut request = load_sample(&file, &signature)?;
            request.outputs = (0..signature.outputs.len()).collect();
            reference
                .push(execute(&mut session, &signature, &request).map_err(|err| format!("{}: {err}", file.display()))?);
            samples.push(request);
        }
        Ok(Self { environment, samples, reference, class_outputs })
    }

    fn score(&self, model: &ModelProto) -> Result<Score, String> {
        let (mut session, signature) = open_internal_session(self.environment, model)?;
        let mut accumulators: Vec<DriftAccumulator> = vec![DriftAccumulator::default(); signature.outputs.len()];
        let mut top1: Vec<Option<DriftAccumulator>> = vec![None; signature.outputs.len()];
        for (request, expected) in self.samples.iter().zip(&self.reference) {
            let actual = execute(&mut session, &signature, request).map_err(|err| err.to_string())?;
            for (index, (r, v)) in expected.iter().zip(&actual).enumerate() {
                let (rv, vv) = (as_f32(r), as_f32(v));
                let classes =
                    self.class_outputs.contains(&r.name).then(|| r.shape.last().copied().unwrap_or(0) as usize);
                accumulators[index].add(&rv, &vv, None);
                if classes.is_some() {
                    top1[index].get_or_insert_with(DriftAccumulator::default).add(&rv, &vv, classes);
                }
            }
        }
        let cosine = accumulators.iter().map(|a| a.figures().cosine).fold(1.0, f64::min);
        let top1 = top1.iter().flatten().filter_map(|a| a.figures().top1_agreement).reduce(f64::min);
        Ok(Score { cosine, top1 })
    }
}

fn quantized_with(
    fp32: &ModelProto,
    options: &Int8Options,
    ranges: &Ranges,
    kept: &[String],
) -> Result<(ModelProto, Int8Report), String> {
    let mut options = options.clone();
    options.nodes_exclude.extend(kept.iter().map(|name| regex::escape(name)));
    let mut model = fp32.clone();
    let report = quantize_static(&mut model, &options, ranges).map_err(|err| err.to_string())?;
    Ok((model, report))
}

/// Quantizes `fp32` statically and keeps nodes in FP32 until `budget` holds on `holdout`.
pub fn search(
    environment: &Environment,
    fp32: &ModelProto,
    options: &Int8Options,
    ranges: &Ranges,
    holdout: &Path,
    class_outputs: &[String],
    budget: &DriftBudget,
) -> Result<(ModelProto, Int8Report, SearchReport), String> {
    let evaluator = Evaluator::new(environment, fp32, holdout, class_outputs)?;
    let (model, report) = quantized_with(fp32, options, ranges, &[])?;
    let initial = evaluator.score(&model)?;
    let mut search = SearchReport {
        kept_fp32: Vec::new(),
        candidates: report.quantized.len(),
        cosine: initial.cosine,
        top1_agreement: initial.top1,
        initial_cosine: initial.cosine,
        initial_top1_agreement: initial.top1,
        evaluations: 1,
    };
    if initial.meets(budget) {
        return Ok((model, report, search));
    }
    // Sensitivity: the score with each node alone left in FP32.
    let mut ranked = Vec::new();
    for (name, _) in &report.quantized {
        let (candidate, _) = quantized_with(fp32, options, ranges, std::slice::from_ref(name))?;
        let score = evaluator.score(&candidate)?;
        search.evaluations += 1;
        ranked.push((name.clone(), score));
    }
    ranked.sort_by(|a, b| b.1.key().partial_cmp(&a.1.key()).unwrap_or(std::cmp::Ordering::Equal));
    tracing::info!(
        candidates = ranked.len(),
        most_sensitive = ?ranked.iter().take(5).map(|(n, s)| (n.as_str(), s.cosine)).collect::<Vec<_>>(),
        "mixed precision: node sensitivity measured"
    );
    // The cap on nodes kept FP32 (rounded down; all candidates without a cap).
    let cap = budget
        .max_fp32_fraction
        .map_or(ranked.len(), |fraction| ((fraction * ranked.len() as f64) + 1e-9).floor() as usize);
    let mut kept = Vec::new();
    for (name, _) in ranked.iter().take(cap) {
        kept.push(name.clone());
        let (candidate, candidate_report) = quantized_with(fp32, options, ranges, &kept)?;
        let score = evaluator.score(&candidate)?;
        search.evaluations += 1;
        search.cosine = score.cosine;
        search.top1_agreement = score.top1;
        if score.meets(budget) {
            search.kept_fp32 = kept;
            tracing::info!(kept_fp32 = ?search.kept_fp32, cosine = score.cosine, top1 = ?score.top1, "mixed precision: budget met");
            return Ok((candidate, candidate_report, search));
        }
    }
    if cap < ranked.len() {
        return Err(format!(
            "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) needs more than {cap} of {} quantized nodes in FP32 (max_fp32_fraction {}): with the {cap} most sensitive kept, cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6})",
            budget.min_cosine,
            budget.min_top1_agreement,
            search.candidates,
            budget.max_fp32_fraction.unwrap_or(1.0),
            search.cosine,
            search.top1_agreement,
            search.initial_cosine
        ));
    }
    Err(format!(
        "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) is missed even with all {} quantized nodes kept in FP32: cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6})",
        budget.min_cosine,
        budget.min_top1_agreement,
        search.candidates,
        search.cosine,
        search.top1_agreement,
        search.initial_cosine
    ))
}
