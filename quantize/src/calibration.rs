//! Activation range statistics for static INT8 calibration, and the quantization parameters
//! derived from ranges and weights.
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
//! (inputs of Sigmoid/Tanh), and [`uint8_asymmetric`], [`int8_symmetric`],
//! [`per_channel_int8_symmetric`] and [`quantize_bias_int32`] turn ranges and weights into the
//! scales, zero points and integers that QuantizeLinear/DequantizeLinear and QLinear* nodes use.

use serde::{Deserialize, Serialize};

/// Default percentile of [`CalibrationMethod::Percentile`].
pub const DEFAULT_PERCENTILE: f64 = 99.99;
/// Default number of histogram buckets per sign (TensorRT's 2048).
pub const DEFAULT_BINS: usize = 2048;
/// Fewest buckets a histogram keeps (entropy calibration needs at least its 128 or 256 levels).
pub const MIN_BINS: usize = 256;
/// Most buckets a histogram keeps (keeps bucket indices exact in `f64`).
pub const MAX_BINS: usize = 1 << 20;
/// Inputs of Sigmoid beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
pub const SIGMOID_INPUT_LIMIT: f32 = 6.0;
/// Inputs of Tanh beyond this magnitude give outputs at the asymptotes (precision-rules §1.4).
pub const TANH_INPUT_LIMIT: f32 = 3.0;

/// How a tensor's calibrated range is chosen from its statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibrationMethod {
    /// The observed `[min, max]`.
    MinMax,
    /// Clip at the given percentile (in percent, e.g. 99.99) of the magnitudes: of `|x|` when
    /// symmetric, of each sign's own magnitudes when asymmetric.
    Percentile(f64),
    /// TensorRT's threshold minimising KL(P || Q) between the clipped and the quantized
    /// distributions of `|x|`.
    Entropy,
    /// The threshold(s) minimising the expected squared rounding and clipping error.
    Mse,
}

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

/// Streamed, mergeable range statistics of one tensor in O(bins) memory (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStatistics {
    bins: usize,
    /// Values observed other than NaN (infinities included).
    count: u64,
    nan_count: u64,
    /// Values exactly 0 (either sign).
    zero_count: u64,
    pos_inf: u64,
    neg_inf: u64,
    /// Finite min and max; `+inf` / `-inf` while no finite value was seen.
    min: f32,
    max: f32,
    /// The histograms cover magnitudes below `2^limit_exp`; `None` while every finite value was 0.
    limit_exp: Option<i32>,
    /// Values >= 0 (zeros included): bucket `floor(x / w)`.
    positive: Vec<u64>,
    /// Values < 0: bucket `floor(-x / w)`.
    negative: Vec<u64>,
}

impl Default for TensorStatistics {
    fn default() -> Self {
        Self::new(DEFAULT_BINS)
    }
}

impl TensorStatistics {
    /// Empty statistics with `bins` buckets per sign, clamped to `[MIN_BINS, MAX_BINS]`.
    pub fn new(bins: usize) -> Self {
        let bins = bins.clamp(MIN_BINS, MAX_BINS);
        Self {
            bins,
            count: 0,
            nan_count: 0,
            zero_count: 0,
            pos_inf: 0,
            neg_inf: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            limit_exp: None,
            positive: vec![0; bins],
            negative: vec![0; bins],
        }
    }

    /// Buckets per sign.
    pub fn bins(&self) -> usize {
        self.bins
    }

    /// Values observed other than NaN (infinities included).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// NaN values seen (and ignored).
    pub fn nan_count(&self) -> u64 {
        self.nan_count
    }

    /// Values exactly zero.
    pub fn zero_count(&self) -> u64 {
        self.zero_count
    }

    /// Infinite values seen (either sign).
    pub fn infinity_count(&self) -> u64 {
        self.pos_inf + self.neg_inf
    }

    /// Smallest finite value, if any.
    pub fn min(&self) -> Option<f32> {
        (self.min <= self.max).then_some(self.min)
    }

    /// Largest finite value, if any.
    pub fn max(&self) -> Option<f32> {
        (self.min <= self.max).then_some(self.max)
    }

    /// The magnitude the histograms cover up to (exclusive), once a non-zero value was seen.
    pub fn histogram_limit(&self) -> Option<f64> {
        self.limit_exp.map(pow2)
    }

    /// Width of one bucket, once a non-zero value was seen.
    pub fn bucket_width(&self) -> Option<f64> {
        self.histogram_limit().map(|limit| limit / self.bins as f64)
    }

    /// Counts of values >= 0 by magnitude bucket (infinities not included).
    pub fn positive_histogram(&self) -> &[u64] {
        &self.positive
    }

    /// Counts of values < 0 by magnitude bucket (infinities not included).
    pub fn negative_histogram(&self) -> &[u64] {
        &self.negative
    }

    /// Adds a batch of values.
    pub fn observe(&mut self, values: &[f32]) {
        let mut batch_max_abs = 0.0f32;
        for &x in values {
            if x.is_nan() {
                self.nan_count += 1;
                continue;
            }
            self.count += 1;
            if x.is_infinite() {
                if x > 0.0 {
                    self.pos_inf += 1;
                } else {
                    self.neg_inf += 1;
                }
                continue;
            }
            if x == 0.0 {
                self.zero_count += 1;
            }
            self.min = self.min.min(x);
            self.max = self.max.max(x);
            batch_max_abs = batch_max_abs.max(x.abs());
        }
        if batch_max_abs > 0.0 {
            self.cover_exponent(exponent_above(batch_max_abs));
        }
        let factor = self.index_factor();
        let top = self.bins - 1;
        for &x in values {
            if !x.is_finite() {
                continue;
            }
            // With no limit yet every finite value is zero.
            let index = factor.map_or(0, |f| ((x.abs() as f64 * f) as usize).min(top));
            if x < 0.0 {
                self.negative[index] += 1;
            } else {
                self.positive[index] += 1;
            }
        }
    }

    /// Adds statistics gathered elsewhere; the result equals observing both inputs' data.
    ///
    /// # Panics
    /// If the two have different bucket counts (create both from the same options).
    pub fn merge(&mut self, other: &TensorStatistics) {
        assert_eq!(self.bins, other.bins, "merging calibration statistics with different bucket counts");
        self.count += other.count;
        self.nan_count += other.nan_count;
        self.zero_count += other.zero_count;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if let Some(exp) = other.limit_exp {
            self.cover_exponent(exp);
        }
        // `other` without a limit only holds zeros, in bucket 0, where they stay.
        let shift = match (self.limit_exp, other.limit_exp) {
            (Some(mine), Some(theirs)) => (mine - theirs) as u32,
            _ => 0,
        };
        for (k, (&p, &n)) in other.positive.iter().zip(&other.negative).enumerate() {
            let target = k.checked_shr(shift).unwrap_or(0);
            self.positive[target] += p;
            self.negative[target] += n;
        }
    }

    /// The calibrated range for asymmetric (uint8) quantization; see [`Self::range_with`].
    pub fn range(&self, method: CalibrationMethod) -> (f32, f32) {
        self.range_with(method, false)
    }

