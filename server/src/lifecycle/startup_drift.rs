//! The startup drift check: each loaded variant of a model whose policy has a `drift` section
//! runs the holdout samples beside the reference variant, through both variants' own workers,
//! and is measured with preparation's accuracy module. A variant that misses the budget is not
//! served, or is served flagged, as the policy says.

use std::borrow::Cow;
use std::sync::Arc;

use mantissa_model_store::{BudgetMiss, DriftSettings};
use mantissa_preparation::accuracy::{DriftReport, Measures, compare_runs};
use mantissa_preparation::named_parts::PartError;
use mantissa_runtime::RuntimeError;
use mantissa_runtime::samples::{load_sample, sample_files};

use crate::facts::{BudgetVerdict, StartupDrift};
use crate::lifecycle::LoadedVariants;
use crate::routing::registry::{ServedModel, VariantState};
use crate::scheduling::workers::{InternalRunError, WorkerPool};
use crate::telemetry::metrics;

/// Why the startup drift of a variant could not be measured (logged; the variant still serves).
#[derive(Debug, thiserror::Error)]
enum DriftCheckError {
    #[error(transparent)]
    Samples(#[from] RuntimeError),
    #[error("{sample}: reference: {reason}")]
    Reference { sample: String, reason: InternalRunError },
    #[error("{sample}: {reason}")]
    Variant { sample: String, reason: InternalRunError },
    /// A named part of the budget does not fit the model's outputs.
    #[error("drift.budget.parts: {0}")]
    Part(#[from] PartError),
}

/// Runs every holdout sample through both variants' workers (blocking) and returns the drift
/// of each float output of the variant against the reference.
fn measure(
    reference: &WorkerPool,
    variant: &WorkerPool,
    settings: &DriftSettings,
) -> Result<DriftReport, DriftCheckError> {
    let signature = reference.signature();
    let mut samples = Vec::new();
    for file in sample_files(&settings.holdout_data)? {
        let mut request = load_sample(&file, signature)?;
        request.outputs = (0..signature.outputs.len()).collect();
        samples.push(request);
    }
    compare_runs(
        &samples,
        Measures { class_outputs: &settings.class_outputs, parts: Some(&settings.budget.parts) },
        |_, sample| {
            reference
                .run_internal_blocking(sample.clone())
                .map(Cow::Owned)
                .map_err(|reason| DriftCheckError::Reference { sample: sample.id.clone(), reason })
        },
        |_, sample| {
            variant
                .run_internal_blocking(sample.clone())
                .map_err(|reason| DriftCheckError::Variant { sample: sample.id.clone(), reason })
        },
    )
}

/// Compares each loaded variant of `model` with the drift reference on holdout data, records
/// the figures (facts, gauges, log), and removes variants that miss the budget when the
/// policy says so.
pub(crate) fn check_drift(model: &ServedModel, loaded: &mut LoadedVariants) {
    let Some(settings) = &model.entry.policy.drift else { return };
    let key = |variant: &str| (model.name().to_owned(), variant.to_owned());
    let Some(reference) = loaded.get(&key(&settings.reference)).map(|(pool, _)| Arc::clone(pool)) else {
        tracing::warn!(model = model.name(), reference = %settings.reference, "drift reference did not load; drift not measured");
        return;
    };
    for variant in model.variants.iter().filter(|v| v.spec.name != settings.reference) {
        let Some((pool, facts)) = loaded.get_mut(&key(&variant.spec.name)) else { continue };
        let report = match measure(&reference, pool, settings) {
            Ok(report) => report,
            Err(reason) => {
                tracing::warn!(model = model.name(), variant = %variant.spec.name, %reason, "drift not measured");
                continue;
            }
        };
        record(model, &variant.spec.name, settings, &report);
        let has_budget = settings.budget.has_thresholds();
        let mut drift = StartupDrift {
            reference: settings.reference.clone(),
            outputs: report.outputs.clone(),
            budget: has_budget.then_some(BudgetVerdict::Met),
        };
        if let Some(miss) = report.budget_miss(&settings.budget) {
            match settings.on_budget_miss {
                BudgetMiss::NotReady => {
                    tracing::error!(model = model.name(), variant = %variant.spec.name, %miss, "variant misses its drift budget; not serving it");
                    if let Some((pool, _)) = loaded.remove(&key(&variant.spec.name))
                        && let Some(pool) = Arc::into_inner(pool)
                    {
                        pool.shutdown();
                    }
                    variant.set(VariantState::Failed(format!("drift budget missed: {miss}")));
                    continue;
                }
                BudgetMiss::ServeFlagged => {
                    tracing::warn!(model = model.name(), variant = %variant.spec.name, %miss, "variant misses its drift budget; serving it flagged");
                    drift.budget = Some(BudgetVerdict::Missed(miss));
                }
            }
        }
        facts.drift = Some(drift);
    }
}

/// Logs the figures and sets the startup drift gauges.
fn record(model: &ServedModel, variant: &str, settings: &DriftSettings, report: &DriftReport) {
    for (output, figure) in &report.outputs {
        tracing::info!(
            model = model.name(),
            variant = %variant,
            output = %output,
            cosine = figure.cosine,
            sqnr_db = figure.sqnr_db,
            max_abs = figure.max_abs,
            rmse = figure.rmse,
            top1_agreement = ?figure.top1_agreement,
            "startup drift against {}", settings.reference
        );
        metrics::set_startup_drift(model.name(), variant, output, figure);
    }
}
