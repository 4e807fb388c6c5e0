#!/usr/bin/env bash
# Builds Mantissa (release) and serves the bundled example model store on
# 0.0.0.0:8001 (gRPC) and 0.0.0.0:8002 (metrics). Extra arguments go to `mantissa serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(pwd)/$(./scripts/fetch-onnxruntime.sh | tail -n 1)"
export ORT_DYLIB_PATH
cargo build --release --bin mantissa
exec ./target/release/mantissa serve --model-store examples/models "$@"
