#!/usr/bin/env python3
"""Calibration and budget-search time at scale, beside ONNX Runtime's Python quantizer.

    python3 scripts/corpus/calibration_bench.py MANTISSA_BIN [--cache DIR] [--model ppocr-v4-det]
        [--samples 96] [--size 640] [--holdout 8] [--budget 0.99] [--json OUT]

On a corpus model with image input (default: the PP-OCRv4 text detector), this renders
`--samples` text pages of `--size` x `--size` pixels (the same page generator as fetch.py) as
calibration data and `--holdout` more as holdout data, then runs, each in its own process:

1. `mantissa quantize --mode static` (minmax, the plain recipe);
2. ONNX Runtime's `quantize_static` (QDQ, QUInt8 activations, QInt8 weights, MinMax,
   per-tensor) on the model as it is, without `quant_pre_process`;
3. `mantissa quantize --mode static --budget-cosine B --holdout ...` (the budget search: cosine
   B on every output part).

It prints the CPU (model, cores, vector and VNNI flags), and for each run the wall time, peak
resident memory (ru_maxrss), and the ratio to ONNX Runtime's time measured in the same run.
Only ratios from one run compare: other work on the machine moves absolute times.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_env  # noqa: E402

corpus_env.ensure_venv([str(Path(__file__).resolve()), *sys.argv[1:]])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

import fetch  # noqa: E402
import judge  # noqa: E402
import report  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def page_sample(seed: int, size: int) -> dict:
    """A text page with a pasted photo now and then, normalized as PP-OCR's detector expects."""
    rng = random.Random(seed)
    image = fetch.page(rng, (size, size), rng.randint(6, 16), seed)
    if rng.random() < 0.3:
        w, h = rng.randint(120, 260), rng.randint(90, 200)
        image.paste(fetch.photo_crop(rng, (w, h)), (rng.randint(0, size - w), rng.randint(0, size - h)))
    return {"x": fetch.to_chw(image, [0.5] * 3, [0.5] * 3, bgr=True)}


def make_data(root: Path, samples: int, holdout: int, size: int) -> tuple[Path, Path]:
    calibration, held = root / "calibration", root / "holdout"
    for directory, count, first in ((calibration, samples, 10_000), (held, holdout, 20_000)):
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = directory / f"sample_{i:03d}.npz"
            if not path.exists():
                np.savez(path, **page_sample(first + i, size))
        for stale in sorted(directory.glob("sample_*.npz"))[count:]:
            stale.unlink()
    return calibration, held


def mantissa_run(binary: Path, model: Path, extra: list[str], out: Path, env: dict, timeout: float) -> dict:
    cmd = [str(binary), "quantize", str(model), "--precision", "int8", "--mode", "static", *extra, "-o", str(out)]
    run = judge.run_child(cmd, timeout, env)
    text = ANSI.sub("", run.output)
    summary = [ln.strip() for ln in text.splitlines() if "calibrated" in ln or "budget" in ln.lower()]
    return {"command": " ".join(cmd), "exit": run.exit, "seconds": round(run.seconds, 2), "peak_mib": run.peak_mib,
            "lines": summary[-4:], "error": None if run.exit == 0 else judge.error_text(text)}


def ort_run(model: Path, calibration: Path, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(report.__file__).resolve()), report.WORKER_FLAG, "ort-static", str(model),
           str(calibration), str(out)]
    run = judge.run_child(cmd, timeout, dict(os.environ))
    inner = report.worker_result(run.output).get("seconds")
    return {"command": "onnxruntime.quantization.quantize_static (QDQ, U8S8, MinMax, per-tensor)", "exit": run.exit,
            "seconds": round(run.seconds, 2), "quantize_static_seconds": None if inner is None else round(inner, 2),
            "peak_mib": run.peak_mib, "error": None if run.exit == 0 else report.python_error(run.output)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(".corpus"))
    parser.add_argument("--model", default="ppocr-v4-det")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--budget", type=float, default=0.99)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cache = args.cache.resolve()
    model = cache / "models" / args.model / "model.onnx"
    if not model.exists():
        sys.exit(f"{model} is missing: run scripts/corpus/fetch.py --only {args.model} first")
    root = cache / "bench" / f"{args.model}-{args.size}x{args.size}"
    calibration, holdout = make_data(root, args.samples, args.holdout, args.size)
    env = judge.ort_library_env(dict(os.environ))
    work = root / "out"
    work.mkdir(exist_ok=True)
    head = {"cpu": report.cpu_info(), "model": args.model, "samples": args.samples, "size": args.size,
            "holdout": args.holdout}
    print(f"CPU: {head['cpu']['model']}, {head['cpu']['cores']} cores, flags {' '.join(head['cpu']['flags'])}")
    print(f"model {args.model}, {args.samples} calibration images of {args.size}x{args.size}, {args.holdout} holdout")

    runs = {"ort quantize_static": ort_run(model, calibration, work / "ort.onnx", args.timeout),
            "mantissa static": mantissa_run(args.binary, model, ["--calibration-data", str(calibration)],
                                            work / "mantissa.onnx", env, args.timeout)}
    if not args.skip_budget:
        runs[f"mantissa static + budget {args.budget}"] = mantissa_run(
            args.binary, model, ["--calibration-data", str(calibration), "--holdout", str(holdout),
                                 "--budget-cosine", str(args.budget)], work / "mantissa-budget.onnx", env,
            args.timeout)
    ort_seconds = runs["ort quantize_static"]["seconds"]
    print(f"\n| run | exit | seconds | vs ORT | peak MiB |\n|---|---|---|---|---|")
    for name, run in runs.items():
        ratio = f"{run['seconds'] / ort_seconds:.2f}x" if ort_seconds else "-"
        print(f"| {name} | {run['exit']} | {run['seconds']:.1f} | {ratio} | {report.mib(run['peak_mib'])} |")
    for name, run in runs.items():
        if run.get("error"):
            print(f"\n{name} failed: {run['error']}")
        for line in run.get("lines", []):
            print(f"  {name}: {line[:400]}")
    if args.json:
        args.json.write_text(json.dumps({**head, "runs": runs}, indent=2))
    return 0 if all(run["exit"] == 0 for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
