//! ONNX models in, ONNX models out.
//!
//! - [`onnx`]: protobuf types generated from our `onnx.proto` (field numbers as in ONNX).
//! - [`model_io`]: load and save models, including external-data initializers.
//! - [`graph`]: an index of producers and consumers, topological order, unique names and the
//!   rewrite helpers passes use.
//! - [`types`]: element-type inference for every value of a graph; [`ranks`]: rank inference.
//! - [`tensor`]: reading and writing initializer values.
//! - [`fp16`]: the FP32 -> FP16 pass that keeps precision-sensitive work in FP32.
//! - [`int8`] and [`int8_static`]: dynamic and static (QDQ) INT8; [`calibration`] holds the
//!   range statistics static calibration streams into.
//!
//! No tokio, no gRPC and no ONNX Runtime here: a pass is a function from model to model.

pub mod calibration;
pub mod fp16;
pub mod graph;
pub mod int8;
pub mod int8_static;
pub mod model_io;
pub mod ranks;
pub mod tensor;
pub mod types;

/// Generated ONNX protobuf types.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use model_io::{ModelIoError, SaveOptions, load_model, load_model_from_bytes, save_model, to_bytes};

/// ONNX's element type numbers (`TensorProto.DataType`) used by the passes.
pub mod elem {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const STRING: i32 = 8;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
}
