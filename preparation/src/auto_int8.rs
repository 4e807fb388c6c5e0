//! `mode: auto`: the fastest INT8 form that meets the drift budget, chosen by timing the forms
//! on the CPU that will serve them.
//!
//! Which form is fastest depends on the model and the CPU: dynamic quantization suits MatMul
//! models and leaves Conv in FP32; static QDQ runs Conv and MatMul on integer kernels but pays
//! for Q/DQ around every float op between them; VNNI CPUs and AVX2-only CPUs rank them
//! differently. So auto builds the forms that apply (dynamic always, static U8S8 when
//! calibration data is given, each through its budget search), measures each one's drift on the holdout
//! data, times each beside FP32 with the variant's own threads and batch sizes, and keeps the
//! fastest form within the budget. Without a budget (no holdout data to judge a form by) it
//! builds the dynamic form only: the one that needs neither calibration nor an accuracy check
//! to be safe on activations.

use std::time::{Duration, Instant};

use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::passes::int8::{Int8Mode, Int8Options, Int8Report};
use mantissa_quantize::to_bytes;
use mantissa_runtime::samples::{load_sample, sample_files};
use mantissa_runtime::{
    Environment, InferenceRequest, InputTensor, SessionConfig, TensorData, execute, open_internal_session_with,
};

use crate::accuracy::Measures;
use crate::dynamic_search::search_dynamic;
use crate::error::PrepareError;
use crate::facts::{AutoFacts, CandidateFacts};
use crate::int8::{Int8Job, Int8Outcome, quantize_int8};
use crate::search::{BudgetSearch, Evaluator};

/// How the forms are timed: as the variant will serve them.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoTiming {
    /// ONNX Runtime intra-op threads per session (0: ONNX Runtime's choice).
    pub intra_op_threads: u32,
    /// Batch sizes each form is timed at (for models whose inputs batch along dimension 0).
    pub batch_sizes: Vec<usize>,
    /// Time spent timing each batch size, all forms together.
    pub seconds_per_batch_size: f64,
}

impl Default for AutoTiming {
    fn default() -> Self {
        Self { intra_op_threads: 0, batch_sizes: vec![1, 8], seconds_per_batch_size: 2.0 }
    }
}

/// Largest batch size auto times at: timing at 64 rows of a transformer would cost more than
/// the build, and the ranking rarely changes past a few rows.
pub const MAX_TIMED_BATCH: usize = 16;

impl AutoTiming {
    /// The variant's threads, and its preferred batch sizes, or 1 and its largest batch.
    pub fn for_variant(intra_op_threads: u32, preferred: &[u32], max_batch_size: u32) -> Self {
        let mut batch_sizes: Vec<usize> = if preferred.is_empty() {
            vec![1, max_batch_size.max(1) as usize]
        } else {
            preferred.iter().map(|&b| b as usize).collect()
        };
        for size in &mut batch_sizes {
            *size = (*size).clamp(1, MAX_TIMED_BATCH);
        }
        batch_sizes.sort_unstable();
        batch_sizes.dedup();
        Self { intra_op_threads, batch_sizes, ..Self::default() }
    }
}

/// The CPU as the artifact cache's key and the facts name it: a form timed on another CPU is
/// re-measured, not trusted.
pub fn cpu_signature() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|line| line.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|line| line.split_once(':'))
            .map(|(_, value)| value.trim().to_owned())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .filter(|f| *f == "avx2" || f.starts_with("avx512") || f.contains("vnni") || f.starts_with("amx"))
        .map(str::to_owned)
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}; {cores} cores; {}", flags.join(" "))
}

/// The form auto keeps: the fastest (geometric mean over batch sizes) of those meeting the
/// budget; `None` when none does.
pub fn choose(candidates: &[CandidateFacts]) -> Option<&CandidateFacts> {
    candidates
        .iter()
        .filter(|c| c.meets_budget)
        .max_by(|a, b| a.mean_speedup().unwrap_or(0.0).total_cmp(&b.mean_speedup().unwrap_or(0.0)))
}

