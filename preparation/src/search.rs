//! Automatic mixed precision for static INT8: given a drift budget and holdout data, keep the
//! fewest, most sensitive quantized nodes in FP32 until the budget is met.
//!
//! The plain recipe is evaluated first (one full evaluation: quantize, run the holdout, score
//! against FP32); when it misses, the quantized nodes are ranked by their local SQNR, measured
//! in a few instrumented runs ([`crate::sensitivity`]), and the number `k` of most sensitive
//! nodes kept FP32 is searched by galloping and bisection ([`crate::prefix_search`]), each
//! probe one full evaluation. So a search costs a handful of runs plus about `2 log2(k)`
//! evaluations instead of one evaluation per node; the configuration returned is one that was
//! evaluated and met the budget.
//!
//! When even the cap (`max_fp32_fraction`, or every node) misses, the search fails with the
//! figures rather than returning a silently worse model. A time limit bounds the search: it
//! starts no evaluation it expects to end past the limit, and stopping returns the smallest
//! configuration that met the budget so far (marked as stopped early) or fails with the best
//! one reached.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use mantissa_model_store::DriftBudget;
use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::passes::int8::{Int8Options, Int8Report};
use mantissa_quantize::passes::int8::{Ranges, quantize_static};
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{Environment, InferenceRequest, OutputTensor, execute, open_internal_session};

use crate::accuracy::{DriftReport, Measures, compare_runs};
use crate::calibrate::group_budget_bytes;
use crate::error::PrepareError;
use crate::prefix_search::{PrefixSearch, Probe, smallest_meeting_prefix};
use crate::sensitivity::{SensitivityJob, rank_by_local_sqnr};

/// A drift budget the static INT8 pass must meet on holdout data, by keeping the most
/// sensitive nodes in FP32.
#[derive(Debug, Clone, Copy)]
pub struct BudgetSearch<'a> {
    pub holdout: &'a Path,
    pub class_outputs: &'a [String],
    /// The figures to meet, the cap on nodes kept FP32 and the search's time limit.
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
    /// Nodes kept in FP32 by the search, most sensitive first.
    pub kept_fp32: Vec<String>,
    /// Quantized nodes the plain recipe produced.
    pub candidates: usize,
    /// Worst cosine over outputs, and worst top-1 agreement over class outputs, at the end.
    pub cosine: f64,
    /// The threshold with the least room left at the end, naming its output or part.
    pub tightest: Option<String>,
    pub top1_agreement: Option<f64>,
    /// Same figures for the plain recipe.
    pub initial_cosine: f64,
    pub initial_top1_agreement: Option<f64>,
    /// Full evaluations (quantize, run the holdout, score), the plain recipe's included.
    pub evaluations: usize,
    /// Instrumented runs over the holdout that measured node sensitivity.
    pub sensitivity_runs: usize,
    /// Time the search took (calibration excluded).
    pub elapsed: Duration,
    /// The time limit stopped the search after a configuration met the budget, so fewer nodes
    /// in FP32 might have met it too.
    pub time_limited: bool,
}

/// Scores candidate models against FP32 outputs computed once on the holdout samples.
pub(crate) struct Evaluator<'a> {
    environment: &'a Environment,
    samples: Vec<InferenceRequest>,
    reference: Vec<Vec<OutputTensor>>,
    measures: Measures<'a>,
}

impl<'a> Evaluator<'a> {
    pub(crate) fn new(
        environment: &'a Environment,
        fp32: &ModelProto,
        holdout: &Path,
        measures: Measures<'a>,
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
        Ok(Self { environment, samples, reference, measures })
    }

    pub(crate) fn score(&self, model: &ModelProto) -> Result<DriftReport, PrepareError> {
        let (mut session, signature) = open_internal_session(self.environment, model)?;
        compare_runs(
            &self.samples,
            self.measures,
            |index, _| Ok(Cow::Borrowed(self.reference[index].as_slice())),
            |_, sample| execute(&mut session, &signature, sample).map_err(PrepareError::from),
        )
    }
}

