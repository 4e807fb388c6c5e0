//! The server's life: startup (listeners, loading every variant, readiness), the checks a
//! variant passes before it serves (batch-invariance self-test, startup drift), and shutdown.

pub mod loading;
pub mod self_test;
pub mod startup;
pub mod startup_drift;