/// The INT8 step for any mode: `auto` here, every other mode by [`quantize_int8`].
pub fn quantize_int8_any(
    environment: &Environment,
    model: &mut ModelProto,
    job: &Int8Job<'_>,
    timing: &AutoTiming,
) -> Result<Int8Outcome, PrepareError> {
    if job.options.mode != Int8Mode::Auto {
        return quantize_int8(environment, model, job);
    }
    let (mut outcome, facts) = quantize_auto(environment, model, job, timing)?;
    outcome.auto = Some(facts);
    Ok(outcome)
}

/// One built form.
struct Built {
    model: ModelProto,
    outcome: Int8Outcome,
}

/// Runs `mode: auto` on `model`, in place.
pub fn quantize_auto(
    environment: &Environment,
    model: &mut ModelProto,
    job: &Int8Job<'_>,
    timing: &AutoTiming,
) -> Result<(Int8Outcome, AutoFacts), PrepareError> {
    let Some(budget) = job.budget else {
        let (outcome, facts) = dynamic_only(model, job, "no drift budget to judge the other forms by")?;
        return Ok((outcome, facts));
    };
    let (mut candidates, mut built, unchanged) = build_candidates(environment, model, job);
    judge_drift(environment, model, &budget, &mut candidates, &built)?;
    time_forms(environment, model, &budget, timing, &mut candidates, &built)?;
    let cpu = cpu_signature();
    let nothing_to_quantize = built.iter().all(Option::is_none)
        && candidates.iter().all(|c| matches!(c.note.as_deref(), Some("quantized nothing" | "no calibration_data")));
    if let (true, Some(Built { model: same, outcome })) = (nothing_to_quantize, unchanged) {
        *model = same;
        let reason = "no form quantizes anything in this model; it stays FP32 (see the notes)".to_owned();
        tracing::info!(variant = job.label, "mode auto: {reason}");
        return Ok((outcome, AutoFacts { chosen: "none".to_owned(), reason, cpu, candidates }));
    }
    // Under `on_budget_miss: serve_flagged` the static form falls back to its plain recipe
    // when the search fails; with no form within the budget, that one serves, flagged.
    let flagged = built.iter().position(|b| b.as_ref().is_some_and(|b| b.outcome.fallback.is_some()));
    if let (None, Some(index)) = (choose(&candidates), flagged)
        && let Some(Built { model: quantized, outcome }) = built.swap_remove(index)
    {
        *model = quantized;
        let form = candidates[index].form.clone();
        let reason = format!(
            "no form meets the budget; the {form} form's plain recipe serves flagged (on_budget_miss: serve_flagged)"
        );
        tracing::warn!(variant = job.label, "mode auto: {reason}");
        return Ok((outcome, AutoFacts { chosen: form, reason, cpu, candidates }));
    }
    let Some(winner) = choose(&candidates).map(|c| c.form.clone()) else {
        let figures = candidates
            .iter()
            .map(|c| format!("{}: {}", c.form, c.note.clone().unwrap_or_else(|| format!("cosine {:?}", c.cosine))))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(PrepareError::BudgetMissed(format!("mode auto: no INT8 form meets the drift budget ({figures})")));
    };
    let index = candidates.iter().position(|c| c.form == winner).unwrap_or(0);
    let chosen = &candidates[index];
    let speed = chosen.mean_speedup().unwrap_or(1.0);
    let others = candidates.iter().filter(|c| c.meets_budget && c.form != winner).count();
    let reason = if others == 0 {
        format!("the only form within the budget ({speed:.2}x FP32)")
    } else {
        format!(
            "the fastest of {} forms within the budget ({speed:.2}x FP32, geometric mean over batch sizes)",
            others + 1
        )
    };
    if speed < 1.0 {
        tracing::warn!(variant = job.label, form = %winner, speedup = speed, "mode auto: the chosen INT8 form is slower than FP32 on this CPU");
    }
    let Some(Built { model: quantized, outcome }) = built.swap_remove(index) else {
        return Err(PrepareError::Observation(format!("mode auto: the {winner} form was not built")));
    };
    *model = quantized;
    let facts = AutoFacts { chosen: winner, reason, cpu, candidates };
    for line in facts.table() {
        tracing::info!(variant = job.label, "mode auto: {line}");
    }
    tracing::info!(variant = job.label, chosen = %facts.chosen, reason = %facts.reason, "mode auto: chosen");
    Ok((outcome, facts))
}

