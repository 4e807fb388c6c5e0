//! The models this server serves and the state of each variant: loading, ready (with its
//! workers), failed (with the reason), or stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use mantissa_model_store::{ModelEntry, VariantSpec, parse_version};

use crate::error::ServeError;
use crate::facts::VariantFacts;
use crate::scheduling::workers::WorkerPool;

#[derive(Debug)]
pub enum VariantState {
    Loading,
    Ready(Arc<WorkerPool>, Arc<VariantFacts>),
    Failed(String),
    Stopped,
}

#[derive(Debug)]
pub struct Variant {
    pub spec: VariantSpec,
    state: RwLock<VariantState>,
}

impl Variant {
    /// The version number as the protocol carries it.
    pub fn version(&self) -> String {
        self.spec.version.to_string()
    }

    /// Version and name together, for messages a person reads: `3 (int8)`.
    pub fn label(&self) -> String {
        format!("{} ({})", self.spec.version, self.spec.name)
    }

    /// The running workers, or why there are none.
    pub fn pool(&self) -> Result<Arc<WorkerPool>, String> {
        match &*self.state.read().unwrap_or_else(|poison| poison.into_inner()) {
            VariantState::Ready(pool, _) => Ok(Arc::clone(pool)),
            VariantState::Loading => Err("still loading".to_owned()),
            VariantState::Failed(reason) => Err(format!("failed to load: {reason}")),
            VariantState::Stopped => Err("stopped".to_owned()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.pool().is_ok()
    }

    /// Facts about how the variant was built and checked, once it is ready.
    pub fn facts(&self) -> Option<Arc<VariantFacts>> {
        match &*self.state.read().unwrap_or_else(|poison| poison.into_inner()) {
            VariantState::Ready(_, facts) => Some(Arc::clone(facts)),
            _ => None,
        }
    }

    /// A short state name as used by RepositoryIndex.
    pub fn state_name(&self) -> (&'static str, String) {
        match &*self.state.read().unwrap_or_else(|poison| poison.into_inner()) {
            VariantState::Loading => ("LOADING", String::new()),
            VariantState::Ready(..) => ("READY", String::new()),
            VariantState::Failed(reason) => ("UNAVAILABLE", reason.clone()),
            VariantState::Stopped => ("UNAVAILABLE", "stopped".to_owned()),
        }
    }

    /// Moves the variant to `state` (the lifecycle's job), returning the state it left.
    pub fn set(&self, state: VariantState) -> VariantState {
        std::mem::replace(&mut *self.state.write().unwrap_or_else(|poison| poison.into_inner()), state)
    }
}

#[derive(Debug)]
pub struct ServedModel {
    pub entry: ModelEntry,
    pub variants: Vec<Variant>,
}

impl ServedModel {
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The numeric versions of every variant, lowest first, as ModelMetadata lists them.
    pub fn version_numbers(&self) -> Vec<String> {
        let mut versions: Vec<u64> = self.variants.iter().map(|variant| variant.spec.version).collect();
        versions.sort_unstable();
        versions.into_iter().map(|version| version.to_string()).collect()
    }

    /// The variant a request addresses: `model_version` as a version number or a variant
    /// name, or the policy's default when it is empty.
    pub fn variant(&self, version: &str) -> Result<&Variant, ServeError> {
        let wanted = if version.is_empty() { self.entry.policy.default_variant.as_str() } else { version };
        let found = match parse_version(wanted) {
            Some(number) => self.variants.iter().find(|variant| variant.spec.version == number),
            None => self.variants.iter().find(|variant| variant.spec.name == wanted),
        };
        found.ok_or_else(|| ServeError::VersionNotFound {
            model: self.entry.name.clone(),
            version: version.to_owned(),
            available: self.variants.iter().map(Variant::label).collect(),
        })
    }

    /// A model is ready when its default variant is.
    pub fn is_ready(&self) -> bool {
        self.variant("").is_ok_and(Variant::is_ready)
    }
}

/// Every model, shared by the gRPC handlers through an `Arc`.
#[derive(Debug)]
pub struct Registry {
    models: BTreeMap<String, ServedModel>,
    loading_done: AtomicBool,
}

impl Registry {
    pub fn new(entries: Vec<ModelEntry>) -> Self {
        let models = entries
            .into_iter()
            .map(|entry| {
                let variants = entry
                    .policy
                    .variants
                    .iter()
                    .map(|spec| Variant { spec: spec.clone(), state: RwLock::new(VariantState::Loading) })
                    .collect();
                (entry.name.clone(), ServedModel { entry, variants })
            })
            .collect();
        Self { models, loading_done: AtomicBool::new(false) }
    }

    pub fn models(&self) -> impl Iterator<Item = &ServedModel> {
        self.models.values()
    }

    pub fn model(&self, name: &str) -> Result<&ServedModel, ServeError> {
        self.models.get(name).ok_or_else(|| ServeError::ModelNotFound {
            model: name.to_owned(),
            available: self.models.keys().cloned().collect(),
        })
    }

    /// True once loading finished and every model's default variant is ready.
    pub fn is_ready(&self) -> bool {
        self.loading_done.load(Ordering::Acquire) && self.models.values().all(ServedModel::is_ready)
    }

    /// Records that startup loading finished (whatever its outcome).
    pub fn mark_loaded(&self) {
        self.loading_done.store(true, Ordering::Release);
    }

    /// Stops every variant: queued work finishes, then the workers are joined (blocking).
    pub fn shutdown(&self) {
        for model in self.models.values() {
            for variant in &model.variants {
                if let VariantState::Ready(pool, _) = variant.set(VariantState::Stopped) {
                    match Arc::into_inner(pool) {
                        Some(pool) => pool.shutdown(),
                        None => {
                            tracing::warn!(model = model.name(), variant = %variant.spec.name, "workers still referenced at shutdown")
                        }
                    }
                }
            }
        }
    }
}
