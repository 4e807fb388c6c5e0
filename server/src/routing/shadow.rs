//! Live shadow drift: a sample of requests served by a non-reference variant is re-run on the
//! reference variant off the hot path, and the outputs are compared with the same measures as
//! the startup drift. The client's answer never waits for this: samples go through a bounded
//! queue, and a sample that does not fit (or would crowd the reference's own queue) is dropped
//! and counted.

use std::collections::HashMap;
use std::sync::Arc;

use std::collections::BTreeMap;

use mantissa_model_store::{PartBudget, ShadowSettings};
use tokio::sync::mpsc;

use mantissa_preparation::accuracy::{DriftTally, Measures};
use mantissa_runtime::{InferenceRequest, OutputTensor};

use crate::routing::registry::Registry;
use crate::telemetry::metrics;

/// A served request and what the variant answered.
pub struct ShadowSample {
    pub variant: String,
    pub request: InferenceRequest,
    pub outputs: Vec<OutputTensor>,
}

/// Per-model senders into the comparison tasks.
#[derive(Debug, Clone, Default)]
pub struct Shadows {
    senders: HashMap<String, (mpsc::Sender<ShadowSample>, ShadowSettings)>,
}

impl Shadows {
    /// Starts one comparison task per model whose policy has a `shadow` section.
    pub fn start(registry: &Arc<Registry>) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let mut senders = HashMap::new();
        let mut tasks = Vec::new();
        for model in registry.models() {
            let Some(settings) = model.entry.policy.shadow.clone() else { continue };
            let (sender, receiver) = mpsc::channel(settings.queue_size);
            // The same parts as the startup drift check, so live and startup figures line up.
            let parts = model.entry.policy.drift.as_ref().map(|drift| drift.budget.parts.clone()).unwrap_or_default();
            tasks.push(tokio::spawn(compare_samples(
                Arc::clone(registry),
                model.name().to_owned(),
                (settings.clone(), parts),
                receiver,
            )));
            senders.insert(model.name().to_owned(), (sender, settings));
        }
        (Self { senders }, tasks)
    }

    /// Whether a request of `model` served by `variant` should be sampled (decided before it
    /// runs, so only sampled requests are copied).
    pub fn wants(&self, model: &str, variant: &str) -> bool {
        self.senders
            .get(model)
            .is_some_and(|(_, settings)| variant != settings.reference && rand::random::<f64>() < settings.sample_rate)
    }

    /// Hands a sample over without waiting; a full queue drops it.
    pub fn offer(&self, model: &str, sample: ShadowSample) {
        let Some((sender, _)) = self.senders.get(model) else { return };
        let variant = sample.variant.clone();
        if sender.try_send(sample).is_err() {
            metrics::record_shadow_dropped(model, &variant);
        }
    }
}

async fn compare_samples(
    registry: Arc<Registry>,
    model: String,
    (settings, parts): (ShadowSettings, BTreeMap<String, PartBudget>),
    mut samples: mpsc::Receiver<ShadowSample>,
) {
    while let Some(sample) = samples.recv().await {
        let reference =
            registry.model(&model).ok().and_then(|m| m.variant(&settings.reference).ok()).and_then(|v| v.pool().ok());
        let Some(pool) = reference else {
            metrics::record_shadow_dropped(&model, &sample.variant);
            continue;
        };
        // Leave at least half of the reference's queue to its own clients.
        if pool.queue_depth() * 2 >= pool.queue_capacity() {
            metrics::record_shadow_dropped(&model, &sample.variant);
            continue;
        }
        let mut request = sample.request;
        request.outputs = sample
            .outputs
            .iter()
            .filter_map(|o| pool.signature().outputs.iter().position(|s| s.name == o.name))
            .collect();
        let Ok(receiver) = pool.submit_internal(request) else {
            metrics::record_shadow_dropped(&model, &sample.variant);
            continue;
        };
        drop(pool);
        let Ok(Ok(expected)) = receiver.await else {
            metrics::record_shadow_dropped(&model, &sample.variant);
            continue;
        };
        // One sample at a time: each sample is one observation in the drift histograms.
        let mut tally = DriftTally::default();
        if let Err(reason) =
            tally.add_pair(&expected, &sample.outputs, Measures { class_outputs: &[], parts: Some(&parts) })
        {
            tracing::warn!(model = %model, variant = %sample.variant, %reason, "shadow sample not compared");
            metrics::record_shadow_dropped(&model, &sample.variant);
            continue;
        }
        for (output, figures) in &tally.report().outputs {
            metrics::record_shadow_drift(&model, &sample.variant, output, figures);
        }
        metrics::record_shadow_sample(&model, &sample.variant);
    }
}
