//! Parts of outputs the policy names (`drift.budget.parts`): a slice of one axis, or the whole
//! output, with the geometry of its top-1 agreement. The policy only checked the slice's
//! syntax; here it meets the output's shape, so a slice of the wrong rank or one that selects
//! nothing is an error naming the part.

use mantissa_model_store::{PartBudget, Top1Axis};

use crate::output_parts::OutputPart;

/// A named part that does not fit the output it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error(
        "part '{part}': slice {slice} has {entries} entries, but output '{output}' has rank {rank} (shape {shape:?})"
    )]
    Rank { part: String, slice: String, entries: usize, output: String, rank: usize, shape: Vec<i64> },
    #[error("part '{part}': slice {slice} selects no element of axis {axis} (size {size}) of output '{output}'")]
    Empty { part: String, slice: String, axis: usize, size: i64, output: String },
    #[error("part '{part}': top1_axis {axis} is not an axis of output '{output}' (rank {rank})")]
    Top1Axis { part: String, axis: i64, output: String, rank: usize },
    #[error("part '{part}' names output '{output}', which the model does not produce (outputs: {outputs:?})")]
    UnknownOutput { part: String, output: String, outputs: Vec<String> },
    #[error(
        "part '{part}' has the name of a model output; only a part measuring that whole output may (rename the part)"
    )]
    NameTaken { part: String },
}

/// Where argmaxes are taken in a row-major tensor: `outer * inner` rows of `len` values each,
/// `inner` apart (the geometry of an argmax along one axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Top1Rows {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl Top1Rows {
    /// Argmax along `axis` of `shape`.
    pub fn along(shape: &[usize], axis: usize) -> Self {
        Self { outer: shape[..axis].iter().product(), len: shape[axis], inner: shape[axis + 1..].iter().product() }
    }

    /// One argmax per batch item over everything else.
    pub fn per_batch_item(shape: &[usize]) -> Self {
        Self { outer: shape.first().copied().unwrap_or(1), len: shape.iter().skip(1).product(), inner: 1 }
    }
}

/// A named part fitted to its output's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPart {
    /// The channels measured; `None` for the whole output.
    pub channels: Option<OutputPart>,
    /// The output and slice, as reports show it: `output0[:,4:,:]`, or `logits` when whole.
    pub label: String,
    /// How top-1 agreement is counted, when the part has a `min_top1_agreement`.
    pub top1: Option<Top1Rows>,
}

/// Fits `spec` (the part called `name`) to an output of `shape`.
pub fn resolve(name: &str, spec: &PartBudget, shape: &[i64]) -> Result<ResolvedPart, PartError> {
    let rank = shape.len();
    let mut dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let (channels, label) = match &spec.slice {
        None => (None, spec.output.clone()),
        Some(slice) => {
            if slice.rank != rank {
                return Err(PartError::Rank {
                    part: name.to_owned(),
                    slice: slice.to_string(),
                    entries: slice.rank,
                    output: spec.output.clone(),
                    rank,
                    shape: shape.to_vec(),
                });
            }
            let size = dims[slice.axis];
            let start = clamp_bound(slice.start, size, 0);
            let end = clamp_bound(slice.end, size, size);
            if start >= end {
                return Err(PartError::Empty {
                    part: name.to_owned(),
                    slice: slice.to_string(),
                    axis: slice.axis,
                    size: shape[slice.axis],
                    output: spec.output.clone(),
                });
            }
            dims[slice.axis] = end - start;
            (Some(OutputPart { axis: slice.axis, start, end }), format!("{}{slice}", spec.output))
        }
    };
    let top1 = match spec.min_top1_agreement.map(|_| spec.top1_axis) {
        None => None,
        Some(Top1Axis::All) => Some(Top1Rows::per_batch_item(&dims)),
        Some(Top1Axis::Last) if rank > 0 => Some(Top1Rows::along(&dims, rank - 1)),
        Some(Top1Axis::Axis(axis)) if (-(rank as i64)..rank as i64).contains(&axis) => {
            Some(Top1Rows::along(&dims, axis.rem_euclid(rank as i64) as usize))
        }
        Some(Top1Axis::Axis(axis)) => {
            return Err(PartError::Top1Axis { part: name.to_owned(), axis, output: spec.output.clone(), rank });
        }
        Some(Top1Axis::Last) => {
            return Err(PartError::Top1Axis { part: name.to_owned(), axis: -1, output: spec.output.clone(), rank });
        }
    };
    Ok(ResolvedPart { channels, label, top1 })
}

/// A NumPy slice bound: negative counts from the end, and both ends clamp to the axis.
fn clamp_bound(bound: Option<i64>, size: usize, default: usize) -> usize {
    match bound {
        None => default,
        Some(value) if value < 0 => (size as i64 + value).max(0) as usize,
        Some(value) => (value as usize).min(size),
    }
}

#[cfg(test)]
mod tests {
    use mantissa_model_store::PartSlice;

    use super::*;

    fn spec(slice: Option<&str>, top1: Option<Top1Axis>) -> PartBudget {
        PartBudget {
            output: "output0".to_owned(),
            slice: slice.map(|text| PartSlice::parse(text).unwrap()),
            min_cosine: Some(0.99),
            min_sqnr_db: None,
            max_abs: None,
            min_top1_agreement: top1.map(|_| 0.9),
            top1_axis: top1.unwrap_or_default(),
        }
    }

    #[test]
    fn a_slice_fits_the_output_like_numpy() {
        let part = resolve("scores", &spec(Some("[:, 4:, :]"), Some(Top1Axis::All)), &[2, 7, 5]).unwrap();
        assert_eq!(part.channels, Some(OutputPart { axis: 1, start: 4, end: 7 }));
        assert_eq!(part.label, "output0[:,4:,:]");
        assert_eq!(part.top1, Some(Top1Rows { outer: 2, len: 15, inner: 1 }));
        let part = resolve("boxes", &spec(Some("[:, :-3, :]"), Some(Top1Axis::Axis(1))), &[2, 7, 5]).unwrap();
        assert_eq!(part.channels, Some(OutputPart { axis: 1, start: 0, end: 4 }));
        assert_eq!(part.top1, Some(Top1Rows { outer: 2, len: 4, inner: 5 }));
        let whole = resolve("all", &spec(None, Some(Top1Axis::Last)), &[2, 7, 5]).unwrap();
        assert_eq!((whole.channels, whole.label.as_str()), (None, "output0"));
        assert_eq!(whole.top1, Some(Top1Rows { outer: 14, len: 5, inner: 1 }));
    }

    #[test]
    fn a_slice_that_does_not_fit_names_the_part() {
        let err = resolve("scores", &spec(Some("[:, 4:]"), None), &[1, 7, 5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "part 'scores': slice [:,4:] has 2 entries, but output 'output0' has rank 3 (shape [1, 7, 5])"
        );
        let err = resolve("scores", &spec(Some("[:, 9:, :]"), None), &[1, 7, 5]).unwrap_err();
        assert!(matches!(err, PartError::Empty { axis: 1, size: 7, .. }), "{err}");
        let err = resolve("scores", &spec(None, Some(Top1Axis::Axis(3))), &[1, 7, 5]).unwrap_err();
        assert!(err.to_string().contains("top1_axis 3 is not an axis"), "{err}");
    }
}
