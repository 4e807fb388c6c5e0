//! Threshold searches over one magnitude histogram (counts per bucket, as `f64`), in bucket
//! units: the caller multiplies by the bucket width. Kept apart from the histogram bookkeeping
//! so each search reads as the formula it implements.

/// The p-th percentile (in percent) of a histogram, in bucket units, interpolating linearly
/// within the bucket that holds it. 0 for an empty histogram.
pub(super) fn percentile_units(hist: &[f64], p: f64) -> f64 {
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
pub(super) fn kl_threshold_units(hist: &[f64], levels: usize) -> f64 {
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
pub(super) fn mse_threshold_units(hist: &[f64], steps: f64) -> f64 {
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
pub(super) fn mse_thresholds_two_sided_units(negative: &[f64], positive: &[f64], steps: f64) -> (f64, f64) {
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
