"""What robustness.py and report.py share: the Mantissa modes, running a child process with a
timeout (wall time and peak memory), and judging a quantized model (onnx.checker, loading and
running it in ONNX Runtime on the holdout samples, cosine of each float output against FP32),
plus the task metrics report.py picks from a model's corpus.json (top-1 agreement, detector
score rows, OCR map IoU, CTC decode, speech windows, sentence-embedding neighbours).

Import it after corpus_env.ensure_venv: it needs numpy, onnx and onnxruntime.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

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
    # auto times its forms with 2 threads, as the report times every form
    "int8-auto": ["--precision", "int8", "--mode", "auto", "--calibration-data", "{calibration}", "--holdout",
                  "{holdout}", "--budget-cosine", "0.99", "--auto-threads", "2"],
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
    "int8-auto": "auto 0.99",
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


def mode_args(mode: str, model_dir: Path) -> list[str]:
    """The `mantissa quantize` options of a mode for the corpus model in `model_dir`."""
    return [a.format(calibration=model_dir / "calibration", holdout=model_dir / "holdout") for a in MODES[mode]]


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


def quant_nodes(ops: dict[str, int]) -> int:
    """How many nodes of INT8 op types an op count holds."""
    return sum(v for k, v in ops.items() if k in QUANT_OPS)


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


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with `threads` intra-op threads and sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_files(model_dir: Path, kind: str) -> list[Path]:
    """The .npz files of a corpus model's `calibration` or `holdout` samples, in order."""
    directory = model_dir / kind
    return sorted(directory.glob("*.npz")) if directory.is_dir() else [model_dir / f"{kind}.npz"]


def holdout_samples(model_dir: Path) -> list[dict]:
    return [dict(np.load(f)) for f in sample_files(model_dir, "holdout")]


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


def model_bytes(path: Path) -> int:
    """Size of a model file together with its external-data files (named after it)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def ort_library_env(base: dict | None = None) -> dict:
    """An environment for mantissa: ORT_DYLIB_PATH set to the venv's libonnxruntime when unset,
    and Rust backtraces off (set CORPUS_RUST_BACKTRACE=1 to keep them)."""
    env = dict(os.environ if base is None else base)
    env["RUST_BACKTRACE"] = os.environ.get("CORPUS_RUST_BACKTRACE", "0")
    if not env.get("ORT_DYLIB_PATH"):
        libs = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
        if libs:
            env["ORT_DYLIB_PATH"] = str(libs[0])
    return env


@dataclass
class ChildRun:
    exit: int | None  # None: killed after the timeout
    output: str  # stdout and stderr together
    seconds: float  # wall time
    peak_mib: float | None  # peak resident memory of the command (None when it was killed)


# Starts the command from a small interpreter and writes its rusage peak and wait status to a
# file. The peak can't come from our own wait4: at exec, Linux counts the high-water mark of the
# memory the child inherited from its parent, which here is the whole report process; from this
# launcher the floor is its own few MiB.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {status}")
"""


def run_child(argv: list[str], timeout: float, env: dict, cwd: Path | None = None) -> ChildRun:
    """Runs one command in its own process group with a timeout; returns its exit status (None
    when it was killed), output, wall time and peak resident memory (ru_maxrss). The command
    runs in `cwd`, or in a scratch directory removed afterwards (what it leaves there goes)."""
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage"
        scratch = Path(tmp) / "cwd"
        scratch.mkdir()
        with open(Path(tmp) / "log", "w+b") as log:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage_file), *argv],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or scratch,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
            except BaseException:  # interrupted: take the child down with us
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            seconds = time.monotonic() - start
            log.seek(0)
            output = log.read().decode("utf-8", "replace")
        code, peak = (None if killed else proc.returncode), None
        if usage_file.exists():
            maxrss, status = usage_file.read_text().split()
            peak = int(maxrss) / 1024
            code = None if killed else os.waitstatus_to_exitcode(int(status))
    return ChildRun(code, output, seconds, peak)


