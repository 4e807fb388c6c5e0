"""FP16 conversion: `mantissa quantize MODEL.onnx --precision fp16 -o OUT.onnx` judged on fixture models.

For every model in tests/fixtures/fp16/ (built by tests/fixtures/make_fp16_fixtures.py) and the two
example models, the converter runs as a subprocess ($MANTISSA_BIN or <repo>/target/debug/mantissa)
into a temporary directory; tests/python/fp16_harness.py then checks that the result passes
onnx.checker (full_check), loads in onnxruntime CPU, and that every output stays finite with cosine
similarity >= 0.999 to FP32, both on onnxruntime CPU and on onnx.reference (per-op FP16 arithmetic;
see the harness docstring for why both). Max-abs errors are printed (`pytest -s`) and recorded as
junit properties.

All tests skip when, and only when, `mantissa quantize --help` does not exit 0 (the subcommand is
not built yet; a binary that cannot be started counts as that too).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import warnings
from pathlib import Path

import onnx
import pytest

import fp16_harness

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "fp16"
EXAMPLES = REPO_ROOT / "examples" / "models"
MIN_COSINE = 0.999
CONVERT_TIMEOUT_S = 300

FIXTURE_NAMES = [
    "cnn_bn_constant", "lstm", "gru", "if_subgraph", "loop_subgraph",
    "cast_to_float", "external_data", "layernorm_overflow",
]
EXAMPLE_NAMES = ["digits_cnn", "digits_transformer"]


def model_case(name: str) -> tuple[Path, Path]:
    """(FP32 model, inputs .npz) for a fixture or example model."""
    if name in EXAMPLE_NAMES:
        return EXAMPLES / name / "model.onnx", EXAMPLES / name / "test_data.npz"
    return FIXTURES / name / "model.onnx", FIXTURES / name / "inputs.npz"


def mantissa_binary() -> Path:
    env = os.environ.get("MANTISSA_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "debug" / "mantissa"


@functools.cache
def quantize_help() -> tuple[int | None, str]:
    """Exit code and output of `mantissa quantize --help` (None when the binary cannot be started)."""
    try:
        proc = subprocess.run([str(mantissa_binary()), "quantize", "--help"], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


@pytest.fixture(scope="session")
def mantissa_quantize() -> Path:
    code, output = quantize_help()
    if code != 0:
        first_line = output.splitlines()[0] if output else ""
        pytest.skip(f"`{mantissa_binary()} quantize --help` exited {code}: {first_line[:200]}")
    return mantissa_binary()


@pytest.fixture(scope="session")
def converted(mantissa_quantize, tmp_path_factory):
    """name -> FP16 model path; each model is converted once per session."""
    cache: dict[str, Path] = {}

    def convert(name: str) -> Path:
        if name not in cache:
            fp32, _ = model_case(name)
            out_dir = tmp_path_factory.mktemp(f"fp16_{name}")
            out = out_dir / "model.onnx"
            cmd = [str(mantissa_quantize), "quantize", str(fp32), "--precision", "fp16", "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, (
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
            assert out.is_file(), f"{' '.join(cmd)} exited 0 but wrote no {out}"
            cache[name] = out
        return cache[name]

    return convert


@functools.cache
def harness_result(fp32: Path, fp16: Path, inputs: Path) -> dict:
    return fp16_harness.compare(fp32, fp16, inputs, min_cosine=MIN_COSINE)


def report(name: str, result: dict, record_property) -> None:
    for runtime, run in result["runs"].items():
        for output, m in run["outputs"].items():
            line = (f"{name} [{runtime}] {output}: max_abs_error={m['max_abs_error']:.6g} "
                    f"cosine={m['cosine']:.6f} nonfinite={m['nonfinite_count']}")
            print(line)
            record_property(f"{runtime}.{output}.max_abs_error", m["max_abs_error"])
            record_property(f"{runtime}.{output}.cosine", m["cosine"])


@pytest.mark.parametrize("name", FIXTURE_NAMES + EXAMPLE_NAMES)
def test_fp16_conversion_matches_fp32(name, converted, record_property):
    fp32, inputs = model_case(name)
    fp16 = converted(name)
    result = harness_result(fp32, fp16, inputs)
    report(name, result, record_property)
    summary = json.dumps(fp16_harness.json_safe(result), indent=1)

    assert result["checker"]["ok"], f"onnx.checker rejects the FP16 model: {result['checker']['error']}"
    assert result["ort_load"]["ok"], f"onnxruntime CPU cannot load the FP16 model: {result['ort_load']['error']}"
    for runtime, run in result["runs"].items():
        assert run["ok"], f"{runtime} failed to run the FP16 model: {run['error']}"
        assert set(run["outputs"]), f"{runtime}: no outputs compared\n{summary}"
        for output, m in run["outputs"].items():
            assert not m["nonfinite"], f"{runtime}: output {output!r} has {m['nonfinite_count']} non-finite values"
            assert m["cosine"] >= MIN_COSINE, (
                f"{runtime}: output {output!r} cosine {m['cosine']:.6f} < {MIN_COSINE} "
                f"(max-abs error {m['max_abs_error']:.4g})")
    assert result["ok"], summary


def io_signature(model: onnx.ModelProto, which: str) -> list[tuple]:
    values = model.graph.input if which == "input" else model.graph.output
    inits = {i.name for i in model.graph.initializer}
    sig = []
    for v in values:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim) if t.HasField("shape") else None
        sig.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
    return sig


@pytest.mark.parametrize("name", FIXTURE_NAMES + EXAMPLE_NAMES)
def test_fp16_keeps_graph_io(name, converted):
    """Inputs and outputs keep their names, order, element types (FP32 stays FP32) and shapes."""
    fp32, _ = model_case(name)
    fp16 = converted(name)
    before = onnx.load(str(fp32), load_external_data=False)
    after = onnx.load(str(fp16), load_external_data=False)
    for which in ("input", "output"):
        want, got = io_signature(before, which), io_signature(after, which)
        assert got == want, f"graph {which}s changed:\n FP32: {want}\n FP16: {got}"


def _tensors(graph: onnx.GraphProto):
    """Initializers and Constant/attribute tensors of a graph and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def total_size(model_path: Path) -> int:
    """The model file plus the external-data files it references."""
    model = onnx.load(str(model_path), load_external_data=False)
    files = {model_path}
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            files.add(model_path.parent / location)
    return sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_fp16_example_weights_halved(name, converted, record_property):
    fp32, _ = model_case(name)
    fp16 = converted(name)
    size32, size16 = total_size(fp32), total_size(fp16)
    print(f"{name}: FP32 {size32} bytes, FP16 {size16} bytes ({size16 / size32:.2%})")
    record_property("fp32_bytes", size32)
    record_property("fp16_bytes", size16)
    # Weights dominate both files; halving them (a few FP32 layers kept) lands well under 75 %.
    assert size16 < size32, f"FP16 model ({size16} B) is not smaller than FP32 ({size32} B)"
    assert size16 < 0.75 * size32, f"FP16 model is {size16 / size32:.1%} of FP32: weights were not halved"


def test_layernorm_overflow_reference_converter_fails_ours_does_not(converted, tmp_path, record_property):
    """onnxconverter-common's default conversion overflows the primitive RMSNorm; ours stays finite."""
    from onnxconverter_common import float16

    fp32, inputs = model_case("layernorm_overflow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    theirs_path = tmp_path / "onnxconverter_common.onnx"
    onnx.save(theirs, theirs_path)
    theirs_result = fp16_harness.compare(fp32, theirs_path, inputs, min_cosine=MIN_COSINE)
    ours_result = harness_result(fp32, converted("layernorm_overflow"), inputs)
    report("layernorm_overflow/onnxconverter-common", theirs_result, record_property)
    report("layernorm_overflow/mantissa", ours_result, record_property)

    assert theirs_result["runs"]["onnx_reference"]["ok"], theirs_result["runs"]["onnx_reference"]["error"]
    assert theirs_result["runs"]["onnx_reference"]["nonfinite"], (
        "expected onnxconverter-common's FP16 model to produce non-finite outputs under FP16 arithmetic")
    for runtime, run in ours_result["runs"].items():
        assert run["ok"], f"{runtime}: {run['error']}"
        assert not run["nonfinite"], f"{runtime}: our FP16 model produced non-finite outputs"
