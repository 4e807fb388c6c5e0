"""Judges an FP16 conversion of an ONNX model against its FP32 original.

Library:  compare(fp32_model, fp16_model, inputs_npz) -> dict
CLI:      python tests/python/fp16_harness.py FP32.onnx FP16.onnx INPUTS.npz [--batch-size 8]
          [--min-cosine 0.999] [--runtime ort_cpu] [--runtime onnx_reference]
          prints the dict as JSON (non-finite numbers as null); exit code 0 when result["ok"].

What it does:
 (a) onnx.checker.check_model(FP16, full_check=True) (by path, so external data is resolved);
 (b) loads FP16 in onnxruntime with the CPU execution provider;
 (c) runs FP32 (onnxruntime CPU: the reference outputs) and FP16 on the inputs, batch by batch along
     axis 0, and per output computes, over all batches flattened: cosine similarity, max-abs error,
     mean-abs error and whether any value is non-finite.

FP16 is run by two runtimes, reported separately under result["runs"]:
 - "ort_cpu": onnxruntime's CPU execution provider. NOTE: on CPU, onnxruntime has FP16 kernels for
   few ops; for the others it inserts Casts and computes in FP32, and drops the FP32->FP16->FP32 Cast
   pairs that result. So this run measures the effect of FP16 *storage* (rounded/clamped weights,
   explicit Casts) and validity, but FP16 *arithmetic* overflow (e.g. x*x > 65504) does not show.
 - "onnx_reference": onnx.reference.ReferenceEvaluator (numpy). Every op computes in the tensor's
   dtype, so FP16 tensors are rounded to FP16 after each op and overflow to inf as on an accelerator.

Inputs: an .npz whose keys include every graph input's name (other keys, e.g. `labels`, are ignored).
Arrays are split into batches of `batch_size` along axis 0 when every input has the same leading
dimension; otherwise the whole arrays are fed once. A float input whose dtype differs from what the
model declares (e.g. an FP16 model input) is cast to the declared type, and listed in
result["input_casts"].

Result keys: fp32_model, fp16_model, inputs, batch_size, min_cosine_threshold, checker {ok, error},
ort_load {ok, error}, input_casts, runs {runtime: {ok, error, seconds, outputs {name: {cosine,
max_abs_error, mean_abs_error, ref_max_abs, nonfinite, nonfinite_count, numel}}, min_cosine,
max_abs_error, nonfinite}}, outputs (= runs["ort_cpu"]["outputs"] when that ran), min_cosine,
max_abs_error, nonfinite (worst over runtimes), failures [str], ok.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

RUNTIMES = ("ort_cpu", "onnx_reference")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MIN_COSINE = 0.999


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def load_inputs(npz_path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    with np.load(npz_path, allow_pickle=False) as data:
        available = set(data.files)
        missing = [i.name for i in graph_inputs(model) if i.name not in available]
        if missing:
            raise KeyError(f"{npz_path}: no array for graph input(s) {missing}; keys: {sorted(available)}")
        return {i.name: data[i.name] for i in graph_inputs(model)}


def cast_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    out, casts = {}, []
    for vi in graph_inputs(model):
        value = feeds[vi.name]
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if value.dtype != want:
            value = value.astype(want)
            casts.append(f"{vi.name}: {feeds[vi.name].dtype} -> {want}")
        out[vi.name] = value
    return out, casts


def batches(feeds: dict[str, np.ndarray], batch_size: int | None):
    leading = {v.shape[0] if v.ndim else None for v in feeds.values()}
    if not batch_size or len(leading) != 1 or None in leading:
        yield feeds
        return
    n = leading.pop()
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in feeds.items()}


def run_batched(run: Callable[[dict], list], output_names: list[str], feeds: dict[str, np.ndarray],
                batch_size: int | None) -> dict[str, np.ndarray]:
    """Runs every batch; returns each output flattened and concatenated over batches."""
    chunks: dict[str, list] = {k: [] for k in output_names}
    for feed in batches(feeds, batch_size):
        for name, value in zip(output_names, run(feed)):
            chunks[name].append(np.asarray(value).reshape(-1))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in chunks.items()}


def ort_session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def output_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    if ref64.shape != got64.shape:
        raise ValueError(f"FP16 output has {got64.size} values, FP32 has {ref64.size}")
    finite = np.isfinite(got64)
    nonfinite_count = int(got64.size - finite.sum())
    if nonfinite_count:
        cosine = max_abs = mean_abs = math.nan
    else:
        diff = np.abs(ref64 - got64)
        max_abs = float(diff.max()) if diff.size else 0.0
        mean_abs = float(diff.mean()) if diff.size else 0.0
        na, nb = float(np.linalg.norm(ref64)), float(np.linalg.norm(got64))
        if na == 0.0 or nb == 0.0:
            cosine = 1.0 if na == nb else 0.0
        else:
            cosine = float(np.clip(np.dot(ref64, got64) / (na * nb), -1.0, 1.0))
    return {
        "cosine": cosine,
        "max_abs_error": max_abs,
        "mean_abs_error": mean_abs,
        "ref_max_abs": float(np.abs(ref64).max()) if ref64.size else 0.0,
        "nonfinite": bool(nonfinite_count),
        "nonfinite_count": nonfinite_count,
        "numel": int(got64.size),
    }


def _make_runner(runtime: str, path: Path) -> tuple[Callable[[dict], list], list[str]]:
    if runtime == "ort_cpu":
        sess = ort_session(path)
        names = [o.name for o in sess.get_outputs()]
        return (lambda feed: sess.run(names, feed)), names
    if runtime == "onnx_reference":
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(onnx.load(str(path)))  # loads external data next to the model
        names = list(ref.output_names)

        def run(feed):
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # numpy overflow warnings: overflow is what we measure
                return ref.run(names, feed)

        return run, names
    raise ValueError(f"unknown runtime {runtime!r}; known: {RUNTIMES}")


def compare(fp32_model: str | Path, fp16_model: str | Path, inputs: str | Path,
            batch_size: int | None = DEFAULT_BATCH_SIZE, min_cosine: float = DEFAULT_MIN_COSINE,
            runtimes: tuple[str, ...] = RUNTIMES) -> dict:
    fp32_model, fp16_model, inputs = Path(fp32_model), Path(fp16_model), Path(inputs)
    result: dict = {
        "fp32_model": str(fp32_model), "fp16_model": str(fp16_model), "inputs": str(inputs),
        "batch_size": batch_size, "min_cosine_threshold": min_cosine,
    }
    failures: list[str] = []

    # (a) checker, by path so that external data and large models are handled
    try:
        onnx.checker.check_model(str(fp16_model), full_check=True)
        result["checker"] = {"ok": True, "error": None}
    except Exception as exc:  # noqa: BLE001 - every checker failure is a finding
        result["checker"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        failures.append(f"checker: {exc}")

    # (b) onnxruntime CPU load
    try:
        ort_session(fp16_model)
        result["ort_load"] = {"ok": True, "error": None}
    except Exception as exc:  # noqa: BLE001
        result["ort_load"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        failures.append(f"onnxruntime CPU load: {exc}")

    # (c) reference outputs: FP32 model on onnxruntime CPU
    fp32_proto = onnx.load(str(fp32_model), load_external_data=False)
    feeds = load_inputs(inputs, fp32_proto)
    fp32_feeds, _ = cast_feeds(fp32_proto, feeds)
    sess32 = ort_session(fp32_model)
    names32 = [o.name for o in sess32.get_outputs()]
    reference = run_batched(lambda f: sess32.run(names32, f), names32, fp32_feeds, batch_size)

    result["input_casts"] = []
    result["runs"] = {}
    try:
        fp16_proto = onnx.load(str(fp16_model), load_external_data=False)
        fp16_feeds, result["input_casts"] = cast_feeds(fp16_proto, feeds)
    except Exception as exc:  # noqa: BLE001
        fp16_feeds = None
        failures.append(f"cannot prepare FP16 inputs: {exc}")

    for runtime in runtimes:
        run_result: dict = {"ok": False, "error": None, "seconds": None, "outputs": {}}
        result["runs"][runtime] = run_result
        if fp16_feeds is None:
            run_result["error"] = "skipped: FP16 inputs could not be prepared"
            continue
        if runtime == "ort_cpu" and not result["ort_load"]["ok"]:
            run_result["error"] = "skipped: model did not load in onnxruntime"
            continue
        start = time.perf_counter()
        try:
            run, names = _make_runner(runtime, fp16_model)
            missing = [n for n in names32 if n not in names]
            if missing:
                raise KeyError(f"FP16 model lacks output(s) {missing}; it has {names}")
            got = run_batched(run, names, fp16_feeds, batch_size)
            for name in names32:
                run_result["outputs"][name] = output_metrics(reference[name], got[name])
            run_result["ok"] = True
        except Exception as exc:  # noqa: BLE001
            run_result["error"] = f"{type(exc).__name__}: {exc}"
            failures.append(f"{runtime} run: {run_result['error']}")
        run_result["seconds"] = round(time.perf_counter() - start, 4)
        outs = run_result["outputs"].values()
        run_result["min_cosine"] = min((o["cosine"] for o in outs), default=math.nan, key=_nan_low)
        run_result["max_abs_error"] = max((o["max_abs_error"] for o in outs), default=math.nan, key=_nan_high)
        run_result["nonfinite"] = any(o["nonfinite"] for o in outs)
        for name, o in run_result["outputs"].items():
            if o["nonfinite"]:
                failures.append(f"{runtime}: output {name!r} has {o['nonfinite_count']} non-finite values")
            elif not o["cosine"] >= min_cosine:
                failures.append(f"{runtime}: output {name!r} cosine {o['cosine']:.6f} < {min_cosine}")

    if "ort_cpu" in result["runs"]:
        result["outputs"] = result["runs"]["ort_cpu"]["outputs"]
    ran = [r for r in result["runs"].values() if r["ok"]]
    result["min_cosine"] = min((r["min_cosine"] for r in ran), default=math.nan, key=_nan_low)
    result["max_abs_error"] = max((r["max_abs_error"] for r in ran), default=math.nan, key=_nan_high)
    result["nonfinite"] = any(r["nonfinite"] for r in ran)
    result["failures"] = failures
    result["ok"] = not failures
    return result


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _nan_high(x: float) -> float:
    return math.inf if math.isnan(x) else x


def json_safe(obj):
    """NaN/inf -> None, recursively, so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare an FP16 ONNX model with its FP32 original.")
    parser.add_argument("fp32_model")
    parser.add_argument("fp16_model")
    parser.add_argument("inputs", help=".npz with one array per graph input (batch along axis 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="rows per run along axis 0; 0 feeds whole arrays (default %(default)s)")
    parser.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES,
                        help="FP16 runtime(s) to use (repeatable; default: all)")
    args = parser.parse_args(argv)
    result = compare(args.fp32_model, args.fp16_model, args.inputs, batch_size=args.batch_size or None,
                     min_cosine=args.min_cosine, runtimes=tuple(args.runtime or RUNTIMES))
    print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
