//! The `calibration:` section of a policy variant: which method picks a tensor's range from its
//! statistics, with what parameters, and whether saturating inputs are clipped.

use serde::{Deserialize, Serialize};

use super::clipping::clip_for_consumers;
use super::statistics::{CalibrationMethod, DEFAULT_BINS, MAX_BINS, MIN_BINS, TensorStatistics};

/// Default percentile of [`CalibrationMethod::Percentile`].
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// The `method:` key of a policy's `calibration:` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethodKind {
    /// `minmax`
    #[default]
    MinMax,
    /// `percentile` (with the `percentile:` key)
    Percentile,
    /// `entropy`
    Entropy,
    /// `mse`
    Mse,
}

/// Options of static calibration (the `calibration:` section of a variant in policy.yaml), e.g.
/// `calibration: {method: percentile, percentile: 99.9}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationOptions {
    /// `minmax` (default), `percentile`, `entropy` or `mse`.
    pub method: CalibrationMethodKind,
    /// Percentile (in percent) used by `method: percentile`; default 99.99.
    pub percentile: f64,
    /// Histogram buckets per sign; default 2048.
    pub bins: usize,
    /// Choose symmetric (int8, one threshold for |x|) rather than asymmetric (uint8) ranges.
    pub symmetric: bool,
    /// Clip the range of a tensor read only by Sigmoid to [-6, 6] and only by Tanh to [-3, 3]
    /// (precision-rules §1.4); default true.
    pub clip_saturating_inputs: bool,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            method: CalibrationMethodKind::MinMax,
            percentile: DEFAULT_PERCENTILE,
            bins: DEFAULT_BINS,
            symmetric: false,
            clip_saturating_inputs: true,
        }
    }
}

impl CalibrationOptions {
    /// Checks the values a policy gave.
    pub fn validate(&self) -> Result<(), CalibrationError> {
        if !(50.0..=100.0).contains(&self.percentile) {
            return Err(CalibrationError::BadPercentile(self.percentile));
        }
        if !(MIN_BINS..=MAX_BINS).contains(&self.bins) {
            return Err(CalibrationError::BadBins(self.bins));
        }
        Ok(())
    }

    /// The method with its parameter.
    pub fn method(&self) -> CalibrationMethod {
        match self.method {
            CalibrationMethodKind::MinMax => CalibrationMethod::MinMax,
            CalibrationMethodKind::Percentile => CalibrationMethod::Percentile(self.percentile),
            CalibrationMethodKind::Entropy => CalibrationMethod::Entropy,
            CalibrationMethodKind::Mse => CalibrationMethod::Mse,
        }
    }

    /// Empty statistics with these options' bucket count.
    pub fn new_statistics(&self) -> TensorStatistics {
        TensorStatistics::new(self.bins)
    }

    /// The calibrated range of a tensor read by nodes of the given op types, with the
    /// Sigmoid/Tanh clipping applied when enabled. The caller lists a graph output as a consumer
    /// (any name other than Sigmoid/Tanh) so an output is never clipped.
    pub fn range<S: AsRef<str>>(&self, stats: &TensorStatistics, consumer_ops: &[S]) -> (f32, f32) {
        let range = stats.range_with(self.method(), self.symmetric);
        if self.clip_saturating_inputs { clip_for_consumers(range, consumer_ops) } else { range }
    }
}

/// Invalid calibration options or quantization inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration percentile {0} is out of range: give a percent in [50, 100], e.g. 99.99")]
    BadPercentile(f64),
    #[error("calibration bins {0} is out of range [{lo}, {hi}]", lo = MIN_BINS, hi = MAX_BINS)]
    BadBins(usize),
    #[error("a weight of shape {shape:?} holds {expected} values but {actual} were given")]
    ShapeMismatch { shape: Vec<usize>, expected: usize, actual: usize },
    #[error("axis {axis} is out of range for a weight of rank {rank}")]
    BadAxis { axis: usize, rank: usize },
}
