#!/usr/bin/env python3
"""One report over the corpus: every Mantissa mode and ONNX Runtime's own quantizer on each model.

    python3 scripts/corpus/report.py MANTISSA_BIN [--cache DIR] [--only NAME ...] [--modes MODE ...]
        [--json OUT] [--markdown OUT] [--timeout S] [--latency-seconds S]
        [--skip-ort-recipes] [--skip-latency]

For each corpus model (what scripts/corpus/fetch.py made under `<cache>/models`) this runs
`MANTISSA_BIN quantize` in each mode of robustness.py, and ONNX Runtime's Python quantizer in
four recipes on the same model and calibration samples:

    ort-dynamic        quantize_dynamic, per-tensor weights (default op types)
    ort-dynamic-pc     quantize_dynamic, per-channel weights
    ort-static         quantize_static, QDQ, QUInt8 activations, QInt8 weights, MinMax, per-tensor
    ort-static-pc      the same with per-channel weights

(quant_pre_process runs once per model first; where it fails, once more with
skip_symbolic_shape=True, and where that fails too the recipes take the model as it is; the
report says which). Every form is judged as robustness.py does (onnx.checker with
full_check, onnxruntime loads it, runs the holdout samples) and gets, against the FP32 model
on the holdout samples:

- cosine: the mean over the samples of each float output's cosine, worst output shown;
- a task metric chosen from corpus.json (box_outputs, class_outputs, family, output text):
    detection   box_outputs: cosine of the score rows alone; best-scoring anchor agreement
    text-map    a probability map: IoU of the map thresholded at 0.3
    ctc         OCR recognition: greedy CTC decode (argmax, collapse repeats, drop blank 0);
                samples whose sequence equals FP32's; per-timestep argmax agreement
    vad         voice activity: windows whose speech/non-speech call at 0.5 matches
    embedding   sentence encoder: mean-pooled over attention_mask; samples whose nearest
                other sample is the same as under FP32; pooled-embedding cosine
    top1        classifiers: rows whose argmax matches FP32's
- latency: onnxruntime CPU, 2 intra-op threads, sequential execution, at batch 1 (the
  median-sized holdout sample) and batch 8 (that sample repeated along the batch axis; "-"
  with a note where the model has no dynamic batch axis or refuses batch 8). After two warm-up
  runs, the FP32 model and the form take turns for about --latency-seconds; speedup = the
  median FP32 time / the form's median time from those same turns, so load from elsewhere on
  the machine weighs on both alike. The FP32 row shows FP32's own median times;
- size (the model file with its external data) against FP32, quantization wall time (ORT:
  time inside the quantizer call, pre-processing included) and the quantizer's peak resident
  memory (the child process's ru_maxrss; ORT's includes the Python interpreter).

Accuracy rule. A form that the checker accepts and onnxruntime loads and runs is OK when
    worst-output cosine >= 0.99 (fp16) or >= 0.98 (INT8 forms), and
    its task metric's first value passes: detection score cosine >= the same cosine bound,
    text-map IoU >= 0.90, and every agreement (top1, ctc sequences, vad windows, embedding
    nearest neighbours) >= 0.85;
otherwise ACCURACY-MISS. An INT8 form with no more INT8 nodes than the input model is
NOTHING-QUANTIZED (with the reason Mantissa printed). Failures: ERROR (non-zero exit),
TIMEOUT, INVALID (checker), ORT-REFUSES (does not load), RUN-FAILS (fails on the holdout).
The best form of each quantizer is its fastest OK form at batch 1 (with --skip-latency: its
highest cosine); each Mantissa row shows the best ORT recipe's speedup beside its own.

Exit status 0 whatever the cells say; non-zero only when the report itself cannot run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_env  # noqa: E402

corpus_env.ensure_venv([str(Path(__file__).resolve()), *sys.argv[1:]])

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import judge  # noqa: E402

ORT_RECIPES = {
    "ort-dynamic": {"static": False, "per_channel": False},
    "ort-dynamic-pc": {"static": False, "per_channel": True},
    "ort-static": {"static": True, "per_channel": False},
    "ort-static-pc": {"static": True, "per_channel": True},
}
COSINE_MIN = {"fp16": 0.99, "int8": 0.98}
WORKER_FLAG = "--ort-worker"
WORKER_MARK = "REPORT-WORKER "
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---- ONNX Runtime's quantizer, run in a child process (own time, memory, crashes)


def ort_worker(argv: list[str]) -> int:
    """`report.py --ort-worker preprocess SRC OUT` or `--ort-worker RECIPE SRC CALIBRATION_DIR OUT`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class NpzReader(CalibrationDataReader):
        def __init__(self, files):
            self.files = iter(files)

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else dict(np.load(path))

    kind, src, out = argv[0], argv[1], argv[-1]
    start = time.perf_counter()
    result: dict = {}
    if kind == "preprocess":
        try:
            quant_pre_process(src, out)
        except Exception as err:  # noqa: BLE001 - then without symbolic shape inference, as its message advises
            result["full_failed"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            quant_pre_process(src, out, skip_symbolic_shape=True)
    elif ORT_RECIPES[kind]["static"]:
        reader = NpzReader(sorted(Path(argv[2]).glob("*.npz")))
        quantize_static(src, out, reader, quant_format=QuantFormat.QDQ, per_channel=ORT_RECIPES[kind]["per_channel"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        quantize_dynamic(src, out, per_channel=ORT_RECIPES[kind]["per_channel"])
    print(WORKER_MARK + json.dumps({"seconds": time.perf_counter() - start, **result}), flush=True)
    return 0


def worker_result(output: str) -> dict:
    """What the worker reported on its last line ({} when it did not get there)."""
    for line in output.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    return {}


def python_error(output: str) -> str:
    """The end of a Python traceback (the failing line and the exception), else the output's tail."""
    lines = [ln for ln in output.splitlines()
             if ln.strip() and not ln.startswith(WORKER_MARK) and not set(ln.strip()) <= set("^~")]
    return "\n".join(ln.strip() for ln in lines[-2:])


# ---- quantizer runs


def trimmed(output: str) -> str:
    """Output without colour codes and calibration progress lines, at most about 6000 characters."""
    lines = [ANSI.sub("", ln) for ln in output.splitlines()]
    lines = [ln for ln in lines if " calibrating " not in ln]
    text = "\n".join(lines)
    return text if len(text) <= 6000 else text[:2000] + "\n[...]\n" + text[-4000:]


def kept_reason(output: str) -> str:
    """Why Mantissa kept nodes in FP32, from its summary ('nodes kept in FP32' block), else the
    lines of its output that mention FP32, kept or skipped nodes."""
    text = ANSI.sub("", output)
    # Mantissa's own explanation when it quantized nothing (its summary's "note:" line).
    note = re.search(r"^\s*note: (no node was quantized.*)$", text, re.M)
    if note:
        return note.group(1).strip()
    kept = re.search(r"nodes kept in FP32:\s+(\d+)", text)
    if kept and kept.group(1) == "0":
        return "no node was a candidate for this mode (0 quantized, 0 kept in FP32)"
    lines = text.splitlines()
    counts: dict[str, int] = {}
    inside = False
    for line in lines:
        if "kept in FP32" in line:
            inside = True
            continue
        if inside and line.startswith("    "):
            grouped = re.match(r"\s+(\d+)\s+(.+)$", line)
            reason, n = (grouped.group(2), int(grouped.group(1))) if grouped else (line.rsplit("): ", 1)[-1], 1)
            reason = re.sub(r"'[^']*'", "'…'", reason.strip())  # one reason, whichever tensor it names
            counts[reason] = counts.get(reason, 0) + n
        elif inside:
            inside = False
    if counts:
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        return "kept in FP32: " + ", ".join(f"{k} ({v})" for k, v in top[:5]) + (", ..." if len(top) > 5 else "")
    hits = [ln.strip() for ln in lines if re.search(r"fp32|kept|skipp", ln, re.I) and " calibrating " not in ln]
    return "; ".join(hits[-3:])


def run_mantissa(ctx: dict, model_dir: Path, mode: str, out_path: Path) -> dict:
    cmd = [str(ctx["binary"]), "quantize", str(model_dir / "model.onnx"), *judge.mode_args(mode, model_dir),
           "-o", str(out_path)]
    run = judge.run_child(cmd, ctx["args"].timeout, ctx["env"])
    rec = {"quantizer": "mantissa", "form": mode, "precision": "fp16" if mode == "fp16" else "int8",
           "command": cmd, "exit": run.exit, "timed_out": run.exit is None, "seconds": round(run.seconds, 3),
           "peak_mib": run.peak_mib, "output": trimmed(run.output)}
    if run.exit not in (0, None):
        rec["error"] = judge.error_text(ANSI.sub("", run.output))
    rec["made"] = run.exit == 0 and out_path.exists()
    return rec


def run_worker(ctx: dict, argv: list[str]) -> judge.ChildRun:
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, *argv]
    return judge.run_child(cmd, ctx["args"].timeout, dict(os.environ))


def ort_preprocess(ctx: dict, model_dir: Path, work: Path) -> dict:
    """quant_pre_process once per model; returns what happened and the model the recipes take."""
    out = work / "ort-preprocessed.onnx"
    for stale in work.glob("ort-preprocessed.onnx*"):
        stale.unlink()
    run = run_worker(ctx, ["preprocess", str(model_dir / "model.onnx"), str(out)])
    ok = run.exit == 0 and out.exists()
    done = worker_result(run.output) if ok else {}
    note = None
    if not ok:
        note = "quant_pre_process failed, the recipes took the model as it is: " + (
            "timed out" if run.exit is None else python_error(run.output).splitlines()[-1][:300])
    elif done.get("full_failed"):
        note = f"quant_pre_process failed ({done['full_failed']}); it ran with skip_symbolic_shape=True"
    return {"ok": ok, "model": str(out if ok else model_dir / "model.onnx"), "seconds": done.get("seconds"),
            "wall_seconds": round(run.seconds, 3), "peak_mib": run.peak_mib, "note": note}


def peak_of(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def run_ort_recipe(ctx: dict, model_dir: Path, recipe: str, pre: dict, out_path: Path) -> dict:
    run = run_worker(ctx, [recipe, pre["model"], str(model_dir / "calibration"), str(out_path)])
    inner = worker_result(run.output).get("seconds")
    seconds = run.seconds if inner is None else inner + (pre["seconds"] or 0.0)
    rec = {"quantizer": "ort", "form": recipe, "precision": "int8", "recipe": ORT_RECIPES[recipe], "exit": run.exit,
           "timed_out": run.exit is None, "seconds": round(seconds, 3), "wall_seconds": round(run.seconds, 3),
           "peak_mib": peak_of(run.peak_mib, pre["peak_mib"] if pre["ok"] else None),
           "preprocessed": pre["ok"], "output": trimmed(run.output)}
    if run.exit not in (0, None):
        rec["error"] = python_error(run.output)
    rec["made"] = run.exit == 0 and out_path.exists()
    return rec


# ---- latency


def batch_axes(sess: ort.InferenceSession, sample: dict) -> tuple[dict, str | None]:
    """The batch axis of each input (from the first input's first dimension), or why there is none.

    A named first dimension ('batch') is looked up by name in the other inputs; an unnamed one
    takes, in each input, the first dynamic axis where the sample has size 1 (so silero-vad's
    state [2, batch, 128] is batched along axis 1). Inputs without one (a scalar) stay as they are."""
    inputs = sess.get_inputs()
    first = inputs[0].shape
    if not first:
        return {}, f"input {inputs[0].name} is a scalar"
    if isinstance(first[0], int) and first[0] > 0:
        return {}, f"input {inputs[0].name} has a fixed first dimension of {first[0]}"
    name = first[0] if isinstance(first[0], str) and first[0] != "?" else None
    axes = {}
    for inp in inputs:
        shape = sample[inp.name].shape
        if name is not None:
            axis = next((i for i, d in enumerate(inp.shape) if d == name), None)
        else:
            axis = next((i for i, d in enumerate(inp.shape)
                         if not (isinstance(d, int) and d > 0) and i < len(shape) and shape[i] == 1), None)
        if axis is not None:
            axes[inp.name] = axis
    return axes, None


def batched(sample: dict, axes: dict, n: int) -> dict:
    return {k: np.concatenate([v] * n, axis=axes[k]) if k in axes else v for k, v in sample.items()}


def timed_ms(sessions: list, feed: dict, seconds: float) -> list[float]:
    """Median wall time of one run of each session in milliseconds. After two warm-up runs
    each, the sessions take turns (order alternating) for about `seconds` in all, at least
    three runs each, so load from elsewhere on the machine weighs on all of them alike."""
    for sess in sessions:
        for _ in range(2):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    turn = 0
    while len(times[0]) < 3 or (time.perf_counter() - start < seconds and len(times[0]) < 5000):
        order = list(range(len(sessions)))
        for i in order if turn % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(time.perf_counter() - t)
        turn += 1
    return [float(np.median(t) * 1000) for t in times]


def latency(sessions: list, sample: dict, axes: dict | None, seconds: float) -> dict:
    """Batch 1 and batch 8 latency of `sessions` timed together: [the form's] or [FP32's, the
    form's]; `axes` None means no batch 8 (already explained). Returns the last session's
    times, with FP32's (fp32_b1_ms, fp32_b8_ms) when it was timed beside it."""
    b1 = timed_ms(sessions, sample, seconds)
    result: dict = {"b1_ms": b1[-1], "b8_ms": None, "b8_note": None}
    if len(sessions) == 2:
        result["fp32_b1_ms"] = b1[0]
    if axes is not None:
        try:
            b8 = timed_ms(sessions, batched(sample, axes, 8), seconds)
            result["b8_ms"] = b8[-1]
            if len(sessions) == 2:
                result["fp32_b8_ms"] = b8[0]
        except Exception as err:  # noqa: BLE001 - refusing batch 8 is a finding
            result["b8_note"] = "refuses batch 8: " + str(err).splitlines()[0][:200]
    return result


def latency_sample(samples: list[dict]) -> dict:
    """The median-sized holdout sample (by element count over all inputs)."""
    order = sorted(range(len(samples)), key=lambda i: sum(np.asarray(v).size for v in samples[i].values()))
    return samples[order[len(order) // 2]]


# ---- judging one form


def judge_form(rec: dict, out_path: Path, ref: dict) -> tuple[dict, object]:
    """Fills status, cosine and task metric of a quantizer's record; returns it and the session."""
    sess = None
    if rec.pop("made"):
        rec["eval"], outputs, sess = judge.judge_model(out_path, ref["outputs"], ref["samples"], ref["types"])
        rec["size_ratio"] = rec["eval"]["size_bytes"] / ref["size_bytes"]
    status = judge.status_of(rec)
    if status != "ok":
        rec["status"] = status
        return rec, None
    cos = [c["mean"] for c in rec["eval"]["cosine"].values()]
    rec["cosine_worst"] = float(min(cos)) if cos else None
    rec["metric"] = judge.task_metric(ref["plan"], ref["outputs"], outputs, ref["samples"])
    bound = COSINE_MIN[rec["precision"]]
    cos_ok = rec["cosine_worst"] is None or rec["cosine_worst"] >= bound
    if rec["precision"] == "int8" and judge.quant_nodes(rec["eval"]["ops"]) <= ref["source_quant"]:
        rec["status"] = "NOTHING-QUANTIZED"
        if rec["quantizer"] == "mantissa":
            rec["reason"] = kept_reason(rec.get("output", ""))
    elif cos_ok and judge.metric_passes(ref["plan"], rec["metric"], bound):
        rec["status"] = "OK"
    else:
        rec["status"] = "ACCURACY-MISS"
    return rec, sess


def finish_form(ctx: dict, rec: dict, out_path: Path, ref: dict) -> dict:
    rec, sess = judge_form(rec, out_path, ref)
    if sess is not None and not ctx["args"].skip_latency:
        rec["latency"] = latency([ref["session"], sess], ref["lat_sample"], ref["axes"], ctx["args"].latency_seconds)
    label = rec["status"] + (f" {rec['cosine_worst']:.4f}" if rec.get("cosine_worst") is not None else "")
    print(f"{label} ({rec['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return rec


# ---- one model


def reference(ctx: dict, model_dir: Path, meta: dict) -> dict:
    """FP32 outputs on the holdout samples, the task metric plan and FP32 latency, shared by all forms."""
    source = model_dir / "model.onnx"
    samples = judge.holdout_samples(model_dir)
    sess = judge.session(source)
    outputs = judge.run_outputs(sess, samples)
    ref = {"samples": samples, "outputs": outputs, "types": {k: v.dtype.type for k, v in outputs[0].items()},
           "source_quant": judge.quant_nodes(judge.op_counts(onnx.load(str(source), load_external_data=False))),
           "size_bytes": sum((model_dir / f).stat().st_size for f in meta.get("model_files", ["model.onnx"])),
           "plan": judge.metric_plan(meta, outputs), "lat_sample": latency_sample(samples)}
    axes, why = batch_axes(sess, ref["lat_sample"])
    ref["axes"] = None if why else axes
    ref["session"] = sess
    ref["latency"] = None
    if not ctx["args"].skip_latency:
        ref["latency"] = latency([sess], ref["lat_sample"], ref["axes"], ctx["args"].latency_seconds)
        if why:
            ref["latency"]["b8_note"] = why
        if ref["latency"]["b8_ms"] is None:
            ref["axes"] = None  # FP32 has no batch 8: do not time it for the quantized forms either
    return ref


def report_model(ctx: dict, name: str) -> dict:
    start = time.monotonic()
    model_dir = ctx["models_dir"] / name
    meta = json.loads((model_dir / "corpus.json").read_text())
    work = ctx["work"] / name
    work.mkdir(parents=True, exist_ok=True)
    print(f"{name}: FP32 reference ...", file=sys.stderr, flush=True)
    ref = reference(ctx, model_dir, meta)
    records = []
    for mode in ctx["modes"]:
        out_path = work / f"{mode}.onnx"
        for stale in work.glob(f"{mode}.onnx*"):
            stale.unlink()
        print(f"{name} {mode} ...", end=" ", file=sys.stderr, flush=True)
        records.append(finish_form(ctx, run_mantissa(ctx, model_dir, mode, out_path), out_path, ref))
    pre = None
    if not ctx["args"].skip_ort_recipes:
        print(f"{name} ORT quant_pre_process ...", file=sys.stderr, flush=True)
        pre = ort_preprocess(ctx, model_dir, work)
        for recipe in ORT_RECIPES:
            out_path = work / f"{recipe}.onnx"
            for stale in work.glob(f"{recipe}.onnx*"):
                stale.unlink()
            print(f"{name} {recipe} ...", end=" ", file=sys.stderr, flush=True)
            records.append(finish_form(ctx, run_ort_recipe(ctx, model_dir, recipe, pre, out_path), out_path, ref))
    for rec in records:
        rec["model"] = name
        speed_up(rec)
    result = {"model": name, "family": meta.get("family", ""), "metric": ref["plan"], "size_bytes": ref["size_bytes"],
              "fp32_latency": ref["latency"], "preprocess": pre, "records": records,
              "best_mantissa": best_of(records, "mantissa"), "best_ort": best_of(records, "ort"),
              "seconds": round(time.monotonic() - start, 1)}
    print(f"{name}: done in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


def speed_up(rec: dict) -> None:
    """FP32 time / the form's time, both from the runs they took turns in."""
    lat = rec.get("latency")
    if not lat:
        return
    rec["b1_speedup"] = lat["fp32_b1_ms"] / lat["b1_ms"]
    if lat.get("b8_ms") and lat.get("fp32_b8_ms"):
        rec["b8_speedup"] = lat["fp32_b8_ms"] / lat["b8_ms"]


def best_of(records: list[dict], quantizer: str) -> str | None:
    """The fastest OK form of a quantizer at batch 1 (the highest cosine when nothing was timed)."""
    ok = [r for r in records if r["quantizer"] == quantizer and r["status"] == "OK"]
    if not ok:
        return None
    if all("b1_speedup" in r for r in ok):
        return max(ok, key=lambda r: r["b1_speedup"])["form"]
    return max(ok, key=lambda r: r.get("cosine_worst") or 0.0)["form"]


# ---- report text


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = [f for f in value.split() if f == "avx2" or f.startswith(("avx512", "amx")) or "vnni" in f]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": flags}


def binary_id(path: Path) -> str:
    """The binary's path, build time and the start of its sha256 (builds come and go)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    return f"{path} (built {built}, sha256 {digest})"


def header(ctx: dict) -> dict:
    return {"command": " ".join(["python3", "scripts/corpus/report.py", *sys.argv[1:]]),
            "mantissa": ctx["version"], "binary": binary_id(ctx["binary"]), "cpu": cpu_info(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "latency_seconds": None if ctx["args"].skip_latency else ctx["args"].latency_seconds,
            "load_average_start": os.getloadavg()[0], "modes": ctx["modes"], "ort_recipes": [] if ctx["args"].skip_ort_recipes else list(ORT_RECIPES)}


def fmt_speed(rec: dict, key: str, best: dict | None, notes: list[str]) -> str:
    if rec.get(key) is None:
        lat = rec.get("latency") or {}
        if key == "b8_speedup" and lat.get("b8_note"):
            return "- " + note_ref(notes, f"{rec['model']} / {rec['form']}: {lat['b8_note']}")
        return "-"
    text = f"{rec[key]:.2f}×"
    if rec["quantizer"] == "mantissa" and best is not None and best.get(key) is not None:
        text += f" (ORT {best[key]:.2f}×)"
    return text


def note_ref(notes: list[str], text: str) -> str:
    if text not in notes:
        notes.append(text)
    return f"[{notes.index(text) + 1}]"


def fp32_row(res: dict, notes: list[str]) -> str:
    lat = res["fp32_latency"] or {}
    b1 = f"{lat['b1_ms']:.2f} ms" if lat.get("b1_ms") else "-"
    if lat.get("b8_ms"):
        b8 = f"{lat['b8_ms']:.2f} ms"
    elif lat.get("b8_note"):
        b8 = "- " + note_ref(notes, f"{res['model']}: {lat['b8_note']}")
    else:
        b8 = "-"
    size = f"{res['size_bytes'] / 1e6:.2f} MB"
    metric = f"{res['metric']['kind']} (from {res['metric']['basis']})"
    return f"| {res['model']} | fp32 | reference | - | {metric} | {b1} | {b8} | {size} | - | - |"


def form_row(res: dict, rec: dict, best_ort: dict | None, notes: list[str]) -> str:
    form = judge.SHORT.get(rec["form"], rec["form"])
    if rec["form"] in (res["best_mantissa"], res["best_ort"]):
        form = f"**{form}**"
    cos = f"{rec['cosine_worst']:.5f}" if rec.get("cosine_worst") is not None else "-"
    metric = rec["metric"]["text"] if rec.get("metric") else "-"
    ratio = f"{rec['size_ratio']:.2f}" if rec.get("size_ratio") else "-"
    status = rec["status"] if rec["status"] in ("OK",) else f"**{rec['status']}**"
    if rec["form"] == next(iter(ORT_RECIPES)) and (res["preprocess"] or {}).get("note"):
        status += " " + note_ref(notes, f"{res['model']}: {res['preprocess']['note']}")
    return (f"| | {form} | {status} | {cos} | {metric} | {fmt_speed(rec, 'b1_speedup', best_ort, notes)} | "
            f"{fmt_speed(rec, 'b8_speedup', best_ort, notes)} | {ratio} | {rec['seconds']:.1f} | {mib(rec['peak_mib'])} |")


def summary_line(res: dict) -> str:
    by_form = {r["form"]: r for r in res["records"]}

    def describe(form: str | None, who: str) -> str:
        if form is None:
            return f"no {who} form passes"
        rec = by_form[form]
        parts = [f"{who} {judge.SHORT.get(form, form)}"]
        if rec.get("b1_speedup"):
            parts.append(f"{rec['b1_speedup']:.2f}× at b1" + (f", {rec['b8_speedup']:.2f}× at b8" if rec.get("b8_speedup") else ""))
        parts.append(f"cosine {rec['cosine_worst']:.5f}" if rec.get("cosine_worst") is not None else "no float output")
        if rec.get("metric"):
            parts.append(rec["metric"]["text"])
        parts.append(f"size {rec['size_ratio']:.2f}")
        return ", ".join(parts)

    text = f"- **{res['model']}** ({res['seconds']:.0f} s): {describe(res['best_mantissa'], 'Mantissa')}"
    if any(r["quantizer"] == "ort" for r in res["records"]):
        text += f" | {describe(res['best_ort'], 'ORT')}"
        m, o = by_form.get(res["best_mantissa"] or ""), by_form.get(res["best_ort"] or "")
        if m and o and m.get("b1_speedup") and o.get("b1_speedup"):
            text += f" | Mantissa / ORT at b1: {m['b1_speedup'] / o['b1_speedup']:.2f}"
    return text


def render(head: dict, results: list[dict]) -> str:
    cpu = head["cpu"]
    lines = ["# Corpus report", "",
             f"- command: `{head['command']}`", f"- mantissa: {head['mantissa']}, {head['binary']}",
             f"- CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags']) or 'none of avx2/avx512/vnni'}",
             f"- load average (1 min): {head['load_average_start']:.2f} at the start, {head['load_average_end']:.2f} at "
             "the end (other work on the machine makes the latencies noisy)",
             f"- Python {head['python']}, onnxruntime {head['onnxruntime']}, onnx {head['onnx']}, numpy {head['numpy']}",
             "- latency: " + ("not measured" if head["latency_seconds"] is None else
                             f"CPU provider, 2 intra-op threads, sequential; after warm-up, FP32 and each form take "
                             f"turns for ~{head['latency_seconds']} s per batch size; speedup = FP32's median time / "
                             "the form's median time from those turns (FP32 row: FP32's own median times)"),
             "- OK: worst-output cosine >= 0.99 (fp16) / 0.98 (INT8) and the task metric passes (detection score "
             "cosine >= the same bound, map IoU >= 0.90, agreements >= 0.85); bold form = fastest OK form of "
             "Mantissa and of ORT's quantizer; Mantissa rows show the best ORT recipe's speedup in brackets", "",
             "| model | form | status | cosine | task metric | b1 speedup | b8 speedup | size ratio | quant s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for res in results:
        lines.append(fp32_row(res, notes))
        best_ort = next((r for r in res["records"] if r["form"] == res["best_ort"]), None)
        lines += [form_row(res, rec, best_ort, notes) for rec in res["records"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    lines += ["", "## Per model", ""] + [summary_line(res) for res in results]
    lines += ["", "## Failures and forms that quantized nothing", ""]
    found = False
    for res in results:
        for rec in res["records"]:
            if rec["status"] in judge.FAILURES:
                found = True
                message = judge.failure_message(rec).strip().replace("\n", " / ")[:600]
                lines.append(f"- {res['model']} / {rec['form']}: {rec['status']}: {message}")
            elif rec["status"] == "NOTHING-QUANTIZED":
                found = True
                lines.append(f"- {res['model']} / {rec['form']}: nothing quantized; {rec.get('reason') or 'no reason printed'}")
    if not found:
        lines.append("none")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path, help="the mantissa binary")
    parser.add_argument("--cache", type=Path, default=corpus_env.DEFAULT_CACHE, help="corpus cache (default .corpus/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these corpus models")
    parser.add_argument("--modes", nargs="+", choices=list(judge.MODES), help="only these Mantissa modes")
    parser.add_argument("--json", type=Path, help="also write everything to this JSON file")
    parser.add_argument("--markdown", type=Path, help="also write the report to this markdown file")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one quantizer run may take (default 300)")
    parser.add_argument("--latency-seconds", type=float, default=2.0, help="timed runs per latency figure (default 2)")
    parser.add_argument("--skip-ort-recipes", action="store_true", help="do not run ONNX Runtime's quantizer")
    parser.add_argument("--skip-latency", action="store_true", help="do not measure latency")
    args = parser.parse_args()
    # a plain `kill` unwinds like Ctrl-C, so the quantizer running at the time goes too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    models_dir = args.cache.resolve() / "models"
    names = sorted(p.name for p in models_dir.iterdir() if (p / "corpus.json").exists()) if models_dir.exists() else []
    if args.only:
        missing = sorted(set(args.only) - set(names))
        if missing:
            print(f"not in the corpus: {', '.join(missing)}", file=sys.stderr)
        names = [n for n in names if n in set(args.only)]
    if not names:
        print(f"no corpus models in {models_dir}; run scripts/corpus/fetch.py first", file=sys.stderr)
        return 2
    binary = args.binary.resolve()
    env = judge.ort_library_env()
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env).stdout.strip()
    ctx = {"args": args, "binary": binary, "env": env, "version": version, "models_dir": models_dir,
           "work": args.cache.resolve() / "report", "modes": args.modes or list(judge.MODES)}
    head = header(ctx)
    results = [report_model(ctx, name) for name in names]
    head["load_average_end"] = os.getloadavg()[0]
    text = render(head, results)
    print(text, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": head, "models": results}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        sys.exit(ort_worker(sys.argv[2:]))
    sys.exit(main())
