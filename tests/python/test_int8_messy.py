"""INT8 on less tidy models: an opset-11 model (per-channel DequantizeLinear needs opset 13, so
weights fall back to per-tensor, with a warning), and models that are already quantized (left
alone rather than quantized twice)."""

import collections
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

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


def test_opset_11_model_keeps_per_channel_weights_through_the_contrib_dequantizer(tmp_path):
    # ONNX's DequantizeLinear has `axis` from opset 13; below it the weights' per-channel
    # scales go through com.microsoft.DequantizeLinear, which ONNX Runtime fuses alike.
    model = onnx.load(str(CNN / "model.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 11  # every op of this model has the same semantics at opset 11
    model.ir_version = 6
    old = tmp_path / "opset11.onnx"
    onnx.save(model, str(old))
    out = tmp_path / "opset11_int8.onnx"
    result = static(old, out)
    assert "per-channel weights dequantized by com.microsoft.DequantizeLinear" in result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    quantized = onnx.load(str(out))
    assert {o.domain or "ai.onnx": o.version for o in quantized.opset_import}["ai.onnx"] == 11
    per_axis = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert per_axis and all(n.domain == "com.microsoft" for n in per_axis)
    assert all(n.domain == "" for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n not in per_axis)
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


# --- Fixture models of tests/fixtures/int8_messy (made by tests/fixtures/make_int8_fixtures.py) ---

MESSY = REPO / "tests/fixtures/int8_messy"


def policy_file(tmp_path: Path, fixture: Path, **int8: object) -> Path:
    """A one-variant policy whose int8 section holds `int8` (static, the fixture's calibration)."""
    lines = ["variants:", "  q:", "    precision: int8", "    int8:", "      mode: static",
             f"      calibration_data: {fixture / 'calibration'}"]
    lines += [f"      {key}: {str(value).lower() if isinstance(value, bool) else value}" for key, value in int8.items()]
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def outputs(model: Path, x: np.ndarray, one_row_at_a_time: bool = False) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if one_row_at_a_time:
        return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    return session.run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def optimized_ops(model: Path, tmp_path: Path) -> collections.Counter:
    """Node types of the graph ONNX Runtime runs, subgraphs included."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{model.stem}_optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    counter: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counter[node.op_type] += 1
            for attribute in node.attribute:
                for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    walk(subgraph)

    walk(onnx.load(options.optimized_model_filepath).graph)
    return counter


def test_constant_node_weights_are_quantized(tmp_path):
    """Exporters that store weights as Constant nodes get the same static INT8 model."""
    model = onnx.load(str(CNN / "model.onnx"))
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with_constants = tmp_path / "constants.onnx"
    onnx.save(model, str(with_constants))
    result = static(with_constants, tmp_path / "constants_int8.onnx")
    reference = static(CNN / "model.onnx", tmp_path / "initializers_int8.onnx")
    quantized_line = lambda text: re.search(r"nodes quantized:\s+(\d+)", text).group(1)
    assert quantized_line(result.stdout) == quantized_line(reference.stdout) != "0", result.stdout
    onnx.checker.check_model(str(tmp_path / "constants_int8.onnx"), full_check=True)
    assert optimized_ops(tmp_path / "constants_int8.onnx", tmp_path)["QLinearConv"] >= 1
    assert accuracy(tmp_path / "constants_int8.onnx") >= accuracy(CNN / "model.onnx") - 0.01


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_matmuls_inside_if_branches_are_quantized(mode, tmp_path):
    fixture = MESSY / "if_branches"
    out = tmp_path / f"if_{mode}.onnx"
    extra = ["--calibration-data", str(fixture / "calibration")] if mode == "static" else []
    if mode == "weight-only":
        extra = ["--weight-bits", "8", "--block-size", "32"]
    result = quantize(fixture / "model.onnx", out, "--mode", mode, *extra)
    assert "inside If/Loop/Scan subgraphs" in result.stderr, result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    # Both branches' MatMuls (four, two reading main-graph weights, two reading Constant
    # nodes of their branch) run on integer kernels.
    expected = {"static": "DynamicQuantizeMatMul", "dynamic": "DynamicQuantizeMatMul", "weight-only": "MatMulNBits"}[mode]
    branch_ops = collections.Counter()
    for node in onnx.load(str(out)).graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                branch_ops.update(n.op_type for n in attribute.g.node)
    assert branch_ops[expected] == 4 and branch_ops["MatMul"] == 0, branch_ops
    assert optimized_ops(out, tmp_path)[expected] >= 4
    x = np.load(fixture / "holdout.npz")["x"]
    reference, got = outputs(fixture / "model.onnx", x, True), outputs(out, x, True)
    then_rows = x.mean(axis=1) > 0
    assert then_rows.any() and (~then_rows).any()
    for rows in (then_rows, ~then_rows):
        assert cosine(reference[rows], got[rows]) >= 0.99


def test_conv_with_an_outlier_weight_channel_keeps_per_channel_scales(tmp_path):
    fixture = MESSY / "edge_channel_cnn"
    x = np.load(fixture / "holdout.npz")["x"]
    reference = outputs(fixture / "model.onnx", x)

    per_channel = tmp_path / "per_channel.onnx"
    quantize(fixture / "model.onnx", per_channel, "--policy", str(policy_file(tmp_path, fixture)))
    onnx.checker.check_model(str(per_channel), full_check=True)
    model = onnx.load(str(per_channel))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv1.input[1])
    scales = initializers[weight_dq.input[1]]
    assert scales.shape == (8,) and any(a.name == "axis" and a.i == 0 for a in weight_dq.attribute)
    assert scales.max() / scales.min() > 20  # the outlier channel has its own scale
    assert optimized_ops(per_channel, tmp_path)["QLinearConv"] >= 2
    per_channel_cosine = cosine(reference, outputs(per_channel, x))

    per_tensor = tmp_path / "per_tensor.onnx"
    quantize(fixture / "model.onnx", per_tensor, "--policy", str(policy_file(tmp_path, fixture, per_channel=False)))
    per_tensor_cosine = cosine(reference, outputs(per_tensor, x))
    print(f"edge_channel_cnn static INT8 cosine: per-channel {per_channel_cosine:.5f}, per-tensor {per_tensor_cosine:.5f}")
    assert per_channel_cosine >= 0.99
    assert per_tensor_cosine < per_channel_cosine - 0.01


def detection_outputs(model: Path) -> tuple[np.ndarray, np.ndarray]:
    y = outputs(model, np.load(MESSY / "detection_head/holdout.npz")["x"])
    return y[..., :4], y[..., 4:]  # boxes (pixels), class logits


def test_concat_of_boxes_and_scores_stays_fp32(tmp_path):
    fixture = MESSY / "detection_head"
    boxes, logits = detection_outputs(fixture / "model.onnx")
    assert np.ptp(boxes) > 50 * np.ptp(logits)
    # The head's Convs are the model's last layers; quantize them too, so the Concat joins
    # two quantized outputs.
    guarded = tmp_path / "guarded.onnx"
    result = quantize(fixture / "model.onnx", guarded, "--verbose",
                      "--policy", str(policy_file(tmp_path, fixture, keep_first_and_last_layers=False)))
    assert re.search(r"head/Concat.*mixed ranges: Concat inputs 'boxes' .* and 'scores' .* differ \d+x", result.stdout), result.stdout
    onnx.checker.check_model(str(guarded), full_check=True)
    ops = optimized_ops(guarded, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["QLinearConcat"] == 0, ops
    guarded_boxes, guarded_logits = detection_outputs(guarded)
    guarded_error = np.abs(guarded_logits - logits).mean()
    assert cosine(guarded_logits, logits) >= 0.999
    assert cosine(guarded_boxes, boxes) >= 0.999

    # Without the guard one scale spans hundreds of pixels and the logits keep a level or two:
    # what the guard prevents.
    shared = tmp_path / "shared.onnx"
    quantize(fixture / "model.onnx", shared, "--policy", str(
        policy_file(tmp_path, fixture, keep_first_and_last_layers=False, max_concat_range_ratio=1e9)))
    assert optimized_ops(shared, tmp_path)["QLinearConcat"] == 1
    _, shared_logits = detection_outputs(shared)
    shared_error = np.abs(shared_logits - logits).mean()
    print(f"detection_head logits (range {np.ptp(logits):.2f}) mean-abs error: guarded {guarded_error:.4f}, "
          f"shared scale {shared_error:.4f}; cosine guarded {cosine(guarded_logits, logits):.5f}, "
          f"shared {cosine(shared_logits, logits):.5f}")
    assert shared_error > 5 * guarded_error and cosine(shared_logits, logits) < 0.99


def test_concat_of_alike_ranges_runs_as_qlinearconcat(tmp_path):
    model = onnx.load(str(MESSY / "detection_head/model.onnx"))
    for name in ("head/box.weight", "head/box.bias"):  # boxes in units of about 1
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) / 64.0, name))
    alike = tmp_path / "alike.onnx"
    onnx.save(model, str(alike))
    out = tmp_path / "alike_int8.onnx"
    quantize(alike, out, "--policy", str(policy_file(tmp_path, MESSY / "detection_head", keep_first_and_last_layers=False)))
    assert optimized_ops(out, tmp_path)["QLinearConcat"] == 1
    x = np.load(MESSY / "detection_head/holdout.npz")["x"]
    assert cosine(outputs(alike, x), outputs(out, x)) >= 0.99


@pytest.mark.parametrize("ends_fp32", [False, True])
def test_two_dimensional_matmul_bias_relu_layers_run_on_integer_kernels(ends_fp32, tmp_path):
    """MatMul + bias Add (+ Relu) on 2-D activations: a layer whose output feeds quantized
    work runs as QLinearMatMul + QLinearAdd with the Relu folded into the output quantization;
    one read by FP32 work (the last) is folded into Gemm and runs as QGemm with a float output.
    Without either, ONNX Runtime would fuse MatMul + Add into an FP32 Gemm that dequantizes
    its weights on every run."""
    fixture = REPO / "tests/fixtures/int8/outlier_mlp"
    model = onnx.load(str(fixture / "model.onnx"))
    # Put a Relu after every hidden layer (the fixture is linear) and quantize all layers.
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "Add" and node.output[0] != "y":
            hidden = node.output[0]
            node.output[0] = f"{hidden}_pre"
            nodes.append(onnx.helper.make_node("Relu", [f"{hidden}_pre"], [hidden], name=f"{node.name}/Relu"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    mlp = tmp_path / "relu_mlp.onnx"
    onnx.save(model, str(mlp))
    out = tmp_path / "relu_mlp_int8.onnx"
    quantize(mlp, out, "--policy", str(policy_file(tmp_path, fixture, keep_first_and_last_layers=ends_fp32)))
    onnx.checker.check_model(str(out), full_check=True)
    ops = optimized_ops(out, tmp_path)
    if ends_fp32:
        # First and last layers FP32; the eight between them integer, entered and left once.
        assert ops["QLinearMatMul"] == 8 and ops["QLinearAdd"] == 8, ops
        assert ops["Gemm"] + ops["FusedGemm"] == 2 and ops["QGemm"] == 0, ops
        assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops
    else:
        assert ops["QLinearMatMul"] == 9 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1, ops
        assert not {"Gemm", "FusedGemm", "MatMul", "Relu", "DequantizeLinear"} & set(ops), ops
        assert ops["QuantizeLinear"] == 1, ops
    x = np.load(fixture / "holdout.npz")["x"]
    assert cosine(outputs(mlp, x), outputs(out, x)) > 0.9  # the outlier channel still costs accuracy here


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_embedding_tables_are_stored_as_int8_when_asked(mode, tmp_path):
    transformer = REPO / "examples/models/digits_transformer"
    out = tmp_path / f"embeddings_{mode}.onnx"
    extra = ["--calibration-data", str(transformer / "calibration")] if mode == "static" else []
    result = quantize(transformer / "model.onnx", out, "--mode", mode, "--quantize-embeddings", "--verbose", *extra)
    assert "quantized /pos/Gather (Gather)" in result.stdout, result.stdout
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    tables = {t.name: t for t in model.graph.initializer}
    lookup = next(n for n in model.graph.node if n.name == "/pos/Gather")
    assert tables[lookup.input[0]].data_type == onnx.TensorProto.INT8
    assert "pos.weight" not in tables  # the FP32 table is gone
    data = np.load(transformer / "test_data.npz")["input"]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": data})[0]
    assert cosine(run(transformer / "model.onnx"), run(out)) >= 0.99


def test_unsupported_nodes_stay_fp32_with_the_reason(tmp_path):
    """A Conv whose weight is a graph input (not a constant) and a Gemm with transA cannot be
    quantized: both stay FP32 with the reason printed, and the model stays valid and exact
    there."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])
    w = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4, 3, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, "batch"])
    rng = np.random.default_rng(5)
    fixed = lambda *shape: onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"c{len(shape)}_{shape[0]}")
    conv0_w, gemm_w = fixed(4, 1, 3, 3), fixed(256, 4)
    nodes = [
        onnx.helper.make_node("Conv", ["x", conv0_w.name], ["a"], name="fixed_conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["a"], ["b"], name="relu0"),
        onnx.helper.make_node("Conv", ["b", "w"], ["c"], name="runtime_weight_conv", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c"], ["d"], name="relu1"),
        onnx.helper.make_node("Flatten", ["d"], ["e"], name="flatten"),
        onnx.helper.make_node("Transpose", ["e"], ["f"], name="transpose", perm=[1, 0]),
        onnx.helper.make_node("Gemm", ["f", gemm_w.name], ["y"], name="trans_a_gemm", transA=1),
    ]
    graph = onnx.helper.make_graph(nodes, "unsupported", [x, w], [y], initializer=[conv0_w, gemm_w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, str(path))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index in range(4):
        np.savez(calibration / f"s{index}.npz", x=rng.standard_normal((2, 1, 8, 8)).astype(np.float32),
                 w=rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    out = tmp_path / "unsupported_int8.onnx"
    result = quantize(path, out, "--policy", str(policy_file(tmp_path, tmp_path, keep_first_and_last_layers=False)))
    assert "runtime_weight_conv (Conv): unsupported: Conv weight 'w' is not a constant" in result.stdout, result.stdout
    assert "trans_a_gemm (Gemm): unsupported: Gemm with alpha/beta != 1 or transA" in result.stdout, result.stdout
    assert re.search(r"nodes quantized:\s+1\b", result.stdout), result.stdout
    onnx.checker.check_model(str(out), full_check=True)
    feed = {"x": rng.standard_normal((3, 1, 8, 8)).astype(np.float32), "w": rng.standard_normal((4, 4, 3, 3)).astype(np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert cosine(run(path), run(out)) >= 0.99


def test_analyze_flags_the_mixed_range_concat(tmp_path):
    import json

    fixture = MESSY / "detection_head"
    args = [str(BIN), "analyze", str(fixture / "model.onnx"), "--data", str(fixture / "calibration"), "--json"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["channel_spread"]["items"]
    joined = next(r for r in rows if r["kind"] == "concat")
    assert (joined["tensor"], joined["node"], joined["channels"], joined["axis"]) == ("joined", "head/Concat", 2, 1)
    assert joined["flagged"] and joined["ratio"] > 10
    assert joined["ratio"] == pytest.approx(joined["widest_range"] / joined["narrowest_range"])
    assert not any(r["flagged"] for r in rows if r["kind"] != "concat")


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_matmuls_inside_a_loop_body_are_quantized(mode, tmp_path):
    """A recurrent Loop (three steps of state = tanh(state @ W + x @ U), W and U read from
    the main graph) gets its body's MatMuls quantized like an If branch's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    width = 32
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    u = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "w"], ["recurrent"], name="body/recurrent"),
            helper.make_node("MatMul", ["x", "u"], ["driven"], name="body/input"),
            helper.make_node("Add", ["recurrent", "driven"], ["total"]),
            helper.make_node("Tanh", ["total"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("step", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", width])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "", "x"], ["y"], body=body, name="recurrence")],
        "loop_rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(u, "u"),
                     numpy_helper.from_array(np.array(3, np.int64), "steps")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "loop.onnx"
    onnx.save(model, str(path))
    (tmp_path / "calibration").mkdir()
    np.savez(tmp_path / "calibration" / "s0.npz", x=rng.standard_normal((8, width)).astype(np.float32))
    out = tmp_path / f"loop_{mode}.onnx"
    extra = ["--calibration-data", str(tmp_path / "calibration")] if mode == "static" else []
    quantize(path, out, "--mode", mode, *extra)
    onnx.checker.check_model(str(out), full_check=True)
    loop = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Loop")
    body_ops = collections.Counter(n.op_type for n in loop.attribute[0].g.node)
    assert body_ops["DynamicQuantizeMatMul"] == 2 and body_ops["MatMul"] == 0, body_ops
    x = rng.standard_normal((16, width)).astype(np.float32)
    assert cosine(outputs(path, x), outputs(out, x)) >= 0.99
