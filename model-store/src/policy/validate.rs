//! Raw policy -> typed policy. Each section has its own function, run in a fixed order (serving,
//! variants, routing, drift, shadow) so that a file with several problems always reports the
//! same, first one. Errors found here have no serde position, so their line is recovered from
//! the text by key path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mantissa_quantize::passes::int8::{Int8Error, Int8Mode, Int8Options};

use super::part_slice::PartSlice;
use super::provider::validate_provider;
use super::raw::{RawBudget, RawDrift, RawParts, RawPolicy, RawRouting, RawServing, RawVariant};
use super::types::{
    DriftBudget, DriftSettings, PartBudget, Policy, PolicyError, Precision, ServingSettings, ShadowSettings, Split,
    Top1Axis, VariantSpec,
};
use super::versions::{self, Known};
use crate::duration::parse_duration;
use crate::yaml_location::line_of_key;

/// The file being validated: its text, to find lines by key path, and its path, for error
/// messages and for resolving the relative data directories it names.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn error(&self, key_path: &[&str], message: String) -> PolicyError {
        PolicyError {
            file: self.path.to_owned(),
            line: line_of_key(self.text, key_path),
            key: key_path.join("."),
            message,
        }
    }

    /// A path written in the policy, taken relative to the policy's directory so that a model
    /// directory can be moved as a whole.
    fn resolve(&self, relative: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(relative)
    }
}

/// Validates a parsed policy; `text` and `path` are the file it was parsed from.
pub(super) fn validate(raw: RawPolicy, text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let source = Source { text, path };
    if raw.variants.is_empty() {
        return Err(source.error(&["variants"], "at least one variant is required".to_owned()));
    }
    let defaults = serving_defaults(&raw.serving, &source)?;
    let versions = versions::assign(&raw.variants)
        .map_err(|err| source.error(&["variants", &err.variant, "version"], err.message))?;
    let variants = raw
        .variants
        .iter()
        .zip(&versions)
        .map(|((name, variant), &version)| validate_variant(name, version, variant, &defaults, &source))
        .collect::<Result<Vec<_>, _>>()?;
    let known = Known::new(&raw.variants, &versions);
    let default_variant = validate_default(&raw.routing, &known, &variants, &source)?;
    let split = validate_split(&raw.routing, &known, &source)?;
    let drift = match raw.drift {
        None => None,
        Some(drift) => Some(validate_drift(drift, &default_variant, &known, &source)?),
    };
    let shadow = match raw.shadow {
        None => None,
        Some(shadow) => Some(check_shadow(shadow, &known, &source)?),
    };
    Ok(Policy { source: Some(path.to_owned()), variants, default_variant, split, drift, shadow })
}

/// The top-level `serving:` section applied to the built-in defaults; every variant starts
/// from the result.
fn serving_defaults(raw: &RawServing, source: &Source) -> Result<ServingSettings, PolicyError> {
    let defaults = merge_serving(&ServingSettings::default(), raw)
        .map_err(|(key, message)| source.error(&["serving", key], message))?;
    check_serving(&defaults, &["serving"], source)?;
    Ok(defaults)
}

