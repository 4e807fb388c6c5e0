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
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

STATIC = ["--precision", "int8", "--mode", "static", "--calibration-data", "{calibration}"]
MODES = {
    "fp16": ["--precision", "fp16"],
    "int8-dynamic": ["--precision", "int8", "--mode", "dynamic"],
    "int8-static-minmax": STATIC + ["--calibration-method", "minmax"],
    "int8-static-percentile": STATIC + ["--calibration-method", "percentile"],
    "int8-static-entropy": STATIC + ["--calibration-method", "entropy"],
    "int8-static-mse": STATIC + ["--calibration-method", "mse"],
    "int8-weight-only": ["--precision", "int8", "--mode", "weight-only"],
    "int8-static-budget": STATIC + ["--holdout", "{holdout}", "--budget-cosine", "0.99"],
}
SHORT = {
    "fp16": "fp16",
    "int8-dynamic": "dynamic",
    "int8-static-minmax": "minmax",
    "int8-static-percentile": "percentile",
    "int8-static-entropy": "entropy",
    "int8-static-mse": "mse",
    "int8-weight-only": "weight-only",
    "int8-static-budget": "budget 0.99",
}
# op types whose presence means INT8 work (what a quantizer adds)
QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "com.microsoft:MatMulIntegerToFloat", "com.microsoft:DynamicQuantizeMatMul",
    "com.microsoft:MatMulNBits", "com.microsoft:DynamicQuantizeLSTM", "com.microsoft:GatherBlockQuantized",
    "com.microsoft:QuantizeLinear", "com.microsoft:DequantizeLinear", "com.microsoft:QLinearAdd",
    "com.microsoft:QLinearMul", "com.microsoft:QGemm",
}
FAILURES = ("ERROR", "TIMEOUT", "INVALID", "ORT-REFUSES", "RUN-FAILS")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def fp16_tensors(model: onnx.ModelProto) -> int:
    """Initializers and Constant values stored as float16, subgraphs included (a sign that FP16
    conversion happened)."""

    def walk(graph) -> int:
        count = sum(1 for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT16:
                    count += 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    count += walk(attr.g)
                for sub in attr.graphs:
                    count += walk(sub)
        return count

    return walk(model.graph)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def holdout_samples(model_dir: Path) -> list[dict]:
    holdout = model_dir / "holdout"
    files = sorted(holdout.glob("*.npz")) if holdout.is_dir() else [model_dir / "holdout.npz"]
    return [dict(np.load(f)) for f in files]


def run_outputs(sess: ort.InferenceSession, samples: list[dict]) -> list[dict]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, s))) for s in samples]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if a.shape != b.shape:
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def run_quantize(binary: Path, args: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """Runs one command; returns (exit status or None on timeout, output text, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or "", time.monotonic() - start


def error_text(output: str) -> str:
    """The error lines of mantissa's output ('Error: ...', ERROR log lines, panics), else its tail."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error") or " ERROR " in ln or "panicked" in ln]
    return "\n".join((errors or lines)[-6:])


def evaluate(out_path: Path, reference: list[dict], samples: list[dict], fp32_types: dict) -> dict:
    result: dict = {}
    try:
        onnx.checker.check_model(str(out_path), full_check=True)
        result["checker"] = "ok"
    except Exception as err:  # noqa: BLE001 - the message is the finding
        result["checker"] = f"{type(err).__name__}: {err}"
    model = onnx.load(str(out_path), load_external_data=False)
    result["ops"] = op_counts(model)
    result["fp16_tensors"] = fp16_tensors(model)
    result["opset"] = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    result["output_types"] = {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type).lower() for o in model.graph.output}
    result["size_bytes"] = sum(p.stat().st_size for p in out_path.parent.iterdir() if p.name.startswith(out_path.name))
    try:
        sess = session(out_path)
        result["ort_load"] = "ok"
    except Exception as err:  # noqa: BLE001
        result["ort_load"] = f"{type(err).__name__}: {err}"
        return result
    try:
        outputs = run_outputs(sess, samples)
        result["ort_run"] = "ok"
    except Exception as err:  # noqa: BLE001
        result["ort_run"] = f"{type(err).__name__}: {err}"
        return result
    cos: dict = {}
    finite = True
    for name, dtype in fp32_types.items():
        if not np.issubdtype(dtype, np.floating):
            continue
        values = []
        for ref, got in zip(reference, outputs):
            if name not in got:
                values.append(float("nan"))
                continue
            finite = finite and bool(np.isfinite(got[name]).all())
            values.append(cosine(ref[name], got[name]))
        cos[name] = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    result["cosine"] = cos
    result["finite"] = finite
    return result


def status_of(rec: dict) -> str:
    if rec.get("timed_out"):
        return "TIMEOUT"
    if rec["exit"] != 0:
        return "ERROR"
    ev = rec.get("eval", {})
    if not ev:
        return "ERROR"
    if ev.get("checker") != "ok":
        return "INVALID"
    if ev.get("ort_load") != "ok":
        return "ORT-REFUSES"
    if ev.get("ort_run") != "ok":
        return "RUN-FAILS"
    return "ok"


def failure_message(rec: dict) -> str:
    status = rec["status"]
    if status == "TIMEOUT":
        return f"no result after {rec['seconds']:.0f} s (killed)"
    if status == "ERROR":
        return rec.get("error") or f"exit {rec['exit']}, no output model"
    ev = rec["eval"]
    if status == "INVALID":
        return ev["checker"]
    if status == "ORT-REFUSES":
        return ev["ort_load"]
    return ev["ort_run"]


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
    env = dict(os.environ, RUST_BACKTRACE=os.environ.get("CORPUS_RUST_BACKTRACE", "0"))
    if not env.get("ORT_DYLIB_PATH"):
        capi = Path(ort.__file__).parent / "capi"
        libs = sorted(capi.glob("libonnxruntime.so.*"))
        if libs:
            env["ORT_DYLIB_PATH"] = str(libs[0])
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
            cmd = ["quantize", str(source)] + [
                a.format(calibration=model_dir / "calibration", holdout=model_dir / "holdout") for a in MODES[mode]
            ] + ["-o", str(out_path)]
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

    # ---- report
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"binary": str(binary), "version": version, "records": records}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
