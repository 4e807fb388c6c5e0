"""Helpers of tests/python/test_corpus.py: where the real-model corpus is, `mantissa quantize`
in each mode, and how its outputs are judged against the FP32 model in ONNX Runtime.

The corpus is what `scripts/corpus/fetch.py` makes: `<corpus>/models/<name>/model.onnx` with
`calibration/*.npz`, `holdout/*.npz` (keys = input names) and `corpus.json`. `<corpus>` is
`$MANTISSA_CORPUS` or `<repo>/.corpus`; the models the tests use are listed in
`tests/python/corpus_models.txt` (`$MANTISSA_CORPUS_MODELS`, space or comma separated,
overrides it). A listed model that is missing fails its tests with the fetch command to run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_FILE = Path(__file__).resolve().parent / "corpus_models.txt"
ORT_LIBRARY = REPO_ROOT / ".onnxruntime" / "lib" / "libonnxruntime.so.1.31.1"
QUANTIZE_TIMEOUT_S = 300

STATIC = ["--precision", "int8", "--mode", "static", "--calibration-data", "{calibration}"]
MODES = {
    "fp16": ["--precision", "fp16"],
    "int8-dynamic": ["--precision", "int8", "--mode", "dynamic"],
    "int8-static-minmax": STATIC + ["--calibration-method", "minmax"],
    "int8-static-percentile": STATIC + ["--calibration-method", "percentile"],
    "int8-static-entropy": STATIC + ["--calibration-method", "entropy"],
    "int8-static-mse": STATIC + ["--calibration-method", "mse"],
    "int8-weight-only": ["--precision", "int8", "--mode", "weight-only"],
    "int8-static-budget": STATIC + ["--holdout", "{holdout}", "--budget-cosine", "{budget}"],
}
BUDGET_COSINE = 0.99

# Op types whose presence means INT8 work (what a quantizer adds), by `op_key`.
QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "com.microsoft:MatMulIntegerToFloat", "com.microsoft:DynamicQuantizeMatMul",
    "com.microsoft:MatMulNBits", "com.microsoft:DynamicQuantizeLSTM", "com.microsoft:GatherBlockQuantized",
    "com.microsoft:QuantizeLinear", "com.microsoft:DequantizeLinear", "com.microsoft:QLinearAdd",
    "com.microsoft:QLinearMul", "com.microsoft:QGemm",
}
# Float compute ops an INT8 mode could quantize; when a mode quantizes nothing, each of these
# op types in the model must be named by a kept-FP32 line of the summary.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN")


# ---- where the corpus is ------------------------------------------------------------------------

def corpus_dir() -> Path:
    env = os.environ.get("MANTISSA_CORPUS")
    return Path(env).resolve() if env else REPO_ROOT / ".corpus"


def listed_models() -> list[str]:
    env = os.environ.get("MANTISSA_CORPUS_MODELS")
    if env:
        return [n for n in re.split(r"[\s,]+", env) if n]
    lines = (ln.split("#", 1)[0].strip() for ln in MODELS_FILE.read_text().splitlines())
    return [ln for ln in lines if ln]


def fetch_command(names: list[str]) -> str:
    cache = "" if corpus_dir() == REPO_ROOT / ".corpus" else f" --cache {corpus_dir()}"
    return f"python3 scripts/corpus/fetch.py{cache} --only {' '.join(names)}"


def model_dir(name: str) -> Path:
    """The corpus directory of `name`; fails the test (not a skip) when it is not there."""
    directory = corpus_dir() / "models" / name
    missing = [p for p in ("model.onnx", "corpus.json", "calibration", "holdout") if not (directory / p).exists()]
    if missing:
        pytest.fail(
            f"corpus model {name!r} is missing from {directory} (no {', '.join(missing)}). "
            f"Fetch it with `{fetch_command([name])}` in {REPO_ROOT} (scripts/test.sh does), "
            "or point MANTISSA_CORPUS at a corpus that has it.",
            pytrace=False,
        )
    return directory


def mantissa_binary() -> Path:
    env = os.environ.get("MANTISSA_BIN")
    binary = Path(env) if env else REPO_ROOT / "target" / "debug" / "mantissa"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(f"mantissa binary not found at {binary}: run `cargo build` or set MANTISSA_BIN", pytrace=False)
    return binary


def quantize_env() -> dict:
    env = dict(os.environ, RUST_BACKTRACE="0", NO_COLOR="1")
    if not env.get("ORT_DYLIB_PATH") and ORT_LIBRARY.is_file():
        env["ORT_DYLIB_PATH"] = str(ORT_LIBRARY)
    return env


# ---- ONNX and ONNX Runtime ---------------------------------------------------------------------

def op_key(node: onnx.NodeProto) -> str:
    return f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes by `op_key`, subgraphs of If/Loop/Scan included."""
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[op_key(node)] = counts.get(op_key(node), 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return counts


def int8_nodes(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k in QUANT_OPS)


INT8_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def int8_tensors(model: onnx.ModelProto) -> int:
    """Initializers and Constant values of 8- or 4-bit integer types, subgraphs included (an int8
    embedding table is INT8 work without an INT8 op type)."""

    def walk(graph: onnx.GraphProto) -> int:
        count = sum(1 for i in graph.initializer if i.data_type in INT8_TYPES)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in INT8_TYPES:
                    count += 1
                if attr.type == onnx.AttributeProto.GRAPH:
                    count += walk(attr.g)
                count += sum(walk(sub) for sub in attr.graphs)
        return count

    return walk(model.graph)


def output_types(model: onnx.ModelProto) -> dict[str, str]:
    return {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in model.graph.output}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def holdout_samples(directory: Path) -> list[dict[str, np.ndarray]]:
    samples = []
    for f in sorted((directory / "holdout").glob("*.npz")):
        with np.load(f) as data:
            samples.append({k: data[k] for k in data.files})
    return samples


def run_all(sess: ort.InferenceSession, samples: list[dict]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, s))) for s in samples]


