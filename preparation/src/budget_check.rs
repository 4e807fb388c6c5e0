//! Whether a drift report meets a budget, and how close it came. Whole outputs and automatic
//! parts are held to the budget's own figures (`min_cosine`, `min_top1_agreement`); named parts
//! to their own thresholds, and a named part that is a whole output of the same name to both.
//! An automatic part of probabilities (a detector's class scores) is also held to
//! [`SCORE_PART_TOP1`] agreement of its best element when the budget sets no top-1 figure:
//! its cosine can pass while the winning anchor or class changes. Every sentence names the
//! output or part, the figure, the threshold and the value.

use mantissa_model_store::{DriftBudget, PartBudget};

use crate::accuracy::{DriftFigures, DriftReport};

/// The agreement of the best element (which anchor and class wins) an automatic part of
/// probabilities needs under a budget that sets no `min_top1_agreement` of its own.
pub const SCORE_PART_TOP1: f64 = 0.95;

/// A measure a threshold applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figure {
    Cosine,
    SqnrDb,
    MaxAbs,
    Top1,
}

impl Figure {
    fn name(self) -> &'static str {
        match self {
            Figure::Cosine => "cosine",
            Figure::SqnrDb => "SQNR",
            Figure::MaxAbs => "max abs error",
            Figure::Top1 => "top-1 agreement",
        }
    }

    fn value(self, figures: &DriftFigures) -> Option<f64> {
        match self {
            Figure::Cosine => Some(figures.cosine),
            Figure::SqnrDb => Some(figures.sqnr_db),
            Figure::MaxAbs => Some(figures.max_abs),
            Figure::Top1 => figures.top1_agreement,
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Figure::Cosine | Figure::MaxAbs => format!("{value:.6}"),
            Figure::SqnrDb => format!("{value:.2} dB"),
            Figure::Top1 => format!("{value:.4}"),
        }
    }

    /// Whether `value` falls on the wrong side of `limit`.
    fn misses(self, value: f64, limit: f64) -> bool {
        if self == Figure::MaxAbs { value > limit } else { value < limit }
    }

    /// The share of the room between the threshold and a perfect figure that is left: 0 at
    /// the threshold, 1 when identical to the reference. Figures in different units (a
    /// fraction, dB, an absolute error) compare on this scale to find the tightest.
    fn margin(self, value: f64, limit: f64) -> f64 {
        match self {
            Figure::Cosine | Figure::Top1 if limit < 1.0 => (value - limit) / (1.0 - limit),
            Figure::Cosine | Figure::Top1 => value - limit,
            Figure::SqnrDb => (value - limit) / limit.abs().max(1.0),
            Figure::MaxAbs if limit > 0.0 => (limit - value) / limit,
            Figure::MaxAbs => -value,
        }
    }
}

/// One threshold on one report entry.
struct Threshold<'a> {
    figure: Figure,
    key: &'static str,
    limit: f64,
    /// The output or part as sentences name it.
    subject: String,
    /// A named part's own threshold (phrased "min_x"), or the budget's ("the budget's min_x").
    own: bool,
    figures: &'a DriftFigures,
}

impl Threshold<'_> {
    fn value(&self) -> Option<f64> {
        self.figure.value(self.figures)
    }

    fn threshold_text(&self) -> String {
        if self.own {
            format!("{} {}", self.key, self.limit)
        } else {
            format!("the budget's {} {}", self.key, self.limit)
        }
    }
}

/// The threshold nearest to being missed, and by how much.
#[derive(Debug, Clone, PartialEq)]
pub struct Tightest {
    /// The output or part, e.g. `part 'scores' (output0[:,4:,:])`.
    pub subject: String,
    pub figure: &'static str,
    pub value: String,
    /// The threshold, e.g. `min_top1_agreement 0.95`.
    pub threshold: String,
    /// The share of the threshold's room left (0 at the threshold, 1 at perfect agreement).
    pub margin: f64,
}