/// One evaluated configuration: the `k` most sensitive nodes kept FP32.
#[derive(Debug, Clone, PartialEq)]
struct Reached {
    k: usize,
    cosine: f64,
    top1: Option<f64>,
    /// The first threshold it missed, naming the output or part that limited it.
    miss: Option<String>,
    /// The threshold with the least room left.
    tightest: Option<String>,
}

impl Reached {
    fn of(k: usize, report: &DriftReport, budget: &DriftBudget) -> Self {
        Self {
            k,
            cosine: report.worst_cosine(),
            top1: report.worst_top1(),
            miss: report.budget_miss(budget),
            tightest: report.tightest(budget).map(|tightest| tightest.to_string()),
        }
    }

    /// The sentence naming what limited it, for failure messages.
    fn limited_by(&self) -> String {
        self.miss.as_ref().map(|miss| format!("; limited by {miss}")).unwrap_or_default()
    }

    /// Larger is better: the budget's own measures, cosine first.
    fn key(&self) -> (f64, f64) {
        (self.cosine, self.top1.unwrap_or(1.0))
    }
}

/// The clock, the count of evaluations and the progress log of one search.
struct Progress<'a> {
    label: &'a str,
    started: Instant,
    limit: Option<Duration>,
    evaluations: usize,
    /// Time spent in full evaluations, for the expected length of the next one.
    evaluating: Duration,
}

impl Progress<'_> {
    /// The expected length of one more evaluation: the mean so far.
    fn expected_evaluation(&self) -> Duration {
        self.evaluating / u32::try_from(self.evaluations.max(1)).unwrap_or(u32::MAX)
    }

    /// Whether work expected to take `next` would end past the time limit.
    fn out_of_time(&self, next: Duration) -> bool {
        self.limit.is_some_and(|limit| self.started.elapsed() + next > limit)
    }

    /// Counts an evaluation that took `took` and logs where the search stands; `left` is how
    /// many evaluations may still follow.
    fn evaluated(&mut self, took: Duration, reached: &Reached, meets: bool, left: usize) {
        self.evaluations += 1;
        self.evaluating += took;
        let eta = self.expected_evaluation().as_secs_f64() * left as f64;
        tracing::info!(
            variant = self.label,
            pass = "int8 budget search",
            evaluations_done = self.evaluations,
            evaluations_planned = self.evaluations + left,
            kept_fp32 = reached.k,
            cosine = reached.cosine,
            top1 = ?reached.top1,
            meets,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            eta_s = (eta * 10.0).round() / 10.0,
            "budget search"
        );
    }
}

/// Why the probe loop stopped before its end.
enum Halt {
    TimeLimit,
    Failed(PrepareError),
}

impl From<PrepareError> for Halt {
    fn from(err: PrepareError) -> Self {
        Halt::Failed(err)
    }
}

/// What the probe loop keeps: the smallest configuration that met and its model, the best
/// that missed (reported when the time limit stops the search) and the last that missed (the
/// cap, when nothing met).
struct Probed {
    met: Option<(Reached, ModelProto, Int8Report)>,
    best_miss: Reached,
    last_miss: Reached,
}

