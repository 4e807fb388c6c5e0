//! What the server tells its operators: Prometheus metrics and Triton-style statistics.

pub mod metrics;
pub mod statistics;
