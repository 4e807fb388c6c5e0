//! Statistics, threshold searches, clipping and options, checked on deterministic data.

use super::*;
use crate::test_support::Rng;

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
    let data: Vec<f32> =
        (0..20_000).map(|i| if i % 4 == 0 { -rng.uniform() as f32 } else { 100.0 * rng.uniform() as f32 }).collect();
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
    // Two outliers at 30 sigma (fewer than the 1 in 10^5 entropy may clip): the bulk spans
    // ~280 of the 2048 buckets, well resolved.
    let stats = stats_of(&gaussian_with_outliers(400_000, 2, 30.0));
    let (lo, hi) = stats.range(CalibrationMethod::Entropy);
    assert!(hi > 3.5 && hi < 6.0, "entropy threshold {hi}");
    assert_eq!(lo, -hi, "entropy is symmetric for two-signed data");
    assert_eq!(stats.range_with(CalibrationMethod::Entropy, true), (lo, hi));
    // Outliers at 100 sigma: the bulk spans fewer buckets than the 128 levels, so the search
    // stops at its smallest candidate (128 buckets = 8 sigma here), still far below the max.
    let stats = stats_of(&gaussian_with_outliers(400_000, 2, 100.0));
    let (_, hi) = stats.range(CalibrationMethod::Entropy);
    assert!(hi > 3.5 && hi <= 128.0 * stats.bucket_width().unwrap() as f32, "entropy threshold {hi}");
}

#[test]
fn entropy_keeps_a_tail_heavier_than_one_value_in_a_hundred_thousand() {
    // With few calibration samples the KL search clipped tails that carry the signal
    // (PP-OCR's classifier, 8 samples: 1 of 8 predictions flipped); 20 values at 30 sigma
    // among 200 000 are 1 in 10^4, more than entropy calibration may clip.
    let stats = stats_of(&gaussian_with_outliers(200_000, 20, 30.0));
    let (lo, hi) = stats.range(CalibrationMethod::Entropy);
    assert!(hi >= 29.0 && lo <= -29.0, "entropy range [{lo}, {hi}]");
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
    use serde::Deserialize;
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
                V::S(s) => IntoDeserializer::<Error>::into_deserializer(s).deserialize_enum(name, variants, visitor),
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

#[test]
fn min_max_only_statistics_keep_the_counters_and_the_observed_range() {
    let values: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
    let mut with_non_finite = values.clone();
    with_non_finite.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0]);
    for batch in [values, with_non_finite] {
        let mut full = TensorStatistics::new(DEFAULT_BINS);
        let mut light = TensorStatistics::min_max_only();
        for chunk in batch.chunks(333) {
            full.observe(chunk);
            light.observe(chunk);
        }
        assert_eq!((light.min(), light.max()), (full.min(), full.max()));
        assert_eq!(
            (light.count(), light.nan_count(), light.zero_count()),
            (full.count(), full.nan_count(), full.zero_count())
        );
        assert_eq!(light.infinity_count(), full.infinity_count());
        assert_eq!(light.range(CalibrationMethod::MinMax), full.range(CalibrationMethod::MinMax));
        assert_eq!(
            light.range(CalibrationMethod::Entropy),
            (-50.0, 50.0),
            "without histograms every method reads [min, max]"
        );
        assert!(light.positive_histogram().is_empty());
    }
}
