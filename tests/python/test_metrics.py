"""Observability end to end: Prometheus metrics, startup drift, drift budgets, Triton
ModelStatistics, live shadow drift, and the Grafana dashboard that reads them.

Servers (the real binary, 127.0.0.1, port 0; module scoped):

* ``examples_server`` (conftest) serves ``examples/models``; the module fixture ``traffic`` sends
  a known set of requests to it once (per model and variant a distinct number of good requests
  and of INVALID_ARGUMENT ones, sequentially, so that no two requests share a run) and scrapes
  ``/metrics`` before and after. Request metrics come only from client requests, so they are
  compared with the traffic as absolute values; queue, compute and batch metrics also count the
  server's own startup runs (warm-up self-test, holdout drift), so they are compared as
  differences between the two scrapes.
* ``scratch_server`` serves a temporary store: ``budget_strict_{static,dynamic}`` and
  ``budget_flagged_{static,dynamic}`` (digits_transformer with fp32 + int8, static INT8 as in the
  example policies or dynamic INT8, and an impossible ``min_cosine: 0.999999999``; the flagged
  ones with ``on_budget_miss: serve_flagged``) and ``deadline_cnn`` (digits_cnn,
  ``default_timeout: 1us``, so every request is dropped for its deadline, deterministically).
* ``shadow_server`` serves a temporary store of three digits_cnn models with fp32 + int8:
  ``shadow_count`` (``shadow: {reference: fp32, sample_rate: 1.0, queue_size: 256}``),
  ``shadow_load`` (the same with ``queue_size: 1``) and ``shadow_off`` (no shadow section). The
  latency comparison runs the same closed-loop load against ``shadow_off`` and ``shadow_load``
  of that one server, one after the other: the only difference is the shadow section.

Startup drift is recomputed offline: ``mantissa quantize`` builds the fp16 and int8 models with
the options of the example policies, onnxruntime (CPUExecutionProvider) runs them and the fp32
model on the whole holdout ``test_data.npz`` ``input`` as one batch of 450 rows (as the server
does), and the five measures are computed in float64 exactly as the README defines them.

ModelStatistics follows Triton: ``inference_count`` counts the rows clients sent and
``execution_count`` the runs that served them; the server's own runs are not client inferences.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shutil
import statistics as pystats
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES_STORE, REPO_ROOT, mantissa_binary, served_variant, start_server, variant_versions

TIMEOUT_S = 20.0  # per RPC
MODELS = ("digits_cnn", "digits_transformer")
VARIANTS = ("fp32", "fp16", "int8")
# Their version numbers: the example policies list them in this order and declare none.
VERSIONS = {"fp32": "1", "fp16": "2", "int8": "3"}
NON_REFERENCE = ("fp16", "int8")
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "mantissa-dashboard.json"
ORT_LIBRARY = REPO_ROOT / ".onnxruntime" / "lib" / "libonnxruntime.so.1.31.1"

# Traffic per variant (the same for both models): rows of each good request, and the number of
# INVALID_ARGUMENT requests. Different counts per variant so that a label mix-up shows.
OK_ROWS = {"fp32": [1, 4, 2, 8], "fp16": [3, 1, 5], "int8": [2, 6]}
INVALID = {"fp32": 1, "fp16": 2, "int8": 3}

# Startup drift: offline recomputation vs the server's gauges and ModelConfig parameters.
COSINE_ABS_TOL = 1e-6
TOP1_ABS_TOL = 1e-4  # 1/450 = 2.2e-3: one row of difference fails
SQNR_DB_ABS_TOL = 0.05
ERROR_REL_TOL = 1e-3  # max-abs error and RMSE

IMPOSSIBLE_MIN_COSINE = 0.999999999

# Shadow drift.
SHADOW_REQUESTS = 20
SHADOW_WAIT_S = 10.0
LOAD_THREADS = 16
LOAD_REQUESTS_PER_THREAD = 25
LOAD_ROWS = 8
LATENCY_FACTOR = 3.0  # shadow on may not make the client p50 more than 3x worse
LATENCY_SLACK_S = 0.002  # plus 2 ms, so that sub-millisecond noise cannot fail it

# Metric families and their Prometheus types (counters are listed by their sample name).
COUNTERS = ("mantissa_requests_total", "mantissa_requests_succeeded_total",
            "mantissa_queue_microseconds_total", "mantissa_requests_dropped_total")
HISTOGRAMS = ("mantissa_request_duration_seconds", "mantissa_queue_duration_seconds",
              "mantissa_compute_duration_seconds", "mantissa_batch_size")
GAUGES = ("mantissa_queue_depth", "mantissa_requests_in_flight", "mantissa_variant_ready",
          "mantissa_variant_build_duration_seconds", "mantissa_variant_artifact_bytes")
DRIFT_GAUGES = {"cosine": "mantissa_startup_drift_cosine", "sqnr_db": "mantissa_startup_drift_sqnr_db",
                "max_abs": "mantissa_startup_drift_max_abs_error", "rmse": "mantissa_startup_drift_rmse",
                "top1_agreement": "mantissa_startup_drift_top1_agreement"}
SHADOW_HISTOGRAMS = ("mantissa_shadow_drift_cosine", "mantissa_shadow_drift_sqnr_db",
                     "mantissa_shadow_drift_max_abs_error")
SHADOW_COUNTERS = ("mantissa_shadow_samples_total", "mantissa_shadow_dropped_total")
LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


# ---- scraping ---------------------------------------------------------------------------------

@dataclass
class Scrape:
    """One parsed ``GET /metrics``."""

    text: str

    def __post_init__(self):
        self.families = list(text_string_to_metric_families(self.text))
        self.samples = [s for f in self.families for s in f.samples]
        self.types = {f.name: f.type for f in self.families}

    @classmethod
    def fetch(cls, server) -> "Scrape":
        with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=TIMEOUT_S) as resp:
            assert resp.status == 200
            assert resp.headers.get("Content-Type", "").startswith("text/plain")
            return cls(resp.read().decode("utf-8"))

    def names(self) -> set[str]:
        """Every sample name (``x_total``, ``x_bucket``, ...) and family name."""
        return {s.name for s in self.samples} | set(self.types)

    def labels_of(self, name: str) -> set[str]:
        return {k for s in self.samples if s.name == name for k in s.labels}

    def find(self, name: str, **labels) -> list:
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def get(self, name: str, default=None, **labels):
        """The value of the sample whose label set is exactly ``labels``."""
        hits = [s for s in self.samples if s.name == name and s.labels == labels]
        assert len(hits) <= 1, f"{len(hits)} samples {name}{labels}"
        return hits[0].value if hits else default

    def one(self, name: str, **labels) -> float:
        value = self.get(name, **labels)
        if value is None:
            near = sorted(f"{s.name}{s.labels}" for s in self.samples if s.name == name)
            raise AssertionError(f"no sample {name}{labels}; the scrape has {near[:20] or 'none of that name'}")
        return value

    def family_type(self, name: str) -> str | None:
        family = name[: -len("_total")] if name.endswith("_total") else name
        return self.types.get(family)

    def histogram(self, name: str, expected_bounds: list[float] | None = None, **labels) -> tuple[float, float]:
        """Checks the bucket series of one histogram child; returns (count, sum)."""
        assert self.family_type(name) == "histogram", f"{name} is a {self.family_type(name)!r}, not a histogram"
        buckets = [s for s in self.samples
                   if s.name == name + "_bucket" and set(s.labels) == set(labels) | {"le"}
                   and all(s.labels[k] == v for k, v in labels.items())]
        assert buckets, f"no {name}_bucket{labels} (le) series"
        buckets.sort(key=lambda s: float(s.labels["le"]))
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds[-1] == math.inf, f"{name}{labels}: no le=\"+Inf\" bucket: {bounds}"
        assert len(set(bounds)) == len(bounds), f"{name}{labels}: duplicate le: {bounds}"
        if expected_bounds is not None:
            assert bounds[:-1] == pytest.approx(expected_bounds), f"{name}{labels}: buckets {bounds}"
        values = [s.value for s in buckets]
        assert all(a <= b for a, b in zip(values, values[1:])), f"{name}{labels}: buckets not cumulative: {values}"
        count = self.one(name + "_count", **labels)
        total = self.one(name + "_sum", **labels)
        assert values[-1] == count, f"{name}{labels}: +Inf bucket {values[-1]} != _count {count}"
        return count, total


def poll(read, done, timeout: float, interval: float = 0.05):
    """Calls ``read()`` until ``done(value)`` or the timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---- requests ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def holdout():
    return {m: np.load(EXAMPLES_STORE / m / "test_data.npz")["input"].astype(np.float32) for m in MODELS}


