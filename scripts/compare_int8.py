#!/usr/bin/env python3
"""Compares Mantissa's INT8 quantization with onnxruntime.quantization's on the example models.

Usage: .venv/bin/python scripts/compare_int8.py [--json] [--json-out FILE] [--example NAME ...]
           [--methods minmax[,percentile,entropy,mse|all]] [--percentile 99.99]
           [--runs 300] [--warmup 50] [--threads 2] [--keep DIR]
       .venv/bin/python scripts/compare_int8.py --model PATH --calibration DIR --holdout NPZ [--name NAME]

Models: examples/models/digits_{cnn,transformer} (model.onnx, calibration/*.npz, test_data.npz), or
one given with --model/--calibration/--holdout (the holdout .npz holds one array per graph input and,
optionally, `labels` (int class ids, --labels-key) for accuracy).

Variants per model, every converter run as its own subprocess (so its peak RSS can be read):
- mantissa static <method>: `mantissa quantize M --precision int8 --mode static --calibration-data DIR
  --calibration-method <method> -o OUT` ($MANTISSA_BIN or target/debug/mantissa; ORT_DYLIB_PATH is
  set to .onnxruntime/lib/libonnxruntime.so.* when unset). minmax by default, others with --methods;
- mantissa static minmax, all layers: the same with keep_first_and_last_layers: false (a policy);
- mantissa static minmax, S8S8: the same with activation_type: int8 (symmetric int8 activations);
- mantissa weight-only int4: `--mode weight-only` (MatMulNBits, 4-bit blocks of 128, activations float);
- mantissa dynamic: `mantissa quantize M --precision int8 --mode dynamic -o OUT`;
- ORT static: onnxruntime.quantization.quantize_static(per_channel=True, quant_format=QDQ,
  activation_type=QUInt8, weight_type=QInt8, calibrate_method=MinMax) with a CalibrationDataReader over
  the same calibration .npz files (one batch per file, as Mantissa reads them); no pre-processing;
- ORT dynamic: quantize_dynamic(weight_type=QInt8, per_channel=True).
ORT-quantized models are written into a temporary directory (or --keep DIR).

Columns, each measured with onnxruntime-Python (CPU EP, GraphOptimizationLevel ORT_ENABLE_ALL,
intra_op_num_threads=--threads, sequential execution):
- acc %: top-1 accuracy on the holdout labels; agree %: top-1 agreement with the FP32 model;
  cosine: cosine similarity of all holdout outputs (flattened, concatenated) with FP32's. Outputs are
  computed one sample at a time (batch 1, --eval-batch), as the reference logits were; note that
  dynamic quantization picks activation scales per run, so its outputs depend on the batch;
- b1/b8 ms: median latency of one run at batch 1 / batch 8 (the first holdout samples), --runs runs
  after --warmup warm-up runs, the variants of a model interleaved in rounds so that background load
  hits them alike; speedup = FP32 median / variant median;
- conv s: wall time of the converter subprocess (calibration + conversion + save, including process
  start; for ORT also Python + onnxruntime import, the in-process quantize_* time in parentheses);
- peak MiB: ru_maxrss of that subprocess, read with GNU time (`/usr/bin/time -f %M`; see run_measured
  for why not os.wait4/RUSAGE_CHILDREN directly); the ORT figure includes the Python interpreter and
  the onnxruntime import, whose baseline is printed under the table;
- size KiB: the model file (plus external data);
- integer ops: node-type histogram of the ORT-optimized graph (session option
  optimized_model_filepath), reduced to the integer/quantization ops; "FP32 compute" lists the
  Conv/MatMul/Gemm-like nodes left in float.
A converter or evaluation that fails is reported in the table and never aborts the run.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples" / "models"
EXAMPLE_NAMES = ("digits_cnn", "digits_transformer")
ALL_METHODS = ("minmax", "percentile", "entropy", "mse")

# Integer / quantization ops of the ORT-optimized graph (op_type; any domain).
INTEGER_OPS = (
    "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul", "DynamicQuantizeLSTM", "MatMulNBits",
    "NhwcQLinearConv", "QuantizeLinear", "DequantizeLinear",
)
# Float compute ops (after ORT fusions) still present.
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                     "Attention", "MultiHeadAttention")


# ---------------------------------------------------------------------------------------------
# helpers shared with tests/python/test_int8.py
# ---------------------------------------------------------------------------------------------

def mantissa_binary() -> Path:
    env = os.environ.get("MANTISSA_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "debug" / "mantissa"


def ort_library() -> str | None:
    """ORT_DYLIB_PATH, or the library fetched into .onnxruntime/lib."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return os.environ["ORT_DYLIB_PATH"]
    found = sorted(glob.glob(str(REPO_ROOT / ".onnxruntime" / "lib" / "libonnxruntime.so.*")))
    return found[-1] if found else None


