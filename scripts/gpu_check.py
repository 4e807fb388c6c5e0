#!/usr/bin/env python3
"""Serves a MiniLM-class encoder and the CNN example as FP32 and FP16 variants on a GPU
execution provider and prints, per variant, the server's throughput beside in-process ONNX
Runtime on the same provider (`mantissa bench --in-process-store`) and the drift of its answers
from FP32 on the CPU.

Run by scripts/gpu-check.sh, which installs the onnxruntime-gpu wheel and the CUDA libraries
and passes their paths:

    python3 scripts/gpu_check.py --bin target/release/mantissa \\
        --ort-library VENV/.../onnxruntime/capi/libonnxruntime.so.1.31.1 --providers cuda,tensorrt

`--providers cpu` runs the same flow on the CPU library (a check of this script on a machine
without a GPU; its figures say nothing about GPUs). Needs numpy, onnxruntime (for the CPU
reference) and tritonclient[grpc].
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = 128  # MiniLM inputs are padded or cut to one length, so TensorRT builds one engine
PROVIDERS = ("cpu", "cuda", "tensorrt")
MODELS = ("minilm", "digits_cnn")


@dataclass
class Model:
    """One model of the check: where it comes from, its benchmark rows and batch size."""

    name: str
    onnx: Path
    batch: int
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # rows along dimension 0
    output: str = ""


@dataclass
class Row:
    model: str
    variant: str
    provider: str = "-"
    group: str = "-"
    server: float | None = None
    concurrency: int | None = None
    in_process: float | None = None
    cosine: float | None = None
    max_abs: float | None = None
    top1: float | None = None
    error: str = ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, required=True, help="the mantissa binary")
    parser.add_argument("--ort-library", type=Path, required=True, help="libonnxruntime.so.1.31.1 to serve with")
    parser.add_argument("--providers", default="cuda", help="comma-separated: cpu, cuda, tensorrt")
    parser.add_argument("--device", type=int, default=0, help="GPU device id")
    parser.add_argument("--minilm", type=Path, default=REPO / ".corpus/models/minilm-l6",
                        help="corpus directory of the MiniLM-class model (model.onnx, holdout/*.npz)")
    parser.add_argument("--models", default="minilm,digits_cnn", help="comma-separated: minilm, digits_cnn")
    parser.add_argument("--duration", default="5s", help="measured time per concurrency level and in-process run")
    parser.add_argument("--concurrency", default="1,16", help="concurrency levels of the server benchmark")
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for readiness")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown or not args.providers:
        parser.error(f"--providers: expected some of {', '.join(PROVIDERS)}, got {args.providers}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        parser.error(f"--models: expected some of {', '.join(MODELS)}, got {args.models}")
    for path, what in [(args.bin, "--bin"), (args.ort_library, "--ort-library")]:
        if not path.is_file():
            parser.error(f"{what}: {path} does not exist")
    if "minilm" in args.models and not (args.minilm / "model.onnx").is_file():
        parser.error(f"--minilm: {args.minilm}/model.onnx does not exist "
                     "(make it with: python3 scripts/corpus/fetch.py --only minilm-l6)")
    return args


def minilm_inputs(directory: Path, rows: int) -> dict[str, np.ndarray]:
    """Holdout sentences, padded (attention 0) or cut to SEQUENCE tokens, repeated to `rows`."""
    samples = [np.load(path) for path in sorted((directory / "holdout").glob("*.npz"))]
    if not samples:
        raise SystemExit(f"{directory}/holdout has no .npz samples")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in samples[0].files}
    for index in range(rows):
        sample = samples[index % len(samples)]
        for name in columns:
            row = sample[name][0][:SEQUENCE]
            columns[name].append(np.pad(row, (0, SEQUENCE - len(row))))
    return {name: np.stack(values).astype(np.int64) for name, values in columns.items()}


def models(args: argparse.Namespace) -> list[Model]:
    checked = []
    if "minilm" in args.models:
        inputs = minilm_inputs(args.minilm, 64)
        checked.append(Model("minilm", args.minilm / "model.onnx", 8, inputs, "last_hidden_state"))
    if "digits_cnn" in args.models:
        digits = np.load(REPO / "examples/models/digits_cnn/test_data.npz")
        checked.append(Model("digits_cnn", REPO / "examples/models/digits_cnn/model.onnx", 64,
                             {"input": digits["input"][:448]}, "logits"))
    return checked


def variant_names(providers: list[str]) -> list[tuple[str, str, str]]:
    """(variant, precision, provider) for every provider: fp32 and fp16 each."""
    return [(f"{precision}_{provider}", precision, provider) for provider in providers for precision in ("fp32", "fp16")]


def policy(model: Model, providers: list[str], device: int) -> str:
    lines = [
        "serving:",
        "  max_batch_size: 64",
        "  instances: 1",
        "  intra_op_threads: 0",
        "variants:",
    ]
    for variant, precision, provider in variant_names(providers):
        lines += [f"  {variant}:", f"    precision: {precision}"]
        if provider == "cuda":
            lines.append(f"    execution_provider: {{kind: cuda, device_id: {device}}}")
        elif provider == "tensorrt":
            fp16 = "true" if precision == "fp16" else "false"
            lines.append(f"    execution_provider: {{kind: tensorrt, device_id: {device}, fp16: {fp16}}}")
            # Every new batch size would make TensorRT build another engine: run only the
            # benchmark's own batch.
            lines += ["    serving:", "      dynamic_batching: false"]
    lines += ["routing:", f"  default: {variant_names(providers)[0][0]}"]
    return "\n".join(lines) + "\n"


def write_store(work: Path, checked: list[Model], args: argparse.Namespace) -> Path:
    store = work / "store"
    for model in checked:
        directory = store / model.name
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "model.onnx"
        if not target.exists():
            target.symlink_to(model.onnx.resolve())
        (directory / "policy.yaml").write_text(policy(model, args.providers, args.device))
        np.savez(work / f"{model.name}_bench.npz", **model.inputs)
    return store


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, store: Path, work: Path) -> tuple[subprocess.Popen, str]:
    grpc_port, metrics_port = free_port(), free_port()
    log = open(work / "server.log", "w")  # noqa: SIM115 (kept open for the server's life)
    command = [
        str(args.bin), "--log-format", "json", "serve", "--model-store", str(store),
        "--grpc-addr", f"127.0.0.1:{grpc_port}", "--metrics-addr", f"127.0.0.1:{metrics_port}",
        "--cache-dir", str(work / "cache"), "--ort-library", str(args.ort_library),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    return server, f"127.0.0.1:{grpc_port}"


def wait_loaded(client, server: subprocess.Popen, work: Path, timeout: float) -> None:
    """Waits until every variant has loaded or failed (the server logs which)."""
    deadline = time.monotonic() + timeout
    log = work / "server.log"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        text = log.read_text()
        if "all models ready; serving" in text or "not every model loaded" in text:
            return
        time.sleep(0.2)
    raise SystemExit(f"variants not loaded within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def variant_state(client, model: str, variant: str, row: Row) -> bool:
    """Fills provider and instance group from ModelConfig; False (with the reason) if not ready."""
    if not client.is_model_ready(model, variant):
        index = client.get_model_repository_index(as_json=True).get("models", [])
        # The index names versions by number; the variants of this model that are not ready.
        reasons = [f"version {m.get('version')}: {m.get('reason', '')}" for m in index
                   if m.get("name") == model and m.get("state") != "READY"]
        row.error = "not ready: " + (reasons[0] if reasons else "no reason given")
        return False
    config = client.get_model_config(model, variant, as_json=True)["config"]
    row.provider = config.get("parameters", {}).get("execution_provider", {}).get("string_value", "?")
    group = config.get("instance_group", [{}])[0]
    gpus = ",".join(str(g) for g in group.get("gpus", []))
    row.group = group.get("kind", "KIND_CPU") + (f" [{gpus}]" if gpus else "")
    return True


def bench(args: argparse.Namespace, address: str, store: Path, work: Path, model: Model, row: Row) -> None:
    command = [
        str(args.bin), "bench", "--url", f"http://{address}", "--model", model.name,
        "--model-version", row.variant, "--batch-size", str(model.batch), "--concurrency", args.concurrency,
        "--duration", args.duration, "--warmup", "1s", "--input-data", str(work / f"{model.name}_bench.npz"),
        "--in-process-store", str(store), "--cache-dir", str(work / "cache"), "--json",
    ]
    env = dict(os.environ, ORT_DYLIB_PATH=str(args.ort_library))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        row.error = f"bench failed: {done.stderr.strip()[-500:]}"
        return
    report = json.loads(done.stdout)
    best = max(report["levels"], key=lambda level: level["inferences_per_second"])
    row.server, row.concurrency = best["inferences_per_second"], best["concurrency"]
    if report.get("in_process"):
        row.in_process = report["in_process"]["inferences_per_second"]


def drift(client, model: Model, reference: np.ndarray, row: Row) -> None:
    """Cosine, largest difference and (for class scores) top-1 agreement against FP32 on the CPU."""
    import tritonclient.grpc as grpcclient

    answers = []
    for start in range(0, len(reference), model.batch):
        inputs = []
        for name, values in model.inputs.items():
            rows = values[start:start + model.batch]
            tensor = grpcclient.InferInput(name, list(rows.shape), "INT64" if rows.dtype == np.int64 else "FP32")
            tensor.set_data_from_numpy(rows)
            inputs.append(tensor)
        result = client.infer(model.name, inputs, model_version=row.variant)
        answers.append(result.as_numpy(model.output))
    got, want = np.concatenate(answers).astype(np.float64), reference.astype(np.float64)
    row.cosine = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-30))
    row.max_abs = float(np.max(np.abs(got - want)))
    if model.output == "logits":
        row.top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))


def cpu_reference(model: Model) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.onnx), providers=["CPUExecutionProvider"])
    return session.run([model.output], model.inputs)[0]


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def print_table(rows: list[Row]) -> None:
    header = (f"{'model':<11} {'variant':<14} {'provider in use':<26} {'group':<13} {'server/s':>10} {'c':>3} "
              f"{'in-proc/s':>10} {'srv/inp':>7} {'x fp32':>6} {'cosine':>9} {'max|d|':>9} {'top1':>6}")
    print(header)
    print("-" * len(header))
    fp32 = {(r.model, r.variant.split("_", 1)[1]): r.server for r in rows if r.variant.startswith("fp32_")}
    for r in rows:
        base = fp32.get((r.model, r.variant.split("_", 1)[1]))
        speedup = r.server / base if r.server and base else None
        ratio = r.server / r.in_process if r.server and r.in_process else None
        print(f"{r.model:<11} {r.variant:<14} {r.provider:<26} {r.group:<13} {fmt(r.server, '.1f'):>10} "
              f"{r.concurrency or '-':>3} {fmt(r.in_process, '.1f'):>10} {fmt(ratio, '.2f'):>7} "
              f"{fmt(speedup, '.2f'):>6} {fmt(r.cosine, '.6f'):>9} {fmt(r.max_abs, '.2e'):>9} {fmt(r.top1, '.3f'):>6}")
        if r.error:
            print(f"    {r.error}")
    for provider in ("cuda", "tensorrt"):
        found = {r.variant: r.server for r in rows if r.model == "minilm" and r.variant.endswith("_" + provider)}
        if found.get(f"fp32_{provider}") and found.get(f"fp16_{provider}"):
            speedup = found[f"fp16_{provider}"] / found[f"fp32_{provider}"]
            verdict = "meets" if speedup >= 1.8 else "misses"
            print(f"MiniLM FP16 / FP32 throughput on {provider}: {speedup:.2f}x ({verdict} the 1.8x target)")


def run(args: argparse.Namespace, work: Path) -> list[Row]:
    import tritonclient.grpc as grpcclient

    checked = models(args)
    store = write_store(work, checked, args)
    references = {model.name: cpu_reference(model) for model in checked}
    started = time.monotonic()
    server, address = start_server(args, store, work)
    rows: list[Row] = []
    try:
        client = grpcclient.InferenceServerClient(address)
        wait_loaded(client, server, work, args.startup_timeout)
        print(f"variants loaded in {time.monotonic() - started:.1f}s (log: {work / 'server.log'})", file=sys.stderr)
        for model in checked:
            for variant, _, _ in variant_names(args.providers):
                row = Row(model.name, variant)
                rows.append(row)
                if not variant_state(client, model.name, variant, row):
                    continue
                drift(client, model, references[model.name], row)
                bench(args, address, store, work, model, row)
                print(f"  {model.name} {variant}: done at {time.monotonic() - started:.0f}s", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="mantissa-gpu-check-") as work:
            rows = run(args, Path(work))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2))
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
