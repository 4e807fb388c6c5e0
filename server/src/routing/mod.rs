//! Where a request goes: the registry of models and their variants' states, the A/B split,
//! and the shadow copy of sampled traffic to the reference variant.

pub mod registry;
pub mod shadow;
pub mod split;