    /// The calibrated `[lo, hi]`. `symmetric` selects how thresholds are searched: one threshold
    /// for `|x|` (int8 with zero point 0, 127 steps per side) or, when false, one per sign where
    /// the method allows (uint8, 255 steps over `[lo, hi]`).
    ///
    /// - MinMax: the observed finite `[min, max]`, whatever `symmetric`.
    /// - Percentile(p): the p-th percentile of `|x|` for both ends when symmetric; otherwise the
    ///   p-th percentile of the non-negative values' magnitudes for `hi` and of the negative
    ///   values' magnitudes for `lo`. Interpolated within a bucket.
    /// - Entropy: TensorRT's KL search over the histogram of `|x|` (exact zeros left out, as 0 is
    ///   exact in every scheme) with 128 levels, or 256 when asymmetric and all values have one
    ///   sign; both ends at the threshold.
    /// - Mse: the threshold minimising `N_in * step^2 / 12 + sum over clipped (|x| - t)^2` with
    ///   step `t / 127` when symmetric, `t / 255` for one-signed data when asymmetric, and a joint
    ///   search of both ends with step `(t_lo + t_hi) / 255` for two-signed data when asymmetric.
    ///
    /// Except for MinMax the result contains 0 and lies within `[min(min, 0), max(max, 0)]`, so
    /// data that is all >= 0 gets `lo == 0`. No finite data gives `(0, 0)`.
    pub fn range_with(&self, method: CalibrationMethod, symmetric: bool) -> (f32, f32) {
        let (Some(min), Some(max)) = (self.min(), self.max()) else {
            return (0.0, 0.0);
        };
        if method == CalibrationMethod::MinMax {
            return (min + 0.0, max + 0.0);
        }
        let lo_bound = min.min(0.0);
        let hi_bound = max.max(0.0);
        let Some(width) = self.bucket_width() else {
            return (0.0, 0.0);
        };
        let negative = self.side(true);
        let positive = self.side(false);
        let has_negative = min < 0.0 || self.neg_inf > 0;
        let has_positive = max > 0.0 || self.pos_inf > 0;
        let two_signed = has_negative && has_positive;
        let magnitudes = |skip_zeros: bool| -> Vec<f64> {
            let mut all: Vec<f64> = negative.iter().zip(&positive).map(|(n, p)| n + p).collect();
            if skip_zeros {
                all[0] -= self.zero_count as f64;
            }
            all
        };
        // Thresholds in bucket units: (negative side, positive side).
        let (t_neg, t_pos) = match method {
            CalibrationMethod::MinMax => unreachable!("handled above"),
            CalibrationMethod::Percentile(p) => {
                let p = if p.is_nan() { 100.0 } else { p.clamp(0.0, 100.0) };
                if symmetric {
                    let t = percentile_units(&magnitudes(false), p);
                    (t, t)
                } else {
                    (percentile_units(&negative, p), percentile_units(&positive, p))
                }
            }
            CalibrationMethod::Entropy => {
                let levels = if symmetric || two_signed { 128 } else { 256 };
                let t = kl_threshold_units(&magnitudes(true), levels);
                (t, t)
            }
            CalibrationMethod::Mse => {
                if symmetric || !two_signed {
                    let steps = if symmetric { 127.0 } else { 255.0 };
                    let t = mse_threshold_units(&magnitudes(true), steps);
                    (t, t)
                } else {
                    let mut positive = positive.clone();
                    positive[0] -= self.zero_count as f64;
                    mse_thresholds_two_sided_units(&negative, &positive, 255.0)
                }
            }
        };
        let lo = ((-t_neg * width) as f32).max(lo_bound);
        let hi = ((t_pos * width) as f32).min(hi_bound);
        (lo + 0.0, hi + 0.0)
    }

    /// Grows the histogram range to cover magnitudes below `2^exp`.
    fn cover_exponent(&mut self, exp: i32) {
        match self.limit_exp {
            None => self.limit_exp = Some(exp),
            Some(current) if exp > current => {
                let shift = (exp - current) as u32;
                for k in 1..self.bins {
                    let target = k.checked_shr(shift).unwrap_or(0);
                    self.positive[target] += std::mem::take(&mut self.positive[k]);
                    self.negative[target] += std::mem::take(&mut self.negative[k]);
                }
                self.limit_exp = Some(exp);
            }
            Some(_) => {}
        }
    }

    /// `bins / 2^limit_exp`: a magnitude times this is its bucket index (exact in f64).
    fn index_factor(&self) -> Option<f64> {
        self.limit_exp.map(|exp| self.bins as f64 * pow2(-exp))
    }

    /// One sign's magnitude histogram as f64, its infinities in the top bucket.
    fn side(&self, negative: bool) -> Vec<f64> {
        let (counts, infinities) =
            if negative { (&self.negative, self.neg_inf) } else { (&self.positive, self.pos_inf) };
        let mut side: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        side[self.bins - 1] += infinities as f64;
        side
    }
}

/// `2^k` for `k` within f64's normal exponents.
fn pow2(k: i32) -> f64 {
    f64::from_bits(((1023 + k as i64) as u64) << 52)
}

/// The smallest `e` with `2^e > m` for a finite `m > 0` (`-126` for subnormals).
fn exponent_above(m: f32) -> i32 {
    let biased = ((m.to_bits() >> 23) & 0xff) as i32;
    if biased == 0 { -126 } else { biased - 127 + 1 }
}

/// The p-th percentile (in percent) of a histogram, in bucket units, interpolating linearly
/// within the bucket that holds it. 0 for an empty histogram.
fn percentile_units(hist: &[f64], p: f64) -> f64 {
    let total: f64 = hist.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let target = p / 100.0 * total;
    let mut below = 0.0;
    for (k, &count) in hist.iter().enumerate() {
        if count > 0.0 && below + count >= target {
            return k as f64 + ((target - below) / count).clamp(0.0, 1.0);
        }
        below += count;
    }
    hist.len() as f64
}

/// One past the last non-empty bucket.
fn extent(hist: &[f64]) -> usize {
    hist.iter().rposition(|&c| c > 0.0).map_or(0, |k| k + 1)
}

/// TensorRT's entropy calibration over a magnitude histogram, in bucket units.
///
/// For each candidate `i` in `levels..=extent`: P is the first `i` buckets with the counts of
/// the buckets beyond folded into bucket `i - 1`; Q quantizes the first `i` buckets (without the
/// folded outliers) into `levels` levels and spreads each level's count evenly over the buckets
/// where P is non-zero; the threshold is the `i` with the smallest KL(P || Q) (ties: the larger
/// `i`). A bucket where P > 0 but Q == 0 (the outliers folded into a level that is otherwise
/// empty) gets Q = 1e-4 counts, the smoothing ONNX Runtime and MXNet apply, so such a candidate
/// is penalised rather than ruled out: without it, a bulk narrower than `levels` buckets (outliers
/// far beyond it) would leave only `i == extent`, no clipping at all.
fn kl_threshold_units(hist: &[f64], levels: usize) -> f64 {
    let extent = extent(hist);
    if extent <= levels {
        return extent as f64;
    }
    let total: f64 = hist.iter().sum();
    let mut outliers: f64 = hist[levels..].iter().sum();
    let mut level_sum = vec![0.0f64; levels];
    let mut level_nonzero = vec![0usize; levels];
    let mut best = (f64::INFINITY, extent);
    for i in levels..=extent {
        if i > levels {
            outliers -= hist[i - 1];
        }
        let outliers = outliers.max(0.0);
        let kept = total - outliers;
        if kept <= 0.0 {
            continue;
        }
        level_sum.fill(0.0);
        level_nonzero.fill(0);
        for (k, &count) in hist[..i].iter().enumerate() {
            let level = k * levels / i;
            level_sum[level] += count;
            if count > 0.0 || (k == i - 1 && outliers > 0.0) {
                level_nonzero[level] += 1;
            }
        }
        let mut divergence = 0.0;
        for (k, &count) in hist[..i].iter().enumerate() {
            let p = if k == i - 1 { count + outliers } else { count };
            if p <= 0.0 {
                continue;
            }
            let level = k * levels / i;
            let q = (level_sum[level] / level_nonzero[level] as f64).max(KL_SMOOTHING);
            let p = p / total;
            divergence += p * (p / (q / kept)).ln();
        }
        if divergence <= best.0 {
            best = (divergence, i);
        }
    }
    best.1 as f64
}

