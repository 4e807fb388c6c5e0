"""Budgets per output part on a detection-style head: output0 [batch, 4 + C, N] concatenates
box rows in pixels and sigmoid class-score rows. The input carries one pixel-scale feature
beside small ones, so static INT8's per-tensor activation scale crushes the small features
the scores are computed from. The boxes stay right and the flattened cosine of output0 stays
near 1, while which (anchor, class) scores best changes: only a named part with its own
`min_top1_agreement` (top1_axis: all) sees it. Figures the server reports are checked
against a recomputation with onnxruntime."""

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from conftest import variant_versions

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MANTISSA_BIN", REPO / "target/debug/mantissa"))
ORT_LIB = REPO / ".onnxruntime/lib/libonnxruntime.so.1.31.1"

FEATURES, ANCHORS, CLASSES = 8, 32, 6
SCORES = "{output: output0, slice: \"[:, 4:, :]\", min_cosine: 0.95, min_top1_agreement: 0.95, top1_axis: all}"
BOXES = "{output: output0, slice: \"[:, :4, :]\", min_cosine: 0.999}"


def detection_head(directory: Path) -> None:
    """x [batch, N, F] -> boxes MatMul [batch, N, 4] and Sigmoid(MatMul) scores [batch, N, C],
    each transposed to channels-first and concatenated into output0 [batch, 4 + C, N]. Feature
    0 is in pixels (0..640) and feeds the boxes; features 1.. are small and feed the scores."""
    rng = np.random.default_rng(11)
    box_weights = np.zeros((FEATURES, 4), np.float32)
    box_weights[0, :] = [1.0, 0.9, 0.5, 0.3]
    box_weights[1:, :] = 0.5 * rng.standard_normal((FEATURES - 1, 4))
    score_weights = np.zeros((FEATURES, CLASSES), np.float32)
    score_weights[1:, :] = 0.05 * rng.standard_normal((FEATURES - 1, CLASSES))
    nodes = [
        helper.make_node("Mul", ["x", "box_gain"], ["x_box"], name="boxes/Gain"),
        helper.make_node("MatMul", ["x_box", "box_w"], ["box_nc"], name="boxes/MatMul"),
        helper.make_node("Transpose", ["box_nc"], ["boxes"], perm=[0, 2, 1], name="boxes/Transpose"),
        # Each branch has its own per-feature gain: the static pass rewires every reader of a
        # quantized tensor to its dequantized copy, so two MatMuls reading x directly would both
        # see the quantized x even with one of them kept FP32.
        helper.make_node("Mul", ["x", "score_gain"], ["x_scaled"], name="scores/Gain"),
        helper.make_node("MatMul", ["x_scaled", "score_w"], ["logits_nc"], name="scores/MatMul"),
        helper.make_node("Sigmoid", ["logits_nc"], ["scores_nc"], name="scores/Sigmoid"),
        helper.make_node("Transpose", ["scores_nc"], ["scores"], perm=[0, 2, 1], name="scores/Transpose"),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1, name="head/Concat"),
    ]
    graph = helper.make_graph(
        nodes, "detection_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ANCHORS, FEATURES])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + CLASSES, ANCHORS])],
        initializer=[numpy_helper.from_array(box_weights, "box_w"), numpy_helper.from_array(score_weights, "score_w"),
                     numpy_helper.from_array(np.ones(FEATURES, np.float32), "score_gain"),
                     numpy_helper.from_array(np.ones(FEATURES, np.float32), "box_gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    data = np.random.default_rng(12)

    def inputs(batch):
        x = data.standard_normal((batch, ANCHORS, FEATURES)).astype(np.float32)
        x[:, :, 0] = data.uniform(0.0, 640.0, (batch, ANCHORS))
        return x

    (directory / "calibration").mkdir(exist_ok=True)
    for index in range(4):
        np.savez(directory / "calibration" / f"sample_{index}.npz", x=inputs(16))
    (directory / "holdout").mkdir(exist_ok=True)
    np.savez(directory / "holdout" / "sample_0.npz", x=inputs(32))
    np.savez(directory / "holdout" / "sample_1.npz", x=inputs(32))


VARIANTS = (
    "variants:\n  fp32:\n    precision: fp32\n  int8:\n    precision: int8\n    int8:\n      mode: static\n"
    "      calibration_data: calibration\n      keep_first_and_last_layers: false\nrouting:\n  default: fp32\n"
)


def policy(on_miss: str) -> str:
    return (
        VARIANTS + "drift:\n  holdout_data: holdout\n  budget:\n    min_cosine: 0.99\n    max_fp32_fraction: 0\n"
        f"    parts:\n      scores: {SCORES}\n      boxes: {BOXES}\n  on_budget_miss: {on_miss}\n"
    )


def run(model: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def figures(reference: np.ndarray, variant: np.ndarray) -> dict:
    """The drift figures of one part, over every holdout sample (float64 sums)."""
    r, v = reference.astype(np.float64), variant.astype(np.float64)
    error = r - v
    with np.errstate(divide="ignore"):  # identical outputs: infinite SQNR
        sqnr_db = float(10 * np.log10((r * r).sum() / (error * error).sum()))
    return {
        "cosine": float((r * v).sum() / np.sqrt((r * r).sum() * (v * v).sum())),
        "sqnr_db": sqnr_db,
        "max_abs": float(np.abs(error).max()),
        "rmse": float(np.sqrt((error * error).mean())),
        # top1_axis: all -- one argmax per batch item over every (class, anchor) of the part.
        "top1_agreement": float((r.reshape(len(r), -1).argmax(1) == v.reshape(len(v), -1).argmax(1)).mean()),
    }


def holdout(directory: Path) -> np.ndarray:
    return np.concatenate([np.load(f)["x"] for f in sorted((directory / "holdout").glob("*.npz"))])


def quantize(directory: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    args = [str(BIN), "quantize", str(directory / "model.onnx"), "--precision", "int8",
            "--policy", str(directory / "policy.yaml"), "--variant", "int8", "-o", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_the_plain_recipe_passes_the_flattened_cosine_and_misses_the_scores_part(tmp_path, start_mantissa):
    model_dir = tmp_path / "store" / "head"
    detection_head(model_dir)
    (model_dir / "policy.yaml").write_text(policy("serve_flagged"))
    plain = tmp_path / "plain.onnx"
    result = quantize(model_dir, plain)
    assert result.returncode == 0, result.stdout + result.stderr

    x = holdout(model_dir)
    reference, variant = run(model_dir / "model.onnx", x), run(plain, x)
    whole, scores = figures(reference, variant), figures(reference[:, 4:, :], variant[:, 4:, :])
    boxes = figures(reference[:, :4, :], variant[:, :4, :])
    print(f"plain recipe: output0 cosine {whole['cosine']:.6f}, boxes cosine {boxes['cosine']:.6f}, "
          f"scores cosine {scores['cosine']:.6f}, scores top-1 (all) {scores['top1_agreement']:.4f}")
    assert whole["cosine"] >= 0.99 and boxes["cosine"] >= 0.999
    assert scores["top1_agreement"] < 0.95

    # max_fp32_fraction 0: the search may keep nothing FP32, so the plain recipe serves, flagged.
    server = start_mantissa(tmp_path / "store")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("head", "int8")
    config = client.get_model_config("head", "int8", as_json=True)["config"]
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    verdict = parameters["drift_budget"]
    assert re.fullmatch(r"missed: part 'scores' \(output0\[:,4:,:\]\): top-1 agreement 0\.\d{4} is below "
                        r"min_top1_agreement 0\.95", verdict), parameters
    for name, expected in (("scores", scores), ("boxes", boxes), ("output0", whole)):
        for figure, value in expected.items():
            key = f"drift_{name}_{figure}"
            if figure == "top1_agreement" and name != "scores":
                assert key not in parameters, parameters
                continue
            tolerance = 1e-4 * max(1.0, abs(value)) if figure == "sqnr_db" else 1e-4
            assert abs(float(parameters[key]) - value) <= tolerance, (key, parameters[key], value)
    # Named parts replace the automatic ones: no output0[...] labels.
    assert not [key for key in parameters if key.startswith("drift_output0[")], parameters

    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    gauges = [line for line in metrics.splitlines() if line.startswith("mantissa_startup_drift_top1_agreement{")
              and 'output="scores"' in line and 'variant="int8"' in line]
    assert len(gauges) == 1, metrics
    assert abs(float(gauges[0].rsplit(" ", 1)[1]) - scores["top1_agreement"]) <= 1e-4, gauges


def test_not_ready_names_the_part_that_missed(tmp_path, start_mantissa):
    model_dir = tmp_path / "store" / "head"
    detection_head(model_dir)
    (model_dir / "policy.yaml").write_text(policy("not_ready"))
    server = start_mantissa(tmp_path / "store")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("head", "fp32")
    assert not client.is_model_ready("head", "int8")
    # RepositoryIndex lists version numbers; ModelConfig of the ready variant says whose they are.
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index(as_json=True)["models"]}
    versions = variant_versions(client, "head")
    reason = index[("head", versions["int8"])].get("reason", "")
    assert "part 'scores' (output0[:,4:,:]): top-1 agreement" in reason, index


def test_quantize_keeps_nodes_fp32_until_the_named_part_meets_its_budget(tmp_path):
    detection_head(tmp_path)
    (tmp_path / "policy.yaml").write_text(VARIANTS)
    (tmp_path / "parts.yaml").write_text(f"scores: {SCORES}\nboxes: {BOXES}\n")
    x = holdout(tmp_path)
    np.savez(tmp_path / "holdout.npz", x=x)
    out = tmp_path / "searched.onnx"
    # The flattened cosine is met by the plain recipe (0.9993), but the scores are an automatic
    # part of probabilities, held to best-element agreement 0.95 by default: the search keeps
    # the scores' MatMul FP32 without being told about parts.
    result = quantize(tmp_path, out, "--holdout", str(tmp_path / "holdout.npz"), "--budget-cosine", "0.99")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"plain recipe cosine 0\.99\d+ -> ", result.stdout), result.stdout
    assert "with 1 of 2 nodes kept FP32" in result.stdout, result.stdout
    assert "kept FP32 by the search: scores/MatMul" in result.stdout, result.stdout
    reference, variant = run(tmp_path / "model.onnx", x), run(out, x)
    assert figures(reference[:, 4:, :], variant[:, 4:, :])["top1_agreement"] >= 0.95

    result = quantize(tmp_path, out, "--holdout", str(tmp_path / "holdout.npz"), "--budget-cosine", "0.99",
                      "--budget-parts", str(tmp_path / "parts.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"with 1 of 2 nodes kept FP32", result.stdout), result.stdout
    assert "kept FP32 by the search: scores/MatMul" in result.stdout, result.stdout
    assert re.search(r"tightest threshold: +(part '\w+' \(output0\[[^]]*\]\)|output 'output0'): ", result.stdout), result.stdout
    reference, variant = run(tmp_path / "model.onnx", x), run(out, x)
    scores = figures(reference[:, 4:, :], variant[:, 4:, :])
    assert scores["top1_agreement"] >= 0.95 and scores["cosine"] >= 0.95, scores
    assert figures(reference[:, :4, :], variant[:, :4, :])["cosine"] >= 0.999

    # With no node allowed FP32, the search fails naming the part.
    result = quantize(tmp_path, tmp_path / "never.onnx", "--holdout", str(tmp_path / "holdout.npz"),
                      "--budget-parts", str(tmp_path / "parts.yaml"), "--budget-max-fp32-fraction", "0")
    assert result.returncode != 0
    assert "limited by part 'scores' (output0[:,4:,:]): top-1 agreement" in result.stderr, result.stderr
    assert not (tmp_path / "never.onnx").exists()


def test_a_bad_budget_parts_file_names_file_line_and_key(tmp_path):
    detection_head(tmp_path)
    (tmp_path / "policy.yaml").write_text(VARIANTS)
    np.savez(tmp_path / "holdout.npz", x=holdout(tmp_path))
    parts = tmp_path / "parts.yaml"
    parts.write_text("scores:\n  output: output0\n  slice: \"[:, 4]\"\n  min_cosine: 0.99\n")
    result = quantize(tmp_path, tmp_path / "never.onnx", "--holdout", str(tmp_path / "holdout.npz"),
                      "--budget-parts", str(parts))
    assert result.returncode != 0
    assert f"{parts}:3: key `scores.slice`" in result.stderr, result.stderr

    # A slice whose entries do not match the output's rank is caught when output0 is measured.
    parts.write_text("scores: {output: output0, slice: \"[:, 4:]\", min_cosine: 0.99}\n")
    result = quantize(tmp_path, tmp_path / "never.onnx", "--holdout", str(tmp_path / "holdout.npz"),
                      "--budget-parts", str(parts))
    assert result.returncode != 0
    assert "part 'scores': slice [:,4:] has 2 entries, but output 'output0' has rank 3" in result.stderr, result.stderr


def test_analyze_lists_the_outputs_measured_by_parts(tmp_path):
    """`mantissa analyze` finds the same parts on the FP32 outputs (boxes and scores of output0),
    with each part's channels and range width, and suggests naming them in drift.budget.parts."""
    detection_head(tmp_path)
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB), RUST_BACKTRACE="0")
    args = [str(BIN), "analyze", str(tmp_path / "model.onnx"), "--data", str(tmp_path / "holdout")]
    result = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    section = json.loads(result.stdout)["output_parts"]
    assert section["flagged"] == 1 and "drift.budget.parts" in section["suggestion"], section
    (output,) = section["items"]
    assert (output["output"], output["axis"]) == ("output0", 1), output
    assert [(p["label"], p["start"], p["end"]) for p in output["parts"]] == [
        ("output0[:,0:4,:]", 0, 4), (f"output0[:,4:{4 + CLASSES},:]", 4, 4 + CLASSES)]
    reference = run(tmp_path / "model.onnx", holdout(tmp_path))
    for part, rows in zip(output["parts"], (reference[:, :4, :], reference[:, 4:, :])):
        assert abs(part["width"] - float(rows.max() - rows.min())) <= 1e-3 * max(1.0, part["width"]), part
    assert abs(output["ratio"] - output["parts"][0]["width"] / output["parts"][1]["width"]) < 1e-6 * output["ratio"]

    table = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert table.returncode == 0, table.stderr
    assert "Outputs measured by parts (1 flagged)" in table.stdout, table.stdout
    assert re.search(r"output0\s+output0\[:,0:4,:\]\s+1: 0\.\.4", table.stdout), table.stdout


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of the one sample of `name` whose labels include `labels`, if there is one."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_shadow_comparison_measures_the_named_parts(tmp_path, start_mantissa):
    """Live shadow drift uses the policy's parts: each sampled request gives one observation
    for `scores` and `boxes`, and none for automatic labels of output0."""
    model_dir = tmp_path / "store" / "head"
    detection_head(model_dir)
    (model_dir / "policy.yaml").write_text(policy("serve_flagged") + "shadow:\n  reference: fp32\n  sample_rate: 1\n")
    plain = tmp_path / "plain.onnx"
    assert quantize(model_dir, plain).returncode == 0
    server = start_mantissa(tmp_path / "store")
    x = holdout(model_dir)
    requests = [x[i:i + 4] for i in range(0, 24, 4)]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for rows in requests:
        request = grpcclient.InferInput("x", list(rows.shape), "FP32")
        request.set_data_from_numpy(rows)
        client.infer("head", [request], model_version="int8")
    labels = {"model": "head", "variant": "int8", "output": "scores"}
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        if metric_value(metrics, "mantissa_shadow_drift_cosine_count", **labels) == len(requests):
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    expected = sum(figures(run(model_dir / "model.onnx", rows)[:, 4:, :], run(plain, rows)[:, 4:, :])["cosine"]
                   for rows in requests)
    assert abs(metric_value(metrics, "mantissa_shadow_drift_cosine_sum", **labels) - expected) <= 1e-4 * len(requests)
    assert metric_value(metrics, "mantissa_shadow_drift_cosine_count", model="head", variant="int8",
                        output="boxes") == len(requests)
    assert 'output="output0[' not in metrics, metrics
