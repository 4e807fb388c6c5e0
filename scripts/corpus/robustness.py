#!/usr/bin/env python3
"""Runs `mantissa quantize` in every mode on every corpus model and judges what comes out.

    python3 scripts/corpus/robustness.py MANTISSA_BIN [--cache DIR] [--json OUT] [--timeout 300]
                                         [--only NAME ...] [--modes MODE ...]

The corpus is what scripts/corpus/fetch.py made under `<cache>/models`. For each model and
mode this runs `MANTISSA_BIN quantize <model> --precision ... -o <out>` and records the exit
status, the error text and the wall time; for a model it produced, whether
`onnx.checker.check_model(full_check=True)` accepts it, whether onnxruntime loads it, the mean
cosine of each float output against the FP32 model over the holdout samples (flattened), and
the count of nodes by op type. It prints a markdown table (model x mode) and the failures
with their messages: a mode that errors, runs past --timeout, writes an invalid model, or
writes a model onnxruntime refuses (or cannot run on the holdout samples) is a failure.
Warnings list runs that worked but look wrong: an INT8 mode that quantized nothing, outputs
that are not finite, a changed output type, or an output cosine under 0.95.

MANTISSA_BIN needs ORT_DYLIB_PATH for static calibration; when it is unset, this script points
it at the libonnxruntime of the venv's onnxruntime wheel. Exit status: 0 when nothing failed,
1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_env  # noqa: E402

corpus_env.ensure_venv([str(Path(__file__).resolve()), *sys.argv[1:]])

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from judge import (  # noqa: E402
    FAILURES, MODES, QUANT_OPS, SHORT, error_text, evaluate, failure_message, holdout_samples, mode_args,
    op_counts, ort_library_env, run_child, run_outputs, session, status_of,
)


def run_quantize(binary: Path, args: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """Runs one command; returns (exit status or None on timeout, output text, seconds)."""
    run = run_child([str(binary), *args], timeout, env)
    return run.exit, run.output, run.seconds


def warnings_of(rec: dict, source_ops: dict, fp32_types: dict) -> list[str]:
    if rec["status"] != "ok":
        return []
    ev = rec["eval"]
    out = []
    if rec["mode"].startswith("int8"):
        before = sum(v for k, v in source_ops.items() if k in QUANT_OPS)
        after = sum(v for k, v in ev["ops"].items() if k in QUANT_OPS)
        if after <= before:
            out.append(f"quantized nothing: {after} INT8 nodes in the output, {before} in the input")
    elif rec["mode"] == "fp16" and ev["fp16_tensors"] == 0 and not any(
        k == "Cast" and v > source_ops.get("Cast", 0) for k, v in ev["ops"].items()
    ):
        out.append("converted nothing: no float16 tensors and no added Cast")
    if not ev.get("finite", True):
        out.append("outputs hold NaN or Inf")
    for name, want in fp32_types.items():
        got = ev["output_types"].get(name)
        expected = onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(want))).lower()
        if got is None:
            out.append(f"output {name} is missing")
        elif got != expected:
            out.append(f"output {name} is {got}, was {expected}")
    for name, c in ev.get("cosine", {}).items():
        if not (c["mean"] >= 0.95):
            out.append(f"output {name} mean cosine {c['mean']:.4f}")
    return out


def cell(rec: dict | None) -> str:
    if rec is None:
        return ""
    secs = f"{rec['seconds']:.1f}s"
    if rec["status"] != "ok":
        return f"**{rec['status']}** {secs}"
    cos = [c["mean"] for c in rec["eval"].get("cosine", {}).values()]
    worst = min(cos) if cos else float("nan")
    mark = " ⚠" if rec["warnings"] else ""
    return f"ok {worst:.4f} {secs}{mark}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path, help="the mantissa binary")
    parser.add_argument("--cache", type=Path, default=corpus_env.DEFAULT_CACHE, help="corpus cache (default .corpus/)")
    parser.add_argument("--json", type=Path, help="also write every record to this JSON file")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one quantize run may take (default 300)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these corpus models")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="only these modes")
    args = parser.parse_args()

    binary = args.binary.resolve()
    models_dir = args.cache.resolve() / "models"
    work = args.cache.resolve() / "robustness"
    # error text without Rust backtraces (set CORPUS_RUST_BACKTRACE=1 to keep them)
    env = ort_library_env()
    names = sorted(p.name for p in models_dir.iterdir() if (p / "corpus.json").exists()) if models_dir.exists() else []
    if args.only:
        names = [n for n in names if n in set(args.only)]
    if not names:
        print(f"no corpus models in {models_dir}; run scripts/corpus/fetch.py first", file=sys.stderr)
        return 2
    modes = args.modes or list(MODES)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env).stdout.strip()
    records = []
    for name in names:
        model_dir = models_dir / name
        meta = json.loads((model_dir / "corpus.json").read_text())
        source = model_dir / "model.onnx"
        samples = holdout_samples(model_dir)
        ref_sess = session(source)
        reference = run_outputs(ref_sess, samples)
        fp32_types = {k: v.dtype.type for k, v in reference[0].items()}
        source_ops = op_counts(onnx.load(str(source), load_external_data=False))
        out_dir = work / name
        out_dir.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            out_path = out_dir / f"{mode}.onnx"
            for stale in out_dir.glob(f"{mode}.onnx*"):
                stale.unlink()
            cmd = ["quantize", str(source), *mode_args(mode, model_dir), "-o", str(out_path)]
            print(f"{name} {mode} ...", end=" ", flush=True, file=sys.stderr)
            code, output, seconds = run_quantize(binary, cmd, args.timeout, env)
            rec = {"model": name, "mode": mode, "family": meta["family"], "opset": meta["opset"], "command": [str(binary), *cmd], "exit": code, "timed_out": code is None,
                   "seconds": round(seconds, 2),
                   "output": output if len(output) <= 6000 else output[:2000] + "\n[...]\n" + output[-4000:]}
            if code == 0 and out_path.exists():
                rec["eval"] = evaluate(out_path, reference, samples, fp32_types)
            elif code not in (0, None):
                rec["error"] = error_text(output)
            rec["status"] = status_of(rec)
            rec["warnings"] = warnings_of(rec, source_ops, fp32_types)
            print(rec["status"], f"{seconds:.1f}s", file=sys.stderr, flush=True)
            records.append(rec)
        del ref_sess

    failures = print_report(binary, version, names, modes, records, models_dir)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"binary": str(binary), "version": version, "records": records}, indent=2) + "\n")
    return 1 if failures else 0


def print_report(binary: Path, version: str, names: list[str], modes: list[str], records: list[dict],
                 models_dir: Path) -> list[dict]:
    """Prints the tables, failures and warnings; returns the failed records."""
    print(f"# Robustness of `{binary.name} quantize` ({version}) on the corpus\n")
    print("Cell: status, worst output's mean cosine vs FP32 over the holdout samples, quantize wall time; "
          "⚠ = warnings below.\n")
    print("| model | " + " | ".join(SHORT[m] for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    by_key = {(r["model"], r["mode"]): r for r in records}
    for name in names:
        print(f"| {name} | " + " | ".join(cell(by_key.get((name, m))) for m in modes) + " |")

    multi = [r for r in records if r["status"] == "ok" and len(r["eval"].get("cosine", {})) > 1]
    if multi:
        print("\n## Per-output mean cosine (models with several outputs)\n")
        for r in multi:
            parts = ", ".join(f"{k} {v['mean']:.4f}" for k, v in r["eval"]["cosine"].items())
            print(f"- {r['model']} / {r['mode']}: {parts}")

    print("\n## INT8 / FP16 work in the outputs\n")
    print("INT8 modes: nodes of INT8 op types (Q/DQ, *Integer, QLinear*, MatMulNBits, ...) in the output "
          "(input model's count in brackets); fp16: float16 tensors and Cast nodes.\n")
    print("| model | " + " | ".join(SHORT[m] for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for name in names:
        src = op_counts(onnx.load(str(models_dir / name / "model.onnx"), load_external_data=False))
        before = sum(v for k, v in src.items() if k in QUANT_OPS)
        cells = []
        for m in modes:
            r = by_key.get((name, m))
            if r is None or "eval" not in r:
                cells.append("-")
            elif m == "fp16":
                cells.append(f"{r['eval']['fp16_tensors']} f16, {r['eval']['ops'].get('Cast', 0)} Cast")
            else:
                cells.append(f"{sum(v for k, v in r['eval']['ops'].items() if k in QUANT_OPS)} [{before}]")
        print(f"| {name} | " + " | ".join(cells) + " |")

    failures = [r for r in records if r["status"] in FAILURES]
    print(f"\n## Failures ({len(failures)})\n")
    for r in failures:
        print(f"- **{r['model']} / {r['mode']}**: {r['status']}")
        print("  ```")
        for line in failure_message(r).splitlines():
            print(f"  {line}")
        print("  ```")
    warned = [r for r in records if r["warnings"]]
    print(f"\n## Warnings ({len(warned)})\n")
    for r in warned:
        print(f"- {r['model']} / {r['mode']}: " + "; ".join(r["warnings"]))
    return failures


if __name__ == "__main__":
    sys.exit(main())
