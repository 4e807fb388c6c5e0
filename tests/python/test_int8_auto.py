"""`mode: auto`: the INT8 forms that apply are built, judged against the drift budget on the
holdout data and timed beside FP32 on this CPU; the fastest within the budget is kept. On the
outlier fixture the dynamic form and the searched static form are both candidates; the kept
model must meet the budget (recomputed here with onnxruntime) and be the table's fastest form
within it. Without a budget, auto is the dynamic form."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from conftest import start_server

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests/fixtures/int8/outlier_mlp"
BIN = Path(os.environ.get("MANTISSA_BIN", REPO / "target/debug/mantissa"))
ENV = dict(os.environ, ORT_DYLIB_PATH=str(REPO / ".onnxruntime/lib/libonnxruntime.so.1.31.1"), RUST_BACKTRACE="0")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"^\s+(dynamic|static)\s+((?:b\d+ [0-9.]+x ?)+|-)\s+([0-9.]+|-)\s+(met|missed)\s+(\d+)(.*)$")


def quantize(out: Path, *extra: str) -> str:
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8", "--policy",
            str(FIXTURE / "policy.yaml"), "--mode", "auto", "-o", str(out), *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return ANSI.sub("", result.stdout)


def cosine_vs_fp32(model: Path) -> float:
    x = np.load(FIXTURE / "holdout.npz")["x"]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref, got = run(FIXTURE / "model.onnx").ravel().astype(np.float64), run(model).ravel().astype(np.float64)
    return float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))


def table(summary: str) -> dict[str, dict]:
    rows = {}
    for line in summary.splitlines():
        match = ROW.match(line)
        if match:
            speedups = [float(s) for s in re.findall(r"b\d+ ([0-9.]+)x", match.group(2))]
            rows[match.group(1)] = {"speedups": speedups, "met": match.group(4) == "met",
                                    "chosen": "(chosen)" in match.group(6), "note": match.group(6).strip()}
    return rows


def test_auto_keeps_the_fastest_form_within_the_budget(tmp_path):
    out = tmp_path / "auto.onnx"
    summary = quantize(out, "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99",
                       "--auto-batch-sizes", "1,8", "--auto-threads", "1")
    rows = table(summary)
    assert set(rows) == {"dynamic", "static"}, summary
    assert "timed on" in summary, summary
    chosen = [form for form, row in rows.items() if row["chosen"]]
    assert len(chosen) == 1 and rows[chosen[0]]["met"], summary
    # Every form within the budget was timed at both batch sizes; the kept one is the fastest.
    within = {form: row for form, row in rows.items() if row["met"]}
    assert all(len(row["speedups"]) == 2 for row in within.values()), summary
    mean = lambda row: float(np.exp(np.mean(np.log(row["speedups"]))))
    assert chosen[0] == max(within, key=lambda form: mean(within[form])), summary
    assert f"-> {out} (int8 auto: {chosen[0]})" in summary, summary
    onnx.checker.check_model(str(out), full_check=True)
    assert cosine_vs_fp32(out) >= 0.99
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    if chosen[0] == "static":
        assert "QuantizeLinear" in ops, ops
    else:
        assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, ops
    # The form that missed says by how much.
    for form, row in rows.items():
        if not row["met"]:
            assert "below the budget" in row["note"] or "kept FP32" in row["note"], summary


def test_auto_without_a_budget_is_the_dynamic_form(tmp_path):
    out = tmp_path / "auto.onnx"
    summary = quantize(out)
    assert "(int8 auto: dynamic)" in summary and "dynamic only: no drift budget" in summary, summary
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" not in ops, ops


def served_int8_parameters(tmp_path: Path, edit_policy) -> tuple[dict[str, str], bool]:
    """Serves the fixture with its policy's `mode: static` removed (so the int8 variant is
    auto) and `edit_policy` applied; returns the int8 variant's ModelConfig parameters and
    whether it is ready."""
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store / "outlier_mlp")
    policy = (FIXTURE / "policy.yaml").read_text().replace("      mode: static\n", "")
    (store / "outlier_mlp" / "policy.yaml").write_text(edit_policy(policy))
    server = start_server(store)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        config = client.get_model_config("outlier_mlp", "int8", as_json=True)["config"]
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        return parameters, client.is_model_ready("outlier_mlp", "int8")
    finally:
        server.stop()


def test_the_server_builds_int8_without_a_mode_as_auto(tmp_path):
    parameters, _ = served_int8_parameters(
        tmp_path, lambda p: p.replace("variants:\n", "serving:\n  intra_op_threads: 1\n  max_batch_size: 4\nvariants:\n"))
    assert parameters["int8_mode"] == "auto", parameters
    assert parameters["int8_auto_chosen"] in ("dynamic", "static"), parameters
    candidates = parameters["int8_auto_candidates"]
    assert "dynamic:" in candidates and "static:" in candidates, candidates
    # Timed at batch 1 and the variant's max_batch_size.
    chosen = next(c for c in candidates.split(" | ") if c.startswith(parameters["int8_auto_chosen"] + ":"))
    assert "b1=" in chosen and "b4=" in chosen and "budget=met" in chosen, candidates
    assert parameters["drift_budget"] == "met", parameters
    assert float(parameters["drift_y_cosine"]) >= 0.99, parameters


def test_auto_on_a_model_with_nothing_to_quantize_keeps_it_with_the_notes(tmp_path):
    # An already-quantized model: every form leaves it alone, which is not an error.
    quantized = tmp_path / "dynamic.onnx"
    args = [str(BIN), "quantize", str(FIXTURE / "model.onnx"), "--precision", "int8", "--mode", "dynamic", "-o", str(quantized)]
    assert subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV).returncode == 0
    out = tmp_path / "again.onnx"
    args = [str(BIN), "quantize", str(quantized), "--precision", "int8", "--mode", "auto", "--calibration-data",
            str(FIXTURE / "calibration"), "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99", "-o", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = ANSI.sub("", result.stdout)
    assert "(int8 auto: none)" in summary and "no form quantizes anything" in summary, summary
    assert "note: " in summary, summary


def test_a_budget_no_form_meets_serves_flagged_when_the_policy_says_so(tmp_path):
    # Dynamic misses (cosine ~0.23 on the outlier fixture) and the search may keep no node
    # FP32, so the static search fails too: under serve_flagged the static plain recipe serves.
    parameters, ready = served_int8_parameters(tmp_path, lambda p: p.replace(
        "    min_cosine: 0.99\n", "    min_cosine: 0.99\n    max_fp32_fraction: 0.0\n  on_budget_miss: serve_flagged\n"))
    assert parameters["int8_auto_chosen"] == "static", parameters
    assert "serve_flagged" in parameters["int8_auto_reason"], parameters
    assert parameters["drift_budget"].startswith("missed"), parameters
    assert ready


def test_the_dynamic_form_meets_the_budget_through_its_own_search(tmp_path):
    # The fixture's outlier channel ruins the per-run activation scale of one MatMul's input:
    # the plain dynamic form reads cosine ~0.23, and keeping that MatMul FP32 fixes it.
    out = tmp_path / "auto.onnx"
    summary = quantize(out, "--holdout", str(FIXTURE / "holdout.npz"), "--budget-cosine", "0.99", "--auto-threads", "1")
    rows = table(summary)
    assert rows["dynamic"]["met"], summary
    kept = re.search(r"(\d+) of its nodes kept FP32", rows["dynamic"]["note"])
    assert kept and 1 <= int(kept.group(1)) <= 2, summary
