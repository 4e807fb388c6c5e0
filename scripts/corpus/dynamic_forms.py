#!/usr/bin/env python3
"""Mantissa's dynamic INT8 form beside ONNX Runtime's quantize_dynamic, graph by graph.

    python3 scripts/corpus/dynamic_forms.py MANTISSA_BIN [--cache DIR] [--model minilm-l6]
        [--latency-seconds S] [--rounds N] [--form LABEL=PATH ...] [--mantissa-args "..."] [--json OUT]

On a corpus model (default: the MiniLM-L6 sentence encoder) this builds

- `mantissa quantize MODEL --precision int8 --mode dynamic` (plus --mantissa-args);
- ONNX Runtime's `quantize_dynamic(model, out, per_channel=True)` and `per_channel=False`
  (default op types, no pre-processing);
- any already-built form given with --form LABEL=PATH;

and prints the CPU (model, cores, vector and VNNI flags), then for each form:

- the op counts of the graph ONNX Runtime actually runs: the model after its ORT_ENABLE_ALL
  optimizations (written with SessionOptions.optimized_model_filepath), which is where the
  quantized forms differ (fusions into MatMulIntegerToFloat, DynamicQuantizeMatMul, attention,
  SkipLayerNormalization);
- the file size against FP32;
- the mean over the holdout samples of each float output's cosine against FP32 (worst output);
- latency at batch 1 (the median-sized holdout sample) and batch 8 (that sample repeated
  along the batch axis) as FP32's median time over the form's. All sessions (2 intra-op
  threads, sequential) take turns in one loop, order alternating (report.timed_ms), so load
  from elsewhere on the machine weighs on all of them alike; --rounds repeats the whole
  timing and prints each round, since only ratios from one run compare.
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
import shlex  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import judge  # noqa: E402
import report  # noqa: E402

# Op types whose counts tell the dynamic forms apart; the table prints these, the JSON all.
KEY_OPS = ["MatMul", "com.microsoft:FusedMatMul", "com.microsoft:DynamicQuantizeMatMul",
           "com.microsoft:MatMulIntegerToFloat", "DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear",
           "com.microsoft:Attention", "com.microsoft:SkipLayerNormalization", "com.microsoft:BiasGelu",
           "com.microsoft:FastGelu", "Add", "Mul", "Cast", "Gather"]


def optimized_ops(path: Path, work: Path) -> dict[str, int]:
    """Op counts of `path` after ONNX Runtime's ORT_ENABLE_ALL graph optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    target = work / f"{path.stem}.optimized.onnx"
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return judge.op_counts(onnx.load(str(target)))


def build_mantissa(binary: Path, model: Path, out: Path, extra: list[str]) -> str:
    cmd = [str(binary.resolve()), "quantize", str(model), "--precision", "int8", "--mode", "dynamic", *extra, "-o", str(out)]
    run = judge.run_child(cmd, 1800, judge.ort_library_env(dict(os.environ)))
    if run.exit != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{judge.error_text(run.output)}")
    return " ".join(cmd)


def build_ort(model: Path, out: Path, per_channel: bool) -> str:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=per_channel)
    return f"onnxruntime.quantization.quantize_dynamic(model, out, per_channel={per_channel})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(".corpus"))
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--latency-seconds", type=float, default=20.0,
                        help="timing per batch size and round, all forms together")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--form", action="append", default=[], metavar="LABEL=PATH",
                        help="an already-built form to compare as well")
    parser.add_argument("--mantissa-args", default="", help="extra `mantissa quantize` options")
    parser.add_argument("--work", type=Path, help="where the forms are written (default: a temporary directory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model_dir = args.cache.resolve() / "models" / args.model
    source = model_dir / "model.onnx"
    if not source.exists():
        sys.exit(f"{source} is missing: run scripts/corpus/fetch.py --only {args.model} first")
    work = args.work or Path(tempfile.mkdtemp(prefix="dynamic-forms-"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = report.cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}")
    print(f"onnxruntime {ort.__version__}, model {args.model}, work {work}")

    forms: dict[str, dict] = {"fp32": {"path": source, "how": "the model as fetched"}}
    forms["mantissa dynamic"] = {"path": work / "mantissa.onnx"}
    forms["mantissa dynamic"]["how"] = build_mantissa(args.binary, source, forms["mantissa dynamic"]["path"],
                                                      shlex.split(args.mantissa_args))
    for label, per_channel in (("ort per-channel", True), ("ort per-tensor", False)):
        forms[label] = {"path": work / f"ort-{'pc' if per_channel else 'pt'}.onnx"}
        forms[label]["how"] = build_ort(source, forms[label]["path"], per_channel)
    for spec in args.form:
        label, _, path = spec.partition("=")
        forms[label] = {"path": Path(path).resolve(), "how": f"given: {path}"}

    samples = judge.holdout_samples(model_dir)
    sessions = {label: judge.session(form["path"]) for label, form in forms.items()}
    reference = judge.run_outputs(sessions["fp32"], samples)
    types = {k: v.dtype.type for k, v in reference[0].items()}
    fp32_bytes = judge.model_bytes(source)
    for label, form in forms.items():
        form["ops"] = optimized_ops(form["path"], work)
        form["size_ratio"] = judge.model_bytes(form["path"]) / fp32_bytes
        cosines, _ = judge.output_cosines(reference, judge.run_outputs(sessions[label], samples), types)
        form["cosine"] = min(c["mean"] for c in cosines.values())

    sample = report.latency_sample(samples)
    axes, why = report.batch_axes(sessions["fp32"], sample)
    feeds = {"b1": sample} | ({} if why else {"b8": report.batched(sample, axes, 8)})
    labels = list(forms)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for batch, feed in feeds.items():
            ms = report.timed_ms([sessions[label] for label in labels], feed, args.latency_seconds)
            row[batch] = dict(zip(labels, ms))
        rounds.append(row)

    print("\n## forms")
    for label, form in forms.items():
        print(f"- {label}: {form['how']}")
    print("\n## optimized graphs (ORT_ENABLE_ALL), op counts")
    ops = [op for op in KEY_OPS if any(form["ops"].get(op) for form in forms.values())]
    print("| form | " + " | ".join(op.removeprefix("com.microsoft:") for op in ops) + " |")
    print("|---" * (len(ops) + 1) + "|")
    for label, form in forms.items():
        print(f"| {label} | " + " | ".join(str(form["ops"].get(op, 0)) for op in ops) + " |")

    print("\n## size, cosine, speedup over FP32 (FP32 median ms / form median ms, per round)")
    batches = list(feeds)
    head = " | ".join(f"{b} r{r + 1}" for r in range(len(rounds)) for b in batches)
    print(f"| form | size | cosine (worst output mean) | {head} |")
    print("|---" * (3 + len(rounds) * len(batches)) + "|")
    for label, form in forms.items():
        cells = []
        for row in rounds:
            for b in batches:
                cells.append(f"{row[b]['fp32']:.2f} ms" if label == "fp32" else f"{row[b]['fp32'] / row[b][label]:.2f}x")
        print(f"| {label} | {form['size_ratio']:.2f}x | {form['cosine']:.4f} | " + " | ".join(cells) + " |")
    if why:
        print(f"\nno batch 8: {why}")
    if args.json:
        out = {"cpu": cpu, "model": args.model, "rounds_ms": rounds,
               "forms": {k: {**v, "path": str(v["path"])} for k, v in forms.items()}}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
