//! Batch-invariance self-test: a batch of N rows must give the same outputs as N single-row
//! runs, within the variant's tolerance. Run once per batching variant before it is ready.

use mantissa_model_store::Precision;
use mantissa_runtime::{DataType, InferenceRequest, InputTensor, ModelSignature, TensorData};

use crate::facts::BatchInvariance;
use crate::scheduling::batcher;
use crate::scheduling::workers::WorkerPool;

const ROWS: usize = 4;

/// Allowed difference relative to the largest output magnitude. Dynamic INT8 picks activation
/// scales per run, so a batch and a single row legitimately quantize differently.
fn tolerance(precision: Precision) -> f32 {
    match precision {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 => 1e-2,
        Precision::Int8 => 1e-1,
    }
}

/// One row of deterministic pseudo-random inputs (floats in [0, 1), integers 0, strings empty).
fn row(signature: &ModelSignature, seed: u64) -> InferenceRequest {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let inputs = signature
        .inputs
        .iter()
        .map(|spec| {
            let mut shape: Vec<i64> = spec.dims.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
            shape[0] = 1;
            let elements: usize = shape.iter().map(|&d| d as usize).product();
            let data = match spec.datatype {
                DataType::Fp32 => TensorData::Raw((0..elements).flat_map(|_| next().to_le_bytes()).collect()),
                DataType::Fp64 => {
                    TensorData::Raw((0..elements).flat_map(|_| f64::from(next()).to_le_bytes()).collect())
                }
                DataType::Fp16 => {
                    TensorData::Raw((0..elements).flat_map(|_| half::f16::from_f32(next()).to_le_bytes()).collect())
                }
                DataType::Bytes => TensorData::Strings(vec![String::new(); elements]),
                other => TensorData::Raw(vec![0; elements * other.element_size().unwrap_or(1)]),
            };
            InputTensor { datatype: spec.datatype, shape, data }
        })
        .collect();
    InferenceRequest { id: format!("self-test-{seed}"), inputs, outputs: (0..signature.outputs.len()).collect() }
}

fn floats(datatype: DataType, raw: &[u8]) -> Vec<f32> {
    match datatype {
        DataType::Fp32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DataType::Fp16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DataType::Fp64 => {
            raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect()
        }
        _ => raw.iter().map(|&b| f32::from(b)).collect(),
    }
}

/// Runs the test through the variant's own workers (blocking) and returns its outcome: the
/// largest difference seen and whether it is within tolerance. `None` for variants that do
/// not batch enough rows to test.
pub fn batch_invariance(pool: &WorkerPool, precision: Precision) -> Option<BatchInvariance> {
    let signature = pool.signature();
    if !signature.batches() || (signature.max_batch_size as usize) < ROWS {
        return None;
    }
    let rows: Vec<InferenceRequest> = (0..ROWS as u64).map(|seed| row(signature, seed + 1)).collect();
    let run = |request: InferenceRequest| pool.run_internal_blocking(request).ok();
    // One at a time, so the batcher cannot merge the single-row runs.
    let singles: Option<Vec<_>> = rows.iter().cloned().map(run).collect();
    let references: Vec<&InferenceRequest> = rows.iter().collect();
    let batch = run(batcher::merge(&references, signature.outputs.len()));
    let (Some(singles), Some(batch)) = (singles, batch) else {
        return Some(BatchInvariance::NotRun);
    };
    let mut max_diff = 0f32;
    let mut max_value = 0f32;
    for (output_index, batched) in batch.iter().enumerate() {
        let all = floats(batched.datatype, &batched.raw);
        let per_row = all.len() / ROWS;
        for (row_index, single) in singles.iter().enumerate() {
            let alone = floats(single[output_index].datatype, &single[output_index].raw);
            for (a, b) in alone.iter().zip(&all[row_index * per_row..(row_index + 1) * per_row]) {
                max_diff = max_diff.max((a - b).abs());
                max_value = max_value.max(a.abs());
            }
        }
    }
    let limit = tolerance(precision) * max_value.max(1.0);
    let passed = max_diff <= limit;
    if passed {
        tracing::info!(variant = %pool.label(), max_abs_diff = max_diff, limit, "batch invariance self-test passed");
    } else {
        tracing::warn!(variant = %pool.label(), max_abs_diff = max_diff, limit, "batch invariance self-test FAILED: batched outputs differ from single runs");
    }
    Some(BatchInvariance::Ran { passed, max_abs_diff: max_diff })
}
