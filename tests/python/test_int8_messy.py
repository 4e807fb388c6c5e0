"""INT8 on less tidy models: an opset-11 model (per-channel DequantizeLinear needs opset 13, so
weights fall back to per-tensor, with a warning), and models that are already quantized (left
alone rather than quantized twice)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MANTISSA_BIN", REPO / "target/debug/mantissa"))
CNN = REPO / "examples/models/digits_cnn"
ENV = dict(os.environ, ORT_DYLIB_PATH=str(REPO / ".onnxruntime/lib/libonnxruntime.so.1.31.1"), RUST_BACKTRACE="0")


def quantize(model: Path, out: Path, *mode: str) -> subprocess.CompletedProcess:
    args = [str(BIN), "quantize", str(model), "--precision", "int8", *mode, "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def static(model: Path, out: Path) -> subprocess.CompletedProcess:
    return quantize(model, out, "--mode", "static", "--calibration-data", str(CNN / "calibration"))


def accuracy(model: Path) -> float:
    data = np.load(CNN / "test_data.npz")
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


def test_opset_11_model_falls_back_to_per_tensor_weights(tmp_path):
    model = onnx.load(str(CNN / "model.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 11  # every op of this model has the same semantics at opset 11
    model.ir_version = 6
    old = tmp_path / "opset11.onnx"
    onnx.save(model, str(old))
    out = tmp_path / "opset11_int8.onnx"
    result = static(old, out)
    assert "per-channel weights need opset 13, using per-tensor weights" in result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    quantized = onnx.load(str(out))
    assert all(not any(a.name == "axis" for a in n.attribute) for n in quantized.graph.node if n.op_type == "DequantizeLinear")
    assert accuracy(out) >= accuracy(CNN / "model.onnx") - 0.01


def test_already_quantized_models_are_left_alone(tmp_path):
    once = tmp_path / "once.onnx"
    static(CNN / "model.onnx", once)
    twice = tmp_path / "twice.onnx"
    result = static(once, twice)
    assert "nodes quantized:         0" in result.stdout, result.stdout
    assert "activations with Q/DQ:   0" in result.stdout, result.stdout
    ops = lambda path: sorted(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops(twice) == ops(once)

    transformer = REPO / "examples/models/digits_transformer/model.onnx"
    dynamic_once = tmp_path / "dynamic_once.onnx"
    quantize(transformer, dynamic_once, "--mode", "dynamic")
    result = quantize(dynamic_once, tmp_path / "dynamic_twice.onnx", "--mode", "dynamic")
    assert "nodes quantized:         0" in result.stdout, result.stdout