impl std::fmt::Display for Tightest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} {} against {} ({:.0}% of the room left)",
            self.subject,
            self.figure,
            self.value,
            self.threshold,
            self.margin * 100.0
        )
    }
}

/// Every threshold that applies to the entries of `report`, in key order.
fn thresholds<'a>(report: &'a DriftReport, budget: &DriftBudget) -> Vec<Threshold<'a>> {
    let mut all = Vec::new();
    for (key, figures) in &report.outputs {
        let named = report.part_labels.get(key).and_then(|label| Some((label, budget.parts.get(key)?)));
        let is_output = named.is_none_or(|(_, spec)| spec.output == *key && spec.slice.is_none());
        if is_output {
            for (figure, name, limit) in [
                (Figure::Cosine, "min_cosine", budget.min_cosine),
                (Figure::Top1, "min_top1_agreement", budget.min_top1_agreement),
            ] {
                if let Some(limit) = limit {
                    all.push(Threshold {
                        figure,
                        key: name,
                        limit,
                        subject: format!("output '{key}'"),
                        own: false,
                        figures,
                    });
                }
            }
            if budget.min_top1_agreement.is_none() && report.score_parts.contains(key) {
                all.push(Threshold {
                    figure: Figure::Top1,
                    key: "the min_top1_agreement of automatic score parts",
                    limit: SCORE_PART_TOP1,
                    subject: format!("output '{key}'"),
                    own: true,
                    figures,
                });
            }
        }
        if let Some((label, spec)) = named {
            for (figure, name, limit) in own_limits(spec) {
                all.push(Threshold {
                    figure,
                    key: name,
                    limit,
                    subject: format!("part '{key}' ({label})"),
                    own: true,
                    figures,
                });
            }
        }
    }
    all
}

fn own_limits(spec: &PartBudget) -> impl Iterator<Item = (Figure, &'static str, f64)> {
    [
        (Figure::Cosine, "min_cosine", spec.min_cosine),
        (Figure::SqnrDb, "min_sqnr_db", spec.min_sqnr_db),
        (Figure::MaxAbs, "max_abs", spec.max_abs),
        (Figure::Top1, "min_top1_agreement", spec.min_top1_agreement),
    ]
    .into_iter()
    .filter_map(|(figure, key, limit)| Some((figure, key, limit?)))
}

impl DriftReport {
    /// The first threshold an output or part misses, as a sentence naming it; `None` when all
    /// are met. A named part that was not measured (its output is not a float tensor) misses.
    pub fn budget_miss(&self, budget: &DriftBudget) -> Option<String> {
        if let Some((name, spec)) = budget.parts.iter().find(|(name, _)| !self.outputs.contains_key(*name)) {
            return Some(format!(
                "part '{name}' of output '{}' was not measured (it needs a float output)",
                spec.output
            ));
        }
        thresholds(self, budget).into_iter().find_map(|threshold| {
            let value = threshold.value()?;
            threshold.figure.misses(value, threshold.limit).then(|| {
                let side = if threshold.figure == Figure::MaxAbs { "above" } else { "below" };
                format!(
                    "{}: {} {} is {side} {}",
                    threshold.subject,
                    threshold.figure.name(),
                    threshold.figure.show(value),
                    threshold.threshold_text()
                )
            })
        })
    }

    pub fn meets(&self, budget: &DriftBudget) -> bool {
        self.budget_miss(budget).is_none()
    }

    /// The threshold with the least room left, over every output and part it applies to.
    pub fn tightest(&self, budget: &DriftBudget) -> Option<Tightest> {
        thresholds(self, budget)
            .into_iter()
            .filter_map(|threshold| {
                let value = threshold.value()?;
                Some(Tightest {
                    subject: threshold.subject.clone(),
                    figure: threshold.figure.name(),
                    value: threshold.figure.show(value),
                    threshold: format!("{} {}", threshold.key, threshold.limit),
                    margin: threshold.figure.margin(value, threshold.limit),
                })
            })
            .min_by(|a, b| a.margin.total_cmp(&b.margin))
    }
}
