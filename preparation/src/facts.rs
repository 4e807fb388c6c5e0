//! Facts about how a variant was built: the precision pass's figures, the budget search's
//! outcome, the artifact size and time. Typed here, stored with cached artifacts, and rendered
//! into ModelConfig parameters by the serving layer in one place.

use mantissa_model_store::Precision;
use mantissa_quantize::calibration::CalibrationMethodKind;
use mantissa_quantize::passes::int8::Int8Mode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildFacts {
    pub precision: Precision,
    /// Bytes of the model the sessions load.
    pub artifact_bytes: u64,
    /// Time the pass (or the cache load) took.
    pub build_ms: u64,
    pub fp16: Option<Fp16Facts>,
    pub int8: Option<Int8Facts>,
    /// Whether the artifact came from the cache; `None` without a cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheOutcome>,
}

impl BuildFacts {
    pub fn new(precision: Precision) -> Self {
        Self { precision, artifact_bytes: 0, build_ms: 0, fp16: None, int8: None, cache: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fp16Facts {
    pub nodes_converted: usize,
    pub nodes_kept_fp32: usize,
    pub casts_inserted: usize,
    pub values_clamped: usize,
    pub keep_io_types: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Int8Facts {
    pub mode: Int8Mode,
    pub nodes_quantized: usize,
    pub nodes_kept_fp32: usize,
    pub activations_quantized: usize,
    pub per_channel: bool,
    /// The reduce_range in effect (resolved for the building CPU when the policy left it open).
    pub reduce_range: bool,
    /// Static mode only.
    pub calibration_method: Option<CalibrationMethodKind>,
    /// Present when a drift budget drove a mixed-precision search that met it.
    pub budget_search: Option<SearchFacts>,
    /// Present when the search failed and the plain recipe is served flagged instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_fallback: Option<BudgetFallback>,
    /// The pass's notes: an already-quantized model, or why nothing was quantized.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What `mode: auto` chose, with every form's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoFacts>,
}

impl Int8Facts {
    /// Whether the budget search's time limit shaped this artifact (it stopped the search early
    /// or made it fall back): another build with more time may differ, so it is not cached.
    pub fn shaped_by_time_limit(&self) -> bool {
        self.budget_search.as_ref().is_some_and(|s| s.time_limited)
            || self.budget_fallback.as_ref().is_some_and(|f| f.time_limited)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchFacts {
    /// Nodes the search kept in FP32, most sensitive first.
    pub kept_fp32: Vec<String>,
    /// Worst output cosine with FP32 on the holdout data, after the search.
    pub cosine: f64,
    /// The same before the search (the plain recipe).
    pub plain_recipe_cosine: f64,
    /// Full evaluations the search ran (the plain recipe's included).
    #[serde(default)]
    pub evaluations: usize,
    /// Time the search took, calibration excluded.
    #[serde(default)]
    pub search_ms: u64,
    /// The time limit stopped the search after a configuration met the budget.
    #[serde(default)]
    pub time_limited: bool,
    /// The threshold with the least room left at the end, naming its output or part.
    #[serde(default)]
    pub tightest: Option<String>,
}

/// Why a variant with a drift budget serves the plain recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetFallback {
    /// The search's failure, with its figures.
    pub reason: String,
    /// The search's time limit ended it.
    pub time_limited: bool,
}

/// One candidate form, as measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateFacts {
    /// "dynamic" or "static".
    pub form: String,
    /// (batch size, FP32 median time / the form's median time).
    pub speedups: Vec<(usize, f64)>,
    /// Worst output (or part) cosine against FP32 on the holdout data.
    pub cosine: Option<f64>,
    pub meets_budget: bool,
    pub bytes: u64,
    /// Why the form was not built or not eligible, or what the budget search did.
    pub note: Option<String>,
}

impl CandidateFacts {
    /// The geometric mean of the speedups: one figure across batch sizes.
    pub fn mean_speedup(&self) -> Option<f64> {
        if self.speedups.is_empty() {
            return None;
        }
        let logs: f64 = self.speedups.iter().map(|(_, s)| s.max(1e-9).ln()).sum();
        Some((logs / self.speedups.len() as f64).exp())
    }
}

/// What auto chose and why, with every candidate's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoFacts {
    pub chosen: String,
    pub reason: String,
    /// The CPU the forms were timed on (model name and the flags that pick INT8 kernels).
    pub cpu: String,
    pub candidates: Vec<CandidateFacts>,
}

impl AutoFacts {
    /// The candidate table, one line per form, as the log and `mantissa quantize` print it.
    pub fn table(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{:<8} {:>26} {:>10} {:>8} {:>11}  note",
            "form", "speedup vs FP32", "cosine", "budget", "bytes"
        )];
        for c in &self.candidates {
            let speedups = c.speedups.iter().map(|(b, s)| format!("b{b} {s:.2}x")).collect::<Vec<_>>().join(" ");
            let cosine = c.cosine.map_or("-".to_owned(), |v| format!("{v:.5}"));
            let chosen = if c.form == self.chosen { " (chosen)" } else { "" };
            lines.push(format!(
                "{:<8} {:>26} {:>10} {:>8} {:>11}  {}{chosen}",
                c.form,
                if speedups.is_empty() { "-".to_owned() } else { speedups },
                cosine,
                if c.meets_budget { "met" } else { "missed" },
                c.bytes,
                c.note.as_deref().unwrap_or("")
            ));
        }
        lines
    }
}
