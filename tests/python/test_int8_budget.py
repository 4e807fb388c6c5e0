"""The accuracy-budget search: on a fixture where the plain static INT8 recipe misses a 0.99
cosine budget, `mantissa quantize --budget-cosine 0.99` keeps the fewest nodes in FP32 that
meet it (checked here independently with onnxruntime), and the server does the same at
startup when the policy names holdout data and a budget. The search costs a logarithmic
number of full evaluations, logs its progress with an ETA, and stops at its time limit."""

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from conftest import variant_versions

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests/fixtures/int8/outlier_mlp"
BIN = Path(os.environ.get("MANTISSA_BIN", REPO / "target/debug/mantissa"))
ORT_LIB = REPO / ".onnxruntime/lib/libonnxruntime.so.1.31.1"


def quantize(out: Path, *extra: str) -> str:
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8",
            "--policy", str(FIXTURE / "policy.yaml"), "-o", str(out), *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def cosine_vs_fp32(model: Path) -> float:
    x = np.load(FIXTURE / "holdout.npz")["x"]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref, got = run(FIXTURE / "model.onnx").ravel().astype(np.float64), run(model).ravel().astype(np.float64)
    return float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))


def test_plain_recipe_misses_and_the_search_meets_the_budget(tmp_path):
    plain = tmp_path / "plain.onnx"
    quantize(plain)
    plain_cosine = cosine_vs_fp32(plain)
    print(f"plain static recipe: cosine {plain_cosine:.6f}")
    assert plain_cosine < 0.99

    searched = tmp_path / "searched.onnx"
    summary = quantize(searched, "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99")
    match = re.search(r"with (\d+) of (\d+) nodes kept FP32", summary)
    assert match, summary
    kept, candidates = int(match.group(1)), int(match.group(2))
    searched_cosine = cosine_vs_fp32(searched)
    print(f"budget search: cosine {searched_cosine:.6f}, {kept} of {candidates} nodes kept FP32")
    assert searched_cosine >= 0.99
    assert kept / candidates < 0.2
    onnx.checker.check_model(str(searched), full_check=True)
    # The nodes left quantized still run on ONNX Runtime's integer kernels.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(searched), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops & {"QLinearMatMul", "MatMulIntegerToFloat", "QGemm"}, ops


def test_a_budget_outside_zero_one_is_refused(tmp_path):
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    out = tmp_path / "never.onnx"
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8", "--policy", str(FIXTURE / "policy.yaml"),
            "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "1.5", "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "--budget-cosine: expected a value in [0, 1], got 1.5" in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize("mantissa_server", [REPO / "tests/fixtures/int8"], indirect=True)
def test_the_server_searches_at_startup(mantissa_server):
    client = grpcclient.InferenceServerClient(mantissa_server.grpc_url)
    config = client.get_model_config("outlier_mlp", "int8", as_json=True)["config"]
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert parameters["int8_budget_kept_fp32"] == "layer5/MatMul", parameters
    # The plain recipe, then k = 1: two evaluations.
    assert parameters["int8_budget_search_evaluations"] == "2", parameters
    assert int(parameters["int8_budget_search_ms"]) >= 0, parameters
    assert "int8_budget_search_time_limited" not in parameters, parameters
    assert float(parameters["drift_y_cosine"]) >= 0.99, parameters
    assert parameters["drift_budget"] == "met", parameters
    assert client.is_model_ready("outlier_mlp", "int8")