def infer_input(batch: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(batch.shape), datatype)
    inp.set_data_from_numpy(np.ascontiguousarray(batch))
    return inp


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status() or "")


def invalid_input(model: str, holdout: dict, kind: int) -> grpcclient.InferInput:
    """Alternately a shape mismatch and a datatype mismatch: both INVALID_ARGUMENT."""
    x = holdout[model][:2]
    if kind % 2 == 0:
        return infer_input(np.zeros((2, 9, 9, 9)[: x.ndim], dtype=np.float32))
    return infer_input(x.astype(np.float64), "FP64")


@pytest.fixture(scope="module")
def client(examples_server):
    with grpcclient.InferenceServerClient(examples_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def traffic(examples_server, client, holdout):
    """Sends OK_ROWS / INVALID to every variant of both models once; returns the expectations
    and the scrapes taken before and after."""
    before = Scrape.fetch(examples_server)
    expected = {}
    for model in MODELS:
        x = holdout[model]
        for variant in VARIANTS:
            offset = 0
            for rows in OK_ROWS[variant]:
                result = client.infer(model, [infer_input(x[offset:offset + rows])], model_version=variant,
                                      client_timeout=TIMEOUT_S)
                assert served_variant(result.get_response()) == variant
                assert result.as_numpy("logits").shape == (rows, 10)
                offset += rows
            for kind in range(INVALID[variant]):
                with pytest.raises(InferenceServerException) as e:
                    client.infer(model, [invalid_input(model, holdout, kind)], model_version=variant,
                                 client_timeout=TIMEOUT_S)
                assert "INVALID_ARGUMENT" in status_of(e.value), e.value
            expected[(model, variant)] = {"ok": len(OK_ROWS[variant]), "rows": sum(OK_ROWS[variant]),
                                          "invalid": INVALID[variant]}
    after = Scrape.fetch(examples_server)
    return {"expected": expected, "before": before, "after": after}


# ---- metrics ----------------------------------------------------------------------------------

def test_metric_families_and_types(traffic):
    scrape = traffic["after"]
    for name in COUNTERS[:3]:
        assert scrape.find(name), f"{name} missing"
        assert scrape.family_type(name) == "counter", (name, scrape.family_type(name))
    for name in HISTOGRAMS:
        assert scrape.family_type(name) == "histogram", (name, scrape.family_type(name))
    for name in GAUGES:
        assert scrape.family_type(name) == "gauge", (name, scrape.family_type(name))
        assert scrape.find(name), f"{name} missing"
    for name in DRIFT_GAUGES.values():
        assert scrape.family_type(name) == "gauge", (name, scrape.family_type(name))
    # mantissa_requests_dropped_total appears with the first drop: see test_deadline_drops_are_counted.


def test_request_counts_and_latency_histograms(traffic):
    scrape = traffic["after"]
    for (model, variant), exp in traffic["expected"].items():
        assert scrape.one("mantissa_requests_total", model=model, variant=variant, outcome="ok") == exp["ok"]
        assert scrape.one("mantissa_requests_total", model=model, variant=variant,
                          outcome="invalid_argument") == exp["invalid"]
        for outcome, n in (("ok", exp["ok"]), ("invalid_argument", exp["invalid"])):
            count, total = scrape.histogram("mantissa_request_duration_seconds", LATENCY_BUCKETS,
                                            model=model, variant=variant, outcome=outcome)
            assert count == n, (model, variant, outcome, count)
            assert total > 0, (model, variant, outcome, total)
        assert scrape.one("mantissa_requests_succeeded_total", model=model, variant=variant) == exp["ok"]
    # Nothing else was sent: no other outcome or variant label for these models.
    for model in MODELS:
        seen = {(s.labels["variant"], s.labels["outcome"]) for s in scrape.find("mantissa_requests_total", model=model)}
        assert seen == {(v, o) for v in VARIANTS for o in ("ok", "invalid_argument")}, seen


def test_queue_compute_and_batch_metrics(traffic):
    before, after = traffic["before"], traffic["after"]
    for (model, variant), exp in traffic["expected"].items():
        labels = {"model": model, "variant": variant}
        deltas = {}
        for name, bounds in (("mantissa_queue_duration_seconds", LATENCY_BUCKETS),
                             ("mantissa_compute_duration_seconds", LATENCY_BUCKETS),
                             ("mantissa_batch_size", BATCH_BUCKETS)):
            count, total = after.histogram(name, bounds, **labels)
            count0 = before.get(name + "_count", 0.0, **labels)
            total0 = before.get(name + "_sum", 0.0, **labels)
            deltas[name] = (count - count0, total - total0)
        # Every good request queued and ran once; invalid ones never reach the queue.
        assert deltas["mantissa_queue_duration_seconds"][0] == exp["ok"], (labels, deltas)
        assert deltas["mantissa_compute_duration_seconds"][0] == exp["ok"], (labels, deltas)
        assert deltas["mantissa_queue_duration_seconds"][1] >= 0, (labels, deltas)
        assert deltas["mantissa_compute_duration_seconds"][1] > 0, (labels, deltas)
        # Sequential requests: one run per request, one request per run.
        assert deltas["mantissa_batch_size"] == (exp["ok"], exp["ok"]), (labels, deltas)
        # The µs counter carries the queue histogram's _sum (rounded per run).
        micros = after.one("mantissa_queue_microseconds_total", **labels)
        micros0 = before.get("mantissa_queue_microseconds_total", 0.0, **labels)
        assert micros >= micros0 >= 0
        assert abs((micros - micros0) - deltas["mantissa_queue_duration_seconds"][1] * 1e6) <= exp["ok"] + 1, (
            labels, micros - micros0, deltas["mantissa_queue_duration_seconds"][1])
        depth = after.one("mantissa_queue_depth", **labels)
        assert depth >= 0 and depth == int(depth), (labels, depth)
    for model in MODELS:
        assert after.one("mantissa_requests_in_flight", model=model) == 0


def test_variant_gauges(traffic):
    scrape = traffic["after"]
    for model in MODELS:
        sizes = {}
        for variant in VARIANTS:
            assert scrape.one("mantissa_variant_ready", model=model, variant=variant) == 1
            sizes[variant] = scrape.one("mantissa_variant_artifact_bytes", model=model, variant=variant)
            assert sizes[variant] > 0
            assert scrape.one("mantissa_variant_build_duration_seconds", model=model, variant=variant) >= 0
        assert sizes["fp32"] == (EXAMPLES_STORE / model / "model.onnx").stat().st_size
        if model == "digits_cnn":
            assert sizes["int8"] < sizes["fp32"] and sizes["fp16"] < sizes["fp32"], sizes
        for variant in NON_REFERENCE:
            cosine = scrape.one(DRIFT_GAUGES["cosine"], model=model, variant=variant, output="logits")
            top1 = scrape.one(DRIFT_GAUGES["top1_agreement"], model=model, variant=variant, output="logits")
            sqnr = scrape.one(DRIFT_GAUGES["sqnr_db"], model=model, variant=variant, output="logits")
            max_abs = scrape.one(DRIFT_GAUGES["max_abs"], model=model, variant=variant, output="logits")
            rmse = scrape.one(DRIFT_GAUGES["rmse"], model=model, variant=variant, output="logits")
            assert 0.99 <= cosine <= 1.0 and 0.98 <= top1 <= 1.0, (model, variant, cosine, top1)  # budget met
            assert sqnr > 0 and 0 <= rmse <= max_abs, (model, variant, sqnr, rmse, max_abs)
        # The reference is not compared with itself.
        assert not scrape.find(DRIFT_GAUGES["cosine"], model=model, variant="fp32")


# ---- startup drift, recomputed offline ------------------------------------------------------------

def run_quantize(args: list[str]) -> None:
    env = dict(os.environ)
    if "ORT_DYLIB_PATH" not in env and ORT_LIBRARY.is_file():
        env["ORT_DYLIB_PATH"] = str(ORT_LIBRARY)
    proc = subprocess.run([str(mantissa_binary()), "quantize", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, f"mantissa quantize {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def offline_variants(tmp_path_factory):
    """{(model, variant): path} of the fp16 / int8 models built offline with the options of the
    example policies (checked here against the policy files)."""
    out = tmp_path_factory.mktemp("offline_variants")
    paths = {}
    for model in MODELS:
        directory = EXAMPLES_STORE / model
        policy = yaml.safe_load((directory / "policy.yaml").read_text())
        fp16 = policy["variants"]["fp16"]
        assert fp16["precision"] == "fp16" and fp16.get("fp16", {}) in ({}, {"keep_io_types": True}), fp16
        int8 = policy["variants"]["int8"]
        assert int8["precision"] == "int8" and int8["int8"] == {
            "mode": "static", "calibration_data": "calibration", "calibration": {"method": "minmax"}}, int8
        assert policy["drift"]["holdout_data"] == "test_data.npz" and policy["drift"]["reference"] == "fp32"
        paths[(model, "fp32")] = directory / "model.onnx"
        paths[(model, "fp16")] = out / f"{model}.fp16.onnx"
        run_quantize([str(directory / "model.onnx"), "--precision", "fp16", "-o", str(paths[(model, "fp16")])])
        paths[(model, "int8")] = out / f"{model}.int8.onnx"
        run_quantize([str(directory / "model.onnx"), "--precision", "int8", "--mode", "static",
                      "--calibration-data", str(directory / "calibration"), "--calibration-method", "minmax",
                      "-o", str(paths[(model, "int8")])])
    return paths


def drift_figures(reference: np.ndarray, variant: np.ndarray) -> dict[str, float]:
    """The README's definitions, in float64 over all elements; top-1 over the last dimension."""
    r, v = reference.astype(np.float64), variant.astype(np.float64)
    error = float(((r - v) ** 2).sum())
    return {
        "cosine": float((r * v).sum() / math.sqrt(float((r * r).sum()) * float((v * v).sum()))),
        "sqnr_db": 10.0 * math.log10(float((r * r).sum()) / error) if error > 0 else math.inf,
        "max_abs": float(np.abs(r - v).max()),
        "rmse": math.sqrt(error / r.size),
        "top1_agreement": float((r.argmax(axis=-1) == v.argmax(axis=-1)).mean()),
    }


def assert_figures_close(where: str, got: dict[str, float], want: dict[str, float]) -> None:
    assert got["cosine"] == pytest.approx(want["cosine"], rel=0, abs=COSINE_ABS_TOL), (where, got, want)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], rel=0, abs=TOP1_ABS_TOL), (where, got, want)
    assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], rel=0, abs=SQNR_DB_ABS_TOL), (where, got, want)
    assert got["max_abs"] == pytest.approx(want["max_abs"], rel=ERROR_REL_TOL), (where, got, want)
    assert got["rmse"] == pytest.approx(want["rmse"], rel=ERROR_REL_TOL), (where, got, want)