/// Every form that applies, built: its facts so far, the built model (`None` when it was not
/// built or quantized nothing), and the first form that quantized nothing (the FP32 model with
/// the pass's notes).
fn build_candidates(
    environment: &Environment,
    model: &ModelProto,
    job: &Int8Job<'_>,
) -> (Vec<CandidateFacts>, Vec<Option<Built>>, Option<Built>) {
    let mut candidates = Vec::new();
    let mut built: Vec<Option<Built>> = Vec::new();
    // A form that quantized nothing is kept aside: it is the answer when no form quantizes
    // anything (as in the other modes, not an error).
    let mut unchanged: Option<Built> = None;
    for mode in [Int8Mode::Dynamic, Int8Mode::Static] {
        let form = if mode == Int8Mode::Dynamic { "dynamic" } else { "static" };
        if mode == Int8Mode::Static && job.options.calibration_data.is_none() {
            candidates.push(unbuilt(form, "no calibration_data"));
            built.push(None);
            continue;
        }
        match build_form(environment, model, job, mode) {
            Ok(form_built) if form_built.outcome.report.quantized.is_empty() => {
                candidates.push(unbuilt(form, "quantized nothing"));
                built.push(None);
                unchanged.get_or_insert(form_built);
            }
            Ok(form_built) => {
                candidates.push(CandidateFacts {
                    form: form.to_owned(),
                    speedups: Vec::new(),
                    cosine: None,
                    meets_budget: false,
                    bytes: to_bytes(&form_built.model).len() as u64,
                    note: form_built
                        .outcome
                        .search
                        .as_ref()
                        .map(|s| format!("{} of its nodes kept FP32", s.kept_fp32.len())),
                });
                built.push(Some(form_built));
            }
            Err(err) => {
                candidates.push(unbuilt(form, &err.to_string()));
                built.push(None);
            }
        }
    }
    (candidates, built, unchanged)
}

fn unbuilt(form: &str, why: &str) -> CandidateFacts {
    CandidateFacts {
        form: form.to_owned(),
        speedups: Vec::new(),
        cosine: None,
        meets_budget: false,
        bytes: 0,
        note: Some(why.to_owned()),
    }
}

fn dynamic_only(
    model: &mut ModelProto,
    job: &Int8Job<'_>,
    why: &str,
) -> Result<(Int8Outcome, AutoFacts), PrepareError> {
    let options = Int8Options { mode: Int8Mode::Dynamic, ..job.options.clone() };
    let report: Int8Report = mantissa_quantize::passes::int8::quantize_dynamic(model, &options)
        .map_err(|source| PrepareError::Int8 { mode: "int8 dynamic", source })?;
    let facts = AutoFacts {
        chosen: "dynamic".to_owned(),
        reason: format!("dynamic only: {why}"),
        cpu: cpu_signature(),
        candidates: vec![CandidateFacts {
            form: "dynamic".to_owned(),
            speedups: Vec::new(),
            cosine: None,
            meets_budget: true,
            bytes: to_bytes(model).len() as u64,
            note: None,
        }],
    };
    tracing::info!(variant = job.label, reason = %facts.reason, "mode auto: chosen dynamic");
    Ok((Int8Outcome::plain(report), facts))
}

