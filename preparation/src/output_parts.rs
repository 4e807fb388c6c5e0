//! Parts of an output whose channels live on different scales, measured on their own.
//!
//! A YOLO-style head writes [batch, 4 + C, anchors]: four rows of box coordinates in pixels
//! (0..640) and C rows of class scores in 0..1. A cosine over the flattened tensor is the
//! cosine of the box rows; the scores can be wrong while it reads 0.9997. So the drift of such
//! an output is also measured per group of channels with alike ranges (precision rules, rule 2),
//! and the worst group counts like an output of its own.
//!
//! Parts are found on the reference output: along the first non-batch axis of 2..=256 channels
//! whose range widths (max - min) fall into contiguous runs with typical widths more than
//! [`PART_RANGE_RATIO`] apart (see [`boundary`]). Runs are split again while they split that
//! way (a head with three scales has three parts), but only where the runs do not overlap
//! (see [`separated`]).

/// Channel range widths differing by more than this factor start a new part; the same factor as
/// the static INT8 pass's `max_concat_range_ratio` default.
pub const PART_RANGE_RATIO: f64 = 10.0;

/// Largest channel axis considered (detection heads have 5..=85 rows or columns).
const MAX_CHANNELS: i64 = 256;

/// Channels `start..end` along `axis` of an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPart {
    pub axis: usize,
    pub start: usize,
    pub end: usize,
}

impl OutputPart {
    /// The part's name: the output's name and a NumPy-style slice, e.g. `output0[:,4:22,:]`.
    pub fn label(&self, output: &str, rank: usize) -> String {
        let slices: Vec<String> = (0..rank)
            .map(|axis| if axis == self.axis { format!("{}:{}", self.start, self.end) } else { ":".to_owned() })
            .collect();
        format!("{output}[{}]", slices.join(","))
    }

    /// The part's values out of the whole output's (row-major, `shape`).
    pub fn select(&self, shape: &[i64], values: &[f32]) -> Vec<f32> {
        let (outer, channels, inner) = split_at_axis(shape, self.axis);
        let mut part = Vec::with_capacity(outer * (self.end - self.start) * inner);
        for block in values.chunks_exact(channels * inner).take(outer) {
            part.extend_from_slice(&block[self.start * inner..self.end * inner]);
        }
        part
    }
}

/// (product of dims before `axis`, dim at `axis`, product of dims after).
fn split_at_axis(shape: &[i64], axis: usize) -> (usize, usize, usize) {
    let dim = |d: &i64| (*d).max(0) as usize;
    let outer = shape[..axis].iter().map(dim).product();
    let inner = shape[axis + 1..].iter().map(dim).product();
    (outer, dim(&shape[axis]), inner)
}

/// Lowest and highest finite value of each channel along `axis` (infinite bounds: none seen).
fn channel_bounds(shape: &[i64], values: &[f32], axis: usize) -> Vec<(f64, f64)> {
    let (_, channels, inner) = split_at_axis(shape, axis);
    let mut bounds = vec![(f64::INFINITY, f64::NEG_INFINITY); channels];
    for block in values.chunks_exact(channels * inner) {
        for (channel, row) in block.chunks_exact(inner).enumerate() {
            let (lo, hi) = &mut bounds[channel];
            for &value in row.iter().filter(|v| v.is_finite()) {
                *lo = lo.min(f64::from(value));
                *hi = hi.max(f64::from(value));
            }
        }
    }
    bounds
}

fn width((lo, hi): (f64, f64)) -> f64 {
    if hi >= lo { hi - lo } else { 0.0 }
}