@pytest.mark.parametrize("model", MODELS)
def test_startup_drift_matches_offline_recomputation(model, offline_variants, holdout, traffic, client, report_line):
    scrape = traffic["after"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # as the example policies

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"input": holdout[model]})[0]  # one batch of 450 rows

    reference = run(offline_variants[(model, "fp32")])
    assert reference.shape == (450, 10)
    for variant in NON_REFERENCE:
        want = drift_figures(reference, run(offline_variants[(model, variant)]))
        gauges = {key: scrape.one(name, model=model, variant=variant, output="logits")
                  for key, name in DRIFT_GAUGES.items()}
        assert_figures_close(f"{model}/{variant} gauges", gauges, want)
        config = client.get_model_config(model, variant, as_json=True, client_timeout=TIMEOUT_S)["config"]
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        from_config = {key: float(params[f"drift_logits_{key}"]) for key in DRIFT_GAUGES}
        assert_figures_close(f"{model}/{variant} ModelConfig", from_config, want)
        assert params.get("drift_budget") == "met", params
        assert params.get("drift_reference") == "fp32", params
        # The artifact the server loads is the one `mantissa quantize` writes.
        size = scrape.one("mantissa_variant_artifact_bytes", model=model, variant=variant)
        assert size == offline_variants[(model, variant)].stat().st_size, (model, variant, size)
        report_line(f"startup drift {model}/{variant}: " + ", ".join(f"{k}={want[k]:.6g}" for k in DRIFT_GAUGES))


