//! Parsing and validation of whole policy files, through the public entry point only, so the
//! tests hold whatever the split between the raw and validation stages.

use std::path::Path;
use std::time::Duration;

use mantissa_quantize::passes::int8::Int8Mode;

use super::{BudgetMiss, Policy, PolicyError, ServingSettings};

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(text, Path::new("store/m/policy.yaml"))
}

#[test]
fn parses_full_policy_with_overrides() {
    let policy = parse(
        "serving:\n  max_batch_size: 16\n  instances: 2\nvariants:\n  fp32:\n    precision: fp32\n    serving:\n      intra_op_threads: 4\nrouting:\n  default: fp32\n",
    )
    .unwrap();
    assert_eq!(policy.default_variant, "fp32");
    assert_eq!(
        policy.variants[0].serving,
        ServingSettings {
            max_batch_size: Some(16),
            instances: 2,
            intra_op_threads: 4,
            intra_op_spinning: false,
            dynamic_batching: true,
            max_queue_delay: Duration::ZERO,
            max_queue_size: None,
            default_timeout: None,
            preferred_batch_sizes: Vec::new(),
        }
    );
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let err = parse("variants:\n  fp32:\n    precision: fp32\n    instancez: 3\n").unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
    assert!(err.key.starts_with("variants.fp32"), "{err}");
    assert!(err.message.contains("unknown field `instancez`"), "{err}");
    assert!(err.to_string().starts_with("store/m/policy.yaml:4: key `variants.fp32"), "{err}");
}

#[test]
fn unknown_precision_is_rejected() {
    let err = parse("variants:\n  x:\n    precision: int4\n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(err.key, "variants.x.precision");
    assert!(err.message.contains("int4"), "{err}");
}

#[test]
fn routing_to_unknown_variant_is_rejected() {
    let err = parse("variants:\n  fp32:\n    precision: fp32\nrouting:\n  default: int8\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(5), "routing.default"));
    assert!(err.message.contains("`int8`"), "{err}");
}

#[test]
fn zero_instances_is_rejected_with_location() {
    let err = parse("variants:\n  fp32:\n    precision: fp32\n    serving:\n      instances: 0\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.fp32.serving.instances"));
    assert!(err.message.contains("got 0"), "{err}");
}

#[test]
fn fp16_variants_take_pass_options() {
    let policy = parse(
        "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\n    fp16:\n      keep_first_and_last_layers: false\n      node_block_list: ['head/.*']\nrouting:\n  default: fp32\n",
    )
    .unwrap();
    let half = policy.variant("half").unwrap();
    let options = half.fp16.as_ref().unwrap();
    assert!(!options.keep_first_and_last_layers);
    assert!(options.keep_io_types, "unset options keep their defaults");
    assert_eq!(options.node_block_list, vec!["head/.*"]);
    assert_eq!(policy.variant("fp32").unwrap().fp16, None);
}

#[test]
fn fp16_option_errors_name_the_key() {
    let err = parse("variants:\n  half:\n    precision: fp16\n    fp16:\n      keep_io: false\n").unwrap_err();
    assert_eq!(err.line, Some(5), "{err}");
    assert!(err.key.starts_with("variants.half.fp16"), "{err}");
    assert!(err.message.contains("unknown field `keep_io`"), "{err}");
    let err = parse("variants:\n  f:\n    precision: fp32\n    fp16: {}\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.f.fp16"));
    let err = parse("variants:\n  h:\n    precision: fp16\n    fp16:\n      node_block_list: ['(']\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.h.fp16.node_block_list"));
    assert!(err.message.contains("'(' is not a valid regular expression"), "{err}");
}

#[test]
fn queue_delay_parses_with_units_and_is_bounded() {
    let policy = parse("serving:\n  max_queue_delay: 500us\nvariants:\n  a:\n    precision: fp32\n    serving:\n      max_queue_delay: 2ms\n").unwrap();
    assert_eq!(policy.variants[0].serving.max_queue_delay, Duration::from_millis(2));
    let err = parse("serving:\n  max_queue_delay: 5h\nvariants:\n  a:\n    precision: fp32\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(2), "serving.max_queue_delay"));
    assert!(err.message.contains("'5h'"), "{err}");
    let policy =
        parse("serving:\n  default_timeout: 2m\n  max_queue_size: 8\nvariants:\n  a:\n    precision: fp32\n").unwrap();
    assert_eq!(policy.variants[0].serving.default_timeout, Some(Duration::from_secs(120)));
    assert_eq!(policy.variants[0].serving.max_queue_size, Some(8));
    let err = parse("variants:\n  a:\n    precision: fp32\n    serving:\n      default_timeout: soon\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(5), "variants.a.serving.default_timeout"));
}

#[test]
fn int8_option_errors_name_their_own_key() {
    for (leaf, value, expected) in [
        ("block_size", "100", "expected a power of two from 16 to 256, got 100"),
        ("weight_bits", "3", "expected 4 or 8, got 3"),
        ("max_concat_range_ratio", "0.5", "expected at least 1, got 0.5"),
        ("nodes_exclude", "[\"(\"]", "is not a valid regular expression"),
    ] {
        let text = format!("variants:\n  q:\n    precision: int8\n    int8:\n      {leaf}: {value}\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, format!("variants.q.int8.{leaf}"), "{err}");
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains(expected), "{err}");
    }
}

#[test]
fn int8_variants_need_calibration_data_for_static_mode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("calibration")).unwrap();
    let path = dir.path().join("policy.yaml");
    let text = "variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: calibration\n      calibration:\n        method: percentile\n";
    let policy = Policy::parse(text, &path).unwrap();
    let options = policy.variant("q").unwrap().int8.as_ref().unwrap();
    assert_eq!(options.mode, Int8Mode::Static);
    assert_eq!(options.calibration_data.as_deref(), Some(dir.path().join("calibration").as_path()));

    let err =
        Policy::parse("variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n", &path).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.q.int8.calibration_data"));
    let err = Policy::parse(
        "variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n      calibration_data: nowhere\n",
        &path,
    )
    .unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(6), "variants.q.int8.calibration_data"));
    assert!(err.message.contains("does not exist"), "{err}");
    let dynamic = Policy::parse("variants:\n  q:\n    precision: int8\n", &path).unwrap();
    assert_eq!(dynamic.variants[0].int8.as_ref().unwrap().mode, Int8Mode::Dynamic);
}

