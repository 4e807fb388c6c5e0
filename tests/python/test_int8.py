"""INT8 quantization: `mantissa quantize MODEL --precision int8 --mode static|dynamic` on the example models.

For examples/models/digits_cnn and digits_transformer, static (minmax calibration on the model's
calibration/ directory) and dynamic conversions run as subprocesses ($MANTISSA_BIN or
<repo>/target/debug/mantissa; ORT_DYLIB_PATH defaults to .onnxruntime/lib/libonnxruntime.so.*) into a
temporary directory, once per session. Checked:
- onnx.checker.check_model(full_check=True) accepts the output; onnxruntime loads it;
- the graph onnxruntime runs (ORT_ENABLE_ALL, saved through optimized_model_filepath) holds fused
  integer ops: static digits_cnn QLinearConv, static digits_transformer QLinearMatMul/QGemm/
  MatMulIntegerToFloat, dynamic DynamicQuantizeMatMul/MatMulIntegerToFloat (histograms printed, `-s`).
  digits_cnn's only MatMul/Gemm is its last layer, which dynamic mode keeps FP32 by default (and it
  leaves Conv FP32), so its default dynamic output holds no integer op; that is asserted as such, and
  the fused-op check for digits_cnn dynamic uses a policy with keep_first_and_last_layers: false;
- accuracy on test_data.npz (batch 1): digits_cnn static within 1 point of FP32; digits_transformer
  output cosine vs FP32 >= 0.99, static and dynamic;
- bad calibration data (no .npz files, an .npz without the input's key, an int64 array, a [8, 64]
  array for digits_cnn's [N,1,8,8] input) exits non-zero, names the file and the input on stderr
  and writes no output file.

All tests skip when, and only when, `mantissa quantize --help` does not mention `--mode` (the INT8
command is not built yet; a binary that cannot be started counts as that too).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import compare_int8 as ci8  # noqa: E402

EXAMPLES = REPO_ROOT / "examples" / "models"
EXAMPLE_NAMES = ["digits_cnn", "digits_transformer"]
MODES = ["static", "dynamic"]
CONVERT_TIMEOUT_S = 120
MIN_COSINE = 0.99
MAX_ACCURACY_DROP = 0.01  # one percentage point
STATIC_INT_OPS = {"digits_cnn": {"QLinearConv"},
                  "digits_transformer": {"QLinearMatMul", "QGemm", "MatMulIntegerToFloat"}}
DYNAMIC_INT_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")

ALL_LAYERS_POLICY = """\
variants:
  int8_all_layers:
    precision: int8
    int8:
      mode: dynamic
      keep_first_and_last_layers: false