/// The boundary between two contiguous runs of channels whose typical widths (geometric
/// means, constant channels left out) differ the most, when they differ more than
/// [`PART_RANGE_RATIO`].
fn boundary(widths: &[f64]) -> Option<usize> {
    let logs: Vec<Option<f64>> = widths.iter().map(|&w| (w > 0.0).then(|| w.ln())).collect();
    let mean = |part: &[Option<f64>]| {
        let known: Vec<f64> = part.iter().flatten().copied().collect();
        (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
    };
    let mut best: Option<(f64, usize)> = None;
    for split in 1..logs.len() {
        let (Some(left), Some(right)) = (mean(&logs[..split]), mean(&logs[split..])) else { continue };
        let gap = (left - right).abs();
        if best.is_none_or(|(widest, _)| gap > widest) {
            best = Some((gap, split));
        }
    }
    best.filter(|(gap, _)| *gap > PART_RANGE_RATIO.ln()).map(|(_, split)| split)
}

/// Whether two runs of widths do not overlap: every non-constant channel of the wider run is
/// wider than every non-constant channel of the narrower one. Class-score rows of classes that
/// never fire are narrow, but they sit between rows that fire; a boundary through such rows
/// leaves firing rows on the narrow side, overlaps, and is refused, so noise is not measured
/// as a part of its own.
fn separated(left: &[f64], right: &[f64]) -> bool {
    let live = |run: &[f64]| run.iter().copied().filter(|&w| w > 0.0).collect::<Vec<f64>>();
    let (left, right) = (live(left), live(right));
    let min = |run: &[f64]| run.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |run: &[f64]| run.iter().copied().fold(0.0, f64::max);
    min(&left) > max(&right) || min(&right) > max(&left)
}

/// Splits `start..end` of `widths` into runs: at its best boundary when that boundary is far
/// enough apart and separates, then each side again.
fn split_runs(widths: &[f64], start: usize, end: usize, runs: &mut Vec<(usize, usize)>) {
    match boundary(&widths[start..end]).map(|split| start + split) {
        Some(split) if separated(&widths[start..split], &widths[split..end]) => {
            split_runs(widths, start, split, runs);
            split_runs(widths, split, end, runs);
        }
        _ => runs.push((start, end)),
    }
}

/// Channel ranges of one output gathered over many samples, for parts found on all of them
/// (`mantissa analyze` streams its data); [`find_parts`] is the one-sample case.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartFinder {
    /// Each candidate axis (2..=256 channels) with its channels' bounds so far; an axis whose
    /// size changes between samples is dropped.
    axes: Vec<(usize, Vec<(f64, f64)>)>,
    seen: bool,
    rank: usize,
}

impl PartFinder {
    /// Adds one tensor of the output.
    pub fn observe(&mut self, shape: &[i64], values: &[f32]) {
        let total: i64 = shape.iter().product();
        if shape.len() < 2 || total <= 0 || total as usize != values.len() {
            return;
        }
        if !self.seen {
            self.seen = true;
            self.rank = shape.len();
            self.axes = (1..shape.len())
                .filter(|&axis| (2..=MAX_CHANNELS).contains(&shape[axis]))
                .map(|axis| (axis, channel_bounds(shape, values, axis)))
                .collect();
            return;
        }
        self.axes.retain_mut(|(axis, bounds)| {
            if shape.len() <= *axis || shape[*axis] as usize != bounds.len() {
                return false;
            }
            for (merged, (lo, hi)) in bounds.iter_mut().zip(channel_bounds(shape, values, *axis)) {
                *merged = (merged.0.min(lo), merged.1.max(hi));
            }
            true
        });
    }

    /// The rank of the output (0 before any tensor was observed), for part labels.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The parts along the first axis whose channels split, with each part's range width
    /// (highest minus lowest value over its channels); empty when the channels share one scale.
    pub fn parts(&self) -> Vec<(OutputPart, f64)> {
        for (axis, bounds) in &self.axes {
            let widths: Vec<f64> = bounds.iter().copied().map(width).collect();
            let mut runs = Vec::new();
            split_runs(&widths, 0, widths.len(), &mut runs);
            if runs.len() > 1 {
                return runs
                    .into_iter()
                    .map(|(start, end)| {
                        let lo = bounds[start..end].iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
                        let hi = bounds[start..end].iter().map(|b| b.1).fold(f64::NEG_INFINITY, f64::max);
                        (OutputPart { axis: *axis, start, end }, width((lo, hi)))
                    })
                    .collect();
            }
        }
        Vec::new()
    }
}

