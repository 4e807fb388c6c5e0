#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and end-to-end tests, then the Python client tests
# (tritonclient, grpcurl, grpcio health/reflection) against the real binary.
# Needs only cargo, python3 and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_DYLIB_PATH="$(pwd)/$(./scripts/fetch-onnxruntime.sh | tail -n 1)"
export ORT_DYLIB_PATH
./scripts/setup-python.sh

echo "== cargo test"
cargo build --workspace --bins --examples
cargo test --workspace

echo "== python client tests"
MANTISSA_BIN="$(pwd)/target/debug/mantissa" .venv/bin/python -m pytest tests/python -q
