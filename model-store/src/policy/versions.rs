//! Version numbers of a model's variants, and the references to variants elsewhere in the
//! policy (routing, drift, shadow) that may name a variant or give its number.
//!
//! Triton's clients and tools treat a model version as an integer (perf_analyzer parses it
//! with `stoll`), so every variant has one: `version:` when the policy declares it, otherwise
//! the smallest positive number no variant declares, handed out in the order `variants:`
//! lists them. A policy that declares none numbers its variants 1, 2, 3... top to bottom.

use std::collections::BTreeMap;

use super::raw::RawVariants;
use super::types::parse_version;

/// A `version:` that cannot be used: the variant it belongs to and what is wrong.
pub(super) struct VersionError {
    pub(super) variant: String,
    pub(super) message: String,
}

/// The version of every variant, in the order of `variants`.
pub(super) fn assign(variants: &RawVariants) -> Result<Vec<u64>, VersionError> {
    let mut declared: BTreeMap<u64, &str> = BTreeMap::new();
    for (name, variant) in variants {
        let Some(version) = variant.version else { continue };
        let fail = |message: String| VersionError { variant: name.clone(), message };
        // Triton's tools read versions as signed 64-bit integers.
        let version = u64::try_from(version)
            .ok()
            .filter(|&v| v >= 1)
            .ok_or_else(|| fail(format!("expected a positive integer, got {version}")))?;
        if let Some(owner) = declared.insert(version, name) {
            return Err(fail(format!(
                "version {version} is already variant `{owner}`'s; every variant of a model needs its own"
            )));
        }
    }
    let mut next = 1;
    let mut versions = Vec::with_capacity(variants.len());
    for variant in variants.values() {
        let version = match variant.version {
            Some(version) => version as u64,
            None => {
                while declared.contains_key(&next) {
                    next += 1;
                }
                next += 1;
                next - 1
            }
        };
        versions.push(version);
    }
    Ok(versions)
}

/// The variants of a policy by name and version, for resolving references to them.
pub(super) struct Known<'a> {
    variants: Vec<(&'a str, u64)>,
}

impl<'a> Known<'a> {
    pub(super) fn new(variants: &'a RawVariants, versions: &[u64]) -> Self {
        Self { variants: variants.keys().map(String::as_str).zip(versions.iter().copied()).collect() }
    }

    /// The name of the variant `reference` names, by name or by version number.
    pub(super) fn resolve(&self, reference: &str) -> Option<&'a str> {
        let found = match parse_version(reference) {
            Some(version) => self.variants.iter().find(|(_, v)| *v == version),
            None => self.variants.iter().find(|(name, _)| *name == reference),
        };
        found.map(|(name, _)| *name)
    }

    /// The variants for "expected one of" messages: `fp32 (version 1), int8 (version 2)`.
    pub(super) fn listing(&self) -> String {
        let entries: Vec<String> =
            self.variants.iter().map(|(name, version)| format!("{name} (version {version})")).collect();
        entries.join(", ")
    }
}
