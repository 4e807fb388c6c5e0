//! The INT8 step of preparation: dynamic and weight-only passes directly; static after
//! calibrating, and through the budget search when the policy gives a drift budget.

use mantissa_model_store::{BudgetMiss, ModelEntry, VariantSpec};
use mantissa_quantize::onnx::ModelProto;
use mantissa_quantize::passes::int8::{Int8Mode, Int8Options, Int8Report, quantize_dynamic, quantize_weight_only};
use mantissa_quantize::passes::int8::{
    quantize_static, tensors_needing_full_range, tensors_to_calibrate, tensors_to_calibrate_for_search,
};
use mantissa_runtime::Environment;

use crate::calibrate::{CalibrationJob, calibrate};
use crate::error::PrepareError;
use crate::facts::{AutoFacts, BudgetFallback};
use crate::search::{BudgetSearch, SearchReport, StaticRecipe, search};

/// What to quantize a model with.
#[derive(Debug, Clone, Copy)]
pub struct Int8Job<'a> {
    pub options: &'a Int8Options,
    /// `model:variant`, for logs.
    pub label: &'a str,
    /// A drift budget to meet by keeping nodes FP32 (static mode only).
    pub budget: Option<BudgetSearch<'a>>,
}

/// The policy's drift budget, when it applies to this variant: a static INT8 variant of a
/// model whose policy names holdout data and a budget.
pub fn budget_for<'a>(entry: &'a ModelEntry, spec: &VariantSpec) -> Option<BudgetSearch<'a>> {
    let drift = entry.policy.drift.as_ref()?;
    // Auto searches with the budget in its static form and judges its dynamic form by it.
    let is_static = spec.int8.as_ref().is_none_or(|o| matches!(o.mode, Int8Mode::Static | Int8Mode::Auto));
    (is_static && drift.budget.has_thresholds() && spec.name != drift.reference).then_some(BudgetSearch {
        holdout: &drift.holdout_data,
        class_outputs: &drift.class_outputs,
        budget: &drift.budget,
        serve_flagged: drift.on_budget_miss == BudgetMiss::ServeFlagged,
    })
}

/// What the INT8 step did.
#[derive(Debug, Clone)]
pub struct Int8Outcome {
    pub report: Int8Report,
    /// The budget search, when one met the budget.
    pub search: Option<SearchReport>,
    /// Why the plain recipe is served instead, when the search failed and the policy serves
    /// such a variant flagged.
    pub fallback: Option<BudgetFallback>,
    /// What `mode: auto` chose, with every form's figures.
    pub auto: Option<AutoFacts>,
}

impl Int8Outcome {
    pub fn plain(report: Int8Report) -> Self {
        Self { report, search: None, fallback: None, auto: None }
    }
}

/// Runs the INT8 pass of the job on `model`, in place.
pub fn quantize_int8(
    environment: &Environment,
    model: &mut ModelProto,
    job: &Int8Job<'_>,
) -> Result<Int8Outcome, PrepareError> {
    let options = job.options;
    match options.mode {
        Int8Mode::Dynamic => quantize_dynamic(model, options)
            .map(Int8Outcome::plain)
            .map_err(|source| PrepareError::Int8 { mode: "int8 dynamic", source }),
        Int8Mode::WeightOnly => quantize_weight_only(model, options)
            .map(Int8Outcome::plain)
            .map_err(|source| PrepareError::Int8 { mode: "int8 weight-only", source }),
        Int8Mode::Static => quantize_calibrated(environment, model, job),
        // Auto runs the passes above itself (`crate::auto_int8`); nothing calls it here.
        Int8Mode::Auto => Err(PrepareError::Observation(
            "mode auto is resolved by auto_int8::quantize_int8_any, not by one pass".to_owned(),
        )),
    }
}

fn static_error(source: mantissa_quantize::passes::int8::Int8Error) -> PrepareError {
    PrepareError::Int8 { mode: "int8 static", source }
}

fn quantize_calibrated(
    environment: &Environment,
    model: &mut ModelProto,
    job: &Int8Job<'_>,
) -> Result<Int8Outcome, PrepareError> {
    let options = job.options;
    let data = options.calibration_data.as_ref().ok_or(PrepareError::NoCalibrationData)?;
    // A budget search keeps nodes FP32, which changes which tensors need ranges.
    let tensors = if job.budget.is_some() {
        tensors_to_calibrate_for_search(model, options)
    } else {
        tensors_to_calibrate(model, options)
    }
    .map_err(static_error)?;
    let full_range = tensors_needing_full_range(model, options).map_err(static_error)?;
    let calibration = CalibrationJob {
        model,
        tensors: &tensors,
        full_range: &full_range,
        data,
        options: &options.calibration,
        label: job.label,
    };
    let ranges = calibrate(environment, &calibration)?;
    let Some(budget) = job.budget else {
        return quantize_static(model, options, &ranges).map(Int8Outcome::plain).map_err(static_error);
    };
    let recipe = StaticRecipe { fp32: model, options, ranges: &ranges };
    match search(environment, &recipe, &budget, job.label) {
        Ok((quantized, report, searched)) => {
            *model = quantized;
            Ok(Int8Outcome { report, search: Some(searched), fallback: None, auto: None })
        }
        Err(missed) if budget.serve_flagged => {
            tracing::warn!(variant = job.label, %missed, "budget search failed; serving the plain recipe flagged");
            let report = quantize_static(model, options, &ranges).map_err(static_error)?;
            let time_limited = matches!(missed, PrepareError::SearchTimeLimit { .. });
            let fallback = BudgetFallback { reason: missed.to_string(), time_limited };
            Ok(Int8Outcome { report, search: None, fallback: Some(fallback), auto: None })
        }
        Err(missed) => Err(missed),
    }
}