# ---- budgets and deadline drops (scratch store) -------------------------------------------------

BUDGET_POLICY = f"""\
serving:
  max_batch_size: 64
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
      calibration:
        method: minmax
routing:
  default: fp32
drift:
  holdout_data: test_data.npz
  reference: fp32
  class_outputs: [logits]
  budget:
    min_cosine: {IMPOSSIBLE_MIN_COSINE}
"""

DEADLINE_POLICY = """\
serving:
  max_batch_size: 64
  instances: 1
  intra_op_threads: 1
  default_timeout: 1us
variants:
  fp32:
    precision: fp32
"""


def copy_model(source: str, store: Path, name: str, policy: str) -> None:
    target = store / name
    target.mkdir(parents=True)
    for item in ("model.onnx", "test_data.npz"):
        shutil.copy2(EXAMPLES_STORE / source / item, target / item)
    shutil.copytree(EXAMPLES_STORE / source / "calibration", target / "calibration")
    (target / "policy.yaml").write_text(policy)


def budget_policy(mode: str, flagged: bool) -> str:
    policy = BUDGET_POLICY
    if mode == "dynamic":
        policy = policy.replace("      mode: static\n      calibration_data: calibration\n"
                                "      calibration:\n        method: minmax\n", "      mode: dynamic\n")
        assert "dynamic" in policy
    return policy + ("  on_budget_miss: serve_flagged\n" if flagged else "")


@pytest.fixture(scope="module")
def scratch_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("scratch_store")
    for mode in BUDGET_MODES:
        copy_model("digits_transformer", store, f"budget_strict_{mode}", budget_policy(mode, flagged=False))
        copy_model("digits_transformer", store, f"budget_flagged_{mode}", budget_policy(mode, flagged=True))
    copy_model("digits_cnn", store, "deadline_cnn", DEADLINE_POLICY)
    server = start_server(store)
    yield server
    rc = server.stop()
    assert rc == 0, f"exit code {rc}\n{server.logs_text()}"


