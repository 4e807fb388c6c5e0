//! Accuracy of a variant against a reference: per output cosine similarity, SQNR, max-abs
//! error, RMSE, and top-1 agreement for class-score outputs; one comparison loop and one budget
//! check. The budget search, the startup drift check and the live shadow comparison all measure
//! with this module; each supplies its own way to run a model (a closure), so nothing here
//! knows about sessions, workers or queues.

use std::borrow::Cow;
use std::collections::BTreeMap;

use mantissa_model_store::DriftBudget;
use mantissa_runtime::{InferenceRequest, OutputTensor};

use crate::output_parts::{OutputPart, find_parts};

/// Running sums for one output; merging samples is adding sums.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DriftAccumulator {
    dot: f64,
    reference_energy: f64,
    variant_energy: f64,
    error_energy: f64,
    max_abs: f64,
    count: u64,
    rows: u64,
    agreeing_rows: u64,
}

/// Final figures for one output.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftFigures {
    pub cosine: f64,
    /// Signal-to-quantization-noise ratio in dB (infinite when identical).
    pub sqnr_db: f64,
    pub max_abs: f64,
    pub rmse: f64,
    pub top1_agreement: Option<f64>,
}

fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(index, _)| index)
}

impl DriftAccumulator {
    /// Adds one pair of outputs. `classes` is the size of the class dimension (the last one)
    /// when top-1 agreement is wanted.
    pub fn add(&mut self, reference: &[f32], variant: &[f32], classes: Option<usize>) {
        for (&r, &v) in reference.iter().zip(variant) {
            let (r, v) = (f64::from(r), f64::from(v));
            self.dot += r * v;
            self.reference_energy += r * r;
            self.variant_energy += v * v;
            self.error_energy += (r - v) * (r - v);
            self.max_abs = self.max_abs.max((r - v).abs());
            self.count += 1;
        }
        if let Some(classes) = classes.filter(|&c| c > 0) {
            for (r, v) in reference.chunks_exact(classes).zip(variant.chunks_exact(classes)) {
                self.rows += 1;
                self.agreeing_rows += u64::from(argmax(r) == argmax(v));
            }
        }
    }

    pub fn figures(&self) -> DriftFigures {
        let norms = (self.reference_energy * self.variant_energy).sqrt();
        DriftFigures {
            cosine: if norms > 0.0 { self.dot / norms } else { 1.0 },
            sqnr_db: if self.error_energy > 0.0 {
                10.0 * (self.reference_energy / self.error_energy).log10()
            } else {
                f64::INFINITY
            },
            max_abs: self.max_abs,
            rmse: if self.count > 0 { (self.error_energy / self.count as f64).sqrt() } else { 0.0 },
            top1_agreement: (self.rows > 0).then(|| self.agreeing_rows as f64 / self.rows as f64),
        }
    }
}

/// Drift of every float output, by output name, over the samples added so far; outputs whose
/// channels live on different scales also by part (see [`crate::output_parts`]), keyed by the
/// part's label, e.g. `output0[:,4:22,:]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DriftTally {
    outputs: BTreeMap<String, DriftAccumulator>,
    /// The parts of each output, found on the first reference sample so every sample is split
    /// the same way.
    parts: BTreeMap<String, Vec<OutputPart>>,
}

impl DriftTally {
    /// Adds one sample: each float output of `variant` against the same output of `reference`.
    /// Outputs named in `class_outputs` also count top-1 agreement over their last dimension.
    pub fn add_pair(&mut self, reference: &[OutputTensor], variant: &[OutputTensor], class_outputs: &[String]) {
        for (expected, actual) in reference.iter().zip(variant) {
            let (r, v) = (expected.floats(), actual.floats());
            if r.is_empty() || r.len() != v.len() {
                continue;
            }
            let classes =
                class_outputs.contains(&expected.name).then(|| expected.shape.last().copied().unwrap_or(0) as usize);
            self.outputs.entry(expected.name.clone()).or_default().add(&r, &v, classes);
            let parts =
                self.parts.entry(expected.name.clone()).or_insert_with(|| find_parts(&expected.shape, &r)).clone();
            for part in parts {
                let label = part.label(&expected.name, expected.shape.len());
                let (part_r, part_v) = (part.select(&expected.shape, &r), part.select(&expected.shape, &v));
                self.outputs.entry(label).or_default().add(&part_r, &part_v, None);
            }
        }
    }

    pub fn report(&self) -> DriftReport {
        DriftReport { outputs: self.outputs.iter().map(|(name, sums)| (name.clone(), sums.figures())).collect() }
    }
}

/// Drift figures per output name, and per part label for outputs measured by part.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DriftReport {
    pub outputs: BTreeMap<String, DriftFigures>,
}

impl DriftReport {
    /// The lowest cosine over all outputs (1 when there are none).
    pub fn worst_cosine(&self) -> f64 {
        self.outputs.values().map(|figures| figures.cosine).fold(1.0, f64::min)
    }

    /// The lowest top-1 agreement over the class outputs, if any was measured.
    pub fn worst_top1(&self) -> Option<f64> {
        self.outputs.values().filter_map(|figures| figures.top1_agreement).reduce(f64::min)
    }

    /// The first budget an output (or part) misses, as a sentence naming it; `None` when every
    /// output meets the budget.
    pub fn budget_miss(&self, budget: &DriftBudget) -> Option<String> {
        for (output, figure) in &self.outputs {
            if let Some(min) = budget.min_cosine
                && figure.cosine < min
            {
                return Some(format!(
                    "output '{output}': cosine {:.6} is below the budget's min_cosine {min}",
                    figure.cosine
                ));
            }
            if let (Some(min), Some(agreement)) = (budget.min_top1_agreement, figure.top1_agreement)
                && agreement < min
            {
                return Some(format!(
                    "output '{output}': top-1 agreement {agreement:.4} is below the budget's min_top1_agreement {min}"
                ));
            }
        }
        None
    }