fn build_form(
    environment: &Environment,
    model: &ModelProto,
    job: &Int8Job<'_>,
    mode: Int8Mode,
) -> Result<Built, PrepareError> {
    let options = Int8Options { mode, ..job.options.clone() };
    let label = format!("{} ({})", job.label, mode.label());
    if let (Int8Mode::Dynamic, Some(budget)) = (mode, job.budget) {
        let (form, report, search) = search_dynamic(environment, model, &options, &budget, &label)?;
        return Ok(Built { model: form, outcome: Int8Outcome { search, ..Int8Outcome::plain(report) } });
    }
    let form_job = Int8Job { options: &options, label: &label, budget: job.budget };
    let mut form = model.clone();
    let outcome = quantize_int8(environment, &mut form, &form_job)?;
    Ok(Built { model: form, outcome })
}

/// A session with the variant's threads (the timing runs as serving will).
fn timing_session(
    environment: &Environment,
    model: &ModelProto,
    threads: u32,
) -> Result<(mantissa_runtime::Session, mantissa_runtime::ModelSignature), PrepareError> {
    let config = SessionConfig { intra_op_threads: threads, ..SessionConfig::INTERNAL };
    Ok(open_internal_session_with(environment, model, config)?)
}

/// Drift of every built form against FP32 on the holdout data.
fn judge_drift(
    environment: &Environment,
    fp32: &ModelProto,
    budget: &BudgetSearch<'_>,
    candidates: &mut [CandidateFacts],
    built: &[Option<Built>],
) -> Result<(), PrepareError> {
    let measures = Measures { class_outputs: budget.class_outputs, parts: Some(&budget.budget.parts) };
    let evaluator = Evaluator::new(environment, fp32, budget.holdout, measures)?;
    for (candidate, form) in candidates.iter_mut().zip(built) {
        let Some(form) = form else { continue };
        let report = evaluator.score(&form.model)?;
        candidate.cosine = Some(report.worst_cosine());
        let fell_back = form.outcome.fallback.is_some();
        candidate.meets_budget = !fell_back && report.meets(budget.budget);
        if let Some(miss) = report.budget_miss(budget.budget).filter(|_| !fell_back) {
            candidate.note = Some(miss);
        }
        if let Some(fallback) = &form.outcome.fallback {
            candidate.note = Some(fallback.reason.clone());
        }
    }
    Ok(())
}

/// A request of `rows` rows made by repeating the rows of `sample` (every input batched along
/// dimension 0), or `None` when the sample cannot be batched that way.
fn batched(sample: &InferenceRequest, rows: usize) -> Option<InferenceRequest> {
    let mut inputs = Vec::with_capacity(sample.inputs.len());
    for input in &sample.inputs {
        let (TensorData::Raw(raw), Some(&have)) = (&input.data, input.shape.first()) else { return None };
        if have <= 0 || raw.len() % have as usize != 0 {
            return None;
        }
        let row = raw.len() / have as usize;
        let mut data = Vec::with_capacity(row * rows);
        for index in 0..rows {
            let at = (index % have as usize) * row;
            data.extend_from_slice(&raw[at..at + row]);
        }
        let mut shape = input.shape.clone();
        shape[0] = rows as i64;
        inputs.push(InputTensor { datatype: input.datatype, shape, data: TensorData::Raw(data) });
    }
    Some(InferenceRequest { id: sample.id.clone(), inputs, outputs: sample.outputs.clone() })
}

