"""The parts of the GPU check that run without a GPU: scripts/gpu-check.sh stops at once
without nvidia-smi, and scripts/gpu_check.py measures the CNN example on the CPU provider
end to end (store and policy, readiness, ModelConfig, drift, `mantissa bench` beside
in-process ONNX Runtime, the table), so a GPU run fails only on GPU matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, mantissa_binary

HELPER = REPO_ROOT / "scripts" / "gpu_check.py"


def ort_library() -> Path:
    env = os.environ.get("ORT_DYLIB_PATH")
    return Path(env) if env else REPO_ROOT / ".onnxruntime/lib/libonnxruntime.so.1.31.1"


def test_the_shell_script_stops_without_nvidia_smi(tmp_path: Path) -> None:
    # A PATH with only what the script needs before its GPU check, so a machine that has a
    # GPU does not start installing wheels here.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "dirname").symlink_to("/usr/bin/dirname")
    done = subprocess.run(["/bin/bash", str(REPO_ROOT / "scripts/gpu-check.sh")], capture_output=True, text=True,
                          env={"PATH": str(tools)}, timeout=30)
    assert done.returncode == 1, done
    assert "nvidia-smi not found" in done.stderr, done.stderr
    bad = subprocess.run(["/bin/bash", str(REPO_ROOT / "scripts/gpu-check.sh"), "--tensorrt", "maybe"],
                         capture_output=True, text=True, env={"PATH": str(tools)}, timeout=30)
    assert bad.returncode == 1 and "--tensorrt: expected auto, yes or no, got 'maybe'" in bad.stderr, bad


def test_the_helper_rejects_unknown_providers() -> None:
    done = subprocess.run([sys.executable, str(HELPER), "--bin", str(mantissa_binary()), "--ort-library",
                           str(ort_library()), "--providers", "rocm"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "--providers: expected some of cpu, cuda, tensorrt" in done.stderr, done.stderr


def test_the_helper_measures_the_cnn_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    command = [sys.executable, str(HELPER), "--bin", str(mantissa_binary()), "--ort-library", str(ort_library()),
               "--providers", "cpu", "--models", "digits_cnn", "--duration", "500ms", "--concurrency", "1,4",
               "--work", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"fp32_cpu", "fp16_cpu"}, rows
    for variant, row in rows.items():
        assert row["error"] == "", row
        assert (row["provider"], row["group"]) == ("cpu", "KIND_CPU"), row
        assert row["server"] > 0 and row["in_process"] > 0 and row["concurrency"] in (1, 4), row
        assert row["top1"] >= 0.99, row
    # FP32 served on the CPU is the CPU reference itself.
    assert rows["fp32_cpu"]["max_abs"] < 1e-5 and rows["fp32_cpu"]["cosine"] > 0.999999, rows["fp32_cpu"]
    assert rows["fp16_cpu"]["cosine"] > 0.999, rows["fp16_cpu"]
    assert "digits_cnn  fp16_cpu" in done.stdout, done.stdout
