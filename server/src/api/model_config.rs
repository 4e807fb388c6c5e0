//! Triton's ModelConfig for one variant: its signature and serving settings in Triton's
//! terms, and, as parameters, everything known about how the variant was built and checked.
//! This is the one place the typed facts become `parameters` strings.

use std::collections::HashMap;

use mantissa_preparation::facts::{BuildFacts, Fp16Facts, Int8Facts};
use mantissa_proto::inference::{
    ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOutput, ModelParameter, ModelVersionPolicy,
    model_config, model_instance_group, model_version_policy,
};
use mantissa_runtime::{ModelSignature, TensorSpec};

use crate::facts::{BatchInvariance, BudgetVerdict, ProviderFacts, StartupDrift, VariantFacts};
use crate::routing::registry::{ServedModel, Variant};

/// Dimensions as Triton's ModelConfig lists them: without the batch dimension when batching.
fn config_dims(spec: &TensorSpec, signature: &ModelSignature) -> Vec<i64> {
    if signature.batches() { spec.dims[1..].to_vec() } else { spec.dims.clone() }
}

pub fn model_config(served: &ServedModel, variant: &Variant, signature: &ModelSignature) -> ModelConfig {
    let serving = &variant.spec.serving;
    let mut parameters = Parameters::default();
    parameters.set("variant", &variant.spec.name);
    parameters.set("version", variant.spec.version);
    // Every version with its variant, so one ModelConfig tells which number is which.
    let versions: Vec<String> = served.variants.iter().map(Variant::label).collect();
    parameters.set("versions", versions.join(", "));
    parameters.set("precision", variant.spec.precision.as_str());
    parameters.set("default_variant", &served.entry.policy.default_variant);
    if let Ok(default) = served.variant("") {
        parameters.set("default_version", default.spec.version);
    }
    parameters.set("intra_op_threads", serving.intra_op_threads);
    let facts = variant.facts();
    if let Some(facts) = &facts {
        render_facts(facts, &mut parameters);
    }
    ModelConfig {
        name: served.name().to_owned(),
        platform: "onnxruntime_onnx".to_owned(),
        backend: "onnxruntime".to_owned(),
        // Every variant is served at once, under its own version number.
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(model_version_policy::PolicyChoice::Specific(model_version_policy::Specific {
                versions: served.variants.iter().map(|v| v.spec.version as i64).collect(),
            })),
        }),
        max_batch_size: signature.max_batch_size as i32,
        input: signature
            .inputs
            .iter()
            .map(|spec| ModelInput {
                name: spec.name.clone(),
                data_type: spec.datatype.triton_enum(),
                dims: config_dims(spec, signature),
                ..Default::default()
            })
            .collect(),
        output: signature
            .outputs
            .iter()
            .map(|spec| ModelOutput {
                name: spec.name.clone(),
                data_type: spec.datatype.triton_enum(),
                dims: config_dims(spec, signature),
                ..Default::default()
            })
            .collect(),
        instance_group: vec![instance_group(served, variant, facts.as_ref().map(|facts| &facts.provider))],
        default_model_filename: "model.onnx".to_owned(),
        parameters: parameters.0,
        scheduling_choice: (signature.batches() && serving.dynamic_batching).then(|| {
            model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                max_queue_delay_microseconds: serving.max_queue_delay.as_micros() as u64,
                preferred_batch_size: serving.preferred_batch_sizes.iter().map(|&size| size as i32).collect(),
                ..Default::default()
            })
        }),
        ..Default::default()
    }
}

/// The variant's workers as Triton's instance group.
fn instance_group(served: &ServedModel, variant: &Variant, provider: Option<&ProviderFacts>) -> ModelInstanceGroup {
    let (kind, gpus) = placement(provider);
    ModelInstanceGroup {
        name: format!("{}_{}", served.name(), variant.spec.name),
        kind: kind as i32,
        count: variant.spec.serving.instances as i32,
        gpus,
        ..Default::default()
    }
}

/// KIND_GPU with the device when the workers run on a GPU provider, KIND_CPU otherwise (also
/// after a fallback to the CPU, and before the variant is ready).
fn placement(provider: Option<&ProviderFacts>) -> (model_instance_group::Kind, Vec<i32>) {
    match provider.and_then(|provider| provider.in_use.device_id()) {
        Some(device) => (model_instance_group::Kind::Gpu, vec![i32::try_from(device).unwrap_or(i32::MAX)]),
        None => (model_instance_group::Kind::Cpu, Vec::new()),
    }
}

/// ModelConfig's string parameters.
#[derive(Default)]
struct Parameters(HashMap<String, ModelParameter>);

impl Parameters {
    fn set(&mut self, key: impl Into<String>, value: impl ToString) {
        self.0.insert(key.into(), ModelParameter { string_value: value.to_string() });
    }
}

fn render_facts(facts: &VariantFacts, out: &mut Parameters) {
    render_build(&facts.build, out);
    out.set("execution_provider", facts.provider.describe());
    if let Some(fallback) = &facts.provider.fallback {
        out.set("execution_provider_requested", &fallback.requested);
        out.set("execution_provider_fallback_reason", &fallback.reason);
    }
    match facts.batch_invariance {
        Some(BatchInvariance::NotRun) => out.set("batch_invariance", "not run (inference failed)"),
        Some(BatchInvariance::Ran { passed, max_abs_diff }) => {
            out.set("batch_invariance", if passed { "pass" } else { "fail" });
            out.set("batch_invariance_max_abs_diff", format!("{max_abs_diff:e}"));
        }
        None => {}
    }
    if let Some(drift) = &facts.drift {
        render_drift(drift, out);
    }
}

