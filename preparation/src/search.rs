//! Automatic mixed precision for static INT8: given a drift budget and holdout data, keep the
//! fewest, most sensitive quantized nodes in FP32 until the budget is met.
//!
//! Sensitivity of a node = how much the model's outputs improve when that node alone is left
//! in FP32 (one evaluation per quantized node). Nodes are then kept FP32 greedily, most
//! sensitive first, re-measuring after each, until the budget holds. When even keeping every
//! candidate in FP32 misses the budget, the search fails with the figures rather than
//! returning a silently worse model.

use std::borrow::Cow;
use std::path::Path;

use mantissa_model_store::DriftBudget;
use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::passes::int8::{Int8Options, Int8Report};
use mantissa_quantize::passes::int8::{Ranges, quantize_static};
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{Environment, InferenceRequest, OutputTensor, execute, open_internal_session};

use crate::accuracy::{DriftReport, compare_runs};
use crate::error::PrepareError;

/// A drift budget the static INT8 pass must meet on holdout data, by keeping the most
/// sensitive nodes in FP32.
#[derive(Debug, Clone, Copy)]
pub struct BudgetSearch<'a> {
    pub holdout: &'a Path,
    pub class_outputs: &'a [String],
    pub budget: &'a DriftBudget,
    /// When no configuration meets the budget: fall back to the plain recipe (the startup
    /// drift check then serves it flagged) instead of failing the build.
    pub serve_flagged: bool,
}

/// The static recipe the search varies: the FP32 model, the pass options and the calibrated
/// ranges (calibration runs once; only the set of FP32 nodes changes).
#[derive(Debug, Clone, Copy)]
pub struct StaticRecipe<'a> {
    pub fp32: &'a ModelProto,
    pub options: &'a Int8Options,
    pub ranges: &'a Ranges,
}

impl StaticRecipe<'_> {
    /// The recipe's model with `kept` nodes left in FP32.
    pub fn quantize_keeping(&self, kept: &[String]) -> Result<(ModelProto, Int8Report), PrepareError> {
        let mut options = self.options.clone();
        options.nodes_exclude.extend(kept.iter().map(|name| regex::escape(name)));
        let mut model = self.fp32.clone();
        let report = quantize_static(&mut model, &options, self.ranges)
            .map_err(|source| PrepareError::Int8 { mode: "int8 static", source })?;
        Ok((model, report))
    }
}

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

/// Scores candidate models against FP32 outputs computed once on the holdout samples.
struct Evaluator<'a> {
    environment: &'a Environment,
    samples: Vec<InferenceRequest>,
    reference: Vec<Vec<OutputTensor>>,
    class_outputs: &'a [String],
}

/// Larger is better: the budget's own measures, cosine first.
fn rank_key(report: &DriftReport) -> (f64, f64) {
    (report.worst_cosine(), report.worst_top1().unwrap_or(1.0))
}

impl<'a> Evaluator<'a> {
    fn new(
        environment: &'a Environment,
        fp32: &ModelProto,
        holdout: &Path,
        class_outputs: &'a [String],
    ) -> Result<Self, PrepareError> {
        let (mut session, signature) = open_internal_session(environment, fp32)?;
        let mut samples = Vec::new();
        let mut reference = Vec::new();
        for file in sample_files(holdout)? {
            let mut request = load_sample(&file, &signature)?;
            request.outputs = (0..signature.outputs.len()).collect();
            reference.push(
                execute(&mut session, &signature, &request)
                    .map_err(|source| PrepareError::Sample { path: file.display().to_string(), source })?,
            );
            samples.push(request);
        }
        Ok(Self { environment, samples, reference, class_outputs })
    }

    fn score(&self, model: &ModelProto) -> Result<DriftReport, PrepareError> {
        let (mut session, signature) = open_internal_session(self.environment, model)?;
        compare_runs(
            &self.samples,
            self.class_outputs,
            |index, _| Ok(Cow::Borrowed(self.reference[index].as_slice())),
            |_, sample| execute(&mut session, &signature, sample).map_err(PrepareError::from),
        )
    }
}

