#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (never run in CI): installs the onnxruntime-gpu
# wheel and the CUDA 13 / cuDNN 9 libraries it needs into a venv, serves a MiniLM-class encoder
# and the CNN example as fp32 and fp16 variants on CUDA (and TensorRT when its libraries are
# there), and prints each variant's throughput beside in-process ONNX Runtime on the same
# provider, with its drift from FP32 on the CPU (scripts/gpu_check.py does the measuring).
#
# Usage: scripts/gpu-check.sh [options]
#   --venv DIR           venv for the GPU wheels (default .gpu-venv)
#   --wheels DIR         install from the wheels in DIR only (for a machine without PyPI)
#   --fetch-wheels DIR   download those wheels into DIR and stop (any Linux x86-64 machine with
#                        the GPU machine's Python version; no GPU needed)
#   --tensorrt MODE      auto (default: when libnvinfer.so.10 is found), yes (pip-install
#                        TensorRT 10 for CUDA 13 too), no
#   --device N           GPU to use (default 0)
#   --minilm DIR         corpus directory of the MiniLM model (default .corpus/models/minilm-l6;
#                        made by scripts/corpus/fetch.py --only minilm-l6)
#   --duration D         measured time per benchmark (default 5s)
#   --bin PATH           mantissa binary to use instead of building target/release/mantissa
#   --json FILE          also write the results as JSON
#   -h, --help           this text
#
# Budget: the measurements are sized for about 2 minutes on CUDA (4 variants x (drift, 2 server
# levels and an in-process run of --duration each, plus warm-ups)), more with TensorRT, whose
# first start builds engines; installing the wheels (about 1.5 GB) and the release build come
# before, once. The measuring step is cut off after 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
venv=.gpu-venv
wheels=
fetch_to=
tensorrt=auto
device=0
minilm=.corpus/models/minilm-l6
duration=5s
bin=
json=

die() { echo "gpu-check: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --venv) need_value "$@"; venv=$2; shift 2 ;;
    --wheels) need_value "$@"; wheels=$2; shift 2 ;;
    --fetch-wheels) need_value "$@"; fetch_to=$2; shift 2 ;;
    --tensorrt) need_value "$@"; tensorrt=$2; shift 2 ;;
    --device) need_value "$@"; device=$2; shift 2 ;;
    --minilm) need_value "$@"; minilm=$2; shift 2 ;;
    --duration) need_value "$@"; duration=$2; shift 2 ;;
    --bin) need_value "$@"; bin=$2; shift 2 ;;
    --json) need_value "$@"; json=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$tensorrt" in auto|yes|no) ;; *) die "--tensorrt: expected auto, yes or no, got '$tensorrt'" ;; esac
[[ "$device" =~ ^[0-9]+$ ]] || die "--device: expected a GPU index, got '$device'"
[[ "$duration" =~ ^[0-9.]+(us|ms|s|m)?$ ]] || die "--duration: expected e.g. 5s or 500ms, got '$duration'"

# The onnxruntime-gpu 1.31.1 wheel is built for CUDA 13 and cuDNN 9; its `cuda` extra does not
# bring cuBLAS, which its CUDA provider links, so that is named too.
packages=(
  "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
  "nvidia-cublas~=13.0"
  "numpy==2.4.6"
  "tritonclient[grpc]==2.73.0"
)
# Its TensorRT provider links libnvinfer.so.10: TensorRT 10 built for CUDA 13.
tensorrt_package="tensorrt-cu13-libs>=10.13,<11"

if [ -n "$fetch_to" ]; then
  mkdir -p "$fetch_to"
  extra=()
  [ "$tensorrt" = yes ] && extra=("$tensorrt_package")
  # For Linux x86-64 and this machine's Python version (the GPU machine's venv must match).
  python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  python3 -m pip download --only-binary=:all: --python-version "$python_version" "${platforms[@]}" \
    -d "$fetch_to" "${packages[@]}" "${extra[@]}"
  echo "wheels in $fetch_to; on the GPU machine: scripts/gpu-check.sh --wheels $fetch_to"
  exit 0
fi

# Fail before any download or build when there is no GPU to measure.
command -v nvidia-smi >/dev/null 2>&1 \
  || die "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver (CPU-side tests: ./scripts/test.sh)"
gpus=$(nvidia-smi -L 2>&1) || die "nvidia-smi failed: $gpus"
grep -q '^GPU ' <<<"$gpus" || die "nvidia-smi lists no GPU: $gpus"
grep -q "^GPU $device:" <<<"$gpus" || die "--device $device: no such GPU in: $gpus"
[ -f "$minilm/model.onnx" ] || die "$minilm/model.onnx not found; make it with: python3 scripts/corpus/fetch.py --only minilm-l6"
echo "== GPU"; echo "$gpus"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
started=$(date +%s)

if [ -z "$bin" ]; then
  echo "== building the release binary"
  cargo build --release --bin mantissa >&2
  bin=target/release/mantissa
fi
[ -x "$bin" ] || die "--bin: $bin is not an executable"

echo "== installing onnxruntime-gpu==$ORT_VERSION and the CUDA libraries into $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip_args=(--quiet --disable-pip-version-check)
[ -n "$wheels" ] && pip_args+=(--no-index --find-links "$wheels")
install=("${packages[@]}")
[ "$tensorrt" = yes ] && install+=("$tensorrt_package")
"$venv/bin/python" -m pip install "${pip_args[@]}" "${install[@]}"

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ort_library="$site/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
[ -f "$ort_library" ] || die "$ort_library missing after installing onnxruntime-gpu"
# ONNX Runtime loads its CUDA provider next to itself; the provider finds the CUDA, cuDNN and
# TensorRT libraries of the nvidia-* wheels only through the loader's path.
wheel_dirs=()
for dir in "$site/nvidia" "$site/tensorrt_libs"; do [ -d "$dir" ] && wheel_dirs+=("$dir"); done
[ "${#wheel_dirs[@]}" -gt 0 ] || die "no nvidia-* wheel libraries under $site"
lib_dirs=$(find "${wheel_dirs[@]}" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd: -)
export LD_LIBRARY_PATH="${lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

providers=cuda
if [ "$tensorrt" != no ]; then
  if ldconfig -p 2>/dev/null | grep -q 'libnvinfer\.so\.10 ' \
      || [ -n "$(find "${wheel_dirs[@]}" -name 'libnvinfer.so.10' -print -quit)" ]; then
    providers=cuda,tensorrt
  elif [ "$tensorrt" = yes ]; then
    die "TensorRT was installed but libnvinfer.so.10 is not found"
  else
    echo "TensorRT: libnvinfer.so.10 not found; CUDA only (--tensorrt yes installs it)"
  fi
fi
echo "== setup took $(( $(date +%s) - started ))s; measuring on $providers"

measure_started=$(date +%s)
helper=(scripts/gpu_check.py --bin "$bin" --ort-library "$ort_library" --providers "$providers"
  --device "$device" --minilm "$minilm" --duration "$duration")
[ -n "$json" ] && helper+=(--json "$json")
status=0
timeout 900 "$venv/bin/python" "${helper[@]}" || status=$?
echo "== measurements took $(( $(date +%s) - measure_started ))s (total $(( $(date +%s) - started ))s)"
exit "$status"
