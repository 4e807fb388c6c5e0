//! What the server knows about a ready variant beyond its workers: how it was built, how its
//! batch-invariance self-test went, and its startup drift against the reference. Filled in by
//! the lifecycle, rendered into ModelConfig parameters by the API in one place.

use std::collections::BTreeMap;

use mantissa_preparation::BuildFacts;
use mantissa_preparation::accuracy::DriftFigures;
use mantissa_runtime::ExecutionProvider;

#[derive(Debug, Clone, PartialEq)]
pub struct VariantFacts {
    pub build: BuildFacts,
    /// `None` for variants that do not batch (or batch fewer rows than the test needs).
    pub batch_invariance: Option<BatchInvariance>,
    /// `None` without a drift section, for the reference itself, or when drift was not measured.
    pub drift: Option<StartupDrift>,
    /// The execution provider the workers run on.
    pub provider: ProviderFacts,
}

/// Which execution provider serves a variant, and whether it is the one the policy asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderFacts {
    pub in_use: ExecutionProvider,
    /// Set when the policy's provider was not available and `fallback: cpu` moved the variant
    /// to the CPU.
    pub fallback: Option<ProviderFallback>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderFallback {
    /// The provider the policy asked for, as `cuda (device 0)`.
    pub requested: String,
    /// The policy's name of it (`cuda`, `tensorrt`).
    pub requested_kind: &'static str,
    /// Why it was not used.
    pub reason: String,
}

impl ProviderFacts {
    /// `cuda (device 0)`, `cpu`, or after a fallback `cpu (fallback from cuda)`.
    pub fn describe(&self) -> String {
        match &self.fallback {
            None => self.in_use.describe(),
            Some(fallback) => format!("{} (fallback from {})", self.in_use.describe(), fallback.requested_kind),
        }
    }
}

/// The outcome of the batch-invariance self-test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchInvariance {
    /// Inference failed, so the test could not compare anything.
    NotRun,
    Ran {
        passed: bool,
        max_abs_diff: f32,
    },
}

/// Startup drift against the policy's reference variant on holdout data.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupDrift {
    pub reference: String,
    pub outputs: BTreeMap<String, DriftFigures>,
    /// `None` when the policy sets no budget.
    pub budget: Option<BudgetVerdict>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BudgetVerdict {
    Met,
    /// Missed, and served anyway because the policy says `serve_flagged`.
    Missed(String),
}