def error_text(output: str) -> str:
    """The error lines of mantissa's output ('Error: ...', ERROR log lines, panics), else its tail."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error") or " ERROR " in ln or "panicked" in ln]
    return "\n".join((errors or lines)[-6:])


def describe_model(out_path: Path) -> dict:
    """What onnx.checker says of a model file and what it holds (ops, FP16 tensors, types, size)."""
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
    result["size_bytes"] = model_bytes(out_path)
    return result


def output_cosines(reference: list[dict], outputs: list[dict], fp32_types: dict) -> tuple[dict, bool]:
    """Mean and minimum cosine over the samples of each float output; whether all are finite."""
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
    return cos, finite


def judge_model(out_path: Path, reference: list[dict], samples: list[dict], fp32_types: dict):
    """Checks, loads and runs a model on the holdout samples. Returns (result, outputs, session);
    outputs and session are None when loading or running failed (result says why)."""
    result = describe_model(out_path)
    try:
        sess = session(out_path)
        result["ort_load"] = "ok"
    except Exception as err:  # noqa: BLE001
        result["ort_load"] = f"{type(err).__name__}: {err}"
        return result, None, None
    try:
        outputs = run_outputs(sess, samples)
        result["ort_run"] = "ok"
    except Exception as err:  # noqa: BLE001
        result["ort_run"] = f"{type(err).__name__}: {err}"
        return result, None, None
    result["cosine"], result["finite"] = output_cosines(reference, outputs, fp32_types)
    return result, outputs, sess


def evaluate(out_path: Path, reference: list[dict], samples: list[dict], fp32_types: dict) -> dict:
    return judge_model(out_path, reference, samples, fp32_types)[0]


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


# ---- task metrics: what a model's user would notice, chosen from its corpus.json


def metric_plan(meta: dict, reference: list[dict]) -> dict:
    """Which task metric fits a corpus model, and on which outputs; `basis` says what chose it.

    In order: box_outputs -> detection; a probability map -> text-map; OCR recognition or CTC
    -> ctc; voice activity -> vad; an encoder or embeddings -> embedding; class outputs (or
    outputs described as class probabilities) -> top1; else none (cosine only)."""
    family = meta.get("family", "").lower()
    described = {k: v.lower() for k, v in meta.get("outputs", {}).items()}
    names = [n for n in reference[0] if np.issubdtype(reference[0][n].dtype, np.floating)]

    def first(words: tuple[str, ...]) -> str | None:
        return next((n for n in names if any(w in described.get(n, "") for w in words)), None)

    if meta.get("box_outputs"):
        return {"kind": "detection", "basis": "box_outputs", "boxes": meta["box_outputs"]}
    if "text detection" in family or first(("probability map",)):
        return {"kind": "text-map", "basis": "family", "output": first(("map",)) or names[0], "threshold": 0.3}
    if "recognition" in family or first(("ctc",)):
        out = first(("ctc",)) or (meta.get("class_outputs") or names)[0]
        return {"kind": "ctc", "basis": "family", "output": out}
    if "voice activity" in family:
        out = next((n for n in names if "probab" in described.get(n, "") and "state" not in described.get(n, "")), names[0])
        return {"kind": "vad", "basis": "family", "output": out, "threshold": 0.5}
    if "encoder" in family or first(("embedding",)):
        return {"kind": "embedding", "basis": "family", "output": first(("embedding",)) or names[0], "mask": "attention_mask"}
    classes = meta.get("class_outputs") or [n for n in names if "class prob" in described.get(n, "")]
    if classes:
        return {"kind": "top1", "basis": "class_outputs" if meta.get("class_outputs") else "outputs", "outputs": classes}
    return {"kind": "none", "basis": "nothing in corpus.json fits"}


def agreement(name: str, agree: int, total: int, **extra) -> dict:
    value = agree / total if total else float("nan")
    return {"name": name, "value": value, "agree": agree, "of": total, "text": f"{name}={agree}/{total}", **extra}


def same_shape(a: np.ndarray, b: np.ndarray | None) -> bool:
    return b is not None and a.shape == b.shape


def top1_agreement(plan: dict, reference: list[dict], outputs: list[dict]) -> dict:
    """Rows (all but the last axis) whose argmax over the last axis matches FP32's."""
    agree = total = 0
    for ref, got in zip(reference, outputs):
        for name in plan["outputs"]:
            want = ref[name].reshape(-1, ref[name].shape[-1]).argmax(-1)
            total += want.size
            if same_shape(ref[name], got.get(name)):
                agree += int((want == got[name].reshape(-1, ref[name].shape[-1]).argmax(-1)).sum())
    return agreement("top1", agree, total)


def score_rows(array: np.ndarray, box: dict) -> np.ndarray:
    """The score rows of a detector output as [anchors, scores] (the `scores` slice along `axis`)."""
    scores = np.take(array, np.arange(*box["scores"]), axis=box["axis"])
    scores = np.moveaxis(scores, box["axis"], -1)
    return scores.reshape(-1, scores.shape[-1])


def detection_scores(plan: dict, reference: list[dict], outputs: list[dict]) -> dict:
    """Mean cosine of the score rows alone, and how often the best-scoring anchor is the same."""
    cosines, agree, total = [], 0, 0
    for ref, got in zip(reference, outputs):
        for box in plan["boxes"]:
            want = score_rows(ref[box["output"]], box)
            total += 1
            if not same_shape(ref[box["output"]], got.get(box["output"])):
                cosines.append(float("nan"))
                continue
            have = score_rows(got[box["output"]], box)
            cosines.append(cosine(want, have))
            agree += int(want.max(-1).argmax() == have.max(-1).argmax())
    value = float(np.mean(cosines))
    return {"name": "score-cos", "value": value, "agree": agree, "of": total,
            "text": f"score-cos={value:.4f}, best-anchor={agree}/{total}"}