@pytest.mark.parametrize("bits,block_size,symmetric", [(4, 32, True), (4, 64, False), (8, 32, True)])
def test_block_wise_weight_only_runs_on_matmulnbits(tmp_path, bits, block_size, symmetric):
    model = REPO / "examples/models/digits_transformer/model.onnx"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "variants:\n  w:\n    precision: int8\n    int8:\n      mode: weight-only\n"
        f"      weight_bits: {bits}\n      block_size: {block_size}\n      weight_symmetric: {str(symmetric).lower()}\n"
    )
    out = tmp_path / "weight_only.onnx"
    env = dict(os.environ, RUST_BACKTRACE="0")
    result = subprocess.run([str(BIN), "quantize", str(model), "--precision", "int8", "--policy", str(policy), "-o", str(out)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulNBits") >= 10, ops
    data = np.load(REPO / "examples/models/digits_transformer/test_data.npz")
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": data["input"]})[0]
    reference = data["logits"]
    cosine = float((logits * reference).sum() / (np.linalg.norm(logits) * np.linalg.norm(reference)))
    accuracy = float((logits.argmax(1) == data["labels"]).mean())
    print(f"weight-only int{bits} block {block_size} symmetric={symmetric}: cosine {cosine:.6f}, accuracy {accuracy:.4f}")
    assert cosine >= 0.99
    assert out.stat().st_size < model.stat().st_size * 0.6


def test_a_budget_the_capped_search_cannot_meet_fails_clearly(tmp_path):
    """When meeting the budget would keep more nodes FP32 than max_fp32_fraction allows, the
    quantizer fails with the figures instead of writing a worse model."""
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    out = tmp_path / "never.onnx"
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8", "--policy", str(FIXTURE / "policy.yaml"),
            "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99", "--budget-max-fp32-fraction", "0.05",
            "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert re.search(r"needs more than 0 of 10 quantized nodes in FP32 \(max_fp32_fraction 0\.05\): "
                     r"with the 0 most sensitive kept, cosine 0\.\d+", result.stderr), result.stderr
    assert not out.exists()


def test_the_server_reports_a_missed_budget_as_not_ready(tmp_path, start_mantissa):
    store = tmp_path / "store"
    model_dir = store / "outlier_mlp"
    model_dir.mkdir(parents=True)
    for name in ("model.onnx", "holdout.npz"):
        (model_dir / name).write_bytes((FIXTURE / name).read_bytes())
    (model_dir / "calibration").mkdir()
    for sample in (FIXTURE / "calibration").iterdir():
        (model_dir / "calibration" / sample.name).write_bytes(sample.read_bytes())
    policy = (FIXTURE / "policy.yaml").read_text().replace("    min_cosine: 0.99", "    min_cosine: 0.99\n    max_fp32_fraction: 0.05")
    (model_dir / "policy.yaml").write_text(policy)
    server = start_mantissa(store)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("outlier_mlp", "fp32")
    assert not client.is_model_ready("outlier_mlp", "int8")
    # RepositoryIndex lists version numbers; ModelConfig of the ready variant says whose they are.
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index(as_json=True)["models"]}
    versions = variant_versions(client, "outlier_mlp")
    reason = index[("outlier_mlp", versions["int8"])].get("reason", "")
    assert "max_fp32_fraction 0.05" in reason, index


def deep_outlier_mlp(directory: Path, layers: int = 48, width: int = 64, outliers=(5, 17, 29, 41)) -> None:
    """outlier_mlp at depth: `layers` MatMul+Add layers, each layer in `outliers` writing a channel
    1000x larger than the others (the next layer scales it back, so the function is unchanged).
    Each such tensor crushes the other channels under per-tensor quantization; keeping its reader
    in FP32 recovers them."""
    rng = np.random.default_rng(5)
    weights = [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32) for _ in range(layers)]
    biases = [(0.1 * rng.standard_normal(width)).astype(np.float32) for _ in range(layers)]
    for layer in outliers:
        weights[layer][:, 0] *= 1000.0
        biases[layer][0] *= 1000.0
        weights[layer + 1][0, :] /= 1000.0
    nodes, initializers, previous = [], [], "x"
    for layer in range(layers):
        initializers += [onnx.numpy_helper.from_array(weights[layer], f"w{layer}"),
                         onnx.numpy_helper.from_array(biases[layer], f"b{layer}")]
        nodes.append(onnx.helper.make_node("MatMul", [previous, f"w{layer}"], [f"mm{layer}"], name=f"layer{layer}/MatMul"))
        output = "y" if layer == layers - 1 else f"h{layer}"
        nodes.append(onnx.helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [output], name=f"layer{layer}/Add"))
        previous = output
    graph = onnx.helper.make_graph(
        nodes, "deep_outlier_mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (directory / "calibration").mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    data = np.random.default_rng(6)
    for index in range(4):
        np.savez(directory / "calibration" / f"sample_{index}.npz", x=data.standard_normal((32, width)).astype(np.float32))
    np.savez(directory / "holdout.npz", x=data.standard_normal((64, width)).astype(np.float32))


def test_the_search_costs_a_logarithmic_number_of_evaluations(tmp_path):
    """On a 48-layer MLP with four outlier tensors (46 candidate nodes; first and last layers stay
    FP32), the search ranks the four readers first by local SQNR and finds k = 4 by galloping and
    bisection: 5 full evaluations (plain, k = 1, 2, 4, 3). The search that evaluated every node
    alone and then added nodes one at a time took 82 evaluations and kept 35 nodes FP32. Every
    evaluation logs a progress line with the evaluations done and planned and an ETA."""
    deep_outlier_mlp(tmp_path)
    out = tmp_path / "int8.onnx"
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0", MANTISSA_LOG_FORMAT="json")
    args = [str(BIN), "quantize", str(tmp_path / "model.onnx"), "--precision", "int8", "--mode", "static",
            "--calibration-data", str(tmp_path / "calibration"), "--holdout", str(tmp_path / "holdout.npz"),
            "--budget-cosine", "0.99", "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"with (\d+) of (\d+) nodes kept FP32 \((\d+) evaluations, (\d+) sensitivity runs, ([0-9.]+) s\)",
                      result.stdout)
    assert match, result.stdout
    kept, candidates, evaluations, runs = (int(match.group(i)) for i in range(1, 5))
    print(f"{kept} of {candidates} nodes kept FP32 in {evaluations} evaluations and {runs} sensitivity runs")
    assert candidates == 46
    assert evaluations <= 2 * math.ceil(math.log2(candidates)) + 2, evaluations
    assert evaluations * 5 <= candidates, evaluations
    assert kept == 4
    readers = {f"layer{layer + 1}/MatMul" for layer in (5, 17, 29, 41)}
    assert set(re.findall(r"kept FP32 by the search: (\S+)", result.stdout)) == readers, result.stdout

    x = np.load(tmp_path / "holdout.npz")["x"]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref, got = run(tmp_path / "model.onnx").ravel().astype(np.float64), run(out).ravel().astype(np.float64)
    assert float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))) >= 0.99

    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [r for r in records if r.get("message") == "budget search"]
    assert [r["evaluations_done"] for r in progress] == list(range(1, evaluations + 1)), progress
    assert all(r["evaluations_planned"] >= r["evaluations_done"] and r["eta_s"] >= 0 for r in progress), progress
    assert progress[0]["evaluations_planned"] >= evaluations and progress[-1]["eta_s"] == 0, progress
    assert [r["kept_fp32"] for r in progress] == [0, 1, 2, 4, 3], progress


