//! The `slice` of a named output part (`drift.budget.parts.<name>.slice`): NumPy-style, one
//! axis sliced as `start:end` (either may be left out, negative counts from the end), every
//! other axis `:`. Only the syntax is checked here; whether the entry count matches the
//! output's rank is known when the output is first measured.

use std::fmt;

use serde::Serialize;

/// A parsed slice such as `[:, 4:, :]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartSlice {
    /// Entries written, which must equal the output's rank.
    pub rank: usize,
    /// The sliced axis.
    pub axis: usize,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl PartSlice {
    /// Parses `[e0, e1, ...]`; the message says what is wrong with the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let inner = text
            .trim()
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or_else(|| format!("expected a NumPy-style slice like \"[:, 4:, :]\", got {text:?}"))?;
        let mut sliced = None;
        let entries: Vec<&str> = inner.split(',').map(str::trim).collect();
        for (axis, entry) in entries.iter().enumerate() {
            if *entry == ":" {
                continue;
            }
            let bounds = parse_entry(entry).map_err(|reason| format!("entry {axis} ({entry:?}): {reason}"))?;
            if sliced.replace((axis, bounds)).is_some() {
                return Err(format!("{text:?} slices more than one axis; slice one and write `:` for the others"));
            }
        }
        let Some((axis, (start, end))) = sliced else {
            return Err(format!("{text:?} slices no axis; leave `slice` out to measure the whole output"));
        };
        Ok(Self { rank: entries.len(), axis, start, end })
    }
}

/// `start:end` with either bound optional.
fn parse_entry(entry: &str) -> Result<(Option<i64>, Option<i64>), String> {
    let mut pieces = entry.split(':');
    let (Some(start), Some(end), None) = (pieces.next(), pieces.next(), pieces.next()) else {
        return Err("expected `start:end`, `start:`, `:end` or `:` (no single indices or steps)".to_owned());
    };
    let bound = |piece: &str| -> Result<Option<i64>, String> {
        let piece = piece.trim();
        if piece.is_empty() {
            return Ok(None);
        }
        piece.parse().map(Some).map_err(|_| format!("{piece:?} is not an integer"))
    };
    Ok((bound(start)?, bound(end)?))
}

impl fmt::Display for PartSlice {
    /// The compact form used in labels, e.g. `[:,4:,:]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = |b: Option<i64>| b.map(|v| v.to_string()).unwrap_or_default();
        let entries: Vec<String> =
            (0..self.rank)
                .map(|axis| {
                    if axis == self.axis {
                        format!("{}:{}", bound(self.start), bound(self.end))
                    } else {
                        ":".to_owned()
                    }
                })
                .collect();
        write!(f, "[{}]", entries.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::PartSlice;

    #[test]
    fn parses_one_sliced_axis() {
        let slice = PartSlice::parse("[:, 4:, :]").unwrap();
        assert_eq!(slice, PartSlice { rank: 3, axis: 1, start: Some(4), end: None });
        assert_eq!(slice.to_string(), "[:,4:,:]");
        assert_eq!(PartSlice::parse("[:,:4]").unwrap(), PartSlice { rank: 2, axis: 1, start: None, end: Some(4) });
        assert_eq!(PartSlice::parse("[-3:-1]").unwrap().to_string(), "[-3:-1]");
    }

    #[test]
    fn rejects_what_is_not_one_axis_range() {
        assert!(PartSlice::parse(":, 4:").unwrap_err().contains("NumPy-style"));
        assert!(PartSlice::parse("[:, 4:, 1:2]").unwrap_err().contains("more than one axis"));
        assert!(PartSlice::parse("[:, :]").unwrap_err().contains("slices no axis"));
        assert!(PartSlice::parse("[:, 4]").unwrap_err().contains("entry 1 (\"4\")"));
        assert!(PartSlice::parse("[:, ::2]").unwrap_err().contains("no single indices or steps"));
        assert!(PartSlice::parse("[:, a:]").unwrap_err().contains("\"a\" is not an integer"));
    }
}