# The example recipe (static INT8, calibrated) and dynamic INT8, whose build does not depend on
# the budget: the drift check after the build is what the budget tests are about.
BUDGET_MODES = ("static", "dynamic")


def repository_index(c: grpcclient.InferenceServerClient) -> dict:
    return {(m["name"], m.get("version", "")): m
            for m in c.get_model_repository_index(as_json=True, client_timeout=TIMEOUT_S).get("models", [])}


def assert_budget_reason(reason: str) -> None:
    # README/brief: "drift budget missed: output 'logits': cosine ... is below the budget's min_cosine ..."
    assert re.search(r"drift budget", reason) and "missed" in reason, reason
    assert "min_cosine" in reason, reason


@pytest.mark.parametrize("mode", BUDGET_MODES)
def test_budget_miss_makes_variant_not_ready(mode, scratch_server, holdout):
    model = f"budget_strict_{mode}"
    with grpcclient.InferenceServerClient(scratch_server.grpc_url) as c:
        index = repository_index(c)
        versions = variant_versions(c, model)
        strict = index[(model, versions["int8"])]
        assert strict.get("state") == "UNAVAILABLE", strict
        assert_budget_reason(strict.get("reason", ""))
        assert index[(model, versions["fp32"])].get("state") == "READY"
        assert not c.is_model_ready(model, "int8", client_timeout=TIMEOUT_S)
        assert c.is_model_ready(model, "fp32", client_timeout=TIMEOUT_S)
        assert c.is_model_ready(model, client_timeout=TIMEOUT_S)
        x = holdout["digits_transformer"][:3]
        result = c.infer(model, [infer_input(x)], model_version="fp32", client_timeout=TIMEOUT_S)
        assert result.as_numpy("logits").shape == (3, 10)
        result = c.infer(model, [infer_input(x)], client_timeout=TIMEOUT_S)  # default: fp32
        assert served_variant(result.get_response()) == "fp32"
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, [infer_input(x)], model_version="int8", client_timeout=TIMEOUT_S)
        assert "UNAVAILABLE" in status_of(e.value), e.value
    scrape = Scrape.fetch(scratch_server)
    assert scrape.one("mantissa_variant_ready", model=model, variant="int8") == 0
    assert scrape.one("mantissa_variant_ready", model=model, variant="fp32") == 1
    if mode == "dynamic":
        # The figures that missed the budget are exported all the same (the dashboard shows why).
        # (A static INT8 build searches for a recipe that meets the budget and, when none does,
        # fails before any drift figure exists.)
        assert scrape.one(DRIFT_GAUGES["cosine"], model=model, variant="int8",
                          output="logits") < IMPOSSIBLE_MIN_COSINE


@pytest.mark.parametrize("mode", BUDGET_MODES)
def test_budget_miss_serve_flagged(mode, scratch_server, holdout):
    model = f"budget_flagged_{mode}"
    with grpcclient.InferenceServerClient(scratch_server.grpc_url) as c:
        flagged = repository_index(c)[(model, variant_versions(c, model)["int8"])]
        assert flagged.get("state") == "READY", flagged
        assert c.is_model_ready(model, "int8", client_timeout=TIMEOUT_S)
        x = holdout["digits_transformer"][:3]
        result = c.infer(model, [infer_input(x)], model_version="int8", client_timeout=TIMEOUT_S)
        assert served_variant(result.get_response()) == "int8"
        assert result.as_numpy("logits").shape == (3, 10)
        config = c.get_model_config(model, "int8", as_json=True, client_timeout=TIMEOUT_S)["config"]
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        assert params.get("drift_budget", "").startswith("missed"), params
        assert "min_cosine" in params["drift_budget"], params
    scrape = Scrape.fetch(scratch_server)
    assert scrape.one("mantissa_variant_ready", model=model, variant="int8") == 1
    assert scrape.one(DRIFT_GAUGES["cosine"], model=model, variant="int8", output="logits") < IMPOSSIBLE_MIN_COSINE


def deadline_counts(server) -> tuple[Scrape, float, float]:
    scrape = Scrape.fetch(server)
    return (scrape,
            scrape.get("mantissa_requests_dropped_total", 0.0, model="deadline_cnn", variant="fp32", reason="deadline"),
            scrape.get("mantissa_requests_total", 0.0, model="deadline_cnn", variant="fp32", outcome="deadline_exceeded"))


def test_deadline_drops_are_counted(scratch_server, holdout):
    x = holdout["digits_cnn"][:2]
    sent = 3
    _, dropped0, failed0 = deadline_counts(scratch_server)
    with grpcclient.InferenceServerClient(scratch_server.grpc_url) as c:
        for _ in range(sent):
            with pytest.raises(InferenceServerException) as e:
                c.infer("deadline_cnn", [infer_input(x)], model_version="fp32", client_timeout=TIMEOUT_S)
            assert "DEADLINE_EXCEEDED" in status_of(e.value), e.value
    # The worker counts the drop when it takes the expired request off the queue.
    scrape, dropped, failed = poll(lambda: deadline_counts(scratch_server),
                                   lambda r: r[1] - dropped0 >= sent, timeout=5.0)
    assert scrape.family_type("mantissa_requests_dropped_total") == "counter"
    assert (dropped - dropped0, failed - failed0) == (sent, sent)
    count, _ = scrape.histogram("mantissa_request_duration_seconds", LATENCY_BUCKETS, model="deadline_cnn",
                                variant="fp32", outcome="deadline_exceeded")
    assert count >= sent
    assert scrape.get("mantissa_requests_succeeded_total", 0.0, model="deadline_cnn", variant="fp32") == 0
    assert scrape.one("mantissa_requests_in_flight", model="deadline_cnn") == 0


