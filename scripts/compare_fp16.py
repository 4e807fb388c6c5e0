#!/usr/bin/env python3
"""Compares Mantissa's FP16 conversion with onnxconverter-common's on the FP16 fixtures and examples.

Usage: .venv/bin/python scripts/compare_fp16.py [--json] [--model NAME ...] [--keep DIR]

For each model (tests/fixtures/fp16/* and examples/models/digits_{cnn,transformer}):
- ours:   `$MANTISSA_BIN|target/debug/mantissa quantize MODEL --precision fp16 -o OUT`, timed as a
          whole subprocess (process start, load, convert, save);
- theirs: onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True),
          in-process, timing the conversion call plus onnx.save (not onnx.load; external data is
          loaded first, and saved back as external data when the original used it);
then tests/python/fp16_harness.py judges each result against FP32: checker, onnxruntime CPU load,
min cosine over outputs, max-abs error, non-finite outputs, on onnxruntime CPU ("ORT") and on
onnx.reference with per-op FP16 arithmetic ("ref"), plus on-disk size (model + external data).
A converter that fails on a model is reported in the table, never aborts the run.
Prints a Markdown table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
import fp16_harness  # noqa: E402
from compare_int8 import file_size as model_size  # noqa: E402  (model file plus its external data)

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "fp16"
EXAMPLES = REPO_ROOT / "examples" / "models"
EXAMPLE_NAMES = ("digits_cnn", "digits_transformer")


def models() -> dict[str, tuple[Path, Path]]:
    found = {}
    fixture_dirs = sorted(p for p in FIXTURES.iterdir() if (p / "model.onnx").is_file()) if FIXTURES.is_dir() else []
    for d in fixture_dirs:
        found[d.name] = (d / "model.onnx", d / "inputs.npz")
    for name in EXAMPLE_NAMES:
        found[name] = (EXAMPLES / name / "model.onnx", EXAMPLES / name / "test_data.npz")
    return found


def mantissa_binary() -> Path:
    env = os.environ.get("MANTISSA_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "debug" / "mantissa"


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def convert_ours(fp32: Path, out_dir: Path, timeout: int) -> dict:
    out = out_dir / "model.onnx"
    cmd = [str(mantissa_binary()), "quantize", str(fp32), "--precision", "fp16", "-o", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [""]
        message = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        return {"error": f"exit {proc.returncode}: {message.strip()[:200]}", "seconds": seconds}
    if not out.is_file():
        return {"error": "exited 0 but wrote no output", "seconds": seconds}
    return {"path": out, "seconds": seconds}


def convert_theirs(fp32: Path, out_dir: Path) -> dict:
    from onnxconverter_common import float16

    out = out_dir / "model.onnx"
    try:
        model = onnx.load(str(fp32), load_external_data=True)
        external = uses_external_data(onnx.load(str(fp32), load_external_data=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation warnings: the drift numbers show their effect
            start = time.perf_counter()
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
            if external:
                onnx.save(converted, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                          location="weights.bin", size_threshold=0)
            else:
                onnx.save(converted, str(out))
            seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - report, don't abort
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"path": out, "seconds": seconds}


def judge(fp32: Path, inputs: Path, conv: dict, batch_size: int) -> dict:
    row = {"seconds": conv.get("seconds"), "error": conv.get("error")}
    if "path" not in conv:
        return row
    row["size"] = model_size(conv["path"])
    try:
        res = fp16_harness.compare(fp32, conv["path"], inputs, batch_size=batch_size)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"harness: {type(exc).__name__}: {exc}"
        return row
    row["checker"] = res["checker"]["ok"]
    row["ort_load"] = res["ort_load"]["ok"]
    for runtime, run in res["runs"].items():
        ok = run["ok"]
        row[runtime] = {"ok": ok, "error": run["error"],
                        "min_cosine": run.get("min_cosine") if ok else None,
                        "max_abs_error": run.get("max_abs_error") if ok else None,
                        "nonfinite": run.get("nonfinite") if ok else None}
    row["nonfinite"] = res["nonfinite"] if any(r["ok"] for r in res["runs"].values()) else None
    problems = []
    if not res["checker"]["ok"]:
        problems.append("checker: " + res["checker"]["error"].splitlines()[0][:120])
    if not res["ort_load"]["ok"]:
        message = res["ort_load"]["error"].splitlines()[0]
        problems.append("ORT load: " + message.split(" failed:", 1)[-1].strip()[:120])
    for runtime, run in res["runs"].items():
        if run["error"] and not run["error"].startswith("skipped"):
            problems.append(f"{runtime}: " + run["error"].splitlines()[0][:120])
    if problems and not row["error"]:
        row["error"] = "; ".join(problems)
    return row


def fmt_float(x, spec: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return format(x, spec)


def markdown(results: list[dict]) -> str:
    head = ("| model | converter | time (s) | size (bytes) | size / FP32 | checker | ORT load | "
            "min cos ORT | min cos ref | max abs err ORT | max abs err ref | non-finite | error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r['model']} | FP32 | | {r['fp32_size']} | 100% | | | | | | | | |")
        for conv in ("ours", "theirs"):
            c = r[conv]
            name = "mantissa" if conv == "ours" else "onnxconverter-common"
            size = c.get("size")
            ratio = f"{size / r['fp32_size']:.0%}" if size else "–"
            ort_run, ref_run = c.get("ort_cpu") or {}, c.get("onnx_reference") or {}
            yn = {True: "yes", False: "no", None: "–"}
            err = (c.get("error") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['model']} | {name} | {fmt_float(c.get('seconds'), '.3f')} | {size if size else '–'} | "
                f"{ratio} | {yn[c.get('checker')]} | {yn[c.get('ort_load')]} | "
                f"{fmt_float(ort_run.get('min_cosine'), '.6f')} | {fmt_float(ref_run.get('min_cosine'), '.6f')} | "
                f"{fmt_float(ort_run.get('max_abs_error'), '.3g')} | {fmt_float(ref_run.get('max_abs_error'), '.3g')} | "
                f"{yn[c.get('nonfinite')]} | {err} |")
    lines.append("")
    lines.append("ORT = onnxruntime CPU (computes most FP16 ops in FP32); ref = onnx.reference, per-op FP16 "
                 "arithmetic. Our time is the whole `mantissa quantize` process; theirs is convert + save.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument("--model", action="append", help="only these models (repeatable)")
    parser.add_argument("--batch-size", type=int, default=fp16_harness.DEFAULT_BATCH_SIZE)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per `mantissa quantize` run")
    parser.add_argument("--keep", type=Path, help="keep converted models under this directory")
    args = parser.parse_args()

    available = models()
    names = args.model or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list(available)}")

    results = []
    with tempfile.TemporaryDirectory(prefix="compare_fp16_") as tmp:
        root = args.keep or Path(tmp)
        for name in names:
            fp32, inputs = available[name]
            row = {"model": name, "fp32_size": model_size(fp32)}
            for conv in ("ours", "theirs"):
                out_dir = root / name / conv
                out_dir.mkdir(parents=True, exist_ok=True)
                try:
                    result = (convert_ours(fp32, out_dir, args.timeout) if conv == "ours"
                              else convert_theirs(fp32, out_dir))
                    row[conv] = judge(fp32, inputs, result, args.batch_size)
                except Exception as exc:  # noqa: BLE001 - keep going
                    row[conv] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            results.append(row)
            print(f"done: {name}", file=sys.stderr)

    if args.json:
        print(json.dumps(fp16_harness.json_safe(results), indent=2, allow_nan=False))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