def map_iou(plan: dict, reference: list[dict], outputs: list[dict]) -> dict:
    """Mean IoU of the probability map thresholded at plan['threshold'] (both empty: 1)."""
    ious = []
    for ref, got in zip(reference, outputs):
        want = ref[plan["output"]] > plan["threshold"]
        if not same_shape(want, got.get(plan["output"])):
            ious.append(0.0)
            continue
        have = got[plan["output"]] > plan["threshold"]
        union = int((want | have).sum())
        ious.append(1.0 if union == 0 else int((want & have).sum()) / union)
    value = float(np.mean(ious))
    return {"name": f"IoU@{plan['threshold']}", "value": value, "text": f"IoU@{plan['threshold']}={value:.4f}"}


def ctc_greedy(scores: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decode of [time, classes] scores: argmax per step, repeats collapsed, blank 0 dropped."""
    best = scores.argmax(-1)
    keep = np.ones(best.shape, bool)
    keep[1:] = best[1:] != best[:-1]
    return tuple(int(c) for c in best[keep & (best != 0)])


def ctc_agreement(plan: dict, reference: list[dict], outputs: list[dict]) -> dict:
    """Samples whose decoded sequence equals FP32's; mean per-timestep argmax agreement. The
    output is [time, classes] once its size-1 (batch) axes are dropped, whatever their order."""
    same, steps = 0, []
    for ref, got in zip(reference, outputs):
        want = ref[plan["output"]].reshape(-1, ref[plan["output"]].shape[-1])
        if not same_shape(ref[plan["output"]], got.get(plan["output"])):
            steps.append(0.0)
            continue
        have = got[plan["output"]].reshape(want.shape)
        same += int(ctc_greedy(want) == ctc_greedy(have))
        steps.append(float((want.argmax(-1) == have.argmax(-1)).mean()))
    result = agreement("ctc-seq", same, len(reference), step=float(np.mean(steps)))
    result["text"] += f", step={result['step']:.3f}"
    return result


def vad_agreement(plan: dict, reference: list[dict], outputs: list[dict]) -> dict:
    """Windows whose speech call (probability >= threshold) matches FP32's."""
    agree = total = 0
    for ref, got in zip(reference, outputs):
        want = ref[plan["output"]].ravel() >= plan["threshold"]
        total += want.size
        if same_shape(ref[plan["output"]], got.get(plan["output"])):
            agree += int((want == (got[plan["output"]].ravel() >= plan["threshold"])).sum())
    return agreement(f"speech@{plan['threshold']}", agree, total)


def pooled(output: np.ndarray, sample: dict, mask_name: str) -> np.ndarray:
    """Mean of token embeddings [batch, seq, dim] over the attention mask (all tokens without one)."""
    mask = sample.get(mask_name)
    mask = np.ones(output.shape[:2]) if mask is None else mask.astype(np.float64)
    return ((output * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)).ravel()


def nearest_others(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def embedding_agreement(plan: dict, reference: list[dict], outputs: list[dict], samples: list[dict]) -> dict:
    """Samples whose nearest other sample (cosine of mean-pooled embeddings) is the same as
    under FP32; mean cosine of the pooled embeddings."""
    name = plan["output"]
    if not all(same_shape(r[name], g.get(name)) for r, g in zip(reference, outputs)):
        return agreement("nn", 0, len(reference), emb_cos=float("nan"))
    want = np.stack([pooled(r[name], s, plan["mask"]) for r, s in zip(reference, samples)])
    have = np.stack([pooled(g[name], s, plan["mask"]) for g, s in zip(outputs, samples)])
    agree = int((nearest_others(want) == nearest_others(have)).sum())
    result = agreement("nn", agree, len(reference), emb_cos=float(np.mean([cosine(a, b) for a, b in zip(want, have)])))
    result["text"] += f", emb-cos={result['emb_cos']:.4f}"
    return result


def task_metric(plan: dict, reference: list[dict], outputs: list[dict], samples: list[dict]) -> dict | None:
    """The plan's metric of `outputs` against the FP32 `reference` (None for kind 'none')."""
    kind = plan["kind"]
    if kind == "embedding":
        return embedding_agreement(plan, reference, outputs, samples)
    metric = {"detection": detection_scores, "text-map": map_iou, "ctc": ctc_agreement, "vad": vad_agreement,
              "top1": top1_agreement}.get(kind)
    return None if metric is None else metric(plan, reference, outputs)


# the bound each metric's first value must reach for a form to pass ("cosine": the form's cosine bound)
METRIC_MIN = {"detection": "cosine", "text-map": 0.90, "ctc": 0.85, "vad": 0.85, "embedding": 0.85, "top1": 0.85}


def metric_passes(plan: dict, metric: dict | None, cosine_bound: float) -> bool:
    if metric is None:
        return True
    bound = METRIC_MIN[plan["kind"]]
    return bool(metric["value"] >= (cosine_bound if bound == "cosine" else bound))
