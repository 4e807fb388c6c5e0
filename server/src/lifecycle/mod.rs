//! The server's life: startup (listeners, loading every variant, readiness), the checks a
//! variant passes before it serves (batch-invariance self-test, startup drift), and shutdown.

pub mod loading;
pub mod providers;
pub mod self_test;
pub mod startup;
pub mod startup_drift;

use std::collections::HashMap;
use std::sync::Arc;

use crate::facts::VariantFacts;
use crate::scheduling::workers::WorkerPool;

/// A variant whose workers run, with the facts its metadata will show: what loading hands to
/// the startup drift check before the variant becomes ready.
pub(crate) type LoadedVariant = (Arc<WorkerPool>, VariantFacts);

/// Loaded variants by (model, variant) name.
pub(crate) type LoadedVariants = HashMap<(String, String), LoadedVariant>;