@dataclass
class Reference:
    """A corpus model, its holdout samples and what the FP32 model computes on them."""

    name: str
    directory: Path
    meta: dict
    samples: list[dict]
    outputs: list[dict]
    source_ops: dict[str, int]
    source_int8_tensors: int
    source_output_types: dict[str, str]

    @property
    def float_outputs(self) -> list[str]:
        return [k for k, v in self.outputs[0].items() if np.issubdtype(v.dtype, np.floating)]

    @property
    def class_outputs(self) -> list[str]:
        return list(self.meta.get("class_outputs", []))


@functools.cache
def reference(name: str) -> Reference:
    directory = model_dir(name)
    samples = holdout_samples(directory)
    assert samples, f"{directory / 'holdout'} holds no .npz samples"
    source = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    return Reference(
        name=name, directory=directory, meta=json.loads((directory / "corpus.json").read_text()),
        samples=samples, outputs=run_all(session(directory / "model.onnx"), samples),
        source_ops=op_counts(source), source_int8_tensors=int8_tensors(source),
        source_output_types=output_types(source),
    )


# ---- accuracy ------------------------------------------------------------------------------------

def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.shape != b.shape:
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


@dataclass
class OutputAccuracy:
    mean: float  # mean over the holdout samples of each sample's cosine
    worst: float  # the lowest sample's cosine
    pooled: float  # one cosine over every sample's elements (what Mantissa's drift and budget use)
    top1: float | None  # top-1 agreement over the last axis, for class outputs
    finite: bool

    def text(self) -> str:
        top1 = f", top-1 {self.top1:.4f}" if self.top1 is not None else ""
        return f"mean cosine {self.mean:.6f} (worst sample {self.worst:.6f}, pooled {self.pooled:.6f}{top1})"


def accuracy(ref: Reference, outputs: list[dict]) -> dict[str, OutputAccuracy]:
    """Per float output of `ref`, `outputs` (one dict per holdout sample) against FP32."""
    result = {}
    for name in ref.float_outputs:
        want = [r[name] for r in ref.outputs]
        got = [o[name] for o in outputs]
        per_sample = [cosine(w, g) for w, g in zip(want, got)]
        pooled = cosine(np.concatenate([w.ravel() for w in want]), np.concatenate([g.ravel() for g in got]))
        top1 = None
        if name in ref.class_outputs:
            top1 = float(np.mean(np.concatenate([
                (w.argmax(axis=-1) == g.argmax(axis=-1)).ravel() for w, g in zip(want, got)])))
        result[name] = OutputAccuracy(
            mean=float(np.mean(per_sample)), worst=float(np.min(per_sample)), pooled=pooled, top1=top1,
            finite=all(bool(np.isfinite(g).all()) for g in got))
    return result


# ---- mantissa quantize ----------------------------------------------------------------------------