def test_unversioned_failures_are_labelled_with_the_routed_variant(scratch_server, holdout):
    """A request without model_version is served by the default variant: its success is counted
    under variant="fp32", and so must its failures be (not under an empty variant label)."""
    x = holdout["digits_cnn"][:2]
    with grpcclient.InferenceServerClient(scratch_server.grpc_url) as c:
        with pytest.raises(InferenceServerException) as e:
            c.infer("deadline_cnn", [infer_input(x)], client_timeout=TIMEOUT_S)
        assert "DEADLINE_EXCEEDED" in status_of(e.value), e.value
        with pytest.raises(InferenceServerException) as e:
            c.infer("deadline_cnn", [invalid_input("digits_cnn", holdout, 0)], client_timeout=TIMEOUT_S)
        assert "INVALID_ARGUMENT" in status_of(e.value), e.value
    scrape = Scrape.fetch(scratch_server)
    empty = [f"{s.name}{s.labels}" for s in scrape.samples
             if s.labels.get("model") == "deadline_cnn" and s.labels.get("variant") == ""]
    assert not empty, f"series with an empty variant label: {empty[:6]}"
    assert scrape.one("mantissa_requests_total", model="deadline_cnn", variant="fp32", outcome="invalid_argument") >= 1


# ---- ModelStatistics ------------------------------------------------------------------------------

def test_model_statistics_requests(traffic, examples_server):
    """Success / failure counts and durations per variant, as Triton reports them."""
    expected = traffic["expected"]
    with grpcclient.InferenceServerClient(examples_server.grpc_url) as c:
        extensions = list(c.get_server_metadata(client_timeout=TIMEOUT_S).extensions)
        assert "statistics" in extensions, extensions
        for (model, variant), exp in expected.items():
            response = c.get_inference_statistics(model, variant, client_timeout=TIMEOUT_S)
            assert len(response.model_stats) == 1, response
            stats = response.model_stats[0]
            where = f"{model}/{variant}: {stats}"
            assert (stats.name, stats.version) == (model, VERSIONS[variant]), where
            inference = stats.inference_stats
            assert inference.success.count == exp["ok"], where
            assert inference.fail.count == exp["invalid"], where
            assert inference.success.ns > 0 and inference.fail.ns > 0, where
            assert inference.compute_infer.ns > 0 and inference.queue.ns > 0, where
            assert stats.last_inference > 0, where
        # An empty version lists every variant of the model, an empty name every model.
        all_versions = c.get_inference_statistics("digits_cnn", "", client_timeout=TIMEOUT_S)
        assert sorted(s.version for s in all_versions.model_stats) == sorted(VERSIONS.values()), all_versions
        everything = c.get_inference_statistics(client_timeout=TIMEOUT_S)
        assert {(s.name, s.version) for s in everything.model_stats} == {
            (model, VERSIONS[variant]) for model, variant in expected}, everything
        with pytest.raises(InferenceServerException) as e:
            c.get_inference_statistics("no_such_model", client_timeout=TIMEOUT_S)
        assert "NOT_FOUND" in status_of(e.value), e.value
        as_json = c.get_inference_statistics("digits_cnn", "int8", as_json=True, client_timeout=TIMEOUT_S)
        success = as_json["model_stats"][0]["inference_stats"]["success"]
        assert int(success["count"]) == expected[("digits_cnn", "int8")]["ok"], as_json


def test_model_statistics_executions(traffic, examples_server):
    """Triton semantics: inference_count counts the rows clients sent, execution_count the runs
    that served them (sequential requests: one run each), queue and compute phases are charged
    per request, and batch_stats holds one entry per executed batch size. The server's own runs
    (startup self-test and holdout drift, shadow re-runs) are not client inferences."""
    expected = traffic["expected"]
    with grpcclient.InferenceServerClient(examples_server.grpc_url) as c:
        for (model, variant), exp in expected.items():
            stats = c.get_inference_statistics(model, variant, client_timeout=TIMEOUT_S).model_stats[0]
            inference = stats.inference_stats
            got = {
                "inference_count": stats.inference_count,
                "execution_count": stats.execution_count,
                **{f"{phase}.count": getattr(inference, phase).count
                   for phase in ("queue", "compute_input", "compute_infer", "compute_output")},
                "batch_stats": {b.batch_size: b.compute_infer.count for b in stats.batch_stats},
            }
            want = {
                "inference_count": exp["rows"],
                "execution_count": exp["ok"],
                **{f"{phase}.count": exp["ok"]
                   for phase in ("queue", "compute_input", "compute_infer", "compute_output")},
                "batch_stats": {rows: OK_ROWS[variant].count(rows) for rows in OK_ROWS[variant]},
            }
            assert got == want, f"{model}/{variant}"
            assert inference.compute_infer.ns < inference.success.ns, f"{model}/{variant}: {stats}"
            assert all(b.compute_infer.ns > 0 for b in stats.batch_stats), f"{model}/{variant}: {stats}"


# ---- live shadow drift -----------------------------------------------------------------------------

def shadow_policy(queue_size: int | None) -> str:
    base = BUDGET_POLICY.split("drift:")[0]
    if queue_size is None:
        return base
    return base + f"shadow:\n  reference: fp32\n  sample_rate: 1.0\n  queue_size: {queue_size}\n"


@pytest.fixture(scope="module")
def shadow_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("shadow_store")
    copy_model("digits_cnn", store, "shadow_count", shadow_policy(256))
    copy_model("digits_cnn", store, "shadow_load", shadow_policy(1))
    copy_model("digits_cnn", store, "shadow_off", shadow_policy(None))
    server = start_server(store)
    yield server
    rc = server.stop()
    assert rc == 0, f"exit code {rc}\n{server.logs_text()}"


