//! Which variant serves a request: an explicit `model_version`, else the policy's weighted
//! A/B split (pinned per caller by the split's key parameter when the request carries it,
//! random otherwise), else the policy's default variant.

use mantissa_proto::inference::InferParameter;
use mantissa_proto::inference::infer_parameter::ParameterChoice;

use crate::error::ServeError;
use crate::routing::registry::{ServedModel, Variant};

/// The variant that serves a request for `model`. `sticky_key` returns the value of the named
/// request parameter, if the request has it.
pub fn route<'m>(
    model: &'m ServedModel,
    version: &str,
    sticky_key: impl FnOnce(&str) -> Option<String>,
) -> Result<&'m Variant, ServeError> {
    if !version.is_empty() {
        return model.variant(version);
    }
    match &model.entry.policy.split {
        Some(split) => {
            let chosen = match sticky_key(&split.key) {
                Some(key) => split.pick_for_key(&key),
                None => split.pick(rand::random::<u64>()),
            };
            model.variant(chosen)
        }
        None => model.variant(""),
    }
}

/// A request parameter's value as text, for sticky routing keys.
pub fn parameter_text(parameter: &InferParameter) -> Option<String> {
    Some(match parameter.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(text) => text.clone(),
        ParameterChoice::Int64Param(value) => value.to_string(),
        ParameterChoice::Uint64Param(value) => value.to_string(),
        ParameterChoice::BoolParam(value) => value.to_string(),
        ParameterChoice::DoubleParam(value) => value.to_string(),
    })
}