fn render_build(build: &BuildFacts, out: &mut Parameters) {
    out.set("precision", build.precision.as_str());
    out.set("artifact_bytes", build.artifact_bytes);
    out.set("build_ms", build.build_ms);
    if let Some(cache) = build.cache {
        out.set("cache", cache.as_str());
    }
    if let Some(fp16) = &build.fp16 {
        render_fp16(fp16, out);
    }
    if let Some(int8) = &build.int8 {
        render_int8(int8, out);
    }
}

fn render_fp16(fp16: &Fp16Facts, out: &mut Parameters) {
    out.set("fp16_nodes_converted", fp16.nodes_converted);
    out.set("fp16_nodes_kept_fp32", fp16.nodes_kept_fp32);
    out.set("fp16_casts_inserted", fp16.casts_inserted);
    out.set("fp16_values_clamped", fp16.values_clamped);
    out.set("fp16_keep_io_types", fp16.keep_io_types);
}

fn render_int8(int8: &Int8Facts, out: &mut Parameters) {
    if let Some(search) = &int8.budget_search {
        out.set("int8_budget_kept_fp32", search.kept_fp32.join(","));
        out.set("int8_budget_search_cosine", search.cosine);
        out.set("int8_plain_recipe_cosine", search.plain_recipe_cosine);
        out.set("int8_budget_search_evaluations", search.evaluations);
        out.set("int8_budget_search_ms", search.search_ms);
        if let Some(tightest) = &search.tightest {
            out.set("int8_budget_tightest", tightest);
        }
        if search.time_limited {
            out.set("int8_budget_search_time_limited", true);
        }
    }
    if let Some(fallback) = &int8.budget_fallback {
        out.set("int8_budget_fallback", &fallback.reason);
    }
    out.set("int8_mode", format!("{:?}", int8.mode).to_lowercase());
    if let Some(auto) = &int8.auto {
        out.set("int8_auto_chosen", &auto.chosen);
        out.set("int8_auto_reason", &auto.reason);
        out.set("int8_auto_cpu", &auto.cpu);
        let candidates: Vec<String> = auto
            .candidates
            .iter()
            .map(|c| {
                let speed = c.speedups.iter().map(|(b, s)| format!("b{b}={s:.2}x")).collect::<Vec<_>>().join(" ");
                let cosine = c.cosine.map_or("-".to_owned(), |v| format!("{v:.6}"));
                let verdict = if c.meets_budget { "met" } else { "missed" };
                format!("{}: {speed} cosine={cosine} budget={verdict} bytes={}", c.form, c.bytes)
            })
            .collect();
        out.set("int8_auto_candidates", candidates.join(" | "));
    }
    out.set("int8_nodes_quantized", int8.nodes_quantized);
    out.set("int8_nodes_kept_fp32", int8.nodes_kept_fp32);
    out.set("int8_activations_quantized", int8.activations_quantized);
    out.set("int8_per_channel", int8.per_channel);
    out.set("int8_reduce_range", int8.reduce_range);
    if let Some(method) = int8.calibration_method {
        out.set("int8_calibration_method", format!("{method:?}").to_lowercase());
    }
    if !int8.notes.is_empty() {
        out.set("int8_notes", int8.notes.join(" | "));
    }
}

fn render_drift(drift: &StartupDrift, out: &mut Parameters) {
    for (output, figure) in &drift.outputs {
        out.set(format!("drift_{output}_cosine"), figure.cosine);
        out.set(format!("drift_{output}_sqnr_db"), figure.sqnr_db);
        out.set(format!("drift_{output}_max_abs"), figure.max_abs);
        out.set(format!("drift_{output}_rmse"), figure.rmse);
        if let Some(agreement) = figure.top1_agreement {
            out.set(format!("drift_{output}_top1_agreement"), agreement);
        }
    }
    out.set("drift_reference", &drift.reference);
    match &drift.budget {
        Some(BudgetVerdict::Met) => out.set("drift_budget", "met"),
        Some(BudgetVerdict::Missed(miss)) => out.set("drift_budget", format!("missed: {miss}")),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use mantissa_runtime::{CudaOptions, ExecutionProvider, TensorRtOptions};

    use super::*;
    use crate::facts::ProviderFallback;

    #[test]
    fn gpu_providers_place_the_group_on_their_device() {
        let cuda = ProviderFacts {
            in_use: ExecutionProvider::Cuda(CudaOptions { device_id: 1, gpu_mem_limit: None }),
            fallback: None,
        };
        assert_eq!(placement(Some(&cuda)), (model_instance_group::Kind::Gpu, vec![1]));
        assert_eq!(cuda.describe(), "cuda (device 1)");
        let trt = ProviderFacts { in_use: ExecutionProvider::TensorRt(TensorRtOptions::default()), fallback: None };
        assert_eq!(placement(Some(&trt)), (model_instance_group::Kind::Gpu, vec![0]));
    }

    #[test]
    fn the_cpu_and_a_fallback_to_it_are_kind_cpu() {
        let fallback = ProviderFacts {
            in_use: ExecutionProvider::Cpu,
            fallback: Some(ProviderFallback {
                requested: "cuda (device 0)".to_owned(),
                requested_kind: "cuda",
                reason: "not available".to_owned(),
            }),
        };
        assert_eq!(placement(Some(&fallback)), (model_instance_group::Kind::Cpu, Vec::new()));
        assert_eq!(fallback.describe(), "cpu (fallback from cuda)");
        assert_eq!(placement(None), (model_instance_group::Kind::Cpu, Vec::new()));
    }
}
