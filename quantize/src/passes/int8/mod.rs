//! INT8 quantization passes: dynamic, static (QDQ) and weight-only.
//!
//! - Dynamic: MatMul/Gemm with constant weights become `com.microsoft.DynamicQuantizeMatMul`
//!   (int8 weights, symmetric, one scale per output column; activations quantized per run),
//!   with a following bias Add moved into the node. The fused op was picked over
//!   DynamicQuantizeLinear + MatMulInteger + Cast + Mul because ONNX Runtime 1.31 runs it as
//!   one MLAS u8s8 GEMM without materialising the int32 product: measured with
//!   `scripts/time_dynamic_forms.py`, the standard-ops form is 1.03-1.24x slower at
//!   ORT_ENABLE_BASIC and within noise at ORT_ENABLE_ALL (where ONNX Runtime fuses it back).
//!   Where several such nodes read one activation (an attention block's query, key and value
//!   projections), one DynamicQuantizeLinear quantizes it for all of them and each becomes
//!   `com.microsoft.MatMulIntegerToFloat`: the form ONNX Runtime's own optimizer leaves from
//!   its quantize_dynamic output (`scripts/corpus/dynamic_forms.py` counts both graphs' ops).
//!   In dynamic mode the first/last-layer rule keeps only the model's ends FP32
//!   ([`crate::graph::model_ends`]).
//!   Conv is left in FP32: ConvInteger has no fast kernel.
//! - Static (QDQ): QuantizeLinear/DequantizeLinear pairs around Conv/MatMul/Gemm and the ops
//!   between them, placed so ONNX Runtime fuses them into QLinearConv/QLinearMatMul; see
//!   [`quantize_static`].
//! - Weight-only: MatMul/Gemm weights become `com.microsoft.MatMulNBits` blocks; see
//!   [`quantize_weight_only`].
//!
//! Defaults follow precision-rules.md: the first and last compute layers, Softmax and
//! normalisations stay FP32; `op_types_exclude` and `nodes_exclude` add exclusions.
//!
//! Files: `options` (options, node selection, errors, report), `checked` (the type check and
//! notes every pass runs under), `notes` (an already-quantized model, why nothing was
//! quantized), `linear_walker` (finds MatMul/Gemm with constant weights in the main graph and
//! in If/Loop/Scan subgraphs and applies a weight rewrite to them), `dynamic`, `weight_only` and
//! `embeddings` (the weight rewrites), `static_plan` (which nodes and tensors get Q/DQ pairs)
//! and `static_rewrite` (inserting them).

mod checked;
mod dynamic;
mod embeddings;
mod linear_walker;
mod notes;
mod options;
mod static_plan;
mod static_rewrite;
mod weight_only;

pub use dynamic::quantize_dynamic;
pub use options::{
    ActivationType, Int8Error, Int8Mode, Int8Options, Int8Report, SkipReason, cpu_has_vnni, validate_options,
};
pub use static_plan::{Ranges, tensors_needing_full_range, tensors_to_calibrate, tensors_to_calibrate_for_search};
pub use static_rewrite::quantize_static;
pub use weight_only::quantize_weight_only;
