//! Model preparation: what happens to a model between its FP32 file and the sessions that
//! serve it. The flow, one module per step:
//!
//! - [`build`]: parse the model and run the variant's precision pass ([`build_variant`]);
//! - [`int8`]: the INT8 step (dynamic, weight-only, or static: calibrate, then search);
//! - [`auto_int8`]: `mode: auto`, the fastest of the forms [`int8`] builds that meets the budget,
//!   timed on this CPU, the dynamic form through its own budget search ([`dynamic_search`]);
//! - [`calibrate`]: static calibration on sample data, each sample run once through the graph's
//!   segments ([`segmented`]; tensor groups where a model cannot be cut);
//! - [`search`]: the accuracy-budget search that keeps the most sensitive nodes FP32, ranking
//!   them by [`sensitivity`] (local SQNR from instrumented runs) and searching how many to keep
//!   with [`prefix_search`] (galloping and bisection, free of models so it is tested alone);
//! - [`accuracy`]: the one comparison loop, shared with the server's startup drift check and
//!   live shadow comparison, and [`budget_check`], whether its report meets a budget;
//! - [`output_parts`]: the parts of an output whose channels live on different scales (a
//!   detection head's boxes and scores), which the comparison measures on their own, and
//!   [`named_parts`], the parts a policy names with thresholds of their own;
//! - [`cache`] and [`cached`]: the content-addressed artifact cache and building through it;
//! - [`providers`]: the policy's execution provider as the runtime's session setting;
//! - [`facts`]: typed facts about how a variant was built;
//! - [`error`]: the one error type, [`PrepareError`].
//!
//! Models run through `mantissa-runtime` sessions opened here, or through closures the caller
//! passes (the server's workers); nothing here knows about gRPC or serving workers.

pub mod accuracy;
pub mod auto_int8;
pub mod budget_check;
pub mod build;
pub mod cache;
pub mod cached;
pub mod calibrate;
pub(crate) mod dynamic_search;
pub mod error;
pub mod facts;
pub mod int8;
pub mod named_parts;
pub mod output_parts;
pub mod prefix_search;
pub mod providers;
pub mod search;
pub mod segmented;
pub mod sensitivity;

pub use build::{BuiltVariant, build_variant};
pub use cache::ArtifactCache;
pub use cached::build_variant_cached;
pub use error::PrepareError;
pub use facts::BuildFacts;
pub use providers::{session_provider, wants_engine_cache};