#[test]
fn split_routing_is_validated_and_sticky() {
    let text = "variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  default: a\n  split:\n    a: 90\n    b: 10\n  key: user\n";
    let policy = parse(text).unwrap();
    let split = policy.split.as_ref().unwrap();
    assert_eq!(split.key, "user");
    assert_eq!(split.total(), 100);
    assert_eq!((split.pick(0), split.pick(89), split.pick(90), split.pick(99)), ("a", "a", "b", "b"));
    // Stable: the same key always lands on the same variant.
    let first = split.pick_for_key("customer-42");
    assert!((0..10).all(|_| split.pick_for_key("customer-42") == first));

    let err = parse(
        "variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 90\n    c: 10\n",
    )
    .unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(9), "routing.split.c"));
    let err = parse(
        "variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 0\n    b: 10\n",
    )
    .unwrap_err();
    assert_eq!(err.key, "routing.split.a");
    let err = parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp16\nrouting:\n  split:\n    a: 5\n")
        .unwrap_err();
    assert_eq!(err.key, "routing.split");
}

#[test]
fn drift_section_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("holdout")).unwrap();
    let path = dir.path().join("policy.yaml");
    let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
    let policy = Policy::parse(
        &format!("{base}drift:\n  holdout_data: holdout\n  class_outputs: [logits]\n  budget:\n    min_cosine: 0.99\n"),
        &path,
    )
    .unwrap();
    let drift = policy.drift.unwrap();
    assert_eq!((drift.reference.as_str(), drift.budget.min_cosine), ("fp32", Some(0.99)));
    assert_eq!(drift.on_budget_miss, BudgetMiss::NotReady);
    let err = Policy::parse(&format!("{base}drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 2\n"), &path)
        .unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(11), "drift.budget.min_cosine"));
    let err = Policy::parse(&format!("{base}drift:\n  holdout_data: nope\n"), &path).unwrap_err();
    assert_eq!(err.key, "drift.holdout_data");
}

#[test]
fn budget_search_time_limit_is_a_duration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("holdout")).unwrap();
    let path = dir.path().join("policy.yaml");
    let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
    let budget = |limit: &str| {
        format!(
            "{base}drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 0.99\n    search_time_limit: {limit}\n"
        )
    };
    let policy = Policy::parse(&budget("5m"), &path).unwrap();
    assert_eq!(policy.drift.unwrap().budget.search_time_limit, Some(Duration::from_secs(300)));
    let policy = Policy::parse(&budget("1500ms"), &path).unwrap();
    assert_eq!(policy.drift.unwrap().budget.search_time_limit, Some(Duration::from_millis(1500)));
    let policy =
        Policy::parse(&format!("{base}drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 0.99\n"), &path)
            .unwrap();
    assert_eq!(policy.drift.unwrap().budget.search_time_limit, None);
    for (bad, wanted) in
        [("soon", "expected a duration like"), ("2h", "expected a duration like"), ("1441m", "between 0 and")]
    {
        let err = Policy::parse(&budget(bad), &path).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(12), "drift.budget.search_time_limit"), "{bad}: {err}");
        assert!(err.message.contains(wanted), "{bad}: {err}");
        let text = err.to_string();
        assert!(text.starts_with(&format!("{}:12: key `drift.budget.search_time_limit`", path.display())), "{text}");
    }
}

#[test]
fn shadow_section_is_validated() {
    let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
    let policy = parse(&format!("{base}shadow:\n  reference: fp32\n  sample_rate: 0.25\n")).unwrap();
    assert_eq!(policy.shadow.unwrap().queue_size, 64);
    let err = parse(&format!("{base}shadow:\n  reference: fp32\n  sample_rate: 1.5\n")).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(10), "shadow.sample_rate"));
    let err = parse(&format!("{base}shadow:\n  reference: int8\n  sample_rate: 1\n")).unwrap_err();
    assert_eq!(err.key, "shadow.reference");
}

#[test]
fn wrong_type_is_rejected() {
    let err = parse("serving:\n  instances: many\nvariants:\n  fp32:\n    precision: fp32\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(2), "serving.instances"));
}

#[test]
fn multiple_variants_need_a_default() {
    let err = parse("variants:\n  a:\n    precision: fp32\n  b:\n    precision: fp32\n").unwrap_err();
    assert_eq!(err.key, "routing");
}