/// Quantizes the recipe statically and keeps nodes in FP32 until the search's budget holds on
/// its holdout data.
pub fn search(
    environment: &Environment,
    recipe: &StaticRecipe<'_>,
    search: &BudgetSearch<'_>,
) -> Result<(ModelProto, Int8Report, SearchReport), PrepareError> {
    let budget = search.budget;
    let evaluator = Evaluator::new(environment, recipe.fp32, search.holdout, search.class_outputs)?;
    let (model, report) = recipe.quantize_keeping(&[])?;
    let initial = evaluator.score(&model)?;
    let mut searched = SearchReport {
        kept_fp32: Vec::new(),
        candidates: report.quantized.len(),
        cosine: initial.worst_cosine(),
        top1_agreement: initial.worst_top1(),
        initial_cosine: initial.worst_cosine(),
        initial_top1_agreement: initial.worst_top1(),
        evaluations: 1,
    };
    if initial.meets(budget) {
        return Ok((model, report, searched));
    }
    let ranked = rank_by_sensitivity(&evaluator, recipe, &report, &mut searched)?;
    // The cap on nodes kept FP32 (rounded down; all candidates without a cap).
    let cap = budget
        .max_fp32_fraction
        .map_or(ranked.len(), |fraction| ((fraction * ranked.len() as f64) + 1e-9).floor() as usize);
    let mut kept = Vec::new();
    for name in ranked.iter().take(cap) {
        kept.push(name.clone());
        let (candidate, candidate_report) = recipe.quantize_keeping(&kept)?;
        let score = evaluator.score(&candidate)?;
        searched.evaluations += 1;
        searched.cosine = score.worst_cosine();
        searched.top1_agreement = score.worst_top1();
        if score.meets(budget) {
            searched.kept_fp32 = kept;
            tracing::info!(kept_fp32 = ?searched.kept_fp32, cosine = searched.cosine, top1 = ?searched.top1_agreement, "mixed precision: budget met");
            return Ok((candidate, candidate_report, searched));
        }
    }
    Err(PrepareError::BudgetMissed(miss_message(budget, &searched, cap, ranked.len())))
}

/// Quantized nodes, most sensitive first: the score with each node alone left in FP32.
fn rank_by_sensitivity(
    evaluator: &Evaluator<'_>,
    recipe: &StaticRecipe<'_>,
    report: &Int8Report,
    searched: &mut SearchReport,
) -> Result<Vec<String>, PrepareError> {
    let mut ranked = Vec::new();
    for (name, _) in &report.quantized {
        let (candidate, _) = recipe.quantize_keeping(std::slice::from_ref(name))?;
        let score = evaluator.score(&candidate)?;
        searched.evaluations += 1;
        ranked.push((name.clone(), score));
    }
    ranked.sort_by(|a, b| rank_key(&b.1).partial_cmp(&rank_key(&a.1)).unwrap_or(std::cmp::Ordering::Equal));
    tracing::info!(
        candidates = ranked.len(),
        most_sensitive = ?ranked.iter().take(5).map(|(n, s)| (n.as_str(), s.worst_cosine())).collect::<Vec<_>>(),
        "mixed precision: node sensitivity measured"
    );
    Ok(ranked.into_iter().map(|(name, _)| name).collect())
}

fn miss_message(budget: &DriftBudget, searched: &SearchReport, cap: usize, candidates: usize) -> String {
    if cap < candidates {
        return format!(
            "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) needs more than {cap} of {} quantized nodes in FP32 (max_fp32_fraction {}): with the {cap} most sensitive kept, cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6})",
            budget.min_cosine,
            budget.min_top1_agreement,
            searched.candidates,
            budget.max_fp32_fraction.unwrap_or(1.0),
            searched.cosine,
            searched.top1_agreement,
            searched.initial_cosine
        );
    }
    format!(
        "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) is missed even with all {} quantized nodes kept in FP32: cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6})",
        budget.min_cosine,
        budget.min_top1_agreement,
        searched.candidates,
        searched.cosine,
        searched.top1_agreement,
        searched.initial_cosine
    )
}
