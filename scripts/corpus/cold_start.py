#!/usr/bin/env python3
"""Cold start to SERVING of a corpus model with a static INT8 variant under a drift budget.

    python3 scripts/corpus/cold_start.py MANTISSA_BIN [--cache DIR] [--model minilm-l6]
        [--budget 0.99] [--runs 1] [--json OUT]

Builds a one-model store in `<cache>/bench/cold-start-<model>/`: the corpus model with the
policy below (fp32, and int8 static calibrated on the model's calibration samples, with the
startup drift budget of cosine `--budget` on the holdout samples), then starts
`mantissa serve` on loopback with an empty artifact cache and measures the wall time from the
start of the process to the log line "all models ready". It prints the CPU, that time, the
search's summary and the int8 variant's startup drift (worst output cosine) from the log.
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
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import judge  # noqa: E402
import report  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")

POLICY = """serving:
  instances: 1
  intra_op_threads: 2
variants:
  fp32:
    precision: fp32
  int8:
    precision: int8
    int8:
      mode: static
      calibration_data: calibration
routing:
  default: fp32
drift:
  holdout_data: holdout
  reference: fp32
  budget:
    min_cosine: {budget}
"""


def make_store(cache: Path, model: str, budget: float) -> Path:
    source = cache / "models" / model
    if not (source / "model.onnx").exists():
        sys.exit(f"{source / 'model.onnx'} is missing: run scripts/corpus/fetch.py --only {model} first")
    store = cache / "bench" / f"cold-start-{model}"
    if store.exists():
        shutil.rmtree(store)
    target = store / model
    target.mkdir(parents=True)
    for name in ("model.onnx", "calibration", "holdout"):
        (target / name).symlink_to(source / name)
    for extra in source.glob("model.onnx.data"):
        (target / extra.name).symlink_to(extra)
    (target / "policy.yaml").write_text(POLICY.format(budget=budget))
    return store


def cold_start(binary: Path, store: Path, env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        cmd = [str(binary), "serve", "--model-store", str(store), "--grpc-addr", "127.0.0.1:0", "--metrics-addr",
               "127.0.0.1:0", "--cache-dir", cache_dir]
        started = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines, ready = [], None
        try:
            assert server.stdout is not None
            for line in server.stdout:
                line = ANSI.sub("", line.rstrip())
                lines.append(line)
                if "all models ready" in line:
                    ready = time.perf_counter() - started
                    break
                if time.perf_counter() - started > timeout:
                    break
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    summary = [ln for ln in lines if "budget met" in ln or "budget missed" in ln or "mixed precision" in ln]
    drift = [ln for ln in lines if "startup drift" in ln and "int8" in ln]
    calibration = [ln for ln in lines if " calibrated " in ln]
    return {"command": " ".join(cmd), "seconds_to_ready": None if ready is None else round(ready, 2),
            "search": summary[-1:], "drift": drift[-2:], "calibration": calibration[-1:],
            "log_tail": lines[-5:] if ready is None else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(".corpus"))
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--budget", type=float, default=0.99)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cpu = report.cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}")
    store = make_store(args.cache.resolve(), args.model, args.budget)
    env = judge.ort_library_env(dict(os.environ))
    runs = [cold_start(args.binary.resolve(), store, env, args.timeout) for _ in range(args.runs)]
    for number, run in enumerate(runs, 1):
        print(f"run {number}: {args.model} fp32 + int8 static (budget cosine {args.budget}) "
              f"ready in {run['seconds_to_ready']} s (empty artifact cache)")
        for line in run["calibration"] + run["search"] + run["drift"] + run["log_tail"]:
            print("   ", line[:500])
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "model": args.model, "budget": args.budget, "runs": runs}, indent=2))
    return 0 if all(run["seconds_to_ready"] is not None for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
