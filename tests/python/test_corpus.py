"""Real models: `mantissa quantize` in every mode and `mantissa serve` on the small corpus models.

The corpus comes from `scripts/corpus/fetch.py` (scripts/test.sh fetches the models listed in
tests/python/corpus_models.txt into .corpus/; see corpus_harness.py for MANTISSA_CORPUS and
MANTISSA_CORPUS_MODELS). A listed model that is missing fails, with the command to fetch it.

Robustness, per model and mode (fp16; INT8 dynamic; static with minmax, percentile, entropy
and mse calibration; weight-only; static with a cosine budget of 0.99 on the holdout), each
run once per session and judged by three tests:

- `test_quantize_valid`: exit 0; `onnx.checker.check_model(full_check=True)` accepts the
  output; ONNX Runtime loads it and runs every holdout sample; the graph outputs keep their
  element types and every output is finite.
- `test_quantize_accuracy`: per float output, the mean over the holdout samples of each
  sample's cosine with FP32 (flattened) is at least FP16_MIN_COSINE (0.999) for fp16 and
  INT8_MIN_COSINE (0.98) for the other INT8 modes; for the budget mode, the pooled cosine over
  all holdout samples (what the budget is defined on) is at least the budget itself (0.99).
- `test_int8_nothing_quantized_is_explained` (INT8 modes): when the output holds no more INT8
  nodes and no more 8/4-bit integer tensors than the input (subgraphs counted), the summary must say `nodes quantized: 0`, the
  output must hold a WARN line saying that no node was quantized (`no node was quantized` or
  `nothing quantized`) with its reason, and every float compute op type of the model (Conv,
  ConvTranspose, MatMul, Gemm, LSTM, GRU, RNN; inside If/Loop/Scan too) must be named, as a
  word, in that line or in a kept-FP32 line `<node> (<op type>): <reason>` of the summary.

Serving, per model: a store with variants fp32, fp16 and static INT8 (minmax on the corpus
calibration samples) and a `drift` section on the holdout samples, served by the real binary:

- `test_serving_fp32_matches_onnxruntime`: every holdout sample through tritonclient on the
  fp32 variant equals onnxruntime-Python on model.onnx (rtol 1e-4, atol 1e-5),
  same datatype and shape, every input of the model sent (silero-vad: input, state, sr).
- `test_serving_variant_accuracy`: fp16 and int8 served outputs meet the robustness
  tolerances against the same FP32 outputs.
- `test_serving_startup_drift_reported`: each non-reference variant exports
  `mantissa_startup_drift_cosine` (and sqnr/max-abs/rmse; top-1 for class outputs) for every
  float output and shows `drift_<output>_cosine` in its ModelConfig parameters, equal to the
  pooled cosine of the served outputs within DRIFT_COSINE_TOL (1e-4).
"""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import corpus_harness as ch
from conftest import served_variant, start_server

MODELS = ch.listed_models()
INT8_MODES = [m for m in ch.MODES if m.startswith("int8")]

FP16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.98
SERVE_RTOL = 1e-4
SERVE_ATOL = 1e-5
DRIFT_COSINE_TOL = 1e-4
RPC_TIMEOUT_S = 60.0
SERVER_STARTUP_S = 300.0


def min_cosine(mode: str) -> float:
    return FP16_MIN_COSINE if mode == "fp16" else INT8_MIN_COSINE


# ---- robustness ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """`quantized(model, mode)`: the (cached) `mantissa quantize` run of that model and mode."""
    out_dir = tmp_path_factory.mktemp("corpus_quantize")
    runs: dict[tuple[str, str], ch.QuantizeRun] = {}

    def get(model: str, mode: str) -> ch.QuantizeRun:
        if (model, mode) not in runs:
            runs[(model, mode)] = ch.quantize(ch.reference(model), mode, out_dir / model)
        return runs[(model, mode)]

    return get


def produced(run: ch.QuantizeRun) -> ch.QuantizeRun:
    assert run.exit_code == 0 and run.path.exists(), f"quantize failed: {run.describe()}"
    return run


_ORT_OUTPUTS: dict[tuple[str, str], list[dict] | str] = {}


def ort_outputs(run: ch.QuantizeRun) -> list[dict]:
    """The quantized model's outputs on the holdout samples (cached); fails with ORT's error."""
    key = (run.model, run.mode)
    if key not in _ORT_OUTPUTS:
        ref = ch.reference(run.model)
        try:
            sess = ch.session(run.path)
        except Exception as err:  # noqa: BLE001 - ORT's message is the finding
            _ORT_OUTPUTS[key] = f"ONNX Runtime refuses the model: {type(err).__name__}: {err}"
        else:
            try:
                _ORT_OUTPUTS[key] = ch.run_all(sess, ref.samples)
            except Exception as err:  # noqa: BLE001
                _ORT_OUTPUTS[key] = f"ONNX Runtime cannot run the holdout samples: {type(err).__name__}: {err}"
    value = _ORT_OUTPUTS[key]
    if isinstance(value, str):
        pytest.fail(f"{run.model} / {run.mode}: {value}", pytrace=False)
    return value


