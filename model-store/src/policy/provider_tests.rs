//! `execution_provider:` through the public entry point: both spellings, the defaults, and
//! errors naming file, line and key.

use std::path::Path;

use super::{ExecutionProviderSpec, GpuProvider, GpuProviderSpec, Policy, PolicyError, TensorRtSpec};

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(text, Path::new("store/m/policy.yaml"))
}

/// A one-variant policy whose variant carries `provider` (YAML at the variant's indentation).
fn with_provider(provider: &str) -> Result<ExecutionProviderSpec, PolicyError> {
    let text = format!("variants:\n  gpu:\n    precision: fp32\n{provider}");
    parse(&text).map(|policy| policy.variants[0].execution_provider.clone())
}

#[test]
fn the_cpu_is_the_default() {
    assert_eq!(with_provider("").unwrap(), ExecutionProviderSpec::Cpu);
    assert_eq!(with_provider("    execution_provider: cpu\n").unwrap(), ExecutionProviderSpec::Cpu);
    assert_eq!(with_provider("    execution_provider: {kind: cpu}\n").unwrap(), ExecutionProviderSpec::Cpu);
    assert_eq!(Policy::default_fp32().variants[0].execution_provider, ExecutionProviderSpec::Cpu);
}

#[test]
fn a_plain_name_takes_the_defaults() {
    let cuda = with_provider("    execution_provider: cuda\n").unwrap();
    assert_eq!(
        cuda,
        ExecutionProviderSpec::Gpu(GpuProviderSpec {
            provider: GpuProvider::Cuda,
            device_id: 0,
            gpu_mem_limit: None,
            fallback_to_cpu: false,
        })
    );
    let ExecutionProviderSpec::Gpu(trt) = with_provider("    execution_provider: tensorrt\n").unwrap() else {
        panic!("tensorrt is a GPU provider");
    };
    assert_eq!(trt.provider, GpuProvider::TensorRt(TensorRtSpec { fp16: false, int8: false, engine_cache: true }));
}

#[test]
fn the_map_form_sets_device_memory_and_fallback() {
    let spec = with_provider(
        "    execution_provider:\n      kind: cuda\n      device_id: 1\n      gpu_mem_limit: 8GiB\n      fallback: cpu\n",
    )
    .unwrap();
    assert_eq!(
        spec,
        ExecutionProviderSpec::Gpu(GpuProviderSpec {
            provider: GpuProvider::Cuda,
            device_id: 1,
            gpu_mem_limit: Some(8 << 30),
            fallback_to_cpu: true,
        })
    );
    assert_eq!(spec.kind(), "cuda");
    let inline = with_provider("    execution_provider: {kind: cuda, gpu_mem_limit: 1073741824}\n").unwrap();
    let ExecutionProviderSpec::Gpu(inline) = inline else { panic!("cuda is a GPU provider") };
    assert_eq!(inline.gpu_mem_limit, Some(1 << 30));
}

#[test]
fn tensorrt_takes_its_switches() {
    let spec = with_provider(
        "    execution_provider:\n      kind: tensorrt\n      fp16: true\n      int8: true\n      engine_cache: false\n",
    )
    .unwrap();
    let ExecutionProviderSpec::Gpu(gpu) = spec else { panic!("tensorrt is a GPU provider") };
    assert_eq!(gpu.provider, GpuProvider::TensorRt(TensorRtSpec { fp16: true, int8: true, engine_cache: false }));
    assert!(!gpu.fallback_to_cpu);
}

/// Asserts the error's line, key and a piece of its message, and that its text starts with
/// `file:line: key`.
fn assert_error(provider: &str, line: usize, key: &str, message: &str) {
    let err = with_provider(provider).unwrap_err();
    assert_eq!((err.line, err.key.as_str()), (Some(line), key), "{err}");
    assert!(err.message.contains(message), "expected '{message}' in: {err}");
    assert!(err.to_string().starts_with(&format!("store/m/policy.yaml:{line}: key `{key}`")), "{err}");
}

#[test]
fn unknown_names_and_keys_name_file_line_and_key() {
    assert_error(
        "    execution_provider: rocm\n",
        4,
        "variants.gpu.execution_provider",
        "unknown variant `rocm`, expected one of `cpu`, `cuda`, `tensorrt`",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      device: 0\n",
        6,
        "variants.gpu.execution_provider.device",
        "unknown field `device`",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      fallback: cuda\n",
        6,
        "variants.gpu.execution_provider.fallback",
        "unknown variant `cuda`, expected `cpu`",
    );
    assert_error("    execution_provider: [cuda]\n", 4, "variants.gpu.execution_provider", "a provider name");
    assert_error(
        "    execution_provider:\n      device_id: 0\n",
        5,
        "variants.gpu.execution_provider",
        "missing field `kind`",
    );
}

#[test]
fn keys_that_do_not_fit_the_kind_are_rejected() {
    assert_error(
        "    execution_provider:\n      kind: cpu\n      fallback: cpu\n",
        6,
        "variants.gpu.execution_provider.fallback",
        "only applies to kind cuda or tensorrt",
    );
    assert_error(
        "    execution_provider:\n      kind: cpu\n      device_id: 1\n",
        6,
        "variants.gpu.execution_provider.device_id",
        "only applies to kind cuda or tensorrt",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      fp16: true\n",
        6,
        "variants.gpu.execution_provider.fp16",
        "only applies to kind tensorrt",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      engine_cache: true\n",
        6,
        "variants.gpu.execution_provider.engine_cache",
        "only applies to kind tensorrt",
    );
}

#[test]
fn bad_values_are_rejected_with_what_was_expected() {
    assert_error(
        "    execution_provider:\n      kind: cuda\n      device_id: 300\n",
        6,
        "variants.gpu.execution_provider.device_id",
        "expected 0..=255, got 300",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      gpu_mem_limit: 8 gigs\n",
        6,
        "variants.gpu.execution_provider.gpu_mem_limit",
        "expected a size like 8GiB",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      gpu_mem_limit: 1024\n",
        6,
        "variants.gpu.execution_provider.gpu_mem_limit",
        "expected at least 1MiB, got 1024 bytes",
    );
    assert_error(
        "    execution_provider:\n      kind: cuda\n      gpu_mem_limit: -1\n",
        6,
        "variants.gpu.execution_provider.gpu_mem_limit",
        "expected a whole number of bytes",
    );
    assert_error(
        "    execution_provider:\n      kind: tensorrt\n      fp16: yes please\n",
        6,
        "variants.gpu.execution_provider.fp16",
        "invalid type",
    );
}

#[test]
fn each_variant_has_its_own_provider() {
    let policy = parse(
        "variants:\n  cpu:\n    precision: fp32\n  gpu:\n    precision: fp16\n    execution_provider: {kind: cuda, fallback: cpu}\nrouting:\n  default: cpu\n",
    )
    .unwrap();
    assert_eq!(policy.variant("cpu").unwrap().execution_provider, ExecutionProviderSpec::Cpu);
    assert_eq!(policy.variant("gpu").unwrap().execution_provider.kind(), "cuda");
}
