//! `policy.yaml` exactly as it is spelled: every key optional where the file may omit it and
//! nothing checked beyond types, so that serde's own errors (unknown key, wrong type) come out
//! with the key path and line before any validation runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use mantissa_quantize::passes::fp16::Fp16Options;
use mantissa_quantize::passes::int8::Int8Options;
use serde::Deserialize;

use super::provider::RawExecutionProvider;
use super::types::{BudgetMiss, PolicyError, Precision, ShadowSettings};

/// The whole file. Only `variants` is required; the other sections have defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) serving: RawServing,
    pub(super) variants: RawVariants,
    #[serde(default)]
    pub(super) routing: RawRouting,
    pub(super) drift: Option<RawDrift>,
    pub(super) shadow: Option<ShadowSettings>,
}

/// A `serving:` section, top-level or per variant. Every key is optional so that a variant's
/// section overrides only what it names; durations stay text until validation bounds them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServing {
    pub(super) max_batch_size: Option<u32>,
    pub(super) instances: Option<u32>,
    pub(super) intra_op_threads: Option<u32>,
    pub(super) intra_op_spinning: Option<bool>,
    pub(super) dynamic_batching: Option<bool>,
    pub(super) max_queue_delay: Option<String>,
    pub(super) max_queue_size: Option<u32>,
    pub(super) default_timeout: Option<String>,
    pub(super) preferred_batch_sizes: Option<Vec<u32>>,
}

/// `variants:` in the order the file declares them, which decides the version numbers of
/// variants that declare none.
pub(super) type RawVariants = IndexMap<String, RawVariant>;

/// One entry under `variants:`; its name is the map key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVariant {
    /// The numeric version clients may address it by; checked (positive, unique) during
    /// validation, so a bad one gets a message rather than a type error.
    pub(super) version: Option<i64>,
    pub(super) precision: Precision,
    #[serde(default)]
    pub(super) serving: RawServing,
    pub(super) fp16: Option<Fp16Options>,
    pub(super) int8: Option<Int8Options>,
    pub(super) execution_provider: Option<RawExecutionProvider>,
}

/// The `routing:` section; which variant names exist is checked during validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) default: Option<String>,
    pub(super) split: Option<BTreeMap<String, u32>>,
    pub(super) key: Option<String>,
}

/// The `drift:` section; `reference` falls back to the default variant during validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDrift {
    pub(super) holdout_data: PathBuf,
    pub(super) reference: Option<String>,
    #[serde(default)]
    pub(super) class_outputs: Vec<String>,
    #[serde(default)]
    pub(super) budget: RawBudget,
    #[serde(default)]
    pub(super) on_budget_miss: BudgetMiss,
}

/// `drift.budget`; its time limit stays text until validation bounds it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) min_cosine: Option<f64>,
    pub(super) min_top1_agreement: Option<f64>,
    pub(super) max_fp32_fraction: Option<f64>,
    pub(super) search_time_limit: Option<String>,
    #[serde(default)]
    pub(super) parts: RawParts,
}

/// `drift.budget.parts`, and the whole of a `--budget-parts` file: part name -> spec.
pub(super) type RawParts = BTreeMap<String, RawPart>;

/// One named part as written; `slice` and `top1_axis` stay unparsed until validation, so their
/// errors can say what is wrong rather than that no form matched.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPart {
    pub(super) output: String,
    pub(super) slice: Option<String>,
    pub(super) min_cosine: Option<f64>,
    pub(super) min_sqnr_db: Option<f64>,
    pub(super) max_abs: Option<f64>,
    pub(super) min_top1_agreement: Option<f64>,
    pub(super) top1_axis: Option<serde_yaml::Value>,
}

/// Deserializes policy text, turning serde's error into a [`PolicyError`] whose key is the
/// dotted path serde was at and whose line is where the YAML parser stopped.
pub(super) fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, PolicyError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = err.into_inner();
        let line = inner.location().map(|location| location.line());
        // serde_yaml appends " at line L column C"; the line is reported separately.
        let message = inner.to_string();
        let message = match message.find(" at line ") {
            Some(cut) => message[..cut].to_owned(),
            None => message,
        };
        PolicyError { file: path.to_owned(), line, key, message }
    })
}