def mantissa_env() -> dict[str, str]:
    env = dict(os.environ)
    lib = ort_library()
    if lib:
        env["ORT_DYLIB_PATH"] = lib
    return env


def mantissa_cmd(model: Path, out: Path, mode: str, calibration: Path | None = None,
                 method: str | None = None, percentile: float | None = None,
                 policy: Path | None = None) -> list[str]:
    cmd = [str(mantissa_binary()), "quantize", str(model), "--precision", "int8", "--mode", mode]
    if policy:
        cmd += ["--policy", str(policy)]
    if mode == "static":
        cmd += ["--calibration-data", str(calibration)]
        if method:
            cmd += ["--calibration-method", method]
        if method == "percentile" and percentile is not None:
            cmd += ["--percentile", str(percentile)]
    return cmd + ["-o", str(out)]


def graph_input_names(model_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def load_holdout(npz: Path, input_names: list[str], labels_key: str = "labels"):
    """(inputs {name: array}, labels or None) of a holdout .npz."""
    with np.load(npz, allow_pickle=False) as data:
        missing = [n for n in input_names if n not in data.files]
        if missing:
            raise KeyError(f"{npz}: no array for graph input(s) {missing}; keys: {sorted(data.files)}")
        inputs = {n: data[n] for n in input_names}
        labels = data[labels_key] if labels_key in data.files else None
    return inputs, labels


def session(model_path: Path, threads: int = 2, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle worker threads of one session must not spin while another session is timed (the
    # variants are interleaved on the same cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def optimized_histogram(model_path: Path, work_dir: Path, threads: int = 2) -> collections.Counter:
    """op_type histogram of the graph ORT runs after ORT_ENABLE_ALL optimizations."""
    import onnx

    work_dir.mkdir(parents=True, exist_ok=True)
    optimized = work_dir / (model_path.stem + ".ort_optimized.onnx")
    session(model_path, threads, optimized)
    model = onnx.load(str(optimized), load_external_data=False)
    hist: collections.Counter = collections.Counter()

    def walk(graph):
        for node in graph.node:
            hist[node.op_type] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return hist


def integer_ops(hist: collections.Counter) -> dict[str, int]:
    return {op: n for op, n in sorted(hist.items()) if op in INTEGER_OPS}


def float_compute_ops(hist: collections.Counter) -> dict[str, int]:
    return {op: n for op, n in sorted(hist.items()) if op in FLOAT_COMPUTE_OPS}


def run_outputs(sess, inputs: dict[str, np.ndarray], batch: int = 1) -> list[np.ndarray]:
    """All outputs of `sess` over the holdout inputs, fed `batch` rows at a time, concatenated."""
    n = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        feed = {k: v[start:start + batch] for k, v in inputs.items()}
        chunks.append(sess.run(None, feed))
    return [np.concatenate([c[i] for c in chunks], axis=0) for i in range(len(chunks[0]))]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / denom)


def quality(outputs: list[np.ndarray], fp32: list[np.ndarray], labels: np.ndarray | None) -> dict:
    """Accuracy (first output, argmax over the last axis), top-1 agreement and cosine vs FP32."""
    logits, ref = outputs[0], fp32[0]
    pred = logits.reshape(len(logits), -1).argmax(axis=1)
    ref_pred = ref.reshape(len(ref), -1).argmax(axis=1)
    all_out = np.concatenate([o.ravel() for o in outputs])
    all_ref = np.concatenate([o.ravel() for o in fp32])
    per_sample = [cosine(logits[i], ref[i]) for i in range(len(logits))]
    return {
        "accuracy": float((pred == labels).mean()) if labels is not None else None,
        "agreement": float((pred == ref_pred).mean()),
        "cosine": cosine(all_out, all_ref),
        "min_sample_cosine": float(min(per_sample)),
        "max_abs_error": float(np.max(np.abs(all_out.astype(np.float64) - all_ref))),
        "nonfinite": int((~np.isfinite(all_out)).sum()),
    }


def file_size(model_path: Path) -> int:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    files = {model_path}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.add(model_path.parent / {e.key: e.value for e in t.external_data}["location"])
    return sum(p.stat().st_size for p in files if p.is_file())


# ---------------------------------------------------------------------------------------------
# converters, each in a subprocess
# ---------------------------------------------------------------------------------------------

GNU_TIME = Path("/usr/bin/time")


@functools.cache
def gnu_time_works() -> bool:
    try:
        proc = subprocess.run([str(GNU_TIME), "-f", "%M", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stderr.strip().splitlines()[-1].strip().isdigit()


def run_measured(cmd: list[str], log_dir: Path, timeout: float, env: dict | None = None) -> dict:
    """Runs cmd; returns returncode, wall seconds, peak RSS (KiB), stdout and stderr.

    Peak RSS: the ru_maxrss of the converter process. Linux counts in a child's ru_maxrss the memory
    of the process it was forked from until exec (a child of this Python process would start at this
    process's RSS), so the command runs under GNU time (`/usr/bin/time -f %M`), whose own small child
    is measured. Without GNU time, os.wait4's ru_maxrss is used and the figure is an upper bound.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path, rss_path = log_dir / "stdout.txt", log_dir / "stderr.txt", log_dir / "maxrss.txt"
    use_time = gnu_time_works()
    full = [str(GNU_TIME), "-f", "%M", "-o", str(rss_path), *cmd] if use_time else cmd
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env=env,
                                cwd=REPO_ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode  # reaped by wait4; keep Popen from waiting again
    peak, method = usage.ru_maxrss, "wait4 (upper bound)"
    if use_time:
        lines = [ln for ln in rss_path.read_text().splitlines() if ln.strip()] if rss_path.is_file() else []
        if lines and lines[-1].strip().isdigit():
            peak, method = int(lines[-1]), "GNU time %M"
    return {
        "returncode": returncode,
        "seconds": seconds,
        "peak_rss_kib": peak,
        "rss_method": method,
        "stdout": out_path.read_text(errors="replace"),
        "stderr": err_path.read_text(errors="replace"),
        "cmd": cmd,
    }


def first_error_line(text: str) -> str:
    """The `Error: ...` line of a failed command (anyhow), else a line mentioning an error, else the last."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()] or [""]
    found = next((ln for ln in lines if ln.startswith("Error")), None)
    found = found or next((ln for ln in lines if "error" in ln.lower() and "::" not in ln), lines[-1])
    return found[:400]


def convert(cmd: list[str], out: Path, log_dir: Path, timeout: float, env: dict | None = None) -> dict:
    res = run_measured(cmd, log_dir, timeout, env)
    row = {"seconds": res["seconds"], "peak_rss_kib": res["peak_rss_kib"], "rss_method": res["rss_method"],
           "cmd": " ".join(cmd)}
    marker = [ln for ln in res["stdout"].splitlines() if ln.startswith("ORT_CONVERT_SECONDS ")]
    if marker:
        row["inproc_seconds"] = float(marker[-1].split()[1])
    # Mantissa's own measure: peak memory of the static pass over that of FP32 inference on one
    # calibration sample, each measured alone in the same process.
    memory = re.search(r"peak memory: .*\(([0-9.]+)x\)", res["stdout"])
    if memory:
        row["calibration_memory_ratio"] = float(memory.group(1))
    if res["returncode"] != 0:
        row["error"] = f"exit {res['returncode']}: {first_error_line(res['stderr'] or res['stdout'])}"
    elif not out.is_file():
        row["error"] = "exited 0 but wrote no output"
    else:
        row["path"] = out
    row["log"] = (res["stdout"] + res["stderr"])[-4000:]
    return row


def ort_worker(argv: list[str]) -> int:
    """`compare_int8.py _ort_convert static|dynamic|noop MODEL OUT [CALIB_DIR]` (run as a child)."""
    kind, model, out = argv[0], argv[1], argv[2]
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    if kind == "noop":
        print("ORT_CONVERT_SECONDS 0")
        return 0
    start = time.perf_counter()
    if kind == "dynamic":
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=True)
    else:
        names = graph_input_names(Path(model))
        files = sorted(glob.glob(os.path.join(argv[3], "*.npz")))
        if not files:
            raise SystemExit(f"no .npz files in {argv[3]}")

        class NpzReader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(files)

            def get_next(self):
                path = next(self._it, None)
                if path is None:
                    return None
                with np.load(path, allow_pickle=False) as data:
                    return {n: data[n] for n in names}

        quantize_static(model, out, NpzReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    print(f"ORT_CONVERT_SECONDS {time.perf_counter() - start:.6f}")
    return 0


def ort_cmd(kind: str, model: Path, out: Path, calibration: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ort_convert", kind, str(model), str(out)]
    return cmd + ([str(calibration)] if calibration else [])


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def latency(sessions: dict[str, object], feed: dict[str, np.ndarray], runs: int, warmup: int,
            rounds: int = 25) -> dict[str, float]:
    """Median ms per run for each session, interleaved in `rounds` rounds."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for key, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feed)
    per_round = max(1, math.ceil(runs / rounds))
    for _ in range(rounds):
        for key, sess in sessions.items():
            t = times[key]
            for _ in range(3):  # re-warm caches after the other variants ran
                sess.run(None, feed)
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feed)
                t.append((time.perf_counter() - start) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def evaluate_model(case: dict, args, root: Path) -> dict:
    name, model, calibration, holdout = case["name"], case["model"], case["calibration"], case["holdout"]
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    result = {"model": name, "fp32_path": str(model), "variants": []}
    names = graph_input_names(model)
    inputs, labels = load_holdout(holdout, names, args.labels_key)
    n = len(next(iter(inputs.values())))

    variants: list[dict] = [{"variant": "FP32", "converter": "fp32", "path": model}]
    env = mantissa_env()
    for method in args.methods:
        out = work / f"mantissa_static_{method}.onnx"
        cmd = mantissa_cmd(model, out, "static", calibration, method, args.percentile)
        variants.append({"variant": f"mantissa static {method}", "converter": "mantissa",
                         **convert(cmd, out, work / f"log_mantissa_static_{method}", args.timeout, env)})
    # The static recipe with one policy option changed: every layer quantized (the node
    # coverage ORT's quantizer has, for a like-for-like latency comparison), and int8
    # symmetric activations (S8S8).
    for label, slug, option in [("all layers", "all_layers", "keep_first_and_last_layers: false"),
                                ("S8S8", "s8s8", "activation_type: int8")]:
        policy = work / f"{slug}_policy.yaml"
        policy.write_text("variants:\n  q:\n    precision: int8\n    int8:\n      mode: static\n"
                          f"      calibration_data: {calibration.resolve()}\n      {option}\n")
        out = work / f"mantissa_static_minmax_{slug}.onnx"
        cmd = mantissa_cmd(model, out, "static", calibration, "minmax", policy=policy)
        variants.append({"variant": f"mantissa static minmax, {label}", "converter": "mantissa",
                         **convert(cmd, out, work / f"log_mantissa_static_{slug}", args.timeout, env)})
    out = work / "mantissa_weight_only.onnx"
    variants.append({"variant": "mantissa weight-only int4", "converter": "mantissa",
                     **convert(mantissa_cmd(model, out, "weight-only"), out, work / "log_mantissa_weight_only",
                               args.timeout, env)})
    out = work / "mantissa_dynamic.onnx"
    variants.append({"variant": "mantissa dynamic", "converter": "mantissa",
                     **convert(mantissa_cmd(model, out, "dynamic"), out, work / "log_mantissa_dynamic",
                               args.timeout, env)})
    out = work / "ort_static_minmax.onnx"
    variants.append({"variant": "ORT static minmax", "converter": "ort",
                     **convert(ort_cmd("static", model, out, calibration), out, work / "log_ort_static",
                               args.timeout)})
    out = work / "ort_dynamic.onnx"
    variants.append({"variant": "ORT dynamic", "converter": "ort",
                     **convert(ort_cmd("dynamic", model, out), out, work / "log_ort_dynamic", args.timeout)})
    print(f"{name}: converted", file=sys.stderr)

    sessions: dict[str, object] = {}
    fp32_out = None
    for v in variants:
        if "path" not in v:
            continue
        key = v["variant"]
        try:
            v["size"] = file_size(Path(v["path"]))
            hist = optimized_histogram(Path(v["path"]), work / "optimized", args.threads)
            v["histogram"] = dict(sorted(hist.items()))
            v["integer_ops"] = integer_ops(hist)
            v["float_compute_ops"] = float_compute_ops(hist)
            sess = session(Path(v["path"]), args.threads)
            outputs = run_outputs(sess, inputs, args.eval_batch)
            if fp32_out is None:
                fp32_out = outputs
            v.update(quality(outputs, fp32_out, labels))
            sessions[key] = sess
        except Exception as exc:  # noqa: BLE001 - report, don't abort
            v["error"] = f"evaluation: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:240]}"
            v["trace"] = traceback.format_exc()
    print(f"{name}: evaluated", file=sys.stderr)

    for batch in (1, 8):
        if batch > n:
            continue
        feed = {k: v[:batch] for k, v in inputs.items()}
        good = {}
        for key, sess in sessions.items():
            try:
                sess.run(None, feed)
                good[key] = sess
            except Exception as exc:  # noqa: BLE001
                v = next(x for x in variants if x["variant"] == key)
                v.setdefault("error", f"batch {batch}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        medians = latency(good, feed, args.runs, args.warmup)
        for v in variants:
            if v["variant"] in medians:
                v[f"latency_b{batch}_ms"] = medians[v["variant"]]
        fp32_ms = medians.get("FP32")
        for v in variants:
            ms = v.get(f"latency_b{batch}_ms")
            if ms and fp32_ms:
                v[f"speedup_b{batch}"] = fp32_ms / ms
        print(f"{name}: latency at batch {batch} measured", file=sys.stderr)

    for v in variants:
        v["path"] = str(v["path"]) if "path" in v else None
    result["variants"] = variants
    result["samples"] = n
    return result


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def fmt(x, spec: str, scale: float = 1.0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return format(x * scale, spec)


def ops_text(ops: dict | None) -> str:
    if ops is None:
        return "–"
    if not ops:
        return "none"
    return ", ".join(f"{op}×{n}" for op, n in ops.items())


def markdown(results: list[dict], args, baseline_kib: int | None) -> str:
    methods = {v.get("rss_method") for r in results for v in r["variants"] if v.get("rss_method")}
    rss_method = ", ".join(sorted(methods)) or "–"
    head = ("| model | variant | acc % | agree % | cosine | b1 ms | b8 ms | speedup b1 | speedup b8 | "
            "conv s | peak MiB | calib. mem / FP32 inference | size KiB | integer ops (ORT-optimized) | "
            "FP32 compute left | error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for v in r["variants"]:
            conv_s = "–"
            if v["converter"] != "fp32" and v.get("seconds") is not None:
                conv_s = f"{v['seconds']:.2f}"
                if v.get("inproc_seconds") is not None:
                    conv_s += f" ({v['inproc_seconds']:.2f})"
            peak = fmt(v.get("peak_rss_kib"), ".0f", 1 / 1024)
            err = (v.get("error") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['model']} | {v['variant']} | {fmt(v.get('accuracy'), '.2f', 100)} | "
                f"{fmt(v.get('agreement'), '.2f', 100)} | {fmt(v.get('cosine'), '.5f')} | "
                f"{fmt(v.get('latency_b1_ms'), '.3f')} | {fmt(v.get('latency_b8_ms'), '.3f')} | "
                f"{fmt(v.get('speedup_b1'), '.2f')}{'x' if v.get('speedup_b1') else ''} | "
                f"{fmt(v.get('speedup_b8'), '.2f')}{'x' if v.get('speedup_b8') else ''} | "
                f"{conv_s} | {peak} | {fmt(v.get('calibration_memory_ratio'), '.2f')}"
                f"{'x' if v.get('calibration_memory_ratio') else ''} | {fmt(v.get('size'), '.1f', 1 / 1024)} | "
                f"{ops_text(v.get('integer_ops'))} | {ops_text(v.get('float_compute_ops'))} | {err} |")
    lines.append("")
    samples = ", ".join(f"{r['model']}: {r.get('samples', '?')}" for r in results)
    lines.append(
        f"Holdout samples ({samples}) run at batch {args.eval_batch}; cosine over all outputs, flattened. "
        f"Latency: median of {args.runs} runs after {args.warmup} warm-up, onnxruntime "
        f"{ort_version()} CPU EP, ORT_ENABLE_ALL, intra_op_num_threads={args.threads}, no spinning, variants "
        f"interleaved; speedup = FP32 median / variant median. conv s: converter subprocess wall time "
        f"(ORT: in-process quantize_* time in parentheses); peak MiB: the subprocess's ru_maxrss "
        f"({rss_method})"
        + (f" (a Python child importing onnxruntime.quantization alone peaks at "
           f"{baseline_kib / 1024:.0f} MiB)" if baseline_kib else "")
        + ". calib. mem / FP32 inference: Mantissa's static pass (calibration, quantization) over FP32 "
        "inference on one calibration sample, peak resident memory of each measured alone in the same "
        "process (`mantissa quantize` prints both). Mantissa keeps the first and last compute layers FP32 "
        "by default; ORT quantizes all supported ops, as the 'all layers' row does.")
    return "\n".join(lines)


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items() if k != "trace" or v}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_ort_convert":
        return ort_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    parser.add_argument("--json-out", type=Path, help="also write the JSON results to this file")
    parser.add_argument("--example", action="append", choices=EXAMPLE_NAMES,
                        help="only these example models (repeatable; default: both)")
    parser.add_argument("--model", type=Path, help="an FP32 model to compare instead of the examples")
    parser.add_argument("--calibration", type=Path, help="with --model: directory of calibration .npz files")
    parser.add_argument("--holdout", type=Path, help="with --model: holdout .npz (input arrays, labels)")
    parser.add_argument("--name", help="with --model: the name shown in the table")
    parser.add_argument("--labels-key", default="labels", help="key of the labels in the holdout .npz")
    parser.add_argument("--methods", default="minmax",
                        help="Mantissa static calibration methods, comma-separated, or 'all' (default minmax)")
    parser.add_argument("--percentile", type=float, help="--percentile for the percentile method")
    parser.add_argument("--runs", type=int, default=1000, help="timed runs per variant and batch size")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up runs per variant and batch size")
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads")
    parser.add_argument("--eval-batch", type=int, default=1, help="batch size for accuracy/cosine runs")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per converter run")
    parser.add_argument("--keep", type=Path, help="keep converted models and logs under this directory")
    args = parser.parse_args()

    args.methods = list(ALL_METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        parser.error(f"unknown method(s) {bad}; known: {list(ALL_METHODS)}")
    if args.model:
        if not (args.calibration and args.holdout):
            parser.error("--model needs --calibration DIR and --holdout NPZ")
        cases = [{"name": args.name or (args.model.parent.name if args.model.stem == "model" else args.model.stem),
                  "model": args.model.resolve(), "calibration": args.calibration.resolve(),
                  "holdout": args.holdout.resolve()}]
    else:
        cases = [{"name": n, "model": EXAMPLES / n / "model.onnx", "calibration": EXAMPLES / n / "calibration",
                  "holdout": EXAMPLES / n / "test_data.npz"} for n in (args.example or EXAMPLE_NAMES)]

    results = []
    with tempfile.TemporaryDirectory(prefix="compare_int8_") as tmp:
        root = (args.keep.resolve() if args.keep else Path(tmp))
        root.mkdir(parents=True, exist_ok=True)
        noop = run_measured(ort_cmd("noop", Path("-"), Path("-")), root / "log_ort_noop", args.timeout)
        baseline_kib = noop["peak_rss_kib"] if noop["returncode"] == 0 else None
        for case in cases:
            try:
                results.append(evaluate_model(case, args, root))
            except Exception as exc:  # noqa: BLE001 - keep going
                results.append({"model": case["name"], "variants": [], "error": f"{type(exc).__name__}: {exc}",
                                "trace": traceback.format_exc()})
                print(traceback.format_exc(), file=sys.stderr)

    payload = {"onnxruntime": ort_version(), "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
               "eval_batch": args.eval_batch, "ort_python_baseline_rss_kib": baseline_kib, "results": results}
    if args.json_out:
        args.json_out.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
    if args.json:
        print(json.dumps(json_safe(payload), indent=2, allow_nan=False))
    else:
        print(markdown(results, args, baseline_kib))
        for r in results:
            if r.get("error"):
                print(f"\n{r['model']}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