def model_mode_params():
    return [pytest.param(model, mode, id=f"{model}-{mode}") for model in MODELS for mode in ch.MODES]


@pytest.mark.parametrize(("model", "mode"), model_mode_params())
def test_quantize_valid(model, mode, quantized):
    run = produced(quantized(model, mode))
    try:
        onnx.checker.check_model(str(run.path), full_check=True)
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"{model} / {mode}: onnx.checker (full_check) rejects the output: "
                    f"{type(err).__name__}: {err}", pytrace=False)
    outputs = ort_outputs(run)
    ref = ch.reference(model)
    got_types = ch.output_types(onnx.load(str(run.path), load_external_data=False))
    assert got_types == ref.source_output_types, f"graph output types changed: {ref.source_output_types} -> {got_types}"
    for name, want in ref.outputs[0].items():
        assert outputs[0][name].dtype == want.dtype, f"output {name}: {outputs[0][name].dtype}, FP32 gives {want.dtype}"
    bad = [n for n in ref.float_outputs if not all(np.isfinite(o[n]).all() for o in outputs)]
    assert not bad, f"outputs {bad} hold NaN or Inf on the holdout samples"


@pytest.mark.parametrize(("model", "mode"), model_mode_params())
def test_quantize_accuracy(model, mode, quantized, report_line):
    run = produced(quantized(model, mode))
    ref = ch.reference(model)
    figures = ch.accuracy(ref, ort_outputs(run))
    report_line(f"corpus quantize {model} / {mode} ({run.seconds:.1f} s, {ch.int8_nodes(run.ops)} INT8 nodes, "
                f"input {ch.int8_nodes(ref.source_ops)}): "
                + "; ".join(f"{name} {fig.text()}" for name, fig in figures.items()))
    if mode == "int8-static-budget":
        low = {n: f.pooled for n, f in figures.items() if not f.pooled >= ch.BUDGET_COSINE - 1e-9}
        assert not low, f"pooled cosine under the budget {ch.BUDGET_COSINE}: {low}\n{run.output[-3000:]}"
        return
    want = min_cosine(mode)
    low = {n: f.text() for n, f in figures.items() if not f.mean >= want}
    assert not low, f"{model} / {mode}: output cosine vs FP32 under {want}: {low}"


@pytest.mark.parametrize(("model", "mode"),
                         [pytest.param(m, mode, id=f"{m}-{mode}") for m in MODELS for mode in INT8_MODES])
def test_int8_nothing_quantized_is_explained(model, mode, quantized):
    run = produced(quantized(model, mode))
    ref = ch.reference(model)
    if run.added_int8_work(ref):
        return  # something was quantized
    where = f"{model} / {mode} quantized nothing (no INT8 node or 8/4-bit tensor added)"
    said = ch.summary_value(run.output, "nodes quantized")
    assert said == "0", f"{where}, but the summary says `nodes quantized: {said}`\n{run.output}"
    warnings = ch.nothing_quantized_warnings(run.output)
    assert warnings, (f"{where} and logs no warning saying so with its reason "
                      f"(a WARN line matching {ch.NOTHING_QUANTIZED.pattern!r})\n{run.output}")
    reasons = warnings + [f"{node} ({op}): {why}" for node, op, why in ch.kept_fp32_lines(run.output)]
    compute = sorted(op for op in ch.COMPUTE_OPS if ref.source_ops.get(op))
    unexplained = {op: ref.source_ops[op] for op in compute
                   if not any(re.search(rf"\b{op}\b", line) for line in reasons)}
    assert not unexplained, (
        f"{where}; the warning and the kept-FP32 lines name no reason for its {unexplained} nodes "
        f"(op type: count, subgraphs included)\n{run.output}")


# ---- serving ---------------------------------------------------------------------------------

class Served:
    """One model served with fp32, fp16 and int8 variants, and the outputs served per variant."""

    def __init__(self, ref: ch.Reference, server):
        self.ref = ref
        self.server = server
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self._outputs: dict[str, list[dict]] = {}

    def ready(self, variant: str) -> None:
        if not self.client.is_model_ready(self.ref.name, variant, client_timeout=RPC_TIMEOUT_S):
            notes = [json.dumps(r) for r in self.server.log_records()
                     if str(r.get("level", "")).upper() in ("ERROR", "WARN")
                     and self.ref.name in json.dumps(r) and variant in json.dumps(r)]
            pytest.fail(f"{self.ref.name} variant {variant} is not ready; the server logged:\n"
                        + "\n".join(notes[-5:] or ["<no warning or error naming it>"]), pytrace=False)

    def outputs(self, variant: str) -> list[dict]:
        """Every holdout sample through tritonclient on `variant`, one request each."""
        if variant not in self._outputs:
            self.ready(variant)
            got = []
            for i, sample in enumerate(self.ref.samples):
                try:
                    result = self.client.infer(self.ref.name, ch.infer_inputs(sample), model_version=variant,
                                               request_id=f"holdout-{i}", client_timeout=RPC_TIMEOUT_S)
                except InferenceServerException as err:
                    pytest.fail(f"{self.ref.name} / {variant}: holdout sample {i} "
                                f"({ {k: (v.dtype.name, v.shape) for k, v in sample.items()} }) fails: {err}",
                                pytrace=False)
                assert served_variant(result.get_response()) == variant
                got.append({o.name: result.as_numpy(o.name) for o in result.get_response().outputs})
            self._outputs[variant] = got
        return self._outputs[variant]


