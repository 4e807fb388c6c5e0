#!/usr/bin/env bash
# Creates .venv with the pinned packages the Python tests use (tritonclient, grpcio health and
# reflection, grpcurl, onnxruntime). Reinstalls only when the requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=tests/python/requirements.txt
stamp=.venv/.requirements.sha256
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$requirements"
echo "$wanted" > "$stamp"
