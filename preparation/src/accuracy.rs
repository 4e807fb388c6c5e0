//! Accuracy of a variant against a reference: per output cosine similarity, SQNR, max-abs
//! error, RMSE, and top-1 agreement for class-score outputs; one comparison loop. The budget
//! check lives in [`crate::budget_check`]. The budget search, the startup drift check and the
//! live shadow comparison all measure with this module; each supplies its own way to run a
//! model (a closure), so nothing here knows about sessions, workers or queues.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use mantissa_model_store::PartBudget;
use mantissa_runtime::{InferenceRequest, OutputTensor};

use crate::named_parts::{PartError, ResolvedPart, Top1Rows, resolve};
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

/// The index of the largest of `len` values `stride` apart starting at `start`; the first of
/// equal largest values, as NumPy's and PyTorch's argmax choose (quantized outputs tie often).
fn argmax(values: &[f32], start: usize, len: usize, stride: usize) -> usize {
    let mut best = 0;
    for i in 1..len {
        if values[start + i * stride].total_cmp(&values[start + best * stride]).is_gt() {
            best = i;
        }
    }
    best
}

impl DriftAccumulator {
    /// Adds one pair of outputs. `classes` is the size of the class dimension (the last one)
    /// when top-1 agreement is wanted.
    pub fn add(&mut self, reference: &[f32], variant: &[f32], classes: Option<usize>) {
        let rows = classes.filter(|&c| c > 0).map(|len| Top1Rows { outer: reference.len() / len, len, inner: 1 });
        self.add_with_rows(reference, variant, rows);
    }

