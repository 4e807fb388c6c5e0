//! Accuracy drift of a variant against a reference variant: per output cosine similarity,
//! SQNR, max-abs error, RMSE, and top-1 agreement for class-score outputs. Used at startup on
//! holdout data (and by the live shadow comparison).

use std::collections::BTreeMap;

use mantissa_model_store::DriftSettings;

use crate::calibrate::{load_sample, sample_files};
use crate::datatype::DataType;
use crate::executor::OutputTensor;
use crate::worker::WorkerPool;

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

pub fn as_f32(output: &OutputTensor) -> Vec<f32> {
    match output.datatype {
        DataType::Fp32 => output.raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DataType::Fp16 => output.raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DataType::Fp64 => {
            output.raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
        }
        _ => Vec::new(),
    }
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

/// Runs every holdout sample through both variants' workers (blocking) and returns the drift
/// of each float output of the variant against the reference.
pub fn measure(
    reference: &WorkerPool,
    variant: &WorkerPool,
    settings: &DriftSettings,
) -> Result<BTreeMap<String, DriftFigures>, String> {
    let files = sample_files(&settings.holdout_data)?;
    let signature = reference.signature();
    let mut accumulators: BTreeMap<String, DriftAccumulator> = BTreeMap::new();
    let run = |pool: &WorkerPool, request| -> Result<Vec<OutputTensor>, String> {
        let receiver = pool.submit_internal(request).map_err(|err| format!("{err:?}"))?;
        receiver.blocking_recv().map_err(|_| "worker stopped".to_owned())?.map_err(|err| err.to_string())
    };
    for file in &files {
        let mut request = load_sample(file, signature)?;
        request.outputs = (0..signature.outputs.len()).collect();
        let expected =
            run(reference, request.clone()).map_err(|err| format!("{}: reference: {err}", file.display()))?;
        let actual = run(variant, request).map_err(|err| format!("{}: {err}", file.display()))?;
        for (r, v) in expected.iter().zip(&actual) {
            let (rv, vv) = (as_f32(r), as_f32(v));
            if rv.is_empty() {
                continue;
            }
            let classes =
                settings.class_outputs.contains(&r.name).then(|| r.shape.last().copied().unwrap_or(0) as usize);
            accumulators.entry(r.name.clone()).or_default().add(&rv, &vv, classes);
        }
    }
    Ok(accumulators.into_iter().map(|(name, accumulator)| (name, accumulator.figures())).collect())
}

/// The first budget the figures miss, if any.
pub fn budget_miss(figures: &BTreeMap<String, DriftFigures>, settings: &DriftSettings) -> Option<String> {
    for (output, figure) in figures {
        if let Some(min) = settings.budget.min_cosine
            && figure.cosine < min
        {
            return Some(format!(
                "output '{output}': cosine {:.6} is below the budget's min_cosine {min}",
                figure.cosine
            ));
        }
        if let (Some(min), Some(agreement)) = (settings.budget.min_top1_agreement, figure.top1_agreement)
            && agreement < min
        {
            return Some(format!(
                "output '{output}': top-1 agreement {agreement:.4} is below the budget's min_top1_agreement {min}"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
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
}
