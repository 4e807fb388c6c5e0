#!/usr/bin/env bash
# Serving benchmarks for the example store, all measured in one run on this machine:
#  1. cold start (empty variant cache) and warm start (cache hit) time to SERVING;
#  2. `mantissa bench` concurrency sweep per model and variant, beside in-process ONNX Runtime
#     at the same batch size, instances and threads;
#  3. throughput with and without dynamic batching at concurrency 16.
# Usage: scripts/bench-variants.sh [DURATION]   (default 4s per level; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-4s}
ORT_DYLIB_PATH="$(pwd)/$(./scripts/fetch-onnxruntime.sh | tail -n 1)"
export ORT_DYLIB_PATH
cargo build --release --bin mantissa >&2
bin=./target/release/mantissa
work=$(mktemp -d)
server_pid=
trap '{ [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; } || true; rm -rf "$work"' EXIT

wait_serving() {  # $1: port; prints seconds since $2 (start time, ns)
  until "$bin" bench --url "http://127.0.0.1:$1" --model digits_cnn --requests 1 --warmup 0ms --json >/dev/null 2>&1 \
      && grep -q "all models ready" "$work/server.log"; do sleep 0.05; done
  python3 -c "print(f'{($(date +%s%N) - $2) / 1e9:.2f}')"
}

serve() {  # $1: store, $2: port; starts the server in the background
  "$bin" serve --model-store "$1" --grpc-addr "127.0.0.1:$2" --metrics-addr "127.0.0.1:$(($2 + 1))" \
    --cache-dir "$work/cache" > "$work/server.log" 2>&1 &
  server_pid=$!
}

stop() { kill -TERM "$server_pid"; wait "$server_pid" || true; }

echo "== start-up (example store: 2 models x fp32, fp16, int8 static with calibration and drift)"
start=$(date +%s%N); serve examples/models 18501; cold=$(wait_serving 18501 "$start")
stop
start=$(date +%s%N); serve examples/models 18501; warm=$(wait_serving 18501 "$start")
echo "cold start (empty cache): ${cold}s; warm start (cache hit): ${warm}s"

echo "== concurrency sweep per variant (batch 1), server beside in-process ONNX Runtime"
for model in digits_cnn digits_transformer; do
  for variant in fp32 fp16 int8; do
    echo "-- $model $variant"
    "$bin" bench --url http://127.0.0.1:18501 --model "$model" --model-version "$variant" --batch-size 1 \
      --concurrency 1,4,16,64 --duration "$duration" --warmup 1s \
      --input-data "examples/models/$model/test_data.npz" --in-process-store examples/models 2>/dev/null | grep -v '^model'
  done
done
stop

echo "== dynamic batching on vs off at concurrency 16 (fp32, batch 1)"
cp -r examples/models "$work/unbatched"
for policy in "$work"/unbatched/*/policy.yaml; do
  sed -i 's/^  intra_op_threads: 2.*/&\n  dynamic_batching: false/' "$policy"
done
for store in examples/models "$work/unbatched"; do
  serve "$store" 18501; wait_serving 18501 "$(date +%s%N)" >/dev/null
  for model in digits_cnn digits_transformer; do
    label=batched; [ "$store" = examples/models ] || label=unbatched
    printf '%-10s %-20s ' "$label" "$model"
    "$bin" bench --url http://127.0.0.1:18501 --model "$model" --model-version fp32 --concurrency 16 \
      --duration "$duration" --warmup 1s --json 2>/dev/null \
      | python3 -c 'import json, sys; r = json.load(sys.stdin)["levels"][0]; print("%.0f infer/s, p99 %.2f ms, %.2f rows per run" % (r["inferences_per_second"], r["latency_ms_p99"], r["server"]["rows_per_run"]))'
  done
  stop
done
exit 0