    /// Adds one pair of outputs, counting top-1 agreement over `rows` when given.
    pub fn add_with_rows(&mut self, reference: &[f32], variant: &[f32], rows: Option<Top1Rows>) {
        for (&r, &v) in reference.iter().zip(variant) {
            let (r, v) = (f64::from(r), f64::from(v));
            self.dot += r * v;
            self.reference_energy += r * r;
            self.variant_energy += v * v;
            self.error_energy += (r - v) * (r - v);
            self.max_abs = self.max_abs.max((r - v).abs());
            self.count += 1;
        }
        let Some(Top1Rows { outer, len, inner }) = rows.filter(|r| r.len > 0 && r.outer * r.len * r.inner > 0) else {
            return;
        };
        if reference.len() < outer * len * inner || variant.len() < outer * len * inner {
            return;
        }
        for block in 0..outer {
            for offset in 0..inner {
                let start = block * len * inner + offset;
                self.rows += 1;
                self.agreeing_rows +=
                    u64::from(argmax(reference, start, len, inner) == argmax(variant, start, len, inner));
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

/// What to measure besides every float output: top-1 agreement of the class outputs, and the
/// policy's named parts (`drift.budget.parts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Measures<'a> {
    pub class_outputs: &'a [String],
    pub parts: Option<&'a BTreeMap<String, PartBudget>>,
}

/// Drift of every float output, by output name, over the samples added so far. An output the
/// policy names parts of is also measured by each of those parts, keyed by the part's name;
/// any other output whose channels live on different scales is measured by automatic part
/// too (see [`crate::output_parts`]), keyed by the part's label, e.g. `output0[:,4:22,:]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DriftTally {
    outputs: BTreeMap<String, DriftAccumulator>,
    /// The automatic parts of each output, found on the first reference sample so every
    /// sample is split the same way.
    parts: BTreeMap<String, Vec<OutputPart>>,
    /// The named parts, fitted to their outputs on the first sample that has them.
    named: BTreeMap<String, ResolvedPart>,
    /// Automatic parts whose reference values are probabilities, counted by best element.
    score_parts: BTreeSet<String>,
}

impl DriftTally {
    /// Adds one sample: each float output of `variant` against the same output of `reference`.
    /// Fails when a named part does not fit its output.
    pub fn add_pair(
        &mut self,
        reference: &[OutputTensor],
        variant: &[OutputTensor],
        measures: Measures<'_>,
    ) -> Result<(), PartError> {
        let named = measures.parts.into_iter().flatten();
        for (name, spec) in named.clone() {
            let whole_of_itself = *name == spec.output && spec.slice.is_none();
            if !whole_of_itself && reference.iter().any(|output| output.name == *name) {
                return Err(PartError::NameTaken { part: name.clone() });
            }
        }
        for (expected, actual) in reference.iter().zip(variant) {
            let (r, v) = (expected.floats(), actual.floats());
            if r.is_empty() || r.len() != v.len() {
                continue;
            }
            let mut own_parts = named.clone().filter(|(_, spec)| spec.output == expected.name).peekable();
            let dims: Vec<usize> = expected.shape.iter().map(|&d| d.max(0) as usize).collect();
            let mut whole_rows = measures
                .class_outputs
                .contains(&expected.name)
                .then(|| Top1Rows::along(&dims, dims.len().saturating_sub(1)))
                .filter(|_| !dims.is_empty());
            if own_parts.peek().is_none() {
                self.outputs.entry(expected.name.clone()).or_default().add_with_rows(&r, &v, whole_rows);
                self.add_automatic_parts(expected, &r, &v);
                continue;
            }
            // The policy's parts replace the automatic ones for this output.
            for (name, spec) in own_parts {
                let part = match self.named.get(name) {
                    Some(part) => part.clone(),
                    None => {
                        let part = resolve(name, spec, &expected.shape)?;
                        self.named.insert(name.clone(), part.clone());
                        part
                    }
                };
                if *name == expected.name {
                    // A part that is its output, whole: the output's own entry counts its top-1.
                    whole_rows = part.top1.or(whole_rows);
                    continue;
                }
                let (part_r, part_v) = match &part.channels {
                    Some(channels) => (
                        Cow::Owned(channels.select(&expected.shape, &r)),
                        Cow::Owned(channels.select(&expected.shape, &v)),
                    ),
                    None => (Cow::Borrowed(r.as_slice()), Cow::Borrowed(v.as_slice())),
                };
                self.outputs.entry(name.clone()).or_default().add_with_rows(&part_r, &part_v, part.top1);
            }
            self.outputs.entry(expected.name.clone()).or_default().add_with_rows(&r, &v, whole_rows);
        }
        Ok(())
    }

    fn add_automatic_parts(&mut self, expected: &OutputTensor, r: &[f32], v: &[f32]) {
        let parts = self.parts.entry(expected.name.clone()).or_insert_with(|| find_parts(&expected.shape, r)).clone();
        for part in parts {
            let label = part.label(&expected.name, expected.shape.len());
            let (part_r, part_v) = (part.select(&expected.shape, r), part.select(&expected.shape, v));
            // A part of probabilities (a detector's class scores) is read by its best element:
            // which anchor and class wins. Its agreement is counted per batch item.
            let best = part_r.iter().all(|value| (0.0..=1.0).contains(value)).then(|| {
                let mut dims: Vec<usize> = expected.shape.iter().map(|&d| d.max(0) as usize).collect();
                dims[part.axis] = part.end - part.start;
                Top1Rows::per_batch_item(&dims)
            });
            if best.is_some() {
                self.score_parts.insert(label.clone());
            }
            self.outputs.entry(label).or_default().add_with_rows(&part_r, &part_v, best);
        }
    }

    pub fn report(&self) -> DriftReport {
        DriftReport {
            outputs: self.outputs.iter().map(|(name, sums)| (name.clone(), sums.figures())).collect(),
            part_labels: self.named.iter().map(|(name, part)| (name.clone(), part.label.clone())).collect(),
            score_parts: self.score_parts.clone(),
        }
    }
}

/// Drift figures per output name, per automatic part label, and per named part.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DriftReport {
    pub outputs: BTreeMap<String, DriftFigures>,
    /// Each named part measured, and what it covers (`output0[:,4:,:]`).
    pub part_labels: BTreeMap<String, String>,
    /// Automatic parts of probabilities (`output0[:,4:84,:]` of a detector), whose best
    /// element's agreement the budget holds to [`crate::budget_check::SCORE_PART_TOP1`] unless
    /// it sets `min_top1_agreement` itself.
    pub score_parts: BTreeSet<String>,
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
}

/// The comparison loop: runs every sample through the reference and the variant and tallies
/// the drift of each output. `reference` may hand back outputs computed once and kept (the
/// budget search compares many candidates against the same FP32 outputs).
pub fn compare_runs<'r, E: From<PartError>>(
    samples: &[InferenceRequest],
    measures: Measures<'_>,
    mut reference: impl FnMut(usize, &InferenceRequest) -> Result<Cow<'r, [OutputTensor]>, E>,
    mut variant: impl FnMut(usize, &InferenceRequest) -> Result<Vec<OutputTensor>, E>,
) -> Result<DriftReport, E> {
    let mut tally = DriftTally::default();
    for (index, sample) in samples.iter().enumerate() {
        let expected = reference(index, sample)?;
        if index == 0 {
            check_outputs(&expected, measures)?;
        }
        let actual = variant(index, sample)?;
        tally.add_pair(&expected, &actual, measures)?;
    }
    Ok(tally.report())
}

