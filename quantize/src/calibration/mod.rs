//! Activation range statistics for static INT8 calibration: the histograms calibration streams
//! tensors into, the threshold searches that turn them into ranges, and the options choosing a
//! method. Turning ranges and weights into scales and zero points is [`crate::quant_params`].
//!
//! A [`TensorStatistics`] is fed every calibration batch of one tensor ([`TensorStatistics::observe`]),
//! can be merged with statistics gathered elsewhere ([`TensorStatistics::merge`]) and keeps a fixed
//! amount of memory: a running min/max, a few counters and two histograms of `bins` buckets each,
//! one for the magnitudes of values >= 0 and one for the magnitudes of values < 0.
//!
//! # Histogram
//! Both histograms cover magnitudes in `[0, 2^e)`, where `2^e` is the smallest power of two above
//! every finite magnitude seen so far; bucket `k` holds magnitudes in `[k w, (k + 1) w)` with
//! `w = 2^e / bins`. When a value reaches `2^e` the range doubles (as many times as needed) and
//! pairs of buckets merge, the growth TensorRT's and ONNX Runtime's histogram calibrators use.
//! Because the limit is always a power of two, `floor(|x| / 2w) == floor(floor(|x| / w) / 2)` and
//! the bucket index `|x| * bins * 2^-e` is computed exactly in `f64` (24-bit mantissa times a
//! bucket count below 2^29), so growing and merging are exact: the histograms do not depend on the
//! order in which batches are observed or merged. The price is resolution: the data occupies
//! between half and all of the buckets.
//!
//! NaN is ignored (and counted). Infinities are counted as saturating values: they never widen
//! the min/max (a scale must stay finite), and the histogram methods treat them as values in the
//! top bucket, so they are clipped like any other outlier.
//!
//! # Ranges
//! [`TensorStatistics::range`] returns the calibrated `[lo, hi]` for a [`CalibrationMethod`];
//! every method other than MinMax returns a range that contains 0 (quantization includes zero
//! anyway) and lies within the observed `[min(min, 0), max(max, 0)]`, so a tensor whose values are
//! all >= 0 (after ReLU) gets `lo == 0`. [`clip_for_consumers`] applies precision-rules §1.4
//! (inputs of Sigmoid/Tanh).
//!
//! # Files
//! - `statistics`: [`TensorStatistics`], the streamed and mergeable histograms, and
//!   [`CalibrationMethod`].
//! - `thresholds`: percentile, entropy (KL) and MSE threshold searches over one histogram.
//! - `clipping`: the Sigmoid/Tanh input limits.
//! - `options`: [`CalibrationOptions`], the policy's `calibration:` section.

mod clipping;
mod options;
mod statistics;
#[cfg(test)]
mod tests;
mod thresholds;

pub use clipping::{SIGMOID_INPUT_LIMIT, TANH_INPUT_LIMIT, clip_for_consumers, saturating_input_limit};
pub use options::{CalibrationError, CalibrationMethodKind, CalibrationOptions, DEFAULT_PERCENTILE};
pub use statistics::{CalibrationMethod, DEFAULT_BINS, MAX_BINS, MIN_BINS, TensorStatistics};