"""


def model_path(name: str) -> Path:
    return EXAMPLES / name / "model.onnx"


@functools.cache
def quantize_help() -> tuple[int | None, str]:
    try:
        proc = subprocess.run([str(ci8.mantissa_binary()), "quantize", "--help"], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return proc.returncode, (proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def mantissa_int8() -> Path:
    code, output = quantize_help()
    if code != 0 or "--mode" not in output:
        first = output.strip().splitlines()[0] if output.strip() else ""
        pytest.skip(f"`{ci8.mantissa_binary()} quantize --help` (exit {code}) has no --mode: {first[:200]}")
    return ci8.mantissa_binary()


def run_quantize(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          env=ci8.mantissa_env(), cwd=REPO_ROOT)
    proc.stderr = ANSI.sub("", proc.stderr)
    proc.stdout = ANSI.sub("", proc.stdout)
    return proc


@pytest.fixture(scope="session")
def converted(mantissa_int8, tmp_path_factory):
    """(name, mode[, variant]) -> (INT8 model path, `mantissa quantize` stdout), cached per session."""
    cache: dict[tuple, tuple[Path, str]] = {}

    def convert(name: str, mode: str, all_layers: bool = False) -> tuple[Path, str]:
        key = (name, mode, all_layers)
        if key not in cache:
            out_dir = tmp_path_factory.mktemp(f"int8_{name}_{mode}{'_all' if all_layers else ''}")
            out = out_dir / "model.onnx"
            if all_layers:
                policy = out_dir / "policy.yaml"
                policy.write_text(ALL_LAYERS_POLICY)
                cmd = [str(mantissa_int8), "quantize", str(model_path(name)), "--precision", "int8",
                       "--policy", str(policy), "--variant", "int8_all_layers", "-o", str(out)]
            else:
                cmd = ci8.mantissa_cmd(model_path(name), out, mode, EXAMPLES / name / "calibration", "minmax")
            proc = run_quantize(cmd)
            assert proc.returncode == 0, (
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
            assert out.is_file(), f"{' '.join(cmd)} exited 0 but wrote no {out}"
            print(proc.stdout)
            cache[key] = (out, proc.stdout)
        return cache[key]

    return convert


@functools.cache
def holdout(name: str):
    return ci8.load_holdout(EXAMPLES / name / "test_data.npz", ci8.graph_input_names(model_path(name)))


@functools.cache
def outputs_of(path: Path, name: str) -> list[np.ndarray]:
    inputs, _ = holdout(name)
    return ci8.run_outputs(ci8.session(path, threads=2), inputs, batch=1)


def quality_of(name: str, path: Path) -> tuple[dict, dict]:
    """(INT8 metrics, FP32 metrics) on the test split."""
    _, labels = holdout(name)
    fp32 = outputs_of(model_path(name), name)
    return ci8.quality(outputs_of(path, name), fp32, labels), ci8.quality(fp32, fp32, labels)


CASES = [pytest.param(n, m, id=f"{n}-{m}") for n in EXAMPLE_NAMES for m in MODES]


@pytest.mark.parametrize("name,mode", CASES)
def test_int8_passes_full_checker(name, mode, converted):
    path, _ = converted(name, mode)
    onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("name,mode", CASES)
def test_int8_loads_and_runs_in_onnxruntime(name, mode, converted):
    import onnxruntime

    assert onnxruntime.__version__ == "1.31.1", f"expected onnxruntime 1.31.1, got {onnxruntime.__version__}"
    path, _ = converted(name, mode)
    sess = ci8.session(path, threads=2)
    inputs, _ = holdout(name)
    for batch in (1, 8):
        out = sess.run(None, {k: v[:batch] for k, v in inputs.items()})
        assert out[0].shape == (batch, 10), f"batch {batch}: output shape {out[0].shape}"
        assert np.isfinite(out[0]).all(), f"batch {batch}: non-finite outputs"


def histogram_of(path: Path, tmp_path: Path, label: str, record_property) -> dict[str, int]:
    hist = ci8.optimized_histogram(path, tmp_path)
    print(f"{label}: ORT-optimized graph: {dict(sorted(hist.items()))}")
    print(f"{label}: integer ops: {ci8.integer_ops(hist)}; FP32 compute left: {ci8.float_compute_ops(hist)}")
    record_property("ort_optimized_histogram", dict(sorted(hist.items())))
    return hist


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_int8_static_fuses_integer_ops(name, converted, tmp_path, record_property):
    path, _ = converted(name, "static")
    hist = histogram_of(path, tmp_path, f"{name} static", record_property)
    want = STATIC_INT_OPS[name]
    assert want & set(hist), f"{name} static: none of {sorted(want)} in the ORT-optimized graph: {dict(hist)}"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_int8_dynamic_fuses_integer_ops(name, converted, tmp_path, record_property):
    """digits_cnn's only Gemm is its last layer, kept FP32 by default: checked with all layers quantized."""
    all_layers = name == "digits_cnn"
    path, _ = converted(name, "dynamic", all_layers=all_layers)
    label = f"{name} dynamic{' (keep_first_and_last_layers: false)' if all_layers else ''}"
    hist = histogram_of(path, tmp_path, label, record_property)
    assert DYNAMIC_INT_OPS & set(hist), (
        f"{label}: none of {sorted(DYNAMIC_INT_OPS)} in the ORT-optimized graph: {dict(hist)}")


def test_int8_dynamic_cnn_default_keeps_last_gemm_fp32(converted, tmp_path, record_property):
    """Default dynamic mode on digits_cnn: Conv stays FP32 and the Gemm is the last layer, so nothing changes."""
    path, summary = converted("digits_cnn", "dynamic")
    hist = histogram_of(path, tmp_path, "digits_cnn dynamic (default)", record_property)
    assert re.search(r"nodes quantized:\s+0\b", summary), summary
    assert "last compute layer" in summary, summary
    assert not ci8.integer_ops(hist), f"unexpected integer ops: {ci8.integer_ops(hist)}"
    int8, _ = quality_of("digits_cnn", path)
    assert int8["cosine"] > 0.99999, int8


def test_int8_static_cnn_accuracy_within_one_point(converted, record_property, report_line):
    path, _ = converted("digits_cnn", "static")
    int8, fp32 = quality_of("digits_cnn", path)
    line = (f"digits_cnn static INT8: accuracy {int8['accuracy']:.2%} (FP32 {fp32['accuracy']:.2%}), "
            f"top-1 agreement {int8['agreement']:.2%}, cosine {int8['cosine']:.5f}")
    print(line)
    report_line(line)
    record_property("accuracy", int8["accuracy"])
    record_property("fp32_accuracy", fp32["accuracy"])
    record_property("cosine", int8["cosine"])
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= MAX_ACCURACY_DROP + 1e-9, line


@pytest.mark.parametrize("mode", MODES)
def test_int8_transformer_cosine(mode, converted, record_property, report_line):
    path, _ = converted("digits_transformer", mode)
    int8, fp32 = quality_of("digits_transformer", path)
    line = (f"digits_transformer {mode} INT8: cosine {int8['cosine']:.5f}, accuracy {int8['accuracy']:.2%} "
            f"(FP32 {fp32['accuracy']:.2%}), top-1 agreement {int8['agreement']:.2%}, "
            f"max-abs error {int8['max_abs_error']:.4g}")
    print(line)
    report_line(line)
    record_property("cosine", int8["cosine"])
    record_property("accuracy", int8["accuracy"])
    assert int8["cosine"] >= MIN_COSINE, line


