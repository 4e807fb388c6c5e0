//! The models this server serves and the state of each variant: loading, ready (with its
//! workers), failed (with the reason), or stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use mantissa_model_store::{BudgetMiss, ModelEntry, VariantSpec};
use ort::environment::Environment;

use crate::artifact_cache::ArtifactCache;
use crate::error::ServeError;
use crate::executor::SessionConfig;
use crate::self_test::batch_invariance;
use crate::variant_build::build_variant_cached;
use crate::worker::{WorkerPool, WorkerPoolConfig};
use crate::{drift, metrics};

/// Serving limits that come from the server's configuration rather than a model's policy.
#[derive(Debug, Clone, Copy)]
pub struct ServingDefaults {
    /// max_batch_size for a batching model whose policy does not set one.
    pub max_batch_size: u32,
    /// Requests a variant may hold waiting for a worker.
    pub queue_capacity: usize,
}

#[derive(Debug)]
pub enum VariantState {
    Loading,
    Ready(Arc<WorkerPool>, Arc<BTreeMap<String, String>>),
    Failed(String),
    Stopped,
}

#[derive(Debug)]
pub struct Variant {
    pub spec: VariantSpec,
    state: RwLock<VariantState>,
}

impl Variant {
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

    /// Facts about how the variant was built (precision pass figures, artifact size).
    pub fn parameters(&self) -> Arc<BTreeMap<String, String>> {
        match &*self.state.read().unwrap_or_else(|poison| poison.into_inner()) {
            VariantState::Ready(_, parameters) => Arc::clone(parameters),
            _ => Arc::default(),
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

    fn set(&self, state: VariantState) -> VariantState {
        std::mem::replace(&mut *self.state.write().unwrap_or_else(|poison| poison.into_inner()), state)
    }
}

/// How variants are built at startup.
#[derive(Debug, Clone, Default)]
pub struct BuildSettings {
    /// Variants built at the same time.
    pub concurrency: usize,
    /// Content-addressed store of built variants; `None` builds every start.
    pub cache: Option<ArtifactCache>,
}

/// A variant whose workers run, with the parameters its metadata will show.
type LoadedVariant = (Arc<WorkerPool>, BTreeMap<String, String>);

/// Builds a variant and starts its workers; on failure records why and returns `None`.
fn load_variant(
    environment: &Arc<Environment>,
    model: &ServedModel,
    variant: &Variant,
    defaults: ServingDefaults,
    cache: Option<&ArtifactCache>,
) -> Option<LoadedVariant> {
    let label = format!("{}:{}", model.name(), variant.spec.name);
    let started = std::time::Instant::now();
    tracing::info!(model = model.name(), variant = %variant.spec.name, precision = variant.spec.precision.as_str(), "building variant");
    let built = match build_variant_cached(environment, &model.entry, &variant.spec, cache) {
        Ok(built) => built,
        Err(reason) => {
            tracing::error!(model = model.name(), variant = %variant.spec.name, %reason, "variant failed to build");
            variant.set(VariantState::Failed(reason));
            return None;
        }
    };
    if let Ok(bytes) = built.parameters.get("artifact_bytes").map_or(Ok(0), |b| b.parse::<u64>()) {
        metrics::set_build_figures(model.name(), &variant.spec.name, started.elapsed(), bytes);
    }
    let serving = &variant.spec.serving;
    let config = WorkerPoolConfig {
        label,
        model_name: model.name().to_owned(),
        variant_name: variant.spec.name.clone(),
        model: built.source,
        instances: serving.instances,
        session: SessionConfig {
            intra_op_threads: serving.intra_op_threads,
            intra_op_spinning: serving.intra_op_spinning,
        },
        max_batch_size: serving.max_batch_size,
        default_max_batch_size: defaults.max_batch_size,
        queue_capacity: serving.max_queue_size.map_or(defaults.queue_capacity, |size| size as usize),
        dynamic_batching: serving.dynamic_batching,
        max_queue_delay: serving.max_queue_delay,
        preferred_batch_sizes: serving.preferred_batch_sizes.iter().map(|&size| size as usize).collect(),
    };
    match WorkerPool::start(Arc::clone(environment), config) {
        Ok(pool) => {
            let mut parameters = built.parameters;
            parameters.extend(batch_invariance(&pool, variant.spec.precision));
            tracing::info!(
                model = model.name(),
                variant = %variant.spec.name,
                instances = serving.instances,
                max_batch_size = pool.signature().max_batch_size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "variant built and warmed up"
            );
            Some((Arc::new(pool), parameters))
        }
        Err(reason) => {
            tracing::error!(model = model.name(), variant = %variant.spec.name, %reason, "variant failed to load");
            variant.set(VariantState::Failed(reason));
            None
        }
    }
}

/// Compares each loaded variant of `model` with the drift reference on holdout data, records
/// the figures (parameters, gauges, log), and removes variants that miss the budget when the
/// policy says so.
fn check_drift(model: &ServedModel, loaded: &mut HashMap<(String, String), LoadedVariant>) {
    let Some(settings) = &model.entry.policy.drift else { return };
    let key = |variant: &str| (model.name().to_owned(), variant.to_owned());
    let Some(reference) = loaded.get(&key(&settings.reference)).map(|(pool, _)| Arc::clone(pool)) else {
        tracing::warn!(model = model.name(), reference = %settings.reference, "drift reference did not load; drift not measured");
        return;
    };
    for variant in model.variants.iter().filter(|v| v.spec.name != settings.reference) {
        let Some((pool, parameters)) = loaded.get_mut(&key(&variant.spec.name)) else { continue };
        let figures = match drift::measure(&reference, pool, settings) {
            Ok(figures) => figures,
            Err(reason) => {
                tracing::warn!(model = model.name(), variant = %variant.spec.name, %reason, "drift not measured");
                continue;
            }
        };
        for (output, figure) in &figures {
            tracing::info!(
                model = model.name(),
                variant = %variant.spec.name,
                output = %output,
                cosine = figure.cosine,
                sqnr_db = figure.sqnr_db,
                max_abs = figure.max_abs,
                rmse = figure.rmse,
                top1_agreement = ?figure.top1_agreement,
                "startup drift against {}", settings.reference
            );
            metrics::set_startup_drift(model.name(), &variant.spec.name, output, figure);
            parameters.insert(format!("drift_{output}_cosine"), format!("{}", figure.cosine));
            parameters.insert(format!("drift_{output}_sqnr_db"), format!("{}", figure.sqnr_db));
            parameters.insert(format!("drift_{output}_max_abs"), format!("{}", figure.max_abs));
            parameters.insert(format!("drift_{output}_rmse"), format!("{}", figure.rmse));
            if let Some(agreement) = figure.top1_agreement {
                parameters.insert(format!("drift_{output}_top1_agreement"), format!("{agreement}"));
            }
        }
        parameters.insert("drift_reference".to_owned(), settings.reference.clone());
        if let Some(miss) = drift::budget_miss(&figures, settings) {
            match settings.on_budget_miss {
                BudgetMiss::NotReady => {
                    tracing::error!(model = model.name(), variant = %variant.spec.name, %miss, "variant misses its drift budget; not serving it");
                    if let Some((pool, _)) = loaded.remove(&key(&variant.spec.name))
                        && let Some(pool) = Arc::into_inner(pool)
                    {
                        pool.shutdown();
                    }
                    variant.set(VariantState::Failed(format!("drift budget missed: {miss}")));
                }
                BudgetMiss::ServeFlagged => {
                    tracing::warn!(model = model.name(), variant = %variant.spec.name, %miss, "variant misses its drift budget; serving it flagged");
                    parameters.insert("drift_budget".to_owned(), format!("missed: {miss}"));
                }
            }
        } else if settings.budget.min_cosine.is_some() || settings.budget.min_top1_agreement.is_some() {
            parameters.insert("drift_budget".to_owned(), "met".to_owned());
        }
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

    pub fn version_names(&self) -> Vec<String> {
        self.variants.iter().map(|variant| variant.spec.name.clone()).collect()
    }

    /// The variant a request addresses: an explicit `model_version`, or the policy's default.
    pub fn variant(&self, version: &str) -> Result<&Variant, ServeError> {
        let wanted = if version.is_empty() { self.entry.policy.default_variant.as_str() } else { version };
        self.variants.iter().find(|variant| variant.spec.name == wanted).ok_or_else(|| ServeError::VersionNotFound {
            model: self.entry.name.clone(),
            version: version.to_owned(),
            available: self.version_names(),
        })
    }

    /// The variant that serves a request: an explicit `model_version`, else the policy's split
    /// (pinned by the split's key parameter when the request carries it, random otherwise),
    /// else the default.
    pub fn route(
        &self,
        version: &str,
        sticky_key: impl FnOnce(&str) -> Option<String>,
    ) -> Result<&Variant, ServeError> {
        if !version.is_empty() {
            return self.variant(version);
        }
        match &self.entry.policy.split {
            Some(split) => {
                let chosen = match sticky_key(&split.key) {
                    Some(key) => split.pick_for_key(&key),
                    None => split.pick(rand::random::<u64>()),
                };
                self.variant(chosen)
            }
            None => self.variant(""),
        }
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

    /// Builds every variant's workers (blocking: run it off the async runtime). Failures are
    /// recorded on the variant and logged; the other variants still load.
    pub fn load_all(&self, environment: &Arc<Environment>, defaults: ServingDefaults, build: &BuildSettings) {
        let jobs: Vec<(&ServedModel, &Variant)> =
            self.models.values().flat_map(|model| model.variants.iter().map(move |variant| (model, variant))).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let built: Vec<std::sync::Mutex<Option<LoadedVariant>>> =
            jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let workers = build.concurrency.clamp(1, jobs.len().max(1));
        // Variants build concurrently, at most `concurrency` at a time: calibration and passes
        // are CPU-bound, so more would only slow each other down.
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let position = next.fetch_add(1, Ordering::Relaxed);
                        let Some((model, variant)) = jobs.get(position) else { break };
                        let loaded = load_variant(environment, model, variant, defaults, build.cache.as_ref());
                        *built[position].lock().unwrap_or_else(|p| p.into_inner()) = loaded;
                    }
                });
            }
        });
        let mut loaded: HashMap<(String, String), LoadedVariant> = HashMap::new();
        for ((model, variant), slot) in jobs.iter().zip(built) {
            if let Some(result) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
                loaded.insert((model.name().to_owned(), variant.spec.name.clone()), result);
            }
        }
        // Drift against the reference on holdout data, then readiness.
        for model in self.models.values() {
            check_drift(model, &mut loaded);
            for variant in &model.variants {
                if let Some((pool, parameters)) = loaded.remove(&(model.name().to_owned(), variant.spec.name.clone())) {
                    metrics::set_variant_ready(model.name(), &variant.spec.name, true);
                    variant.set(VariantState::Ready(pool, Arc::new(parameters)));
                } else {
                    metrics::set_variant_ready(model.name(), &variant.spec.name, false);
                }
            }
        }
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