def test_shadow_drift_one_observation_per_request(shadow_server, holdout):
    server = shadow_server
    x = holdout["digits_cnn"]
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        for i in range(SHADOW_REQUESTS):
            rows = 1 + i % 4
            result = c.infer("shadow_count", [infer_input(x[i:i + rows])], model_version="int8",
                             client_timeout=TIMEOUT_S)
            assert served_variant(result.get_response()) == "int8"
        for i in range(3):  # served by the reference itself: never sampled
            c.infer("shadow_count", [infer_input(x[i:i + 2])], model_version="fp32", client_timeout=TIMEOUT_S)
    labels = {"model": "shadow_count", "variant": "int8", "output": "logits"}
    scrape = poll(lambda: Scrape.fetch(server),
                  lambda s: s.get("mantissa_shadow_drift_cosine_count", **labels) == SHADOW_REQUESTS,
                  timeout=SHADOW_WAIT_S)
    for name in SHADOW_HISTOGRAMS:
        count, total = scrape.histogram(name, **labels)
        assert count == SHADOW_REQUESTS, (name, count)
    count, total = scrape.histogram("mantissa_shadow_drift_cosine", **labels)
    assert 0.99 < total / count <= 1.0 + 1e-9, total / count  # int8 digits_cnn: cosine ~0.9999
    _, sqnr_total = scrape.histogram("mantissa_shadow_drift_sqnr_db", **labels)
    assert sqnr_total / count > 10, sqnr_total / count
    _, max_abs_total = scrape.histogram("mantissa_shadow_drift_max_abs_error", **labels)
    assert max_abs_total >= 0
    assert scrape.family_type("mantissa_shadow_samples_total") == "counter"
    assert scrape.one("mantissa_shadow_samples_total", model="shadow_count", variant="int8") == SHADOW_REQUESTS
    assert scrape.get("mantissa_shadow_dropped_total", 0.0, model="shadow_count", variant="int8") == 0
    assert not scrape.find("mantissa_shadow_drift_cosine_count", model="shadow_count", variant="fp32")
    assert not scrape.find("mantissa_shadow_samples_total", model="shadow_count", variant="fp32")
    assert not scrape.find("mantissa_shadow_samples_total", model="shadow_off")


def closed_loop(url: str, model: str, batch: np.ndarray) -> tuple[list[float], list[Exception]]:
    """LOAD_THREADS clients, each sending LOAD_REQUESTS_PER_THREAD requests back to back."""

    def client_loop(_):
        latencies, errors = [], []
        with grpcclient.InferenceServerClient(url) as c:
            inputs = [infer_input(batch)]
            for _ in range(LOAD_REQUESTS_PER_THREAD):
                started = time.perf_counter()
                try:
                    c.infer(model, inputs, model_version="int8", client_timeout=TIMEOUT_S)
                except InferenceServerException as e:
                    errors.append(e)
                    continue
                latencies.append(time.perf_counter() - started)
        return latencies, errors

    with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
        results = list(pool.map(client_loop, range(LOAD_THREADS)))
    return [t for r in results for t in r[0]], [e for r in results for e in r[1]]


def test_shadow_queue_full_drops_samples_not_requests(shadow_server, holdout, report_line):
    server = shadow_server
    batch = holdout["digits_cnn"][:LOAD_ROWS]
    total = LOAD_THREADS * LOAD_REQUESTS_PER_THREAD
    closed_loop(server.grpc_url, "shadow_off", batch[:1])  # warm both paths a little
    off, off_errors = closed_loop(server.grpc_url, "shadow_off", batch)
    on, on_errors = closed_loop(server.grpc_url, "shadow_load", batch)
    assert not off_errors and not on_errors, (off_errors[:3], on_errors[:3])
    assert len(off) == len(on) == total
    labels = {"model": "shadow_load", "variant": "int8"}

    def settled(s: Scrape) -> bool:
        compared = s.get("mantissa_shadow_samples_total", 0.0, **labels)
        return compared + s.get("mantissa_shadow_dropped_total", 0.0, **labels) >= total

    scrape = poll(lambda: Scrape.fetch(server), settled, timeout=SHADOW_WAIT_S)
    dropped = scrape.get("mantissa_shadow_dropped_total", 0.0, **labels)
    compared = scrape.get("mantissa_shadow_samples_total", 0.0, **labels)
    assert scrape.one("mantissa_requests_total", outcome="ok", **labels) == total
    assert dropped > 0, f"queue_size 1 and {LOAD_THREADS} concurrent clients, yet nothing dropped ({compared} compared)"
    # With sample_rate 1.0 every request is either compared (one observation) or dropped.
    assert compared + dropped == total, (compared, dropped, total)
    assert scrape.get("mantissa_shadow_drift_cosine_count", 0.0, output="logits", **labels) == compared
    p50_off, p50_on = pystats.median(off), pystats.median(on)
    p90_off = pystats.quantiles(off, n=10)[-1]
    p90_on = pystats.quantiles(on, n=10)[-1]
    line = (f"shadow load ({LOAD_THREADS} clients x {LOAD_REQUESTS_PER_THREAD} requests of {LOAD_ROWS} rows, "
            f"int8 digits_cnn): p50 shadow off {p50_off * 1e3:.2f} ms, on {p50_on * 1e3:.2f} ms "
            f"(p90 {p90_off * 1e3:.2f} / {p90_on * 1e3:.2f} ms); shadow compared {compared:.0f}, dropped {dropped:.0f}")
    print(line)
    report_line(line)
    assert p50_on <= LATENCY_FACTOR * p50_off + LATENCY_SLACK_S, line