def test_a_search_out_of_time_fails_with_what_it_reached(tmp_path):
    """A 1 ms limit stops the search after the plain recipe (which misses the budget): the
    quantizer fails naming the limit, the evaluations done, the time and the best figures."""
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    out = tmp_path / "never.onnx"
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8", "--policy", str(FIXTURE / "policy.yaml"),
            "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99", "--budget-time-limit", "1ms", "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert re.search(r"the budget search stopped at its time limit of 0\.001s after 1 evaluations in [0-9.]+s: "
                     r"the best configuration reached keeps 0 of 10 quantized nodes in FP32: cosine 0\.2\d+, "
                     r"top-1 agreement None, short of the budget \(min_cosine Some\(0\.99\)", result.stderr), result.stderr
    assert not out.exists()

    args[args.index("1ms")] = "soon"
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "--budget-time-limit" in result.stderr and "expected a duration like 500us, 2ms or 0.5s" in result.stderr, result.stderr


def test_the_server_serves_the_plain_recipe_flagged_when_the_search_runs_out_of_time(tmp_path, start_mantissa):
    """Policy `search_time_limit: 1ms` with `on_budget_miss: serve_flagged`: the variant serves
    the plain recipe flagged, its ModelConfig says why, and the artifact is not cached (a later
    start with more time would search again)."""
    store = tmp_path / "store"
    model_dir = store / "outlier_mlp"
    model_dir.mkdir(parents=True)
    for name in ("model.onnx", "holdout.npz"):
        (model_dir / name).write_bytes((FIXTURE / name).read_bytes())
    (model_dir / "calibration").mkdir()
    for sample in (FIXTURE / "calibration").iterdir():
        (model_dir / "calibration" / sample.name).write_bytes(sample.read_bytes())
    policy = (FIXTURE / "policy.yaml").read_text().replace(
        "    min_cosine: 0.99", "    min_cosine: 0.99\n    search_time_limit: 1ms\n  on_budget_miss: serve_flagged")
    (model_dir / "policy.yaml").write_text(policy)
    cache = tmp_path / "cache"
    server = start_mantissa(store, ["--cache-dir", str(cache)])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("outlier_mlp", "int8")
    config = client.get_model_config("outlier_mlp", "int8", as_json=True)["config"]
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert "stopped at its time limit of 0.001s" in parameters.get("int8_budget_fallback", ""), parameters
    assert "int8_budget_kept_fp32" not in parameters, parameters
    assert parameters["drift_budget"].startswith("missed"), parameters
    assert not list(cache.glob("outlier_mlp/int8-*")), list(cache.rglob("*"))