/// One variant: its own `serving:` over the policy-wide defaults, and the options section of
/// its precision's pass (defaults when absent, an error under another precision).
fn validate_variant(
    name: &str,
    version: u64,
    variant: &RawVariant,
    defaults: &ServingSettings,
    source: &Source,
) -> Result<VariantSpec, PolicyError> {
    if !is_valid_name(name) {
        return Err(source.error(
            &["variants", name],
            format!("variant name `{name}` must be non-empty and use only letters, digits, '_', '-' or '.'"),
        ));
    }
    // `model_version` takes a version number or a name; an all-digit name would be both.
    if name.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(source.error(
            &["variants", name],
            format!(
                "variant name `{name}` is all digits and would read as a version number; name it with a letter (e.g. `v{name}`) and give `version: {name}` if that number is wanted"
            ),
        ));
    }
    let serving = merge_serving(defaults, &variant.serving)
        .map_err(|(key, message)| source.error(&["variants", name, "serving", key], message))?;
    check_serving(&serving, &["variants", name, "serving"], source)?;
    let fp16 = pass_section(variant.precision, Precision::Fp16, &variant.fp16, &["variants", name, "fp16"], source)?;
    if let Some(options) = &fp16
        && let Err(err) = mantissa_quantize::passes::fp16::validate_options(options)
    {
        return Err(source.error(&["variants", name, "fp16", "node_block_list"], err.to_string()));
    }
    let mut int8 =
        pass_section(variant.precision, Precision::Int8, &variant.int8, &["variants", name, "int8"], source)?;
    if let Some(options) = int8.as_mut() {
        check_int8(name, options, source)?;
    }
    let execution_provider = validate_provider(variant.execution_provider.as_ref()).map_err(|(leaf, message)| {
        let key: Vec<&str> = ["variants", name, "execution_provider"].into_iter().chain(leaf).collect();
        source.error(&key, message)
    })?;
    Ok(VariantSpec {
        name: name.to_owned(),
        version,
        precision: variant.precision,
        fp16,
        int8,
        serving,
        execution_provider,
    })
}

