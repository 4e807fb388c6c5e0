//! The protocol surface: the gRPC handlers, request validation, typed-contents decoding and
//! the ModelConfig a variant is described by.

pub mod contents;
pub mod model_config;
pub mod service;
pub mod validation;