# ---- bad calibration data --------------------------------------------------------------------

def _good_sample(directory: Path) -> None:
    shutil.copy(EXAMPLES / "digits_cnn" / "calibration" / "sample_000.npz", directory / "sample_000.npz")


def _no_npz(directory: Path) -> tuple[str, str]:
    (directory / "README.txt").write_text("no samples here\n")
    (directory / "samples.npz.bak").write_bytes(b"")  # not an .npz: ignored
    return directory.name, ".npz"


def _missing_key(directory: Path) -> tuple[str, str]:
    _good_sample(directory)
    np.savez(directory / "sample_001.npz", image=np.zeros((8, 1, 8, 8), np.float32))
    return "sample_001.npz", "input"


def _wrong_dtype(directory: Path) -> tuple[str, str]:
    _good_sample(directory)
    np.savez(directory / "sample_001.npz", input=np.zeros((8, 1, 8, 8), np.int64))
    return "sample_001.npz", "input"


def _wrong_shape(directory: Path) -> tuple[str, str]:
    _good_sample(directory)
    np.savez(directory / "sample_001.npz", input=np.zeros((8, 64), np.float32))
    return "sample_001.npz", "input"


BAD_DATA = {
    "no_npz_files": (_no_npz, ()),
    "missing_input_key": (_missing_key, ("missing",)),
    "int64_dtype": (_wrong_dtype, ("i8", "int64", "dtype")),
    "wrong_shape": (_wrong_shape, ("shape", "[8, 64]")),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_int8_static_rejects_bad_calibration_data(case, mantissa_int8, tmp_path):
    make, problem_words = BAD_DATA[case]
    data = tmp_path / f"calib_{case}"
    data.mkdir()
    must_name = make(data)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    cmd = ci8.mantissa_cmd(model_path("digits_cnn"), out, "static", data, "minmax")
    proc = run_quantize(cmd)
    stderr = proc.stderr
    print(f"{case}: exit {proc.returncode}: {ci8.first_error_line(stderr)}")
    assert proc.returncode != 0, f"{case}: exited 0\nstdout:\n{proc.stdout}\nstderr:\n{stderr[-3000:]}"
    file_name, input_name = must_name
    assert file_name in stderr, f"{case}: stderr does not name {file_name!r}:\n{stderr[-3000:]}"
    if input_name == ".npz":
        assert ".npz" in stderr, f"{case}: stderr does not say that .npz files are wanted:\n{stderr[-3000:]}"
    else:
        assert re.search(rf"[\'\"`]{re.escape(input_name)}[\'\"`]", stderr), (
            f"{case}: stderr does not name input {input_name!r}:\n{stderr[-3000:]}")
    if problem_words:
        assert any(w in stderr for w in problem_words), (
            f"{case}: stderr does not say what is wrong (one of {problem_words}):\n{stderr[-3000:]}")
    assert not out.exists(), f"{case}: {out} was written although the conversion failed"
    assert list(out.parent.iterdir()) == [], f"{case}: files left behind: {list(out.parent.iterdir())}"


def test_static_calibration_memory_stays_within_twice_fp32_inference(tmp_path):
    """A model whose activations dwarf its weights (8 Convs over 64x64 maps, 16 images per
    calibration file: 8 MiB per tensor) calibrates in tensor groups, so the static pass peaks
    within 2x the memory of FP32 inference on one calibration file (both measured by
    `mantissa quantize` itself)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, initializers, previous = [], [], "x"
    for layer in range(8):
        channels_in = 3 if layer == 0 else 32
        weight = (rng.standard_normal((32, channels_in, 3, 3)) * np.sqrt(2 / (channels_in * 9))).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(np.zeros(32, np.float32), f"b{layer}")]
        nodes += [helper.make_node("Conv", [previous, f"w{layer}", f"b{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1], name=f"conv{layer}"),
                  helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"], name=f"relu{layer}")]
        previous = f"r{layer}"
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["y"], name="pool")]
    graph = helper.make_graph(nodes, "wide_maps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32, 1, 1])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    (tmp_path / "calibration").mkdir()
    for index in range(2):
        np.savez(tmp_path / "calibration" / f"s{index}.npz", x=rng.standard_normal((16, 3, 64, 64)).astype(np.float32))
    args = [str(ci8.mantissa_binary()), "quantize", str(tmp_path / "model.onnx"), "--precision", "int8", "--mode", "static",
            "--calibration-data", str(tmp_path / "calibration"), "-o", str(tmp_path / "int8.onnx")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ci8.mantissa_env())
    assert result.returncode == 0, result.stderr
    match = re.search(r"peak memory: +static pass ([0-9.]+) MiB, FP32 inference at the calibration batch ([0-9.]+) MiB "
                      r"\(([0-9.]+)x\)", result.stdout)
    assert match, result.stdout
    print(f"static pass {match.group(1)} MiB, FP32 inference {match.group(2)} MiB ({match.group(3)}x)")
    assert float(match.group(3)) <= 2.0
