//! The passes, each a function from model to model: [`canonicalize`] first (each pass applies
//! the steps it needs; static INT8's includes [`batch_norm_folding`]), then one precision pass,
//! [`fp16`] or one of [`int8`]'s.

pub mod batch_norm_folding;
pub mod canonicalize;
pub mod fp16;
pub mod int8;
