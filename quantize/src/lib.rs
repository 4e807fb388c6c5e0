//! ONNX models in, ONNX models out.
//!
//! Modules, one line each, in dependency order (each uses only modules above it):
//! - [`onnx`]: protobuf types generated from our `onnx.proto` (field numbers as in ONNX).
//! - [`elem`]: the ONNX element type numbers the passes use.
//! - `model_io`: load and save models with external data ([`load_model`], [`save_model`], ...).
//! - [`types`]: element-type inference for every value of a graph.
//! - [`type_check`]: the element-type check each pass runs on its output.
//! - [`ranks`]: rank inference, where ONNX Runtime's fusions depend on ranks.
//! - [`tensor`]: reading, building and narrowing initializer values.
//! - [`graph`]: the read-only index: producers, consumers, topological order, first/last layers.
//! - [`rewrite`]: rewrite helpers: fresh names, renaming, edge insertion, bias folding, dead code.
//! - [`split`]: a model cut into consecutive segment models (calibration runs them in turn).
//! - [`calibration`]: streamed range histograms and percentile/entropy/MSE threshold searches.
//! - [`quant_params`]: scale/zero-point math: activations, per-channel weights, int32 bias, blocks.
//! - [`passes::canonicalize`]: Constant nodes to initializers and topological order.
//! - [`passes::fp16`]: FP32 -> FP16, keeping precision-sensitive work in FP32.
//! - [`passes::int8`]: dynamic, static (QDQ) and weight-only INT8, and embedding tables.
//!
//! No tokio, no gRPC and no ONNX Runtime here: a pass is a function from model to model.

pub mod calibration;
pub mod elem;
pub mod graph;
mod model_io;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod onnx;
pub mod passes;
pub mod quant_params;
pub mod ranks;
pub mod rewrite;
pub mod split;
pub mod tensor;
#[cfg(test)]
mod test_support;
pub mod type_check;
pub mod types;

pub use model_io::{ModelIoError, SaveOptions, load_model, load_model_from_bytes, save_model, to_bytes};
