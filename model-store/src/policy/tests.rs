//! Parsing and validation of whole policy files, through the public entry point only, so the
//! tests hold whatever the split between the raw and validation stages.

use std::path::Path;
use std::time::Duration;

use mantissa_quantize::passes::int8::Int8Mode;

use super::{BudgetMiss, DriftBudget, PartSlice, Policy, PolicyError, ServingSettings, Top1Axis, parse_budget_parts};

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
    // Without a mode, INT8 is auto: without calibration data or a budget, the dynamic form.
    let auto = Policy::parse("variants:\n  q:\n    precision: int8\n", &path).unwrap();
    assert_eq!(auto.variants[0].int8.as_ref().unwrap().mode, Int8Mode::Auto);
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

/// A policy with the drift section's budget followed by `parts`, and its parts' first line.
fn with_parts(dir: &Path, parts: &str) -> Result<Policy, PolicyError> {
    let base = "variants:\n  fp32:\n    precision: fp32\n  half:\n    precision: fp16\nrouting:\n  default: fp32\n";
    let text = format!("{base}drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 0.99\n    parts:\n{parts}");
    Policy::parse(&text, &dir.join("policy.yaml"))
}

#[test]
fn budget_parts_are_parsed_with_their_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("holdout")).unwrap();
    let policy = with_parts(
        dir.path(),
        "      scores: {output: output0, slice: \"[:, 4:, :]\", min_cosine: 0.99, min_top1_agreement: 0.95, top1_axis: all}\n      boxes:\n        output: output0\n        slice: \"[:, :4, :]\"\n        min_cosine: 0.999\n        max_abs: 2.0\n      logits: {output: logits, min_sqnr_db: 20, min_top1_agreement: 0.9, top1_axis: -1}\n",
    )
    .unwrap();
    let budget = policy.drift.unwrap().budget;
    assert!(budget.has_thresholds());
    let scores = &budget.parts["scores"];
    assert_eq!(scores.output, "output0");
    assert_eq!(scores.slice, Some(PartSlice { rank: 3, axis: 1, start: Some(4), end: None }));
    assert_eq!((scores.min_top1_agreement, scores.top1_axis), (Some(0.95), Top1Axis::All));
    let boxes = &budget.parts["boxes"];
    assert_eq!((boxes.min_cosine, boxes.max_abs, boxes.top1_axis), (Some(0.999), Some(2.0), Top1Axis::Last));
    assert_eq!(boxes.slice.unwrap().to_string(), "[:,:4,:]");
    let logits = &budget.parts["logits"];
    assert_eq!((logits.slice, logits.min_sqnr_db, logits.top1_axis), (None, Some(20.0), Top1Axis::Axis(-1)));
    // The parts decide the artifact, so they are part of the cache key's serialization.
    let key = serde_yaml::to_string(&budget).unwrap();
    assert!(key.contains("scores:") && key.contains("min_sqnr_db: 20.0"), "{key}");
    let without = serde_yaml::to_string(&DriftBudget { min_cosine: Some(0.99), ..Default::default() }).unwrap();
    assert!(!without.contains("parts"), "{without}");
}

#[test]
fn bad_budget_parts_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("holdout")).unwrap();
    let file = dir.path().join("policy.yaml");
    // (parts text, line, key, message excerpt); the parts start on line 13.
    let cases = [
        (
            "      scores:\n        output: output0\n        slice: \"[:, 4]\"\n        min_cosine: 0.9\n",
            15,
            "drift.budget.parts.scores.slice",
            "entry 1",
        ),
        (
            "      scores: {output: output0, slice: \"[:, 4:, 1:]\", min_cosine: 0.9}\n",
            13,
            "drift.budget.parts.scores.slice",
            "more than one axis",
        ),
        ("      scores:\n        output: output0\n", 13, "drift.budget.parts.scores", "sets no threshold"),
        (
            "      scores:\n        output: output0\n        min_top1_agreement: 1.5\n",
            15,
            "drift.budget.parts.scores.min_top1_agreement",
            "[0, 1]",
        ),
        (
            "      scores:\n        output: output0\n        max_abs: -1\n",
            15,
            "drift.budget.parts.scores.max_abs",
            ">= 0",
        ),
        (
            "      scores:\n        output: output0\n        min_cosine: 0.9\n        top1_axis: 1\n",
            16,
            "drift.budget.parts.scores.top1_axis",
            "only applies with",
        ),
        (
            "      scores:\n        output: output0\n        min_top1_agreement: 0.9\n        top1_axis: every\n",
            16,
            "drift.budget.parts.scores.top1_axis",
            "integer axis or `all`",
        ),
        (
            "      scores:\n        output: output0\n        min_cosin: 0.9\n",
            15,
            "drift.budget.parts.scores.min_cosin",
            "unknown field `min_cosin`",
        ),
        (
            "      \"bad name\":\n        output: output0\n        min_cosine: 0.9\n",
            13,
            "drift.budget.parts.bad name",
            "part name",
        ),
    ];
    for (parts, line, key, excerpt) in cases {
        let err = with_parts(dir.path(), parts).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(line), key), "{parts}: {err}");
        assert!(err.message.contains(excerpt), "{parts}: {err}");
        assert!(err.to_string().starts_with(&format!("{}:{line}: key `{key}", file.display())), "{err}");
    }
}