/// Quantizes the recipe statically and keeps nodes in FP32 until the search's budget holds on
/// its holdout data. `label` (`model:variant`) names the variant in progress logs.
pub fn search(
    environment: &Environment,
    recipe: &StaticRecipe<'_>,
    search: &BudgetSearch<'_>,
    label: &str,
) -> Result<(ModelProto, Int8Report, SearchReport), PrepareError> {
    let budget = search.budget;
    let mut progress = Progress {
        label,
        started: Instant::now(),
        limit: budget.search_time_limit,
        evaluations: 0,
        evaluating: Duration::ZERO,
    };
    let measures = Measures { class_outputs: search.class_outputs, parts: Some(&budget.parts) };
    let evaluator = Evaluator::new(environment, recipe.fp32, search.holdout, measures)?;
    let evaluation_started = Instant::now();
    let (model, report) = recipe.quantize_keeping(&[])?;
    let initial = evaluator.score(&model)?;
    let plain = Reached::of(0, &initial, budget);
    let candidates = report.quantized.len();
    // The cap on nodes kept FP32 (rounded down; all candidates without a cap).
    let cap = budget
        .max_fp32_fraction
        .map_or(candidates, |fraction| ((fraction * candidates as f64) + 1e-9).floor() as usize);
    let planned = if initial.meets(budget) { 0 } else { PrefixSearch::new(cap).left() };
    progress.evaluated(evaluation_started.elapsed(), &plain, initial.meets(budget), planned);
    let mut searched = SearchReport {
        kept_fp32: Vec::new(),
        candidates,
        cosine: plain.cosine,
        tightest: plain.tightest.clone(),
        top1_agreement: plain.top1,
        initial_cosine: plain.cosine,
        initial_top1_agreement: plain.top1,
        evaluations: 1,
        sensitivity_runs: 0,
        elapsed: Duration::ZERO,
        time_limited: false,
    };
    if initial.meets(budget) {
        searched.elapsed = progress.started.elapsed();
        return Ok((model, report, searched));
    }
    if cap == 0 {
        return Err(PrepareError::BudgetMissed(miss_message(budget, &searched, &plain, cap)));
    }
    // The instrumented runs cost about one evaluation each; they are not started past the limit.
    if progress.out_of_time(progress.expected_evaluation()) {
        return Err(timed_out(budget, &progress, &plain, candidates));
    }
    let ranked = rank(environment, recipe, &evaluator, &model, &report, search.holdout, &mut searched)?;
    drop(model);
    let mut probed = Probed { met: None, best_miss: plain.clone(), last_miss: plain };
    let outcome = smallest_meeting_prefix(cap, |probe: Probe| {
        probe_prefix(recipe, &evaluator, budget, &ranked, probe, &mut progress, &mut probed)
    });
    let stopped = match outcome {
        Ok(_) => false,
        Err(Halt::TimeLimit) => true,
        Err(Halt::Failed(err)) => return Err(err),
    };
    searched.evaluations = progress.evaluations;
    searched.elapsed = progress.started.elapsed();
    let Some((reached, model, report)) = probed.met.take() else {
        return Err(if stopped {
            timed_out(budget, &progress, &probed.best_miss, candidates)
        } else {
            PrepareError::BudgetMissed(miss_message(budget, &searched, &probed.last_miss, cap))
        });
    };
    searched.time_limited = stopped;
    searched.kept_fp32 = ranked[..reached.k].to_vec();
    searched.cosine = reached.cosine;
    searched.top1_agreement = reached.top1;
    searched.tightest = reached.tightest.clone();
    if searched.time_limited {
        tracing::warn!(
            variant = label,
            kept_fp32 = reached.k,
            "mixed precision: the time limit stopped the search; fewer nodes in FP32 might meet the budget too"
        );
    }
    tracing::info!(
        variant = label,
        kept_fp32 = ?searched.kept_fp32,
        cosine = searched.cosine,
        top1 = ?searched.top1_agreement,
        tightest = ?searched.tightest,
        evaluations = searched.evaluations,
        sensitivity_runs = searched.sensitivity_runs,
        elapsed_ms = searched.elapsed.as_millis() as u64,
        "mixed precision: budget met"
    );
    Ok((model, report, searched))
}

