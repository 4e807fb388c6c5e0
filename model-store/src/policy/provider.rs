//! A variant's `execution_provider:` key, in either of its spellings: a provider name
//! (`cuda`) or a map (`{kind: cuda, device_id: 0, gpu_mem_limit: 8GiB, fallback: cpu}`, with
//! `fp16`, `int8` and `engine_cache` for `tensorrt`). Read by serde as written, so unknown keys
//! and names come out with serde's position, then checked for keys that do not fit the kind.

use std::fmt;

use serde::de::{self, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::types::{ExecutionProviderSpec, GpuProvider, GpuProviderSpec, TensorRtSpec};
use crate::byte_size::parse_byte_size;

/// Provider names as the policy spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProviderKind {
    Cpu,
    Cuda,
    Tensorrt,
}

/// What a GPU provider may fall back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Fallback {
    Cpu,
}

/// The map form as written; the size stays a YAML value so that `8GiB` and `8589934592` both
/// read and a wrong one can say what it got.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProviderSettings {
    kind: ProviderKind,
    device_id: Option<u32>,
    gpu_mem_limit: Option<serde_yaml::Value>,
    fallback: Option<Fallback>,
    fp16: Option<bool>,
    int8: Option<bool>,
    engine_cache: Option<bool>,
}

/// `execution_provider:` as written.
#[derive(Debug, Clone)]
pub(super) enum RawExecutionProvider {
    Name(ProviderKind),
    Settings(RawProviderSettings),
}

impl<'de> Deserialize<'de> for RawExecutionProvider {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = RawExecutionProvider;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a provider name (cpu, cuda, tensorrt) or a map with `kind`")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                ProviderKind::deserialize(name.into_deserializer()).map(RawExecutionProvider::Name)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                // Through the map's own access, so serde keeps tracking the key path inside it.
                RawProviderSettings::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawExecutionProvider::Settings)
            }
        }
        deserializer.deserialize_any(Either)
    }
}

/// Device ids beyond this are a mistake in the file, not a machine.
const MAX_DEVICE_ID: u32 = 255;

/// The smallest memory cap accepted: below it no model's weights fit, so it is a typo.
const MIN_GPU_MEM_LIMIT: u64 = 1 << 20;

/// Validates the key. A failure names the leaf under `execution_provider` it concerns (`None`
/// for the key itself) and the message; the caller adds file, line and the path above.
pub(super) fn validate_provider(
    raw: Option<&RawExecutionProvider>,
) -> Result<ExecutionProviderSpec, (Option<&'static str>, String)> {
    let settings = match raw {
        None | Some(RawExecutionProvider::Name(ProviderKind::Cpu)) => return Ok(ExecutionProviderSpec::Cpu),
        Some(RawExecutionProvider::Name(kind)) => RawProviderSettings {
            kind: *kind,
            device_id: None,
            gpu_mem_limit: None,
            fallback: None,
            fp16: None,
            int8: None,
            engine_cache: None,
        },
        Some(RawExecutionProvider::Settings(settings)) => settings.clone(),
    };
    let gpu_only = [
        ("device_id", settings.device_id.is_some()),
        ("gpu_mem_limit", settings.gpu_mem_limit.is_some()),
        ("fallback", settings.fallback.is_some()),
    ];
    let tensorrt_only = [
        ("fp16", settings.fp16.is_some()),
        ("int8", settings.int8.is_some()),
        ("engine_cache", settings.engine_cache.is_some()),
    ];
    let provider = match settings.kind {
        ProviderKind::Cpu => {
            if let Some((key, _)) = gpu_only.iter().chain(&tensorrt_only).find(|(_, set)| *set) {
                return Err((Some(key), format!("`{key}` only applies to kind cuda or tensorrt, not cpu")));
            }
            return Ok(ExecutionProviderSpec::Cpu);
        }
        ProviderKind::Cuda => {
            if let Some((key, _)) = tensorrt_only.iter().find(|(_, set)| *set) {
                return Err((
                    Some(key),
                    format!(
                        "`{key}` only applies to kind tensorrt; CUDA runs the variant's own precision (set `precision: fp16` or `int8` for that)"
                    ),
                ));
            }
            GpuProvider::Cuda
        }
        ProviderKind::Tensorrt => GpuProvider::TensorRt(TensorRtSpec {
            fp16: settings.fp16.unwrap_or(false),
            int8: settings.int8.unwrap_or(false),
            engine_cache: settings.engine_cache.unwrap_or(true),
        }),
    };
    let device_id = settings.device_id.unwrap_or(0);
    if device_id > MAX_DEVICE_ID {
        return Err((Some("device_id"), format!("expected 0..={MAX_DEVICE_ID}, got {device_id}")));
    }
    let gpu_mem_limit = match &settings.gpu_mem_limit {
        None => None,
        Some(value) => Some(memory_limit(value).map_err(|message| (Some("gpu_mem_limit"), message))?),
    };
    Ok(ExecutionProviderSpec::Gpu(GpuProviderSpec {
        provider,
        device_id,
        gpu_mem_limit,
        fallback_to_cpu: settings.fallback == Some(Fallback::Cpu),
    }))
}

/// `gpu_mem_limit`: a size text or a number of bytes, at least [`MIN_GPU_MEM_LIMIT`].
fn memory_limit(value: &serde_yaml::Value) -> Result<u64, String> {
    let bytes = match value {
        serde_yaml::Value::Number(number) => number
            .as_u64()
            .ok_or_else(|| format!("expected a whole number of bytes or a size like 8GiB, got {number}"))?,
        serde_yaml::Value::String(text) => parse_byte_size(text)?,
        other => {
            let shown = serde_yaml::to_string(other).map(|t| t.trim().to_owned()).unwrap_or_default();
            return Err(format!("expected a size like 8GiB or a number of bytes, got {shown}"));
        }
    };
    if bytes < MIN_GPU_MEM_LIMIT {
        return Err(format!("expected at least 1MiB, got {bytes} bytes"));
    }
    Ok(bytes)
}
