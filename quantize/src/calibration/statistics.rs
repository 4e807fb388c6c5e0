//! [`TensorStatistics`]: a running min/max, counters and two power-of-two histograms per tensor,
//! in fixed memory and independent of the order batches arrive in (see the module docs of
//! [`crate::calibration`]), and the range each [`CalibrationMethod`] reads from them.

use super::thresholds::{kl_threshold_units, mse_threshold_units, mse_thresholds_two_sided_units, percentile_units};

/// Default number of histogram buckets per sign (TensorRT's 2048).
pub const DEFAULT_BINS: usize = 2048;
/// Entropy calibration clips no more than the values above this percentile of `|x|`.
const ENTROPY_FLOOR_PERCENTILE: f64 = 99.999;

/// Fewest buckets a histogram keeps (entropy calibration needs at least its 128 or 256 levels).
pub const MIN_BINS: usize = 256;
/// Most buckets a histogram keeps (keeps bucket indices exact in `f64`).
pub const MAX_BINS: usize = 1 << 20;

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
    /// False for [`Self::min_max_only`]: no histograms are kept (both are empty).
    histograms: bool,
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
            histograms: true,
        }
    }

    /// Statistics that keep only the counters and the observed `[min, max]`: what MinMax
    /// calibration reads, at a fraction of the cost per value. Every method's range is then the
    /// observed `[min, max]`.
    pub fn min_max_only() -> Self {
        Self { positive: Vec::new(), negative: Vec::new(), histograms: false, ..Self::new(MIN_BINS) }
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
        let batch = BatchSummary::of(values);
        let batch_max_abs = if batch.all_finite {
            self.count += values.len() as u64;
            self.zero_count += batch.zeros;
            self.min = self.min.min(batch.min);
            self.max = self.max.max(batch.max);
            batch.min.abs().max(batch.max.abs())
        } else {
            self.observe_counting_non_finite(values)
        };
        if !self.histograms {
            return;
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

    /// The counters and range of a batch holding NaN or infinite values, one value at a time;
    /// returns the largest finite magnitude.
    fn observe_counting_non_finite(&mut self, values: &[f32]) -> f32 {
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
        batch_max_abs
    }

    /// Adds statistics gathered elsewhere; the result equals observing both inputs' data.
    ///
    /// # Panics
    /// If the two have different bucket counts (create both from the same options).
    pub fn merge(&mut self, other: &TensorStatistics) {
        assert_eq!(self.bins, other.bins, "merging calibration statistics with different bucket counts");
        assert_eq!(self.histograms, other.histograms, "merging statistics with and without histograms");
        self.count += other.count;
        self.nan_count += other.nan_count;
        self.zero_count += other.zero_count;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if !self.histograms {
            return;
        }
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
        if !self.histograms {
            return (min, max);
        }
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
                let magnitudes = magnitudes(true);
                // The KL search trusts the histogram's tail, which a few calibration samples
                // estimate poorly: it never clips more than 1 value in 10^5.
                let t = kl_threshold_units(&magnitudes, levels)
                    .max(percentile_units(&magnitudes, ENTROPY_FLOOR_PERCENTILE));
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

/// Min, max and zeros of a batch in one branch-free sweep the compiler vectorizes, and whether
/// every value was finite (otherwise the batch is counted again one value at a time).
struct BatchSummary {
    min: f32,
    max: f32,
    zeros: u64,
    all_finite: bool,
}

impl BatchSummary {
    fn of(values: &[f32]) -> Self {
        const LANES: usize = 16;
        let mut min = [f32::INFINITY; LANES];
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut zeros = [0u32; LANES];
        // Infinities and NaN make `x * 0` NaN, and a NaN sum stays NaN.
        let mut finite_check = [0.0f32; LANES];
        let mut total_zeros = 0u64;
        // Chunks short enough that a lane's zero count cannot overflow u32.
        for block in values.chunks(LANES << 20) {
            let mut chunks = block.chunks_exact(LANES);
            for chunk in &mut chunks {
                for lane in 0..LANES {
                    let x = chunk[lane];
                    min[lane] = if x < min[lane] { x } else { min[lane] };
                    max[lane] = if x > max[lane] { x } else { max[lane] };
                    zeros[lane] += u32::from(x == 0.0);
                    finite_check[lane] += x * 0.0;
                }
            }
            for &x in chunks.remainder() {
                min[0] = if x < min[0] { x } else { min[0] };
                max[0] = if x > max[0] { x } else { max[0] };
                zeros[0] += u32::from(x == 0.0);
                finite_check[0] += x * 0.0;
            }
            total_zeros += zeros.iter().map(|&z| u64::from(z)).sum::<u64>();
            zeros = [0; LANES];
        }
        Self {
            min: min.iter().copied().fold(f32::INFINITY, f32::min),
            max: max.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            zeros: total_zeros,
            all_finite: finite_check.iter().all(|v| *v == 0.0),
        }
    }
}
