#!/usr/bin/env bash
# INT8 benchmark: accuracy, drift, latency at batch 1 and 8 with 2 intra-op threads, speedup
# over FP32, conversion time and peak memory, Mantissa beside onnxruntime.quantization, on the
# example models and on a wide MLP (3 x 1024, trained on the bundled digits) whose MatMuls
# dominate its run time, and on the messy-model fixtures. One Markdown table per model set.
# Usage: scripts/bench-int8.sh [extra compare_int8.py arguments, e.g. --methods all]
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(pwd)/$(./scripts/fetch-onnxruntime.sh | tail -n 1)"
export ORT_DYLIB_PATH
./scripts/setup-python.sh
.venv/bin/python -m pip install --quiet -r scripts/models/requirements-bench.txt
cargo build --release --bin mantissa >&2
export MANTISSA_BIN=./target/release/mantissa
wide=target/bench-models/digits_mlp_wide
[ -f "$wide/model.onnx" ] || .venv/bin/python scripts/models/train_wide_mlp.py --out "$wide"
.venv/bin/python scripts/compare_int8.py "$@"
echo
.venv/bin/python scripts/compare_int8.py --model "$wide/model.onnx" --calibration "$wide/calibration" \
  --holdout "$wide/test_data.npz" --name digits_mlp_wide "$@"
# The messy-model fixtures (If branches, an outlier weight channel, a mixed-range detection
# head): random weights, so drift and latency only, no accuracy.
for fixture in tests/fixtures/int8_messy/*/; do
  echo
  .venv/bin/python scripts/compare_int8.py --model "$fixture/model.onnx" --calibration "$fixture/calibration" \
    --holdout "$fixture/holdout.npz" --name "$(basename "$fixture")" "$@"
done