/// Checks a variant's INT8 options and resolves its `calibration_data` against the policy's
/// directory, so that later stages get a path that works from any working directory.
fn check_int8(name: &str, options: &mut Int8Options, source: &Source) -> Result<(), PolicyError> {
    let at = |leaf: &'static str| -> Vec<&str> { vec!["variants", name, "int8", leaf] };
    if let Err(err) = mantissa_quantize::passes::int8::validate_options(options) {
        let key = err.option_key().unwrap_or("mode");
        // The message after the key names the problem; the key is already in the location.
        let message = match &err {
            Int8Error::BadOption { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        return Err(source.error(&at(key), message));
    }
    if let Err(err) = options.calibration.validate() {
        return Err(source.error(&at("calibration"), err.to_string()));
    }
    match (&options.calibration_data, options.mode) {
        (None, Int8Mode::Static) => {
            return Err(source.error(
                &at("calibration_data"),
                "static mode needs calibration_data (a directory of .npz samples)".to_owned(),
            ));
        }
        (Some(data), _) => {
            let resolved = source.resolve(data);
            if !resolved.is_dir() {
                return Err(
                    source.error(&at("calibration_data"), format!("directory {} does not exist", resolved.display()))
                );
            }
            options.calibration_data = Some(resolved);
        }
        (None, _) => {}
    }
    Ok(())
}

/// The variant for unversioned requests: `routing.default`, else the only variant, else the
/// first variant of the split (in name order). Given by name or version; kept as the name.
fn validate_default(
    routing: &RawRouting,
    known: &Known,
    variants: &[VariantSpec],
    source: &Source,
) -> Result<String, PolicyError> {
    match &routing.default {
        Some(reference) => match known.resolve(reference) {
            Some(name) => Ok(name.to_owned()),
            None => Err(source.error(&["routing", "default"], unknown_variant(reference, known))),
        },
        None if variants.len() == 1 => Ok(variants[0].name.clone()),
        None if routing.split.is_some() => Ok(routing
            .split
            .iter()
            .flat_map(|split| split.keys())
            .filter_map(|reference| known.resolve(reference))
            .min()
            .unwrap_or_default()
            .to_owned()),
        None => Err(source
            .error(&["routing"], "`routing.default` is required when a policy has more than one variant".to_owned())),
    }
}

/// `routing.split`: every entry a known variant (by name or version, each variant once) and
/// every weight above zero, since a zero entry would look like a live arm while receiving
/// nothing. The weights are kept by name, in name order, so that a caller's sticky key maps
/// to the same variant however the policy spells it.
fn validate_split(routing: &RawRouting, known: &Known, source: &Source) -> Result<Option<Split>, PolicyError> {
    let Some(weights) = &routing.split else {
        if routing.key.is_some() {
            return Err(source.error(&["routing", "key"], "`key` only applies with a `split`".to_owned()));
        }
        return Ok(None);
    };
    let mut by_name: BTreeMap<&str, (&str, u32)> = BTreeMap::new();
    for (reference, weight) in weights {
        let Some(name) = known.resolve(reference) else {
            return Err(source.error(&["routing", "split", reference], unknown_variant(reference, known)));
        };
        if let Some((first, _)) = by_name.insert(name, (reference, *weight)) {
            return Err(source.error(
                &["routing", "split", reference],
                format!("variant `{name}` is listed twice, as `{first}` and as `{reference}`"),
            ));
        }
    }
    if let Some((name, _)) = weights.iter().find(|(_, weight)| **weight == 0) {
        return Err(
            source.error(&["routing", "split", name], "weight 0 sends no traffic; remove the entry instead".to_owned())
        );
    }
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    if weights.len() < 2 || total > 1_000_000 {
        return Err(source.error(
            &["routing", "split"],
            format!(
                "expected at least two variants with weights summing to at most 1000000 (e.g. int8: 90, fp16: 10), got {weights:?}"
            ),
        ));
    }
    Ok(Some(Split {
        weights: by_name.into_iter().map(|(name, (_, weight))| (name.to_owned(), weight)).collect(),
        key: routing.key.clone().unwrap_or_else(|| "routing_key".to_owned()),
    }))
}

/// `drift:` with its paths resolved and its reference defaulted, so the startup comparison
/// needs no access to the raw section.
fn validate_drift(
    drift: RawDrift,
    default_variant: &str,
    known: &Known,
    source: &Source,
) -> Result<DriftSettings, PolicyError> {
    let holdout = source.resolve(&drift.holdout_data);
    if !holdout.exists() {
        return Err(source.error(&["drift", "holdout_data"], format!("{} does not exist", holdout.display())));
    }
    let reference = match &drift.reference {
        None => default_variant.to_owned(),
        Some(reference) => known
            .resolve(reference)
            .ok_or_else(|| source.error(&["drift", "reference"], unknown_variant(reference, known)))?
            .to_owned(),
    };
    Ok(DriftSettings {
        holdout_data: holdout,
        reference,
        class_outputs: drift.class_outputs,
        budget: validate_budget(&drift.budget, source)?,
        on_budget_miss: drift.on_budget_miss,
    })
}

/// The longest `drift.budget.search_time_limit` may be (a day): a startup that would wait
/// longer is a mistake in the file, not a setting.
const MAX_SEARCH_SECONDS: f64 = 24.0 * 3600.0;

/// `drift.budget`: every figure a fraction in [0, 1], the time limit a bounded duration.
fn validate_budget(raw: &RawBudget, source: &Source) -> Result<DriftBudget, PolicyError> {
    for (key, value) in [
        ("min_cosine", raw.min_cosine),
        ("min_top1_agreement", raw.min_top1_agreement),
        ("max_fp32_fraction", raw.max_fp32_fraction),
    ] {
        if let Some(value) = value
            && !(0.0..=1.0).contains(&value)
        {
            return Err(source.error(&["drift", "budget", key], format!("expected a value in [0, 1], got {value}")));
        }
    }
    let search_time_limit = match &raw.search_time_limit {
        Some(text) => Some(
            parse_duration(text, MAX_SEARCH_SECONDS)
                .map_err(|message| source.error(&["drift", "budget", "search_time_limit"], message))?,
        ),
        None => None,
    };
    Ok(DriftBudget {
        min_cosine: raw.min_cosine,
        min_top1_agreement: raw.min_top1_agreement,
        parts: validate_parts(&raw.parts, &["drift", "budget", "parts"], source)?,
        max_fp32_fraction: raw.max_fp32_fraction,
        search_time_limit,
    })
}

/// Named parts, found under the key path `at` (`drift.budget.parts` in a policy, the top
/// level of a `--budget-parts` file): a usable name, a slice that parses, at least one
/// threshold, each in its range.
fn validate_parts(raw: &RawParts, at: &[&str], source: &Source) -> Result<BTreeMap<String, PartBudget>, PolicyError> {
    let mut parts = BTreeMap::new();
    for (name, part) in raw {
        let key = |leaf: Option<&'static str>| -> Vec<&str> {
            at.iter().copied().chain([name.as_str()]).chain(leaf).collect()
        };
        // The name labels metrics and ModelConfig parameters, like a variant name.
        if !is_valid_name(name) {
            return Err(source.error(
                &key(None),
                format!("part name `{name}` must be non-empty and use only letters, digits, '_', '-' or '.'"),
            ));
        }
        if part.output.is_empty() {
            return Err(source.error(&key(Some("output")), "expected the name of a model output".to_owned()));
        }
        let slice = match &part.slice {
            Some(text) => Some(PartSlice::parse(text).map_err(|message| source.error(&key(Some("slice")), message))?),
            None => None,
        };
        for (leaf, value) in [("min_cosine", part.min_cosine), ("min_top1_agreement", part.min_top1_agreement)] {
            if let Some(value) = value.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(source.error(&key(Some(leaf)), format!("expected a value in [0, 1], got {value}")));
            }
        }
        if let Some(value) = part.max_abs.filter(|v| !v.is_finite() || *v < 0.0) {
            return Err(source.error(&key(Some("max_abs")), format!("expected a finite value >= 0, got {value}")));
        }
        if let Some(value) = part.min_sqnr_db.filter(|v| !v.is_finite()) {
            return Err(source.error(&key(Some("min_sqnr_db")), format!("expected a finite number of dB, got {value}")));
        }
        if [part.min_cosine, part.min_sqnr_db, part.max_abs, part.min_top1_agreement].iter().all(Option::is_none) {
            return Err(source.error(
                &key(None),
                format!(
                    "part `{name}` sets no threshold; give at least one of min_cosine, min_sqnr_db, max_abs, min_top1_agreement"
                ),
            ));
        }
        let top1_axis = match &part.top1_axis {
            None => Top1Axis::Last,
            Some(_) if part.min_top1_agreement.is_none() => {
                return Err(source
                    .error(&key(Some("top1_axis")), "`top1_axis` only applies with `min_top1_agreement`".to_owned()));
            }
            Some(value) => top1_axis(value).map_err(|message| source.error(&key(Some("top1_axis")), message))?,
        };
        parts.insert(
            name.clone(),
            PartBudget {
                output: part.output.clone(),
                slice,
                min_cosine: part.min_cosine,
                min_sqnr_db: part.min_sqnr_db,
                max_abs: part.max_abs,
                min_top1_agreement: part.min_top1_agreement,
                top1_axis,
            },
        );
    }
    Ok(parts)
}