#[test]
fn a_budget_parts_file_holds_the_same_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("parts.yaml");
    let parts =
        parse_budget_parts("scores:\n  output: output0\n  slice: \"[:, 4:, :]\"\n  min_top1_agreement: 0.9\n", &path)
            .unwrap();
    assert_eq!(parts["scores"].slice.unwrap().axis, 1);
    let err =
        parse_budget_parts("scores:\n  output: output0\n  slice: \"4:\"\n  min_cosine: 0.9\n", &path).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(3), "scores.slice"), "{err}");
    let err = parse_budget_parts("scores:\n  output: output0\n  colour: red\n", &path).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(3), "scores.colour"), "{err}");
    std::fs::write(&path, "boxes: {output: y, max_abs: 0.5}\n").unwrap();
    assert_eq!(super::load_budget_parts(&path).unwrap()["boxes"].max_abs, Some(0.5));
}

const THREE_VARIANTS: &str =
    "variants:\n  fp32:\n    precision: fp32\n  int8:\n    precision: int8\n  fp16:\n    precision: fp16\n";

fn versions(policy: &Policy) -> Vec<(&str, u64)> {
    policy.variants.iter().map(|v| (v.name.as_str(), v.version)).collect()
}

#[test]
fn undeclared_versions_follow_the_declaration_order() {
    let policy = parse(&format!("{THREE_VARIANTS}routing:\n  default: fp32\n")).unwrap();
    assert_eq!(versions(&policy), [("fp32", 1), ("int8", 2), ("fp16", 3)]);
    assert_eq!(versions(&Policy::default_fp32()), [("fp32", 1)]);
}

#[test]
fn declared_versions_are_kept_and_the_rest_fill_the_gaps() {
    let text = "variants:\n  fp32:\n    precision: fp32\n  int8:\n    version: 1\n    precision: int8\n  fp16:\n    precision: fp16\n  other:\n    version: 7\n    precision: fp32\nrouting:\n  default: fp32\n";
    let policy = parse(text).unwrap();
    assert_eq!(versions(&policy), [("fp32", 2), ("int8", 1), ("fp16", 3), ("other", 7)]);
    assert_eq!(policy.find_variant("7").unwrap().name, "other");
    assert_eq!(policy.find_variant("fp16").unwrap().version, 3);
    assert_eq!(policy.find_variant("4"), None);
    assert_eq!(policy.find_variant("99999999999999999999999"), None);
}

#[test]
fn duplicate_versions_name_the_second_variant() {
    let text =
        "variants:\n  fp32:\n    version: 2\n    precision: fp32\n  int8:\n    precision: int8\n    version: 2\n";
    let err = parse(text).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(7), "variants.int8.version"), "{err}");
    assert!(err.message.contains("version 2 is already variant `fp32`'s"), "{err}");
    assert!(err.to_string().starts_with("store/m/policy.yaml:7: key `variants.int8.version`"), "{err}");
}

#[test]
fn versions_must_be_positive_integers() {
    for (value, expected) in
        [("0", "expected a positive integer, got 0"), ("-3", "expected a positive integer, got -3")]
    {
        let err = parse(&format!("variants:\n  fp32:\n    precision: fp32\n    version: {value}\n")).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.fp32.version"), "{err}");
        assert!(err.message.contains(expected), "{err}");
    }
    // Not a number at all: the type error names the key and line.
    let err = parse("variants:\n  fp32:\n    precision: fp32\n    version: latest\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(4), "variants.fp32.version"), "{err}");
    assert!(err.message.contains("latest"), "{err}");
}

#[test]
fn all_digit_variant_names_are_rejected() {
    let err = parse("variants:\n  \"2\":\n    precision: fp32\n").unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(2), "variants.2"), "{err}");
    assert!(err.message.contains("would read as a version number"), "{err}");
}

#[test]
fn routing_drift_and_shadow_take_names_or_versions() {
    let text = format!(
        "{THREE_VARIANTS}routing:\n  default: 1\n  split:\n    2: 90\n    fp16: 10\ndrift:\n  holdout_data: .\n  reference: \"1\"\nshadow:\n  reference: 1\n  sample_rate: 0.5\n"
    );
    let policy = Policy::parse(&text, &std::env::temp_dir().join("policy.yaml")).unwrap();
    assert_eq!(policy.default_variant, "fp32");
    assert_eq!(policy.split.as_ref().unwrap().weights, [("fp16".to_owned(), 10), ("int8".to_owned(), 90)]);
    assert_eq!(policy.drift.as_ref().unwrap().reference, "fp32");
    assert_eq!(policy.shadow.as_ref().unwrap().reference, "fp32");
}

#[test]
fn a_split_may_name_each_variant_once() {
    let err = parse(&format!("{THREE_VARIANTS}routing:\n  default: fp32\n  split:\n    int8: 50\n    \"2\": 50\n"))
        .unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(11), "routing.split.int8"), "{err}");
    assert!(err.message.contains("variant `int8` is listed twice, as `2` and as `int8`"), "{err}");
    let err = parse(&format!("{THREE_VARIANTS}routing:\n  default: 4\n")).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(9), "routing.default"), "{err}");
    assert!(err.message.contains("fp32 (version 1), int8 (version 2), fp16 (version 3)"), "{err}");
}