/// Every named part's output is among the reference's outputs (all of them are run here).
fn check_outputs(reference: &[OutputTensor], measures: Measures<'_>) -> Result<(), PartError> {
    let names: Vec<String> = reference.iter().map(|output| output.name.clone()).collect();
    for (part, spec) in measures.parts.into_iter().flatten() {
        if !names.contains(&spec.output) {
            return Err(PartError::UnknownOutput { part: part.clone(), output: spec.output.clone(), outputs: names });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mantissa_model_store::{DriftBudget, PartSlice, Top1Axis};
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
        tally.add_pair(&[reference], &[variant], Measures::default()).unwrap();
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
        let classes = ["logits".to_owned()];
        tally.add_pair(&reference, &variant, Measures { class_outputs: &classes, parts: None }).unwrap();
        let report = tally.report();
        assert_eq!(report.worst_top1(), Some(0.5));
        assert!(report.worst_cosine() < 0.9 && report.outputs["z"].cosine == 1.0);
        let budget = DriftBudget { min_cosine: Some(0.5), min_top1_agreement: Some(0.9), ..Default::default() };
        let miss = report.budget_miss(&budget).unwrap();
        assert!(miss.contains("output 'logits': top-1 agreement 0.5000 is below"), "{miss}");
        assert!(report.meets(&DriftBudget { min_cosine: Some(0.5), ..Default::default() }));
    }

    /// [1, 6, 4] detection head: boxes right, scores with their best class flipped per anchor.
    fn flipped_scores() -> (OutputTensor, OutputTensor) {
        let boxes: Vec<f32> = (0..16).map(|v| 20.0 * v as f32 + 10.0).collect();
        let scores = [0.9f32, 0.1, 0.8, 0.2, 0.1, 0.7, 0.3, 0.9];
        let wrong = [0.1f32, 0.9, 0.2, 0.8, 0.7, 0.1, 0.9, 0.3];
        let tensor = |rows: &[f32]| OutputTensor {
            name: "output0".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 6, 4],
            raw: rows.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        (tensor(&[boxes.as_slice(), &scores].concat()), tensor(&[boxes.as_slice(), &wrong].concat()))
    }

    fn part(slice: Option<&str>) -> PartBudget {
        PartBudget {
            output: "output0".to_owned(),
            slice: slice.map(|text| PartSlice::parse(text).unwrap()),
            min_cosine: None,
            min_sqnr_db: None,
            max_abs: None,
            min_top1_agreement: None,
            top1_axis: Top1Axis::Last,
        }
    }

    #[test]
    fn named_parts_replace_the_automatic_ones_and_have_their_own_thresholds() {
        let (reference, variant) = flipped_scores();
        let mut parts = BTreeMap::new();
        parts.insert(
            "scores".to_owned(),
            PartBudget { min_top1_agreement: Some(0.95), top1_axis: Top1Axis::Axis(1), ..part(Some("[:, 4:, :]")) },
        );
        parts.insert("boxes".to_owned(), PartBudget { max_abs: Some(2.0), ..part(Some("[:, :4, :]")) });
        let mut tally = DriftTally::default();
        tally.add_pair(&[reference], &[variant], Measures { class_outputs: &[], parts: Some(&parts) }).unwrap();
        let report = tally.report();
        let keys: Vec<&str> = report.outputs.keys().map(String::as_str).collect();
        assert_eq!(keys, ["boxes", "output0", "scores"], "no automatic parts beside named ones");
        assert_eq!(report.part_labels["scores"], "output0[:,4:,:]");
        // Per anchor (argmax over the two score rows), every anchor's class flips.
        assert_eq!(report.outputs["scores"].top1_agreement, Some(0.0));
        assert_eq!(report.outputs["boxes"].max_abs, 0.0);
        let budget = DriftBudget { min_cosine: Some(0.99), parts, ..Default::default() };
        assert_eq!(
            report.budget_miss(&budget).unwrap(),
            "part 'scores' (output0[:,4:,:]): top-1 agreement 0.0000 is below min_top1_agreement 0.95"
        );
        // The whole output still meets the budget's min_cosine: only the part tells.
        assert!(report.outputs["output0"].cosine > 0.99);
    }

    #[test]
    fn an_automatic_part_of_probabilities_is_held_to_its_best_elements_agreement() {
        let (reference, _) = flipped_scores();
        // The score part's cosine stays high while its best element moves: class 0 anchor 2
        // (0.8) rises past the reference's best (0.9 at class 0 anchor 0).
        let mut values = reference.floats();
        values[18] = 0.92;
        let variant = OutputTensor { raw: values.iter().flat_map(|v| v.to_le_bytes()).collect(), ..reference.clone() };
        let mut tally = DriftTally::default();
        tally.add_pair(&[reference], &[variant], Measures::default()).unwrap();
        let report = tally.report();
        let scores = "output0[:,4:6,:]";
        assert_eq!(report.score_parts.iter().map(String::as_str).collect::<Vec<_>>(), [scores], "boxes are not scores");
        assert!(report.outputs[scores].cosine > 0.99, "{report:?}");
        assert_eq!(report.outputs[scores].top1_agreement, Some(0.0));
        assert_eq!(report.outputs["output0[:,0:4,:]"].top1_agreement, None);
        let budget = DriftBudget { min_cosine: Some(0.99), ..Default::default() };
        assert_eq!(
            report.budget_miss(&budget).unwrap(),
            format!(
                "output '{scores}': top-1 agreement 0.0000 is below the min_top1_agreement of automatic score parts 0.95"
            )
        );
        // A budget's own top-1 figure replaces the default.
        assert!(report.meets(&DriftBudget { min_top1_agreement: Some(0.0), ..budget }));
    }

    #[test]
    fn top1_over_all_of_a_part_and_the_tightest_threshold() {
        let (reference, _) = flipped_scores();
        // The best (class, anchor) of the reference is class 0 anchor 0 (0.9, tied with class 1
        // anchor 3; ties go to the first). The variant raises class 0 anchor 2 from 0.8 to 0.95.
        let mut values = reference.floats();
        values[18] = 0.95;
        let variant = OutputTensor { raw: values.iter().flat_map(|v| v.to_le_bytes()).collect(), ..reference.clone() };
        let mut parts = BTreeMap::new();
        parts.insert(
            "scores".to_owned(),
            PartBudget {
                min_cosine: Some(0.9),
                min_top1_agreement: Some(0.5),
                top1_axis: Top1Axis::All,
                ..part(Some("[:, -2:, :]"))
            },
        );
        parts.insert("output0".to_owned(), PartBudget { min_sqnr_db: Some(20.0), ..part(None) });
        let mut tally = DriftTally::default();
        tally.add_pair(&[reference], &[variant], Measures { class_outputs: &[], parts: Some(&parts) }).unwrap();
        let report = tally.report();
        assert_eq!(report.outputs["scores"].top1_agreement, Some(0.0));
        let budget = DriftBudget { parts: parts.clone(), ..Default::default() };
        let miss = report.budget_miss(&budget).unwrap();
        assert!(miss.starts_with("part 'scores' (output0[:,-2:,:]): top-1 agreement 0.0000 is below"), "{miss}");
        parts.get_mut("scores").unwrap().min_top1_agreement = None;
        parts.get_mut("scores").unwrap().top1_axis = Top1Axis::Last;
        let budget = DriftBudget { parts, ..Default::default() };
        let tightest = report.tightest(&budget).unwrap();
        // The scores' cosine is near 0.98 (room left about 0.8); the whole output's SQNR is far
        // above 20 dB.
        assert!(tightest.subject == "part 'scores' (output0[:,-2:,:])" && tightest.figure == "cosine", "{tightest}");
    }

    #[test]
    fn a_part_that_does_not_fit_its_output_fails_the_comparison() {
        let (reference, variant) = flipped_scores();
        let mut parts = BTreeMap::new();
        parts.insert("scores".to_owned(), PartBudget { min_cosine: Some(0.9), ..part(Some("[:, 4:]")) });
        let mut tally = DriftTally::default();
        let measures = Measures { class_outputs: &[], parts: Some(&parts) };
        let err =
            tally.add_pair(std::slice::from_ref(&reference), std::slice::from_ref(&variant), measures).unwrap_err();
        assert!(matches!(err, PartError::Rank { entries: 2, rank: 3, .. }), "{err}");
        parts.insert("output0".to_owned(), PartBudget { min_cosine: Some(0.9), ..part(Some("[:, 4:, :]")) });
        let measures = Measures { class_outputs: &[], parts: Some(&parts) };
        let err = tally.add_pair(&[reference], &[variant], measures).unwrap_err();
        assert_eq!(err, PartError::NameTaken { part: "output0".to_owned() });
    }
}
