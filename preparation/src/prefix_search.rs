//! The search core of the accuracy budget, free of models and sessions: given nodes ranked
//! most sensitive first, find the smallest `k` such that keeping the first `k` in FP32 meets
//! the budget, probing as few `k` as it can.
//!
//! `k = 0` (the plain recipe) is known to miss when the search starts. The probes gallop
//! (1, 2, 4, ... up to the cap) until one meets, then bisect between the last miss and that
//! meet. Meeting the budget is only roughly monotone in `k` (errors compound, and keeping one
//! node can unfuse a neighbour), so the search never trusts a `k` it did not probe: every
//! answer is a probed `k` that met, and a non-monotone ranking can only make the answer larger
//! than the true minimum, never a configuration that misses. Galloping first costs about
//! `2 log2(k)` probes, fewer than bisecting over the whole list when few nodes need FP32 (the
//! usual case) and never more than twice as many otherwise; it also probes the cap, the
//! costliest configuration, only when nothing smaller met.

/// The next probe, with what remains of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Nodes kept in FP32: the first `k` of the ranking.
    pub k: usize,
    /// Probes still to run at most, this one included.
    pub left: usize,
}

/// Where the search stands: `miss` is the largest `k` known to miss, `meet` the smallest
/// probed `k` known to meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixSearch {
    cap: usize,
    miss: usize,
    meet: Option<usize>,
    /// True once no gallop probe is left (a probe met, or the cap missed).
    done_galloping: bool,
}

impl PrefixSearch {
    /// A search over `k` in `1..=cap`, with `k = 0` known to miss.
    pub fn new(cap: usize) -> Self {
        Self { cap, miss: 0, meet: None, done_galloping: cap == 0 }
    }

    /// The next `k` to probe, or `None` when the search is over.
    pub fn next(&self) -> Option<Probe> {
        let k = match self.meet {
            None if self.done_galloping => return None,
            None => (self.miss * 2).clamp(1, self.cap),
            Some(meet) if meet - self.miss <= 1 => return None,
            Some(meet) => self.miss + (meet - self.miss) / 2,
        };
        Some(Probe { k, left: self.left() })
    }

    /// Records the verdict of probing `k`.
    pub fn record(&mut self, k: usize, meets: bool) {
        if meets {
            self.meet = Some(self.meet.map_or(k, |meet| meet.min(k)));
            self.done_galloping = true;
        } else {
            self.miss = self.miss.max(k);
            if k >= self.cap {
                self.done_galloping = true;
            }
        }
    }

    /// The smallest probed `k` that met, if any.
    pub fn met(&self) -> Option<usize> {
        self.meet
    }

    /// Probes still to run at most: during the gallop, the worst case over where it meets
    /// (each remaining gallop point, then a bisection of the gap below it); after it, a
    /// bisection of what is left.
    pub fn left(&self) -> usize {
        match self.meet {
            Some(meet) => bisection_probes(meet - self.miss),
            None if self.done_galloping => 0,
            None => {
                let mut worst = 0;
                let (mut previous, mut probes) = (self.miss, 0);
                loop {
                    let point = (previous * 2).clamp(1, self.cap);
                    probes += 1;
                    worst = worst.max(probes + bisection_probes(point - previous));
                    if point >= self.cap {
                        return worst;
                    }
                    previous = point;
                }
            }
        }
    }
}

/// Probes a bisection needs at most to settle a gap of `gap` between a miss and a meet (the
/// `gap - 1` values strictly between them): ceil(log2(gap)).
fn bisection_probes(gap: usize) -> usize {
    if gap <= 1 { 0 } else { (usize::BITS - (gap - 1).leading_zeros()) as usize }
}

/// Runs the search with `meets(probe)` as the verdict of each probe, and returns the smallest
/// probed `k` that met (`None` when even the cap missed). An error from `meets` ends the search.
pub fn smallest_meeting_prefix<E>(
    cap: usize,
    mut meets: impl FnMut(Probe) -> Result<bool, E>,
) -> Result<Option<usize>, E> {
    let mut search = PrefixSearch::new(cap);
    while let Some(probe) = search.next() {
        let verdict = meets(probe)?;
        search.record(probe.k, verdict);
    }
    Ok(search.met())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search on a verdict function, returning the answer and the probed `k`s.
    fn probe_all(cap: usize, verdict: impl Fn(usize) -> bool) -> (Option<usize>, Vec<usize>) {
        let mut probed = Vec::new();
        let answer = smallest_meeting_prefix::<()>(cap, |probe| {
            probed.push(probe.k);
            Ok(verdict(probe.k))
        })
        .unwrap();
        (answer, probed)
    }

    #[test]
    fn a_monotone_score_finds_the_smallest_k_in_logarithmic_probes() {
        for cap in 1..=300 {
            for needed in 1..=cap {
                // A synthetic score rising with k: the budget holds from `needed` on.
                let score = |k: usize| 0.9 + 0.1 * (k as f64 / cap as f64);
                let threshold = score(needed);
                let (answer, probed) = probe_all(cap, |k| score(k) >= threshold);
                assert_eq!(answer, Some(needed), "cap {cap}, needed {needed}");
                let bound = 2 * (usize::BITS - needed.leading_zeros()) as usize + 1;
                assert!(probed.len() <= bound, "cap {cap}, needed {needed}: {probed:?}");
                assert!(probed.iter().all(|&k| (1..=cap).contains(&k)), "{probed:?}");
            }
        }
    }

    #[test]
    fn the_probes_are_as_planned() {
        let (answer, probed) = probe_all(49, |k| k >= 9);
        assert_eq!(answer, Some(9));
        assert_eq!(probed, vec![1, 2, 4, 8, 16, 12, 10, 9]);
        let (answer, probed) = probe_all(10, |k| k >= 1);
        assert_eq!((answer, probed), (Some(1), vec![1]));
    }

    #[test]
    fn a_cap_that_misses_ends_the_search_without_an_answer() {
        let (answer, probed) = probe_all(10, |_| false);
        assert_eq!(answer, None);
        assert_eq!(probed, vec![1, 2, 4, 8, 10]);
        assert_eq!(probe_all(0, |_| true), (None, Vec::new()));
    }

    #[test]
    fn a_non_monotone_score_still_returns_a_probed_meet() {
        // Meets at 5 and from 9 on: the gallop misses at 1, 2, 4 and 8 and meets at 16, so
        // the bisection settles on 9, a probed meet, though 5 would have met too.
        let verdict = |k: usize| k == 5 || k >= 9;
        let (answer, probed) = probe_all(40, verdict);
        let answer = answer.unwrap();
        assert!(probed.contains(&answer) && verdict(answer), "{answer} {probed:?}");
        assert_eq!(answer, 9);
    }

    #[test]
    fn the_plan_never_understates_what_is_left() {
        for cap in 1..=130 {
            for needed in (1..=cap).chain([cap + 1]) {
                let mut search = PrefixSearch::new(cap);
                let mut planned = search.left();
                let mut ran = 0;
                while let Some(probe) = search.next() {
                    assert_eq!(probe.left, search.left());
                    assert!(probe.left <= planned, "cap {cap}, needed {needed}: plan grew");
                    planned = probe.left - 1;
                    search.record(probe.k, probe.k >= needed);
                    ran += 1;
                }
                assert!(ran <= PrefixSearch::new(cap).left(), "cap {cap}, needed {needed}");
                assert_eq!(search.left(), 0);
            }
        }
    }
}