/// Times FP32 and every form that met the budget in alternating turns, at each batch size,
/// with the variant's threads; records each form's speedup over FP32 (medians).
fn time_forms(
    environment: &Environment,
    fp32: &ModelProto,
    budget: &BudgetSearch<'_>,
    timing: &AutoTiming,
    candidates: &mut [CandidateFacts],
    built: &[Option<Built>],
) -> Result<(), PrepareError> {
    let eligible: Vec<usize> =
        (0..candidates.len()).filter(|&i| candidates[i].meets_budget && built[i].is_some()).collect();
    if eligible.is_empty() {
        return Ok(());
    }
    let (reference, signature) = timing_session(environment, fp32, timing.intra_op_threads)?;
    let mut sessions = vec![reference];
    for &index in &eligible {
        let Some(form) = &built[index] else { continue };
        sessions.push(timing_session(environment, &form.model, timing.intra_op_threads)?.0);
    }
    let file = sample_files(budget.holdout)?
        .into_iter()
        .next()
        .ok_or(PrepareError::Observation("no holdout samples".into()))?;
    let mut sample = load_sample(&file, &signature)?;
    sample.outputs = (0..signature.outputs.len()).collect();
    let batches = signature.inputs.iter().all(|spec| spec.dims.first() == Some(&-1));
    let requests: Vec<(usize, InferenceRequest)> = if batches {
        timing.batch_sizes.iter().filter_map(|&rows| batched(&sample, rows).map(|r| (rows, r))).collect()
    } else {
        let rows = sample.inputs.first().and_then(|i| i.shape.first()).copied().unwrap_or(1).max(1) as usize;
        vec![(rows, sample)]
    };
    for (rows, request) in &requests {
        let medians = alternate(&mut sessions, &signature, request, timing.seconds_per_batch_size)?;
        for (slot, &index) in eligible.iter().enumerate() {
            candidates[index].speedups.push((*rows, medians[0] / medians[slot + 1].max(1e-9)));
        }
    }
    Ok(())
}

/// Median run time (ms) of each session on `request`, running them in turns for about
/// `seconds` in all (at least 5 turns, at most 200), after one warm-up run each.
fn alternate(
    sessions: &mut [mantissa_runtime::Session],
    signature: &mantissa_runtime::ModelSignature,
    request: &InferenceRequest,
    seconds: f64,
) -> Result<Vec<f64>, PrepareError> {
    for session in sessions.iter_mut() {
        execute(session, signature, request)?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    let started = Instant::now();
    for turn in 0..200 {
        if turn >= 5 && started.elapsed() > Duration::from_secs_f64(seconds) {
            break;
        }
        for (session, samples) in sessions.iter_mut().zip(&mut times) {
            let run = Instant::now();
            execute(session, signature, request)?;
            samples.push(run.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut samples| {
            samples.sort_by(f64::total_cmp);
            samples[samples.len() / 2]
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(form: &str, speedups: &[(usize, f64)], meets: bool) -> CandidateFacts {
        CandidateFacts {
            form: form.into(),
            speedups: speedups.to_vec(),
            cosine: Some(0.99),
            meets_budget: meets,
            bytes: 1,
            note: None,
        }
    }

    #[test]
    fn the_fastest_form_within_the_budget_wins() {
        let candidates = [
            candidate("dynamic", &[(1, 1.6), (8, 1.4)], true),
            candidate("static", &[(1, 1.9), (8, 1.2)], true),
            candidate("faster", &[(1, 3.0), (8, 3.0)], false),
        ];
        // Geometric means: dynamic 1.497, static 1.510.
        assert_eq!(choose(&candidates).unwrap().form, "static");
        assert!(choose(&candidates[2..]).is_none(), "a form outside the budget never wins");
    }

    #[test]
    fn timing_follows_the_variant_and_stays_affordable() {
        let timing = AutoTiming::for_variant(2, &[], 64);
        assert_eq!((timing.intra_op_threads, timing.batch_sizes), (2, vec![1, MAX_TIMED_BATCH]));
        assert_eq!(AutoTiming::for_variant(1, &[4, 2, 4], 64).batch_sizes, vec![2, 4]);
    }

    #[test]
    fn a_batch_repeats_the_sample_rows() {
        let sample = InferenceRequest {
            id: "s".into(),
            inputs: vec![InputTensor {
                datatype: mantissa_runtime::DataType::Fp32,
                shape: vec![2, 1],
                data: TensorData::Raw([1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect()),
            }],
            outputs: vec![0],
        };
        let batch = batched(&sample, 3).unwrap();
        assert_eq!(batch.inputs[0].shape, vec![3, 1]);
        let TensorData::Raw(raw) = &batch.inputs[0].data else { panic!() };
        let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(values, [1.0, 2.0, 1.0]);
    }
}