# ---- Grafana dashboard -------------------------------------------------------------------------------

SHADOW_AND_STATISTICS_NAMES = (
    {f"{h}{suffix}" for h in SHADOW_HISTOGRAMS for suffix in ("", "_bucket", "_sum", "_count")}
    | set(SHADOW_COUNTERS)
)
KNOWN_LABELS = {"model", "variant", "outcome", "output", "reason", "le", "job", "instance", "pod", "namespace"}
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "by", "without", "rate", "irate", "increase",
                "histogram_quantile", "clamp_min", "clamp_max", "topk", "bottomk", "on", "ignoring",
                "group_left", "group_right", "and", "or", "unless", "offset", "bool", "abs", "vector",
                "label_replace", "time", "delta", "deriv", "avg_over_time", "max_over_time", "min_over_time",
                "last_over_time", "absent", "scalar", "sort", "sort_desc", "round", "le", "inf"}


def dashboard_panels(panels: list) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(dashboard_panels(panel.get("panels", [])))
    return out


def promql_metric_names(expr: str) -> set[str]:
    """Identifiers outside label matchers, strings, ranges and grouping clauses that are not
    PromQL keywords or functions: the metric names an expression selects."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    stripped = re.sub(r"\{[^{}]*\}", "{}", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "[]", stripped)  # ranges
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", stripped)
    stripped = re.sub(r"\$\{?\w+\}?", "", stripped)  # template variables
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", stripped))
    return {w for w in words if w.lower() not in PROMQL_WORDS and not re.fullmatch(r"e\d*", w)}


def promql_labels(expr: str) -> set[str]:
    labels = set()
    for matchers in re.findall(r"\{([^{}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {w.strip() for w in grouping.split(",") if w.strip()}
    return labels


def test_grafana_dashboard_references_real_metrics(traffic, scratch_server, holdout):
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41, dashboard["schemaVersion"]
    assert dashboard.get("title") and dashboard.get("uid")
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("model", "variant"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] is True, variables[name]
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "$model" in variables["variant"]["definition"] + json.dumps(variables["variant"]["query"])

    # Metric names a real server exports (after traffic, a deadline drop and a budget miss) plus
    # the shadow-drift names, which need a policy section.
    with grpcclient.InferenceServerClient(scratch_server.grpc_url) as c:  # one deadline drop
        with pytest.raises(InferenceServerException):
            c.infer("deadline_cnn", [infer_input(holdout["digits_cnn"][:1])], model_version="fp32",
                    client_timeout=TIMEOUT_S)
    scratch = poll(lambda: Scrape.fetch(scratch_server),
                   lambda s: bool(s.find("mantissa_requests_dropped_total")), timeout=5.0)
    known = traffic["after"].names() | scratch.names() | SHADOW_AND_STATISTICS_NAMES
    panels = dashboard_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    exprs = []
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})), panel.get("title")
        if panel["type"] == "row":
            continue
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no targets"
        for target in targets:
            expr = target.get("expr", "")
            where = f"panel {panel['title']!r} target {target.get('refId')}: {expr}"
            assert expr.strip(), where
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", where
            for open_, close in ("()", "{}", "[]"):
                assert expr.count(open_) == expr.count(close), f"unbalanced {open_}{close}: {where}"
            names = promql_metric_names(expr)
            assert names, f"no metric selected: {where}"
            unknown = {n for n in names if n not in known}
            assert not unknown, f"{where}\n  references metrics no server exports: {sorted(unknown)}"
            assert all(n.startswith("mantissa_") for n in names), where
            assert promql_labels(expr) <= KNOWN_LABELS, f"unknown labels {promql_labels(expr) - KNOWN_LABELS}: {where}"
            if "histogram_quantile" in expr:
                assert "_bucket" in expr and re.search(r"\ble\b", expr), f"quantile without le buckets: {where}"
            exprs.append(expr)

    joined = "\n".join(exprs)
    for q in ("0.5", "0.9", "0.99"):
        assert re.search(rf"histogram_quantile\(\s*{q}\s*,[^\n]*mantissa_request_duration_seconds_bucket", joined), q
    for name in ("mantissa_queue_duration_seconds_bucket", "mantissa_compute_duration_seconds_bucket"):
        assert re.search(rf"histogram_quantile\(\s*0.99\s*,[^\n]*{name}", joined), name
    for q in ("0.5", "0.1"):
        assert re.search(rf"histogram_quantile\(\s*{q}\s*,[^\n]*mantissa_shadow_drift_cosine_bucket", joined), q
    assert re.search(r"rate\(mantissa_requests_succeeded_total", joined)
    assert re.search(r"rate\(mantissa_batch_size_sum.*/.*rate\(mantissa_batch_size_count", joined)
    for name in ("mantissa_requests_total", "mantissa_queue_depth", "mantissa_requests_in_flight",
                 "mantissa_variant_ready", "mantissa_shadow_samples_total", "mantissa_shadow_dropped_total",
                 "mantissa_startup_drift_cosine", "mantissa_startup_drift_sqnr_db",
                 "mantissa_startup_drift_max_abs_error", "mantissa_startup_drift_top1_agreement"):
        assert name in joined, f"the dashboard shows no {name}"
    assert re.search(r"mantissa_requests_total\{[^}]*outcome!=\"ok\"", joined), "no error rate by outcome"
    assert "mantissa_queue_microseconds_total" in joined or "mantissa_queue_duration_seconds_sum" in joined
    # A/B: per-variant panels side by side (repeat by variant) or series per variant.
    repeated = [p for p in panels if p.get("repeat") == "variant"]
    assert repeated, "no panel repeats by variant"
    assert all(p.get("repeatDirection") == "h" for p in repeated)