/// Counts given to a bucket of Q that is empty where P is not (see [`kl_threshold_units`]).
const KL_SMOOTHING: f64 = 1e-4;

/// Running sums of count, count*center and count*center^2 over the buckets above a threshold.
#[derive(Default, Clone, Copy)]
struct TailSums {
    n: f64,
    s1: f64,
    s2: f64,
}

impl TailSums {
    fn add(&mut self, bucket: usize, count: f64) {
        let center = bucket as f64 + 0.5;
        self.n += count;
        self.s1 += count * center;
        self.s2 += count * center * center;
    }

    /// `sum count * (center - t)^2`: the error of clipping these values to `t`.
    fn clip_error(&self, t: f64) -> f64 {
        (self.s2 - 2.0 * t * self.s1 + t * t * self.n).max(0.0)
    }
}

/// For each candidate threshold `t = j + 1` (bucket units, `j < extent`), the count of values
/// kept within range and the squared error of clipping the rest.
fn threshold_candidates(hist: &[f64]) -> Vec<(f64, f64)> {
    let extent = extent(hist);
    let total: f64 = hist[..extent].iter().sum();
    let mut tail = TailSums::default();
    let mut candidates = vec![(0.0, 0.0); extent];
    for j in (0..extent).rev() {
        let t = (j + 1) as f64;
        candidates[j] = (total - tail.n, tail.clip_error(t));
        tail.add(j, hist[j]);
    }
    candidates
}

/// The threshold (bucket units) minimising `kept * (t / steps)^2 / 12 + clipping error`.
fn mse_threshold_units(hist: &[f64], steps: f64) -> f64 {
    let mut best = (f64::INFINITY, 0.0);
    for (j, (kept, clip)) in threshold_candidates(hist).into_iter().enumerate() {
        let t = (j + 1) as f64;
        let step = t / steps;
        let error = kept * step * step / 12.0 + clip;
        if error < best.0 {
            best = (error, t);
        }
    }
    best.1
}

/// Both thresholds (bucket units) of an asymmetric range over two-signed data, minimising
/// `kept * ((t_neg + t_pos) / steps)^2 / 12 + clipping errors of both tails`.
fn mse_thresholds_two_sided_units(negative: &[f64], positive: &[f64], steps: f64) -> (f64, f64) {
    let negative = threshold_candidates(negative);
    let positive = threshold_candidates(positive);
    let mut best = (f64::INFINITY, 0.0, 0.0);
    for (jn, &(kept_n, clip_n)) in negative.iter().enumerate() {
        let t_neg = (jn + 1) as f64;
        for (jp, &(kept_p, clip_p)) in positive.iter().enumerate() {
            let t_pos = (jp + 1) as f64;
            let step = (t_neg + t_pos) / steps;
            let error = (kept_n + kept_p) * step * step / 12.0 + clip_n + clip_p;
            if error < best.0 {
                best = (error, t_neg, t_pos);
            }
        }
    }
    (best.1, best.2)
}

/// The magnitude a tensor's range may be clipped to when every consumer is a saturating
/// function (precision-rules §1.4): 6 when all consumers are Sigmoid, 3 when all are Tanh,
/// otherwise (no consumers, other ops, mixed) none.
pub fn saturating_input_limit<S: AsRef<str>>(consumer_ops: &[S]) -> Option<f32> {
    let first = consumer_ops.first()?.as_ref();
    let limit = match first {
        "Sigmoid" => SIGMOID_INPUT_LIMIT,
        "Tanh" => TANH_INPUT_LIMIT,
        _ => return None,
    };
    consumer_ops.iter().all(|op| op.as_ref() == first).then_some(limit)
}

/// Clips a calibrated range for the op types that read the tensor: a tensor read only by
/// Sigmoid is clipped to [-6, 6], one read only by Tanh to [-3, 3]; any other list (empty,
/// other ops, mixed) leaves the range unchanged. A graph output must appear in the list as a
/// consumer of its own (any other name) so it is never clipped.
pub fn clip_for_consumers<S: AsRef<str>>(range: (f32, f32), consumer_ops: &[S]) -> (f32, f32) {
    match saturating_input_limit(consumer_ops) {
        Some(limit) => (range.0.clamp(-limit, limit), range.1.clamp(-limit, limit)),
        None => range,
    }
}

/// NaN -> 0, infinities -> the largest finite values.
fn sanitize(x: f32) -> f32 {
    if x.is_nan() { 0.0 } else { x.clamp(-f32::MAX, f32::MAX) }
}

/// Scale and zero point of asymmetric uint8 quantization of `[lo, hi]`, widened to contain 0 so
/// that 0 is exactly representable (it quantizes to the zero point). `reduce_range` uses 7 bits
/// (0..=127). A range too narrow for a normal positive scale gives `(1.0, 0)`.
pub fn uint8_asymmetric(lo: f32, hi: f32, reduce_range: bool) -> (f32, u8) {
    let qmax = if reduce_range { 127.0 } else { 255.0 };
    let lo = sanitize(lo).min(0.0) as f64;
    let hi = sanitize(hi).max(0.0) as f64;
    let scale = ((hi - lo) / qmax) as f32;
    if !(scale.is_finite() && scale >= f32::MIN_POSITIVE) {
        return (1.0, 0);
    }
    let zero_point = (-lo / scale as f64).round_ties_even().clamp(0.0, qmax);
    (scale, zero_point as u8)
}

/// Scale (and zero point 0) of symmetric int8 quantization covering `max(|lo|, |hi|)` with 127
/// steps per side, or 63 with `reduce_range`. A zero range gives scale 1.0.
pub fn int8_symmetric(lo: f32, hi: f32, reduce_range: bool) -> (f32, i8) {
    let qmax = if reduce_range { 63.0 } else { 127.0 };
    let max_abs = sanitize(lo).abs().max(sanitize(hi).abs());
    (symmetric_scale(max_abs, qmax), 0)
}

fn symmetric_scale(max_abs: f32, qmax: f32) -> f32 {
    let scale = max_abs / qmax;
    if scale.is_finite() && scale >= f32::MIN_POSITIVE { scale } else { 1.0 }
}