/// The plain recipe's quantized nodes, most sensitive first (see [`crate::sensitivity`]).
fn rank(
    environment: &Environment,
    recipe: &StaticRecipe<'_>,
    evaluator: &Evaluator<'_>,
    quantized: &ModelProto,
    report: &Int8Report,
    holdout: &Path,
    searched: &mut SearchReport,
) -> Result<Vec<String>, PrepareError> {
    let started = Instant::now();
    let job = SensitivityJob {
        fp32: recipe.fp32,
        quantized,
        nodes: &report.quantized,
        samples: &evaluator.samples,
        group_budget_bytes: group_budget_bytes(environment, recipe.fp32, holdout)?,
    };
    let ranking = rank_by_local_sqnr(environment, &job)?;
    searched.sensitivity_runs = ranking.runs;
    tracing::info!(
        candidates = ranking.nodes.len(),
        runs = ranking.runs,
        elapsed_ms = started.elapsed().as_millis() as u64,
        most_sensitive = ?ranking.nodes.iter().take(5).map(|n| (n.node.as_str(), n.sqnr_db)).collect::<Vec<_>>(),
        "mixed precision: node sensitivity measured (local SQNR, dB)"
    );
    Ok(ranking.nodes.into_iter().map(|n| n.node).collect())
}

/// One probe of the prefix search: the `probe.k` most sensitive nodes kept FP32, evaluated in
/// full. Stops with [`Halt::TimeLimit`] rather than start an evaluation expected to end past
/// the limit.
fn probe_prefix(
    recipe: &StaticRecipe<'_>,
    evaluator: &Evaluator<'_>,
    budget: &DriftBudget,
    ranked: &[String],
    probe: Probe,
    progress: &mut Progress<'_>,
    probed: &mut Probed,
) -> Result<bool, Halt> {
    if progress.out_of_time(progress.expected_evaluation()) {
        return Err(Halt::TimeLimit);
    }
    let started = Instant::now();
    let (candidate, candidate_report) = recipe.quantize_keeping(&ranked[..probe.k])?;
    let score = evaluator.score(&candidate)?;
    let reached = Reached::of(probe.k, &score, budget);
    let meets = score.meets(budget);
    progress.evaluated(started.elapsed(), &reached, meets, probe.left - 1);
    if meets {
        probed.met = Some((reached, candidate, candidate_report));
    } else {
        if reached.key() > probed.best_miss.key() {
            probed.best_miss = reached.clone();
        }
        probed.last_miss = reached;
    }
    Ok(meets)
}

/// The time-limit failure, with the best configuration reached.
fn timed_out(budget: &DriftBudget, progress: &Progress<'_>, best: &Reached, candidates: usize) -> PrepareError {
    PrepareError::SearchTimeLimit {
        limit: budget.search_time_limit.unwrap_or_default(),
        elapsed: progress.started.elapsed(),
        evaluations: progress.evaluations,
        reached: format!(
            "the best configuration reached keeps {} of {candidates} quantized nodes in FP32: cosine {:.6}, top-1 agreement {:?}, short of the budget (min_cosine {:?}, min_top1_agreement {:?}){}",
            best.k,
            best.cosine,
            best.top1,
            budget.min_cosine,
            budget.min_top1_agreement,
            best.limited_by()
        ),
    }
}

fn miss_message(budget: &DriftBudget, searched: &SearchReport, at_cap: &Reached, cap: usize) -> String {
    if cap < searched.candidates {
        return format!(
            "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) needs more than {cap} of {} quantized nodes in FP32 (max_fp32_fraction {}): with the {cap} most sensitive kept, cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6}; {} evaluations){}",
            budget.min_cosine,
            budget.min_top1_agreement,
            searched.candidates,
            budget.max_fp32_fraction.unwrap_or(1.0),
            at_cap.cosine,
            at_cap.top1,
            searched.initial_cosine,
            searched.evaluations,
            at_cap.limited_by()
        );
    }
    format!(
        "the drift budget (min_cosine {:?}, min_top1_agreement {:?}) is missed even with all {} quantized nodes kept in FP32: cosine {:.6}, top-1 agreement {:?} (plain recipe: cosine {:.6}; {} evaluations){}",
        budget.min_cosine,
        budget.min_top1_agreement,
        searched.candidates,
        at_cap.cosine,
        at_cap.top1,
        searched.initial_cosine,
        searched.evaluations,
        at_cap.limited_by()
    )
}