@pytest.fixture(scope="module", params=MODELS)
def served(request, tmp_path_factory):
    ref = ch.reference(request.param)
    store = ch.write_store(tmp_path_factory.mktemp(f"store_{request.param}"), ref)
    server = start_server(store, startup_timeout=SERVER_STARTUP_S)
    handle = Served(ref, server)
    yield handle
    handle.client.close()
    rc = server.stop()
    assert rc == 0, f"mantissa exited with code {rc} after SIGTERM\n{server.logs_text()}"


def test_serving_fp32_matches_onnxruntime(served, report_line):
    ref = served.ref
    got = served.outputs("fp32")
    worst = 0.0
    for i, (want, have) in enumerate(zip(ref.outputs, got)):
        assert sorted(have) == sorted(want), f"sample {i}: outputs {sorted(have)}, the model has {sorted(want)}"
        for name, value in want.items():
            assert have[name].dtype == value.dtype and have[name].shape == value.shape, (
                f"sample {i} output {name}: served {have[name].dtype}{have[name].shape}, ORT {value.dtype}{value.shape}")
            np.testing.assert_allclose(have[name], value, rtol=SERVE_RTOL, atol=SERVE_ATOL,
                                       err_msg=f"{ref.name} sample {i} output {name}")
            if np.issubdtype(value.dtype, np.floating) and value.size:
                worst = max(worst, float(np.max(np.abs(have[name].astype(np.float64) - value))))
    report_line(f"corpus serving {ref.name} / fp32: {len(got)} holdout samples, max |served - ORT| {worst:.3g}")


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_serving_variant_accuracy(served, variant, report_line):
    ref = served.ref
    figures = ch.accuracy(ref, served.outputs(variant))
    report_line(f"corpus serving {ref.name} / {variant}: "
                + "; ".join(f"{n} {f.text()}" for n, f in figures.items()))
    want = min_cosine(variant)
    low = {n: f.text() for n, f in figures.items() if not f.mean >= want}
    assert not low, f"{ref.name} / {variant}: served output cosine vs FP32 under {want}: {low}"


def drift_gauges(served, variant: str) -> dict[tuple[str, str], float]:
    """{(metric, output): value} of the startup-drift gauges of one variant."""
    samples = ch.scrape_metrics(served.server.metrics_url)
    return {(s.name, s.labels.get("output")): s.value for s in samples
            if s.name.startswith("mantissa_startup_drift_")
            and s.labels.get("model") == served.ref.name and s.labels.get("variant") == variant}


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_serving_startup_drift_reported(served, variant, report_line):
    ref = served.ref
    served.ready(variant)
    deadline = time.monotonic() + 10
    gauges = drift_gauges(served, variant)
    while not gauges and time.monotonic() < deadline:
        time.sleep(0.2)
        gauges = drift_gauges(served, variant)
    config = served.client.get_model_config(ref.name, variant, as_json=True, client_timeout=RPC_TIMEOUT_S)
    params = {k: v.get("string_value") for k, v in config["config"].get("parameters", {}).items()}
    figures = ch.accuracy(ref, served.outputs(variant))
    lines = []
    for output in ref.float_outputs:
        wanted = ["cosine", "sqnr_db", "max_abs_error", "rmse"] + (["top1_agreement"] if output in ref.class_outputs else [])
        missing = [m for m in wanted if (f"mantissa_startup_drift_{m}", output) not in gauges]
        assert not missing, (f"{ref.name} / {variant} output {output}: no startup drift gauges {missing}; "
                             f"the scrape has {sorted(gauges)}")
        gauge = gauges[("mantissa_startup_drift_cosine", output)]
        key = f"drift_{output}_cosine"
        assert key in params, f"ModelConfig parameters of {ref.name} / {variant} lack {key}: {sorted(params)}"
        assert math.isclose(float(params[key]), gauge, abs_tol=1e-9), (key, params[key], gauge)
        assert gauge == pytest.approx(figures[output].pooled, abs=DRIFT_COSINE_TOL), (
            f"{ref.name} / {variant} output {output}: startup drift cosine {gauge}, "
            f"served holdout outputs give {figures[output].pooled}")
        lines.append(f"{output} cosine {gauge:.6f}")
    assert params.get("drift_reference") == "fp32", params
    report_line(f"corpus startup drift {ref.name} / {variant}: " + ", ".join(lines))
