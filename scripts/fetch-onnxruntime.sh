#!/usr/bin/env bash
# Places libonnxruntime.so.1.31.1 in .onnxruntime/lib, taken from the onnxruntime==1.31.1 wheel
# on PyPI (the same build the Python tests use). Idempotent: does nothing when it is present.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.31.1
dest=.onnxruntime/lib
lib="$dest/libonnxruntime.so.$version"
if [ -f "$lib" ]; then
  echo "$lib"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 \
  "onnxruntime==$version" -d "$tmp" >&2
mkdir -p "$dest"
python3 - "$tmp" "$dest" "$version" <<'PY'
import glob, sys, zipfile
tmp, dest, version = sys.argv[1:]
wheel = glob.glob(f"{tmp}/onnxruntime-{version}-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    for name in (f"onnxruntime/capi/libonnxruntime.so.{version}", "onnxruntime/capi/libonnxruntime_providers_shared.so"):
        target = f"{dest}/{name.rsplit('/', 1)[1]}"
        with archive.open(name) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        import os
        os.replace(target + ".part", target)
PY
echo "$lib"
