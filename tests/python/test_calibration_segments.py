"""Static calibration through graph segments: each sample runs once through consecutive pieces
of the graph, so the observed ranges must be those of the whole FP32 model, as onnxruntime
computes them; and a model that cannot be cut (a sequence value crossing a cut) falls back to
observing tensor groups, with the same ranges."""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MANTISSA_BIN", REPO / "target/debug/mantissa"))
ENV = dict(os.environ, ORT_DYLIB_PATH=str(REPO / ".onnxruntime/lib/libonnxruntime.so.1.31.1"), RUST_BACKTRACE="0")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def conv(rng, name: str, source: str, channels_in: int, nodes: list, initializers: list) -> str:
    weight = (rng.standard_normal((32, channels_in, 3, 3)) * np.sqrt(2 / (channels_in * 9))).astype(np.float32)
    bias = (rng.standard_normal(32) * 0.1).astype(np.float32)
    initializers += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
    nodes.append(helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [name], pads=[1, 1, 1, 1], name=name))
    return name


def save(tmp_path: Path, nodes: list, initializers: list, output: str, rng) -> Path:
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", 32, 64, 64])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    (tmp_path / "calibration").mkdir()
    for index in range(3):
        # 16 images of 32 channels x 64 x 64: 8 MiB per activation, so segments hold few.
        x = (rng.standard_normal((16, 3, 64, 64)) * (1 + index)).astype(np.float32)
        np.savez(tmp_path / "calibration" / f"s{index}.npz", x=x)
    return path


def conv_chain(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    nodes, initializers, previous = [], [], "x"
    for layer in range(6):
        previous = conv(rng, f"c{layer}", previous, 3 if layer == 0 else 32, nodes, initializers)
    return save(tmp_path, nodes, initializers, previous, rng)


def sequence_across(tmp_path: Path) -> Path:
    """c0 goes into a sequence right away and comes out of it (at position 0, after c9 is
    inserted) only after nine more Convs, so any cut between them has a sequence (not a
    tensor) to hand on."""
    rng = np.random.default_rng(6)
    nodes, initializers = [], []
    c0 = conv(rng, "c0", "x", 3, nodes, initializers)
    nodes.append(helper.make_node("SequenceConstruct", [c0], ["s"], name="seq"))
    previous = c0
    for layer in range(1, 10):
        previous = conv(rng, f"c{layer}", previous, 32, nodes, initializers)
    # Inserting c9 makes the sequence's reader wait for the last Conv.
    initializers.append(numpy_helper.from_array(np.array(0, np.int64), "first"))
    nodes.append(helper.make_node("SequenceInsert", ["s", previous], ["s2"], name="insert"))
    nodes.append(helper.make_node("SequenceAt", ["s2", "first"], ["t"], name="at"))
    nodes.append(helper.make_node("Add", [previous, "t"], ["sum"], name="add"))
    out = conv(rng, "c10", "sum", 32, nodes, initializers)
    return save(tmp_path, nodes, initializers, out, rng)


def quantize(model: Path, out: Path) -> str:
    args = [str(BIN), "quantize", str(model), "--precision", "int8", "--mode", "static", "--calibration-data",
            str(model.parent / "calibration"), "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return ANSI.sub("", result.stdout + result.stderr)


def observed_ranges(model: Path) -> dict[str, tuple[float, float]]:
    """[min, max] of every value over the calibration samples, from onnxruntime with all of
    them declared as outputs."""
    proto = onnx.load(str(model))
    names = [o for node in proto.graph.node for o in node.output if not node.op_type.startswith("Sequence")]
    names += [o for node in proto.graph.node for o in node.output if node.op_type == "SequenceAt"]
    del proto.graph.output[:]
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: dict[str, tuple[float, float]] = {"x": (np.inf, -np.inf)}
    for sample in sorted((model.parent / "calibration").glob("*.npz")):
        x = np.load(sample)["x"]
        for name, value in [("x", x), *zip(names, session.run(names, {"x": x}))]:
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
    return ranges


def check_scales_match(quantized: Path, ranges: dict[str, tuple[float, float]]) -> int:
    """Every activation's uint8 scale and zero point cover onnxruntime's [min, max] (with 0)
    to within one step; returns how many were checked."""
    proto = onnx.load(str(quantized))
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in ranges:
            continue
        scale, zero = float(constants[node.input[1]]), int(constants[node.input[2]])
        lo, hi = min(ranges[node.input[0]][0], 0.0), max(ranges[node.input[0]][1], 0.0)
        assert abs((0 - zero) * scale - lo) <= scale and abs((255 - zero) * scale - hi) <= scale, (node.input[0], lo, hi, scale, zero)
        assert abs(scale - (hi - lo) / 255) <= 1e-5 * scale + 1e-12, (node.input[0], scale, (hi - lo) / 255)
        checked += 1
    return checked


def test_segments_observe_the_ranges_of_the_whole_model(tmp_path):
    model = conv_chain(tmp_path)
    log = quantize(model, tmp_path / "int8.onnx")
    segments = re.search(r"observed=(\d+) segments, one pass", log)
    assert segments and int(segments.group(1)) >= 2, log
    assert check_scales_match(tmp_path / "int8.onnx", observed_ranges(model)) >= 5


def test_a_sequence_across_a_cut_falls_back_to_tensor_groups(tmp_path):
    model = sequence_across(tmp_path)
    log = quantize(model, tmp_path / "int8.onnx")
    assert "cannot be run in segments; observing tensor groups" in log, log
    assert re.search(r"observed=\d+ groups, one pass each", log), log
    onnx.checker.check_model(str(tmp_path / "int8.onnx"), full_check=True)
    assert check_scales_match(tmp_path / "int8.onnx", observed_ranges(model)) >= 4