/// The parts of an output of `shape` (as the reference `values` show them); empty when its
/// channels share one scale.
pub fn find_parts(shape: &[i64], values: &[f32]) -> Vec<OutputPart> {
    let mut finder = PartFinder::default();
    finder.observe(shape, values);
    finder.parts().into_iter().map(|(part, _)| part).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [1, 6, 5]: rows 0-3 boxes in pixels, rows 4-5 scores in 0..1.
    fn detection_head() -> (Vec<i64>, Vec<f32>) {
        let mut values = Vec::new();
        for row in 0..6 {
            for anchor in 0..5 {
                values.push(if row < 4 { 60.0 * anchor as f32 + row as f32 } else { 0.2 * anchor as f32 });
            }
        }
        (vec![1, 6, 5], values)
    }

    #[test]
    fn a_detection_head_splits_into_boxes_and_scores() {
        let (shape, values) = detection_head();
        let parts = find_parts(&shape, &values);
        assert_eq!(parts, [OutputPart { axis: 1, start: 0, end: 4 }, OutputPart { axis: 1, start: 4, end: 6 }]);
        assert_eq!(parts[1].label("output0", 3), "output0[:,4:6,:]");
        assert_eq!(parts[1].select(&shape, &values), [0.0, 0.2, 0.4, 0.6, 0.8, 0.0, 0.2, 0.4, 0.6, 0.8]);
    }

    #[test]
    fn channels_on_one_scale_make_no_parts() {
        let values: Vec<f32> = (0..40).map(|v| (v % 7) as f32 * 0.1).collect();
        assert!(find_parts(&[1, 8, 5], &values).is_empty());
        assert!(find_parts(&[40], &values).is_empty());
    }

    /// [1, channels, 4] with the given width per channel (values 0..width across anchors).
    fn rows(widths: &[f32]) -> (Vec<i64>, Vec<f32>) {
        let values = widths.iter().flat_map(|&w| (0..4).map(move |a| w * a as f32 / 3.0)).collect();
        (vec![1, widths.len() as i64, 4], values)
    }

    #[test]
    fn three_scales_make_three_parts() {
        let (shape, values) = rows(&[1000.0, 900.0, 1100.0, 10.0, 12.0, 0.1, 0.09, 0.11]);
        let parts = find_parts(&shape, &values);
        let ranges: Vec<(usize, usize)> = parts.iter().map(|p| (p.start, p.end)).collect();
        assert_eq!(ranges, [(0, 3), (3, 5), (5, 8)]);
    }

    #[test]
    fn dead_classes_between_firing_ones_are_not_split_off() {
        // Boxes, then class rows where every other class never fires (width 1e-4).
        let (shape, values) = rows(&[600.0, 600.0, 500.0, 500.0, 1.0, 1e-4, 0.9, 1e-4, 1.0, 1e-4, 0.8, 1e-4]);
        let parts = find_parts(&shape, &values);
        let ranges: Vec<(usize, usize)> = parts.iter().map(|p| (p.start, p.end)).collect();
        assert_eq!(ranges, [(0, 4), (4, 12)]);
    }

    #[test]
    fn parts_found_over_several_samples_merge_their_ranges() {
        let (shape, first) = detection_head();
        // A second sample whose box rows span less and score rows more: still two parts.
        let second: Vec<f32> = first.iter().enumerate().map(|(i, v)| if i < 20 { v * 0.5 } else { v + 0.4 }).collect();
        let mut finder = PartFinder::default();
        finder.observe(&shape, &first);
        finder.observe(&shape, &second);
        let parts = finder.parts();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].0, OutputPart { axis: 1, start: 4, end: 6 });
        assert!((parts[1].1 - 1.2).abs() < 1e-6, "{parts:?}");
        assert!((parts[0].1 - 243.0).abs() < 1e-4, "{parts:?}");
    }
}