/// `top1_axis`: an integer axis or `all`.
fn top1_axis(value: &serde_yaml::Value) -> Result<Top1Axis, String> {
    match value {
        serde_yaml::Value::Number(number) if number.is_i64() => Ok(Top1Axis::Axis(number.as_i64().unwrap_or(-1))),
        serde_yaml::Value::String(text) if text == "all" => Ok(Top1Axis::All),
        other => Err(format!("expected an integer axis or `all`, got {}", yaml_text(other))),
    }
}

fn yaml_text(value: &serde_yaml::Value) -> String {
    serde_yaml::to_string(value).map(|text| text.trim().to_owned()).unwrap_or_else(|_| format!("{value:?}"))
}

/// Validates a `--budget-parts` file's map (its keys are at the top level of the file).
pub(super) fn validate_parts_file(
    raw: &RawParts,
    text: &str,
    path: &Path,
) -> Result<BTreeMap<String, PartBudget>, PolicyError> {
    validate_parts(raw, &[], &Source { text, path })
}

/// The `shadow:` section is deserialized straight into its typed form; only its values are
/// left to check, and its reference to resolve to a name.
fn check_shadow(mut shadow: ShadowSettings, known: &Known, source: &Source) -> Result<ShadowSettings, PolicyError> {
    match known.resolve(&shadow.reference) {
        Some(name) => shadow.reference = name.to_owned(),
        None => return Err(source.error(&["shadow", "reference"], unknown_variant(&shadow.reference, known))),
    }
    if !(0.0..=1.0).contains(&shadow.sample_rate) {
        return Err(
            source.error(&["shadow", "sample_rate"], format!("expected a value in [0, 1], got {}", shadow.sample_rate))
        );
    }
    if shadow.queue_size == 0 {
        return Err(source.error(&["shadow", "queue_size"], "expected at least 1, got 0".to_owned()));
    }
    Ok(shadow)
}