/// `round_half_to_even(x / scale)` clamped to [-127, 127]; NaN gives 0.
fn quantize_symmetric_int8(x: f32, scale: f32) -> i8 {
    if x.is_nan() {
        return 0;
    }
    (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Per-channel symmetric int8 quantization of a weight tensor (row-major `shape`) along `axis`
/// (the output channels: 0 for Conv and Gemm with transB, 1 for MatMul's `[K, N]`): one scale per
/// channel, `max|w| / 127`, and values rounded half to even and clamped to [-127, 127]. A channel
/// of zeros (or subnormals) gets scale 1.0; NaN quantizes to 0 and infinities saturate without
/// affecting the scale.
///
/// # Panics
/// If `axis` is not an axis of `shape` or `shape` does not match `weights.len()`; see
/// [`try_per_channel_int8_symmetric`].
pub fn per_channel_int8_symmetric(weights: &[f32], shape: &[usize], axis: usize) -> (Vec<f32>, Vec<i8>) {
    match try_per_channel_int8_symmetric(weights, shape, axis) {
        Ok(result) => result,
        Err(err) => panic!("{err}"),
    }
}

/// [`per_channel_int8_symmetric`] returning an error for a bad axis or shape.
pub fn try_per_channel_int8_symmetric(
    weights: &[f32],
    shape: &[usize],
    axis: usize,
) -> Result<(Vec<f32>, Vec<i8>), CalibrationError> {
    try_per_channel_symmetric(weights, shape, axis, false)
}

/// Per-channel symmetric weights in 8 bits, or in 7 bits (±63) with `reduce_range`: on CPUs
/// without VNNI, u8 x s8 products are summed in pairs into int16 (VPMADDUBSW), which
/// saturates unless one operand leaves a bit of headroom.
pub fn per_channel_symmetric(weights: &[f32], shape: &[usize], axis: usize, reduce_range: bool) -> (Vec<f32>, Vec<i8>) {
    match try_per_channel_symmetric(weights, shape, axis, reduce_range) {
        Ok(result) => result,
        Err(err) => panic!("{err}"),
    }
}

fn try_per_channel_symmetric(
    weights: &[f32],
    shape: &[usize],
    axis: usize,
    reduce_range: bool,
) -> Result<(Vec<f32>, Vec<i8>), CalibrationError> {
    let limit = if reduce_range { 63.0 } else { 127.0 };
    if axis >= shape.len() {
        return Err(CalibrationError::BadAxis { axis, rank: shape.len() });
    }
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(weights.len()) {
        return Err(CalibrationError::ShapeMismatch {
            shape: shape.to_vec(),
            expected: expected.unwrap_or(usize::MAX),
            actual: weights.len(),
        });
    }
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let channel_of = |i: usize| (i / inner) % channels;
    let mut max_abs = vec![0.0f32; channels];
    for (i, &w) in weights.iter().enumerate() {
        if w.is_finite() {
            let c = channel_of(i);
            max_abs[c] = max_abs[c].max(w.abs());
        }
    }
    let scales: Vec<f32> = max_abs.iter().map(|&m| symmetric_scale(m, limit)).collect();
    let quantized = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| quantize_symmetric_int8(w, scales[channel_of(i)]).clamp(-(limit as i8), limit as i8))
        .collect();
    Ok((scales, quantized))
}

/// Int32 bias of a quantized Conv/Gemm/MatMul: `round_half_to_even(bias[c] / (input_scale *
/// weight_scales[c]))`, saturating at the i32 limits (NaN gives 0). `weight_scales` holds one
/// scale per channel or a single per-tensor scale. The bias's DequantizeLinear scale must be the
/// same f32 product `input_scale * weight_scales[c]`.
///
/// # Panics
/// If `weight_scales` has neither one element nor one per bias element.
pub fn quantize_bias_int32(bias: &[f32], input_scale: f32, weight_scales: &[f32]) -> Vec<i32> {
    assert!(
        weight_scales.len() == 1 || weight_scales.len() == bias.len(),
        "{} weight scales for a bias of {} elements",
        weight_scales.len(),
        bias.len()
    );
    bias.iter()
        .enumerate()
        .map(|(c, &b)| {
            let weight_scale = if weight_scales.len() == 1 { weight_scales[0] } else { weight_scales[c] };
            let scale = input_scale * weight_scale;
            // `as` saturates at the i32 limits and maps NaN to 0.
            (b as f64 / scale as f64).round_ties_even() as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 with Box-Muller: deterministic test data without a rand dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn gaussian(&mut self) -> f32 {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        }

        fn gaussians(&mut self, n: usize, sigma: f32) -> Vec<f32> {
            (0..n).map(|_| self.gaussian() * sigma).collect()
        }
    }

    /// A gaussian (sigma 1) bulk of `n` values with a few outliers at +-`outlier`.
    fn gaussian_with_outliers(n: usize, outliers: usize, outlier: f32) -> Vec<f32> {
        let mut data = Rng(7).gaussians(n, 1.0);
        for k in 0..outliers {
            data[k * (n / outliers)] = if k % 2 == 0 { outlier } else { -outlier };
        }
        data
    }

    fn stats_of(values: &[f32]) -> TensorStatistics {
        let mut stats = TensorStatistics::new(DEFAULT_BINS);
        stats.observe(values);
        stats
    }

    /// The p-th percentile of the magnitudes, nearest rank.
    fn exact_abs_percentile(values: &[f32], p: f64) -> f32 {
        let mut magnitudes: Vec<f32> = values.iter().map(|x| x.abs()).collect();
        magnitudes.sort_by(f32::total_cmp);
        let rank = ((p / 100.0 * magnitudes.len() as f64).ceil() as usize).clamp(1, magnitudes.len());
        magnitudes[rank - 1]
    }

    fn histogram_total(stats: &TensorStatistics) -> u64 {
        stats.positive_histogram().iter().chain(stats.negative_histogram()).sum()
    }

    const ALL_METHODS: [CalibrationMethod; 4] = [
        CalibrationMethod::MinMax,
        CalibrationMethod::Percentile(99.9),
        CalibrationMethod::Entropy,
        CalibrationMethod::Mse,
    ];

    #[test]
    fn minmax_is_exact_and_ignores_nan_and_infinities() {
        let mut stats = TensorStatistics::new(DEFAULT_BINS);
        stats.observe(&[0.5, -0.123_456_7, f32::NAN, 3.25]);
        stats.observe(&[f32::INFINITY, 1e-3, f32::NEG_INFINITY, 2.999_999_8]);
        assert_eq!(stats.range(CalibrationMethod::MinMax), (-0.123_456_7, 3.25));
        assert_eq!(stats.range_with(CalibrationMethod::MinMax, true), (-0.123_456_7, 3.25));
        assert_eq!(stats.count(), 7);
        assert_eq!(stats.nan_count(), 1);
        assert_eq!(stats.infinity_count(), 2);
        assert_eq!(stats.min(), Some(-0.123_456_7));
        assert_eq!(stats.max(), Some(3.25));
        assert_eq!(histogram_total(&stats), 5, "finite values are binned, infinities counted apart");
    }

    #[test]
    fn empty_and_degenerate_statistics() {
        let empty = TensorStatistics::new(DEFAULT_BINS);
        let mut nans = TensorStatistics::new(DEFAULT_BINS);
        nans.observe(&[f32::NAN, f32::NAN]);
        let mut zeros = TensorStatistics::new(DEFAULT_BINS);
        zeros.observe(&[0.0, -0.0, 0.0]);
        let mut infinities = TensorStatistics::new(DEFAULT_BINS);
        infinities.observe(&[f32::INFINITY]);
        for stats in [&empty, &nans, &zeros, &infinities] {
            for method in ALL_METHODS {
                for symmetric in [false, true] {
                    let (lo, hi) = stats.range_with(method, symmetric);
                    assert_eq!((lo, hi), (0.0, 0.0), "{method:?}");
                    assert!(lo.is_sign_positive() && hi.is_sign_positive(), "no negative zero");
                    let (scale, zero_point) = uint8_asymmetric(lo, hi, false);
                    assert_eq!((scale, zero_point), (1.0, 0));
                }
            }
        }
        assert_eq!(zeros.zero_count(), 3);
        assert_eq!(zeros.positive_histogram()[0], 3);
        assert_eq!(zeros.histogram_limit(), None);
        // A constant tensor: the range shrinks to [0, c] or stays at [c, c] for MinMax.
        let constant = stats_of(&[2.5; 100]);
        assert_eq!(constant.range(CalibrationMethod::MinMax), (2.5, 2.5));
        for method in &ALL_METHODS[1..] {
            let (lo, hi) = constant.range(*method);
            assert_eq!(lo, 0.0, "{method:?}");
            assert!(hi > 2.0 && hi <= 2.5, "{method:?}: {hi}");
        }
    }

    #[test]
    fn merging_two_halves_equals_observing_all() {
        let mut rng = Rng(1);
        // The second half is 1000x wider, so merging has to grow the first half's histogram.
        let first = rng.gaussians(5000, 0.01);
        let mut second = rng.gaussians(5000, 10.0);
        second.extend([f32::NAN, f32::INFINITY, 0.0]);
        let mut all = first.clone();
        all.extend(&second);

        let whole = stats_of(&all);
        let mut merged = stats_of(&first);
        merged.merge(&stats_of(&second));
        assert_eq!(merged, whole);
        let mut merged_other_way = stats_of(&second);
        merged_other_way.merge(&stats_of(&first));
        assert_eq!(merged_other_way, whole);

        // Merging into or from empty statistics, and zero-only statistics, changes nothing else.
        let mut from_empty = TensorStatistics::new(DEFAULT_BINS);
        from_empty.merge(&whole);
        assert_eq!(from_empty, whole);
        let mut with_empty = whole.clone();
        with_empty.merge(&TensorStatistics::new(DEFAULT_BINS));
        assert_eq!(with_empty, whole);
        let mut with_zeros = stats_of(&first);
        with_zeros.merge(&stats_of(&[0.0, 0.0]));
        let mut first_and_zeros = first.clone();
        first_and_zeros.extend([0.0, 0.0]);
        assert_eq!(with_zeros, stats_of(&first_and_zeros));
        for method in ALL_METHODS {
            assert_eq!(merged.range(method), whole.range(method), "{method:?}");
        }
    }

    #[test]
    #[should_panic(expected = "different bucket counts")]
    fn merging_different_bucket_counts_panics() {
        let mut a = TensorStatistics::new(512);
        a.merge(&TensorStatistics::new(1024));
    }

    #[test]
    fn histogram_growth_keeps_counts_and_percentiles() {
        let mut rng = Rng(2);
        let mut stats = TensorStatistics::new(DEFAULT_BINS);
        let mut all = Vec::new();
        // Batches whose scale grows by a factor of ~10 each time force repeated re-binning.
        for batch in 0..6 {
            let values = rng.gaussians(2000, 0.001 * 10f32.powi(batch));
            stats.observe(&values);
            all.extend(values);
            assert_eq!(histogram_total(&stats), all.len() as u64);
            assert_eq!(stats.positive_histogram().len(), DEFAULT_BINS);
            assert_eq!(stats.negative_histogram().len(), DEFAULT_BINS);
            let limit = stats.histogram_limit().unwrap();
            let max_abs = all.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
            assert!(limit > max_abs && limit <= 2.0 * max_abs, "limit {limit} for max {max_abs}");
        }
        // Growth is exact: the same as observing everything at once.
        assert_eq!(stats, stats_of(&all));
        let width = stats.bucket_width().unwrap() as f32;
        for p in [50.0, 90.0, 99.0, 99.9] {
            let (lo, hi) = stats.range_with(CalibrationMethod::Percentile(p), true);
            let exact = exact_abs_percentile(&all, p);
            assert!((hi - exact).abs() <= width, "p{p}: {hi} vs {exact} (bucket {width})");
            assert_eq!(lo, -hi);
        }
    }

    #[test]
    fn memory_stays_fixed_however_much_is_observed() {
        let mut rng = Rng(3);
        let mut stats = TensorStatistics::new(1000);
        for batch in 0..50 {
            stats.observe(&rng.gaussians(10_000, 1.0 + batch as f32));
        }
        assert_eq!(stats.count(), 500_000);
        assert_eq!(stats.positive_histogram().len(), 1000);
        assert_eq!(stats.negative_histogram().len(), 1000);
        assert_eq!(TensorStatistics::new(10).bins(), MIN_BINS);
        assert_eq!(TensorStatistics::new(usize::MAX).bins(), MAX_BINS);
    }

    #[test]
    fn percentile_clips_gaussian_outliers() {
        let data = gaussian_with_outliers(100_000, 10, 1000.0);
        let stats = stats_of(&data);
        assert_eq!(stats.range(CalibrationMethod::MinMax), (-1000.0, 1000.0));
        let width = stats.bucket_width().unwrap() as f32;

        let (lo, hi) = stats.range_with(CalibrationMethod::Percentile(99.9), true);
        let exact = exact_abs_percentile(&data, 99.9);
        assert!((hi - exact).abs() <= width, "{hi} vs {exact}");
        assert!(hi > 3.0 && hi < 4.0, "99.9th percentile of |N(0,1)| is ~3.29, got {hi}");
        assert_eq!(lo, -hi);

        // Asymmetric: each sign at its own 99.9th percentile, also ~3.29 sigma.
        let (lo, hi) = stats.range(CalibrationMethod::Percentile(99.9));
        assert!(hi > 3.0 && hi < 4.0, "{hi}");
        assert!(lo < -3.0 && lo > -4.0, "{lo}");

        // 100 keeps everything; the threshold never exceeds the observed max.
        assert_eq!(stats.range(CalibrationMethod::Percentile(100.0)), (-1000.0, 1000.0));
        assert_eq!(stats.range_with(CalibrationMethod::Percentile(100.0), true), (-1000.0, 1000.0));
    }

    #[test]
    fn asymmetric_percentile_follows_each_sign() {
        // Positive values up to 100, negative ones only down to -1.
        let mut rng = Rng(4);
        let data: Vec<f32> = (0..20_000)
            .map(|i| if i % 4 == 0 { -rng.uniform() as f32 } else { 100.0 * rng.uniform() as f32 })
            .collect();
        let stats = stats_of(&data);
        let (lo, hi) = stats.range(CalibrationMethod::Percentile(99.0));
        assert!(lo < -0.9 && lo > -1.0, "{lo}");
        assert!(hi > 98.0 && hi < 100.0, "{hi}");
        // Symmetric: one threshold from |x|, clamped to the observed minimum.
        let (lo, hi) = stats.range_with(CalibrationMethod::Percentile(99.0), true);
        assert!(hi > 98.0 && hi < 100.0, "{hi}");
        assert_eq!(lo, stats.min().unwrap());
    }

    #[test]
    fn infinities_saturate() {
        let mut data = Rng(5).gaussians(10_000, 1.0);
        data.extend([f32::INFINITY; 5]);
        let stats = stats_of(&data);
        let max = stats.max().unwrap();
        assert_eq!(stats.range(CalibrationMethod::MinMax).1, max);
        // Five infinities in 10 005 values sit above the 99.9th percentile: it stays in the bulk.
        let (_, hi) = stats.range(CalibrationMethod::Percentile(99.9));
        assert!(hi < 4.0, "{hi}");
        // With more infinities than the percentile allows, the range saturates at the finite max.
        data.extend([f32::INFINITY; 100]);
        let (_, hi) = stats_of(&data).range(CalibrationMethod::Percentile(99.9));
        assert_eq!(hi, max);
        for method in ALL_METHODS {
            let (lo, hi) = stats_of(&data).range(method);
            assert!(lo.is_finite() && hi.is_finite(), "{method:?}");
        }
    }

    #[test]
    fn entropy_threshold_lies_between_bulk_and_outliers() {
        // Outliers at 30 sigma: the bulk spans ~280 of the 2048 buckets, well resolved.
        let stats = stats_of(&gaussian_with_outliers(200_000, 20, 30.0));
        let (lo, hi) = stats.range(CalibrationMethod::Entropy);
        assert!(hi > 3.5 && hi < 6.0, "entropy threshold {hi}");
        assert_eq!(lo, -hi, "entropy is symmetric for two-signed data");
        assert_eq!(stats.range_with(CalibrationMethod::Entropy, true), (lo, hi));
        // Outliers at 100 sigma: the bulk spans fewer buckets than the 128 levels, so the search
        // stops at its smallest candidate (128 buckets = 8 sigma here), still far below the max.
        let stats = stats_of(&gaussian_with_outliers(200_000, 20, 100.0));
        let (_, hi) = stats.range(CalibrationMethod::Entropy);
        assert!(hi > 3.5 && hi <= 128.0 * stats.bucket_width().unwrap() as f32, "entropy threshold {hi}");
    }

    #[test]
    fn entropy_without_outliers_keeps_most_of_the_range() {
        let data = Rng(6).gaussians(200_000, 1.0);
        let stats = stats_of(&data);
        let max = stats.max().unwrap();
        let (lo, hi) = stats.range(CalibrationMethod::Entropy);
        assert!(hi > 3.5 && hi <= max, "entropy threshold {hi}, max {max}");
        assert!(lo < -3.5 && lo >= stats.min().unwrap(), "{lo}");
    }

    #[test]
    fn mse_threshold_lies_between_bulk_and_outliers() {
        // Two outliers at +-30 among 200 000 N(0, 1) values. With t well above the bulk, the
        // error is N (t / s)^2 / 12 + 2 (30 - t)^2 (s = 127 steps per side when symmetric, 255
        // over 2t when asymmetric), minimised at t = 2 * 30 / (N / (12 s^2) + 2) ~= 19.8.
        let n = 200_000.0;
        let expected = |steps: f64| (2.0 * 30.0 / (n / (12.0 * steps * steps) + 2.0)) as f32;
        let stats = stats_of(&gaussian_with_outliers(200_000, 2, 30.0));
        let (lo, hi) = stats.range_with(CalibrationMethod::Mse, true);
        assert!((hi - expected(127.0)).abs() < 0.05, "{hi} vs {}", expected(127.0));
        assert_eq!(lo, -hi);
        let (lo, hi) = stats.range_with(CalibrationMethod::Mse, false);
        assert!((hi - expected(127.5)).abs() < 0.05, "{hi} vs {}", expected(127.5));
        assert!((lo + expected(127.5)).abs() < 0.05, "{lo} vs {}", -expected(127.5));
        // Many far outliers are cheaper to keep than to clip: still within the observed max.
        let stats = stats_of(&gaussian_with_outliers(200_000, 20, 100.0));
        for symmetric in [true, false] {
            let (lo, hi) = stats.range_with(CalibrationMethod::Mse, symmetric);
            assert!(hi > 4.0 && hi < 100.0, "symmetric {symmetric}: {hi}");
            assert!(lo < -4.0 && lo > -100.0, "symmetric {symmetric}: {lo}");
        }
        // On pure gaussian data the 8-bit optimum is near 4 sigma.
        let stats = stats_of(&Rng(8).gaussians(200_000, 1.0));
        for symmetric in [true, false] {
            let (lo, hi) = stats.range_with(CalibrationMethod::Mse, symmetric);
            assert!(hi > 3.5 && hi < 4.5 && hi <= stats.max().unwrap(), "{hi}");
            assert!(lo < -3.5 && lo > -4.5, "{lo}");
        }
    }

    #[test]
    fn mse_two_sided_asymmetric_follows_skew() {
        // Negative side narrow, positive side wide: the asymmetric search keeps both tails.
        let mut rng = Rng(9);
        let data: Vec<f32> = (0..50_000)
            .map(|i| if i % 2 == 0 { -0.1 * rng.uniform() as f32 } else { 10.0 * rng.uniform() as f32 })
            .collect();
        let stats = stats_of(&data);
        let (lo, hi) = stats.range(CalibrationMethod::Mse);
        assert!(lo < -0.05 && lo >= stats.min().unwrap(), "{lo}");
        assert!(hi > 9.0 && hi <= stats.max().unwrap(), "{hi}");
    }

    #[test]
    fn relu_data_gets_lo_zero() {
        let mut rng = Rng(10);
        let mut data: Vec<f32> = rng.gaussians(50_000, 2.0).into_iter().map(|x| x.max(0.0)).collect();
        data.push(80.0);
        let stats = stats_of(&data);
        for method in ALL_METHODS {
            for symmetric in [false, true] {
                let (lo, hi) = stats.range_with(method, symmetric);
                assert_eq!(lo, 0.0, "{method:?} symmetric {symmetric}");
                assert!(lo.is_sign_positive());
                assert!(hi > 0.0 && hi <= 80.0, "{method:?} symmetric {symmetric}: {hi}");
            }
        }
        // Positive but never zero (e.g. after Sigmoid): still no negative lower bound.
        let sigmoid: Vec<f32> = (0..1000).map(|i| 0.1 + i as f32 * 0.0008).collect();
        let stats = stats_of(&sigmoid);
        for method in &ALL_METHODS[1..] {
            assert_eq!(stats.range(*method).0, 0.0, "{method:?}");
        }
        assert!(stats.range(CalibrationMethod::MinMax).0 > 0.0);
    }

    #[test]
    fn non_positive_data_gets_hi_zero() {
        let data: Vec<f32> = Rng(11).gaussians(10_000, 1.0).into_iter().map(|x| -x.abs()).collect();
        let stats = stats_of(&data);
        assert_eq!(stats.range(CalibrationMethod::MinMax), (stats.min().unwrap(), stats.max().unwrap()));
        for method in &ALL_METHODS[1..] {
            for symmetric in [false, true] {
                let (lo, hi) = stats.range_with(*method, symmetric);
                assert_eq!(hi, 0.0, "{method:?}");
                assert!(lo < -2.0, "{method:?}: {lo}");
            }
        }
    }

    #[test]
    fn uint8_params_represent_zero_exactly() {
        for (lo, hi) in [(-1.0f32, 1.0f32), (-0.3, 5.7), (0.0, 6.0), (-2.5, 0.0), (0.5, 2.0), (-3.0, -1.0)] {
            for reduce_range in [false, true] {
                let (scale, zero_point) = uint8_asymmetric(lo, hi, reduce_range);
                let qmax = if reduce_range { 127.0 } else { 255.0 };
                assert!(scale > 0.0 && scale.is_finite());
                assert!(f32::from(zero_point) <= qmax);
                // quantize(0) = round(0 / scale) + zp = zp, and it dequantizes to exactly 0.
                let q = ((0.0 / scale).round_ties_even() + f32::from(zero_point)).clamp(0.0, qmax);
                assert_eq!((q - f32::from(zero_point)) * scale, 0.0);
                // The representable range covers [min(lo, 0), max(hi, 0)] within half a step.
                let lowest = -f32::from(zero_point) * scale;
                let highest = (qmax - f32::from(zero_point)) * scale;
                assert!(lowest <= lo.min(0.0) + scale / 2.0 + 1e-6, "{lo} {hi}: {lowest}");
                assert!(highest >= hi.max(0.0) - scale / 2.0 - 1e-6, "{lo} {hi}: {highest}");
            }
        }
        assert_eq!(uint8_asymmetric(0.0, 6.0, false), (6.0 / 255.0, 0));
        assert_eq!(uint8_asymmetric(-2.55, 0.0, false).1, 255);
        // 1 / (2 / 255) is 127.5 in exact arithmetic; the f32 scale decides which neighbour wins.
        assert!([127, 128].contains(&uint8_asymmetric(-1.0, 1.0, false).1));
        assert_eq!(uint8_asymmetric(-1.0, 1.0, true), (2.0 / 127.0, 64));
        assert_eq!(uint8_asymmetric(f32::NAN, f32::NAN, false), (1.0, 0));
        assert_eq!(uint8_asymmetric(0.0, 1e-40, false), (1.0, 0));
        let (scale, _) = uint8_asymmetric(f32::NEG_INFINITY, f32::INFINITY, false);
        assert!(scale.is_finite() && scale > 0.0);
    }

    #[test]
    fn int8_symmetric_params() {
        assert_eq!(int8_symmetric(-2.0, 1.0, false), (2.0 / 127.0, 0));
        assert_eq!(int8_symmetric(-0.5, 3.0, true), (3.0 / 63.0, 0));
        assert_eq!(int8_symmetric(0.0, 0.0, false), (1.0, 0));
        assert_eq!(int8_symmetric(f32::NAN, 1.0, false), (1.0 / 127.0, 0));
    }

    #[test]
    fn per_channel_outlier_channel_does_not_affect_others() {
        // Conv weight [out=4, in=3, 2, 2], channel 2 holds an outlier.
        let mut rng = Rng(12);
        let shape = [4usize, 3, 2, 2];
        let mut weights = rng.gaussians(48, 0.1);
        weights[2 * 12 + 5] = 50.0;
        let (scales, quantized) = per_channel_int8_symmetric(&weights, &shape, 0);
        assert_eq!(scales.len(), 4);
        assert_eq!(quantized.len(), 48);
        for c in 0..4 {
            let channel = &weights[c * 12..(c + 1) * 12];
            let max_abs = channel.iter().fold(0.0f32, |m, w| m.max(w.abs()));
            assert_eq!(scales[c], max_abs / 127.0, "channel {c}");
            if c != 2 {
                assert!(scales[c] < 0.01, "channel {c} is not stretched by the outlier");
            }
            for (k, &w) in channel.iter().enumerate() {
                let q = quantized[c * 12 + k];
                assert!((-127..=127).contains(&q));
                let error = (f32::from(q) * scales[c] - w).abs();
                assert!(error <= scales[c] * 0.500_01, "channel {c} value {k}: error {error}");
            }
        }
        assert_eq!(quantized[2 * 12 + 5], 127);
    }

    #[test]
    fn per_channel_along_inner_axis_and_edge_cases() {
        // MatMul weight [K=2, N=3] quantized per output column (axis 1).
        let weights = [1.0, -0.5, 0.0, -2.0, 0.25, 0.0];
        let (scales, quantized) = per_channel_int8_symmetric(&weights, &[2, 3], 1);
        assert_eq!(scales, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(quantized, vec![64, -127, 0, -127, 64, 0]);
        // Round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, and 127 stays in range.
        let weights = [0.5, 1.5, 2.5, -2.5, 127.0];
        let (scales, quantized) = per_channel_int8_symmetric(&weights, &[1, 5], 0);
        assert_eq!(scales, vec![1.0]);
        assert_eq!(quantized, vec![0, 2, 2, -2, 127]);
        // NaN -> 0, infinity saturates without affecting the scale; tiny channels get scale 1.
        let (scales, quantized) = per_channel_int8_symmetric(&[f32::NAN, f32::INFINITY, 1.27, 1e-42], &[2, 2], 0);
        assert_eq!(scales, vec![1.0, 0.01]);
        assert_eq!(quantized, vec![0, 127, 127, 0]);
        for scale in scales {
            assert!(scale > 0.0 && scale.is_finite());
        }
        assert_eq!(
            try_per_channel_int8_symmetric(&[1.0; 5], &[2, 3], 0),
            Err(CalibrationError::ShapeMismatch { shape: vec![2, 3], expected: 6, actual: 5 })
        );
        assert_eq!(
            try_per_channel_int8_symmetric(&[1.0; 6], &[2, 3], 2),
            Err(CalibrationError::BadAxis { axis: 2, rank: 2 })
        );
        assert_eq!(per_channel_int8_symmetric(&[], &[0, 3], 0), (vec![], vec![]));
    }

    #[test]
    fn bias_int32_rounding_and_saturation() {
        // Scales 0.5 * 0.25 = 0.125: 0.0625 / 0.125 = 0.5 -> 0, 0.1875 -> 1.5 -> 2, -0.3125 -> -2.5 -> -2.
        let bias = [0.0625, 0.1875, -0.3125, 1.0];
        assert_eq!(quantize_bias_int32(&bias, 0.5, &[0.25]), vec![0, 2, -2, 8]);
        assert_eq!(quantize_bias_int32(&bias, 0.5, &[0.25, 0.25, 0.125, 1.0]), vec![0, 2, -5, 2]);
        assert_eq!(quantize_bias_int32(&[1e10, -1e10, f32::NAN], 1e-3, &[1e-3]), vec![i32::MAX, i32::MIN, 0]);
        // Dequantized bias is within half a step of the original.
        let scales = [0.013f32, 0.002, 0.7];
        let bias = [0.123f32, -4.56, 78.9];
        let quantized = quantize_bias_int32(&bias, 0.02, &scales);
        for c in 0..3 {
            let step = 0.02 * scales[c];
            assert!((quantized[c] as f32 * step - bias[c]).abs() <= step * 0.500_01);
        }
    }

    #[test]
    #[should_panic(expected = "weight scales")]
    fn bias_with_wrong_scale_count_panics() {
        quantize_bias_int32(&[1.0, 2.0, 3.0], 1.0, &[1.0, 1.0]);
    }

    #[test]
    fn sigmoid_and_tanh_inputs_are_clipped() {
        let range = (-20.0, 15.0);
        assert_eq!(clip_for_consumers(range, &["Sigmoid"]), (-6.0, 6.0));
        assert_eq!(clip_for_consumers(range, &["Sigmoid", "Sigmoid"]), (-6.0, 6.0));
        assert_eq!(clip_for_consumers(range, &["Tanh"]), (-3.0, 3.0));
        assert_eq!(clip_for_consumers(range, &["Sigmoid", "Tanh"]), range);
        assert_eq!(clip_for_consumers(range, &["Sigmoid", "Conv"]), range);
        assert_eq!(clip_for_consumers(range, &["Relu"]), range);
        assert_eq!(clip_for_consumers::<&str>(range, &[]), range);
        // Narrower ranges are kept; ranges beyond the limit collapse onto it.
        assert_eq!(clip_for_consumers((-1.0, 2.0), &["Tanh"]), (-1.0, 2.0));
        assert_eq!(clip_for_consumers((0.0, 10.0), &[String::from("Tanh")]), (0.0, 3.0));
        assert_eq!(clip_for_consumers((7.0, 9.0), &["Sigmoid"]), (6.0, 6.0));
        assert_eq!(saturating_input_limit(&["Tanh", "Tanh"]), Some(TANH_INPUT_LIMIT));
        assert_eq!(saturating_input_limit(&["Softmax"]), None);
    }

    #[test]
    fn options_apply_method_and_clipping() {
        let stats = stats_of(&gaussian_with_outliers(10_000, 4, 40.0));
        let options = CalibrationOptions::default();
        assert_eq!(options.validate(), Ok(()));
        assert_eq!(options.method(), CalibrationMethod::MinMax);
        assert_eq!(options.range(&stats, &["Conv"]), (-40.0, 40.0));
        assert_eq!(options.range(&stats, &["Sigmoid"]), (-6.0, 6.0));
        let unclipped = CalibrationOptions { clip_saturating_inputs: false, ..options.clone() };
        assert_eq!(unclipped.range(&stats, &["Sigmoid"]), (-40.0, 40.0));
        let percentile =
            CalibrationOptions { method: CalibrationMethodKind::Percentile, percentile: 99.0, ..options.clone() };
        assert_eq!(percentile.method(), CalibrationMethod::Percentile(99.0));
        assert!(percentile.range(&stats, &["Conv"]).1 < 3.0);
        assert_eq!(options.new_statistics().bins(), DEFAULT_BINS);
        for (bad, error) in [
            (CalibrationOptions { percentile: 0.9999, ..options.clone() }, CalibrationError::BadPercentile(0.9999)),
            (CalibrationOptions { percentile: 100.5, ..options.clone() }, CalibrationError::BadPercentile(100.5)),
            (CalibrationOptions { percentile: f64::NAN, ..options.clone() }, CalibrationError::BadPercentile(f64::NAN)),
            (CalibrationOptions { bins: 100, ..options.clone() }, CalibrationError::BadBins(100)),
        ] {
            match (bad.validate(), error) {
                (Err(CalibrationError::BadPercentile(a)), CalibrationError::BadPercentile(b)) => {
                    assert!(a == b || (a.is_nan() && b.is_nan()))
                }
                (got, want) => assert_eq!(got, Err(want)),
            }
        }
    }

    mod deserialize {
        //! A minimal map deserializer standing in for the policy's YAML (the crate has no YAML
        //! or JSON dependency).
        use serde::de::value::{Error, MapDeserializer};
        use serde::de::{Deserializer, IntoDeserializer, Visitor};

        use super::super::*;

        #[derive(Clone, Copy)]
        enum V {
            S(&'static str),
            F(f64),
            U(u64),
            B(bool),
        }

        impl<'de> IntoDeserializer<'de, Error> for V {
            type Deserializer = Self;
            fn into_deserializer(self) -> Self {
                self
            }
        }

        impl<'de> Deserializer<'de> for V {
            type Error = Error;

            fn deserialize_any<W: Visitor<'de>>(self, visitor: W) -> Result<W::Value, Error> {
                match self {
                    V::S(s) => visitor.visit_str(s),
                    V::F(f) => visitor.visit_f64(f),
                    V::U(u) => visitor.visit_u64(u),
                    V::B(b) => visitor.visit_bool(b),
                }
            }

            fn deserialize_enum<W: Visitor<'de>>(
                self,
                name: &'static str,
                variants: &'static [&'static str],
                visitor: W,
            ) -> Result<W::Value, Error> {
                match self {
                    V::S(s) => {
                        IntoDeserializer::<Error>::into_deserializer(s).deserialize_enum(name, variants, visitor)
                    }
                    other => other.deserialize_any(visitor),
                }
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
                unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
            }
        }

        fn parse(entries: &[(&'static str, V)]) -> Result<CalibrationOptions, Error> {
            CalibrationOptions::deserialize(MapDeserializer::new(entries.iter().copied()))
        }

        #[test]
        fn policy_section_parses() {
            let options = parse(&[("method", V::S("percentile")), ("percentile", V::F(99.9))]).unwrap();
            assert_eq!(options.method(), CalibrationMethod::Percentile(99.9));
            assert_eq!(options.bins, DEFAULT_BINS);
            assert!(options.clip_saturating_inputs);
            assert!(!options.symmetric);

            assert_eq!(parse(&[]).unwrap(), CalibrationOptions::default());
            let defaulted = parse(&[("method", V::S("percentile"))]).unwrap();
            assert_eq!(defaulted.method(), CalibrationMethod::Percentile(DEFAULT_PERCENTILE));
            let integer_percentile = parse(&[("method", V::S("percentile")), ("percentile", V::U(99))]).unwrap();
            assert_eq!(integer_percentile.method(), CalibrationMethod::Percentile(99.0));

            for (name, method) in [
                ("minmax", CalibrationMethod::MinMax),
                ("entropy", CalibrationMethod::Entropy),
                ("mse", CalibrationMethod::Mse),
            ] {
                assert_eq!(parse(&[("method", V::S(name))]).unwrap().method(), method);
            }
            let full = parse(&[
                ("method", V::S("entropy")),
                ("bins", V::U(4096)),
                ("symmetric", V::B(true)),
                ("clip_saturating_inputs", V::B(false)),
            ])
            .unwrap();
            assert_eq!(full.bins, 4096);
            assert!(full.symmetric && !full.clip_saturating_inputs);
            assert_eq!(full.validate(), Ok(()));
        }

        #[test]
        fn unknown_keys_and_methods_are_rejected() {
            let err = parse(&[("method", V::S("kl"))]).unwrap_err().to_string();
            assert!(err.contains("unknown variant") && err.contains("minmax"), "{err}");
            let err = parse(&[("percentil", V::F(99.0))]).unwrap_err().to_string();
            assert!(err.contains("unknown field"), "{err}");
            assert!(parse(&[("method", V::S("MinMax"))]).is_err());
        }
    }
}