    pub fn meets(&self, budget: &DriftBudget) -> bool {
        self.budget_miss(budget).is_none()
    }
}

/// The comparison loop: runs every sample through the reference and the variant and tallies
/// the drift of each output. `reference` may hand back outputs computed once and kept (the
/// budget search compares many candidates against the same FP32 outputs).
pub fn compare_runs<'r, E>(
    samples: &[InferenceRequest],
    class_outputs: &[String],
    mut reference: impl FnMut(usize, &InferenceRequest) -> Result<Cow<'r, [OutputTensor]>, E>,
    mut variant: impl FnMut(usize, &InferenceRequest) -> Result<Vec<OutputTensor>, E>,
) -> Result<DriftReport, E> {
    let mut tally = DriftTally::default();
    for (index, sample) in samples.iter().enumerate() {
        let expected = reference(index, sample)?;
        let actual = variant(index, sample)?;
        tally.add_pair(&expected, &actual, class_outputs);
    }
    Ok(tally.report())
}

#[cfg(test)]
mod tests {
    use mantissa_runtime::DataType;

    use super::*;

    #[test]
    fn identical_outputs_have_no_drift() {
        let mut accumulator = DriftAccumulator::default();
        accumulator.add(&[1.0, 2.0, 3.0, 0.5], &[1.0, 2.0, 3.0, 0.5], Some(2));
        let figures = accumulator.figures();
        assert_eq!(figures.cosine, 1.0);
        assert_eq!(figures.sqnr_db, f64::INFINITY);
        assert_eq!((figures.max_abs, figures.rmse), (0.0, 0.0));
        assert_eq!(figures.top1_agreement, Some(1.0));
    }

    #[test]
    fn figures_match_their_definitions() {
        let mut accumulator = DriftAccumulator::default();
        // Two rows of two classes; the second row's argmax flips.
        accumulator.add(&[1.0, 0.0, 0.0, 1.0], &[1.0, 0.0, 0.6, 0.4], Some(2));
        let figures = accumulator.figures();
        let dot = 1.0 + 0.4;
        let cosine = dot / (2f64.sqrt() * (1.0f64 + 0.36 + 0.16).sqrt());
        assert!((figures.cosine - cosine).abs() < 1e-6);
        let error: f64 = 0.36 + 0.36;
        assert!((figures.sqnr_db - 10.0 * (2.0 / error).log10()).abs() < 1e-6);
        assert!((figures.max_abs - 0.6).abs() < 1e-6);
        assert!((figures.rmse - (error / 4.0).sqrt()).abs() < 1e-6);
        assert_eq!(figures.top1_agreement, Some(0.5));
    }

    fn output(name: &str, values: &[f32]) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![values.len() as i64 / 2, 2],
            raw: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn a_detection_head_is_judged_by_its_worst_part() {
        // [1, 6, 4]: four box rows in pixels, two score rows in 0..1. The variant gets the
        // boxes right and the scores wrong: the whole tensor's cosine stays near 1.
        let boxes: Vec<f32> = (0..16).map(|v| 20.0 * v as f32 + 10.0).collect();
        let scores = [0.9f32, 0.1, 0.8, 0.2, 0.1, 0.7, 0.3, 0.9];
        let wrong = [0.1f32, 0.9, 0.2, 0.8, 0.7, 0.1, 0.9, 0.3];
        let tensor = |rows: &[f32]| OutputTensor {
            name: "output0".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 6, 4],
            raw: rows.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let reference = tensor(&[boxes.as_slice(), &scores].concat());
        let variant = tensor(&[boxes.as_slice(), &wrong].concat());
        let mut tally = DriftTally::default();
        tally.add_pair(&[reference], &[variant], &[]);
        let report = tally.report();
        assert!(report.outputs["output0"].cosine > 0.999, "{report:?}");
        assert!(report.outputs["output0[:,4:6,:]"].cosine < 0.6, "{report:?}");
        assert_eq!(report.outputs["output0[:,0:4,:]"].cosine, 1.0);
        let miss = report.budget_miss(&DriftBudget { min_cosine: Some(0.99), ..Default::default() }).unwrap();
        assert!(miss.starts_with("output 'output0[:,4:6,:]': cosine"), "{miss}");
    }

    #[test]
    fn the_budget_names_the_first_output_that_misses() {
        let mut tally = DriftTally::default();
        let reference = [output("logits", &[1.0, 0.0, 0.0, 1.0]), output("z", &[1.0, 2.0, 3.0, 4.0])];
        let variant = [output("logits", &[1.0, 0.0, 0.6, 0.4]), output("z", &[1.0, 2.0, 3.0, 4.0])];
        tally.add_pair(&reference, &variant, &["logits".to_owned()]);
        let report = tally.report();
        assert_eq!(report.worst_top1(), Some(0.5));
        assert!(report.worst_cosine() < 0.9 && report.outputs["z"].cosine == 1.0);
        let budget = DriftBudget { min_cosine: Some(0.5), min_top1_agreement: Some(0.9), ..Default::default() };
        let miss = report.budget_miss(&budget).unwrap();
        assert!(miss.contains("output 'logits': top-1 agreement 0.5000 is below"), "{miss}");
        assert!(report.meets(&DriftBudget { min_cosine: Some(0.5), ..Default::default() }));
    }
}