fn unknown_variant(reference: &str, known: &Known) -> String {
    format!("names unknown variant `{reference}`; expected the name or version of one of: {}", known.listing())
}

/// A pass's options section (`fp16:`, `int8:`): defaults when the variant has the pass's
/// precision and no section, an error when the section sits under another precision.
fn pass_section<T: Clone + Default>(
    precision: Precision,
    wanted: Precision,
    section: &Option<T>,
    key: &[&str],
    source: &Source,
) -> Result<Option<T>, PolicyError> {
    match (precision == wanted, section) {
        (true, options) => Ok(Some(options.clone().unwrap_or_default())),
        (false, Some(_)) => Err(source.error(
            key,
            format!(
                "an `{0}` section needs `precision: {0}`, but this variant has precision {1}",
                wanted.as_str(),
                precision.as_str()
            ),
        )),
        (false, None) => Ok(None),
    }
}

/// `raw` over `base`: keys the section names replace the inherited value, the rest are kept.
/// A failing key is returned as its leaf only, since the caller knows which section it read.
fn merge_serving(base: &ServingSettings, raw: &RawServing) -> Result<ServingSettings, (&'static str, String)> {
    let max_queue_delay = match &raw.max_queue_delay {
        Some(text) => parse_duration(text, 1.0).map_err(|m| ("max_queue_delay", m))?,
        None => base.max_queue_delay,
    };
    let default_timeout = match &raw.default_timeout {
        Some(text) => Some(parse_duration(text, 3600.0).map_err(|m| ("default_timeout", m))?),
        None => base.default_timeout,
    };
    Ok(ServingSettings {
        max_batch_size: raw.max_batch_size.or(base.max_batch_size),
        instances: raw.instances.unwrap_or(base.instances),
        intra_op_threads: raw.intra_op_threads.unwrap_or(base.intra_op_threads),
        intra_op_spinning: raw.intra_op_spinning.unwrap_or(base.intra_op_spinning),
        dynamic_batching: raw.dynamic_batching.unwrap_or(base.dynamic_batching),
        max_queue_delay,
        max_queue_size: raw.max_queue_size.or(base.max_queue_size),
        default_timeout,
        preferred_batch_sizes: raw.preferred_batch_sizes.clone().unwrap_or_else(|| base.preferred_batch_sizes.clone()),
    })
}

/// Bounds of merged settings, checked after merging because a value may be valid alone but
/// not together with an inherited one (preferred sizes above an inherited `max_batch_size`).
fn check_serving(serving: &ServingSettings, at: &[&str], source: &Source) -> Result<(), PolicyError> {
    let key = |leaf: &'static str| -> Vec<&str> { at.iter().copied().chain([leaf]).collect() };
    if serving.instances == 0 || serving.instances > 256 {
        return Err(source.error(&key("instances"), format!("expected 1..=256, got {}", serving.instances)));
    }
    if serving.intra_op_threads > 1024 {
        return Err(
            source.error(&key("intra_op_threads"), format!("expected 0..=1024, got {}", serving.intra_op_threads))
        );
    }
    if let Some(bad) = serving
        .preferred_batch_sizes
        .iter()
        .find(|&&size| size == 0 || serving.max_batch_size.is_some_and(|max| size > max))
    {
        return Err(source.error(
            &key("preferred_batch_sizes"),
            format!("expected sizes from 1 to max_batch_size ({:?}), got {bad}", serving.max_batch_size),
        ));
    }
    if serving.max_queue_size == Some(0) {
        return Err(source.error(&key("max_queue_size"), "expected at least 1, got 0".to_owned()));
    }
    if let Some(size) = serving.max_batch_size
        && size > 65_536
    {
        return Err(source.error(&key("max_batch_size"), format!("expected 0..=65536, got {size}")));
    }
    Ok(())
}

/// Variant names are what clients send as `model_version` and what metrics and logs are
/// labelled with, so they are kept to characters that need no quoting or escaping there.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}