@dataclass
class QuantizeRun:
    model: str
    mode: str
    command: list[str]
    exit_code: int | None  # None: killed after QUANTIZE_TIMEOUT_S
    output: str
    seconds: float
    path: Path
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    def describe(self) -> str:
        status = "timed out" if self.exit_code is None else f"exit {self.exit_code}"
        return f"`{' '.join(self.command)}`: {status} after {self.seconds:.1f} s\n--- output ---\n{self.output[-6000:]}"

    @property
    def model_proto(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = onnx.load(str(self.path), load_external_data=False)
        return self._model

    @property
    def ops(self) -> dict[str, int]:
        return op_counts(self.model_proto)

    def added_int8_work(self, ref: "Reference") -> bool:
        """More INT8 op nodes or more 8/4-bit integer tensors than the FP32 model has."""
        return (int8_nodes(self.ops) > int8_nodes(ref.source_ops)
                or int8_tensors(self.model_proto) > ref.source_int8_tensors)


def quantize(ref: Reference, mode: str, out_dir: Path) -> QuantizeRun:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ref.name}.{mode}.onnx"
    fill = {"calibration": ref.directory / "calibration", "holdout": ref.directory / "holdout",
            "budget": BUDGET_COSINE}
    command = [str(mantissa_binary()), "quantize", str(ref.directory / "model.onnx"),
               *(a.format(**fill) for a in MODES[mode]), "-o", str(path)]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=quantize_env(), cwd=REPO_ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=QUANTIZE_TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return QuantizeRun(ref.name, mode, command, code, strip_ansi(out or ""), time.monotonic() - start, path)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


SUMMARY_LINE = re.compile(r"^  (\S[^:]*):\s+(.*)$")
KEPT_LINE = re.compile(r"^\s+(.+) \(([\w.:]+)\): (\S.*)$")


def summary_value(output: str, key: str) -> str | None:
    """The value of a `  key: value` line of the quantize summary."""
    for line in output.splitlines():
        m = SUMMARY_LINE.match(line)
        if m and m.group(1).strip() == key:
            return m.group(2).strip()
    return None


NOTHING_QUANTIZED = re.compile(r"\b(no node|nothing) (was )?quantized\b", re.IGNORECASE)


def nothing_quantized_warnings(output: str) -> list[str]:
    """The WARN log lines of a quantize run that say it quantized nothing."""
    return [ln for ln in output.splitlines() if re.search(r"\bWARN\b", ln) and NOTHING_QUANTIZED.search(ln)]


def kept_fp32_lines(output: str) -> list[tuple[str, str, str]]:
    """(node, op type, reason) of the lines under `nodes kept in FP32:` up to the next summary line."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("  nodes kept in FP32:")), None)
    if start is None:
        return []
    kept = []
    for line in lines[start + 1:]:
        if SUMMARY_LINE.match(line) and not line.startswith("   "):
            break
        m = KEPT_LINE.match(line)
        if m:
            kept.append((m.group(1), m.group(2), m.group(3)))
    return kept


# ---- serving ---------------------------------------------------------------------------------

SERVED_VARIANTS = ("fp32", "fp16", "int8")


def serving_policy(ref: Reference) -> dict:
    """fp32, fp16 and static INT8 (minmax on the corpus calibration samples), startup drift on
    the holdout samples against fp32 (no budget: the tests judge the figures)."""
    drift = {"holdout_data": "holdout", "reference": "fp32"}
    if ref.class_outputs:
        drift["class_outputs"] = ref.class_outputs
    return {
        "serving": {"instances": 1, "intra_op_threads": 2},
        "variants": {
            "fp32": {"precision": "fp32"},
            "fp16": {"precision": "fp16"},
            "int8": {"precision": "int8", "int8": {
                "mode": "static", "calibration_data": "calibration", "calibration": {"method": "minmax"}}},
        },
        "routing": {"default": "fp32"},
        "drift": drift,
    }


def write_store(store: Path, ref: Reference) -> Path:
    """`<store>/<model>/`: the corpus model (symlinked files) and its serving policy."""
    import yaml

    target = store / ref.name
    target.mkdir(parents=True)
    for item in ref.directory.iterdir():
        if item.name.startswith("model.onnx") or item.name in ("calibration", "holdout"):
            (target / item.name).symlink_to(item)
    (target / "policy.yaml").write_text(yaml.safe_dump(serving_policy(ref), sort_keys=False))
    return store


def infer_inputs(sample: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in sample.items():
        value = np.asarray(value, order="C")  # (np.ascontiguousarray would make a 0-d input 1-d)
        inp = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    return inputs


def scrape_metrics(metrics_url: str) -> list:
    """Every sample of `GET /metrics`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=20) as resp:
        text = resp.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]
