"""Mantissa's ONNX reader and writer are lossless: every fixture and example model, loaded and
saved by the Rust code (quantize/examples/onnx_roundtrip.rs), reads back in the reference
`onnx` package as an equal model that passes the full checker, with inline or external data."""

import os
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import external_data_helper

REPO = Path(__file__).resolve().parents[2]
ROUNDTRIP = Path(os.environ.get("MANTISSA_ROUNDTRIP_BIN", REPO / "target/debug/examples/onnx_roundtrip"))
MODELS = sorted(
    list((REPO / "examples/models").glob("*/model.onnx"))
    + list((REPO / "tests/fixtures/store").glob("*/model.onnx"))
    + list((REPO / "tests/fixtures/fp16").glob("*/model.onnx"))
)


def roundtrip(source: Path, target: Path, external: str | None = None) -> None:
    if not ROUNDTRIP.exists():
        pytest.fail(f"{ROUNDTRIP} is missing: run `cargo build --examples` first")
    args = [str(ROUNDTRIP), str(source), str(target)] + ([external] if external else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with external data already read in, and where it was stored forgotten."""
    for tensor in external_data_helper._get_all_tensors(model):
        # onnx.load reads external data in and marks the tensor DEFAULT explicitly.
        assert tensor.data_location != onnx.TensorProto.EXTERNAL, f"external data of {tensor.name} was not loaded"
        tensor.ClearField("data_location")
        del tensor.external_data[:]
    return model


def assert_equal_models(original: Path, copy: Path) -> None:
    onnx.checker.check_model(str(copy), full_check=True)
    expected = inline(onnx.load(str(original)))
    actual = inline(onnx.load(str(copy)))
    assert actual.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.parent.name)
def test_load_save_is_lossless(model, tmp_path):
    out = tmp_path / "model.onnx"
    roundtrip(model, out)
    assert_equal_models(model, out)


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.parent.name)
def test_external_data_write_is_lossless(model, tmp_path):
    out = tmp_path / "model.onnx"
    roundtrip(model, out, "weights.bin")
    stored = onnx.load(str(out), load_external_data=False)
    # Tensors of 1 KiB or more go to weights.bin; smaller ones (shapes, axes) stay inline.
    large = [t for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) >= 1024]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in large), "large initializers go to weights.bin"
    if large:
        assert (tmp_path / "weights.bin").stat().st_size > 0
    assert_equal_models(model, out)
