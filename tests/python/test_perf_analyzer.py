"""Triton's perf_analyzer (the binary of the tritonclient 2.40.0 wheel, installed by
scripts/setup-perf-analyzer.sh) against the real server on the example store, over gRPC.

Each run is short (500 ms windows, at most three of them) and must finish with exit code 0,
a throughput above zero in its CSV report, and server-side statistics (ModelStatistics of the
version it measured) that grew by at least the requests and rows perf_analyzer says it sent.
perf_analyzer reads those statistics itself too: its "Server" section must count the requests.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from conftest import EXAMPLES_STORE, REPO_ROOT

RUN_TIMEOUT_S = 60
# Short windows; stable after three of them whatever the spread (-s 100), and no more than three.
SHORT = ["--measurement-interval", "500", "--stability-percentage", "100", "--max-trials", "3"]


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    override = os.environ.get("PERF_ANALYZER")
    if override:
        return Path(override)
    # Installs on first use (a no-op once installed), so the file also runs outside test.sh.
    result = subprocess.run([str(REPO_ROOT / "scripts" / "setup-perf-analyzer.sh")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"setup-perf-analyzer.sh failed:\n{result.stdout}\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client(examples_server):
    with grpcclient.InferenceServerClient(examples_server.grpc_url) as c:
        yield c


def totals(client, model: str, version: str) -> tuple[int, int]:
    """(successful requests, rows inferred) of one version of `model`."""
    stats = client.get_inference_statistics(model, version, client_timeout=20).model_stats
    assert len(stats) == 1 and stats[0].version == version, stats
    return stats[0].inference_stats.success.count, stats[0].inference_count


def run(perf_analyzer: Path, server, client, tmp_path: Path, model: str, version: str, *args: str) -> dict:
    """Runs perf_analyzer; returns its client request count, server request count and CSV row.
    `version` is the one whose statistics it measures (the default variant's without -x)."""
    report = tmp_path / f"{model}-{version}.csv"
    before = totals(client, model, version)
    command = [str(perf_analyzer), "-m", model, "-i", "grpc", "-u", server.grpc_url, *SHORT, "-f", str(report),
               *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output}"
    after = totals(client, model, version)
    with report.open() as f:
        row = next(csv.DictReader(f))
    counts = dict(re.findall(r"(Request count|Successful request count): (\d+)", output))
    assert set(counts) == {"Request count", "Successful request count"}, output
    sent, server_counted = int(counts["Request count"]), int(counts["Successful request count"])
    batch = int(args[args.index("-b") + 1]) if "-b" in args else 1
    throughput = float(row["Inferences/Second"])
    assert throughput > 0, row
    assert sent > 0 and server_counted >= sent, output
    # Warm-up and the windows not reported come on top, so the statistics grew at least this much.
    assert after[0] - before[0] >= sent, (before, after, sent)
    assert after[1] - before[1] >= sent * batch, (before, after, sent, batch)
    return {"sent": sent, "server": server_counted, "throughput": throughput, "row": row, "output": output}


def test_concurrency_mode_on_the_default_variant(perf_analyzer, examples_server, client, tmp_path, report_line):
    # Without -x the server routes to the policy default, fp32 (version 1); perf_analyzer reads
    # the statistics of that version.
    result = run(perf_analyzer, examples_server, client, tmp_path, "digits_cnn", "1", "--concurrency-range", "2")
    assert result["row"]["Concurrency"] == "2", result["row"]
    report_line(f"perf_analyzer digits_cnn concurrency 2 (default variant): {result['throughput']:.0f} infer/s")


def test_request_rate_mode_with_a_version_number(perf_analyzer, examples_server, client, tmp_path):
    result = run(perf_analyzer, examples_server, client, tmp_path, "digits_cnn", "2", "-x", "2",
                 "--request-rate-range", "200")
    assert result["row"]["Request Rate"] == "200", result["row"]
    # An open loop at 200/s over three windows of 0.5 s: about 300 requests.
    assert 0.5 * 200 * 1.5 <= result["sent"] <= 2 * 200 * 1.5, result["output"]


def test_version_number_picks_the_int8_variant(perf_analyzer, examples_server, client, tmp_path):
    assert client.get_model_config("digits_transformer", "3").config.parameters["variant"].string_value == "int8"
    default_before = totals(client, "digits_transformer", "1")
    run(perf_analyzer, examples_server, client, tmp_path, "digits_transformer", "3", "-x", "3",
        "--concurrency-range", "1")
    # Every request went to version 3: the default variant saw none of them.
    assert totals(client, "digits_transformer", "1") == default_before


def test_input_data_from_json_with_expected_outputs(perf_analyzer, examples_server, client, tmp_path):
    """Real test rows from a JSON file, and ONNX Runtime's outputs for them as validation data:
    perf_analyzer fails the run on any output that differs."""
    rows = np.load(EXAMPLES_STORE / "digits_cnn" / "test_data.npz")["input"][:6].astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # as the policy's intra_op_threads
    session = ort.InferenceSession(str(EXAMPLES_STORE / "digits_cnn" / "model.onnx"), options)
    expected = [session.run(["logits"], {"input": row[None]})[0] for row in rows]
    data = {
        "data": [{"input": {"content": row.ravel().tolist(), "shape": list(row.shape)}} for row in rows],
        "validation_data": [{"logits": {"content": out.ravel().tolist()}} for out in expected],
    }
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(data))
    # Concurrency 1: every request runs alone (batch 1), as the reference did.
    result = run(perf_analyzer, examples_server, client, tmp_path, "digits_cnn", "1", "-x", "1",
                 "--concurrency-range", "1", "--input-data", str(path))
    assert "6 step/steps" in result["output"], result["output"]

    # The same file with one wrong expected value fails the run: the check above is real.
    data["validation_data"][3]["logits"]["content"][0] += 1.0
    path.write_text(json.dumps(data))
    failed = subprocess.run([str(perf_analyzer), "-m", "digits_cnn", "-i", "grpc", "-u", examples_server.grpc_url,
                             *SHORT, "-x", "1", "--concurrency-range", "1", "--input-data", str(path)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert failed.returncode != 0
    assert "Output doesn't match expected output" in failed.stdout + failed.stderr


def test_batch_of_8_on_a_batching_model(perf_analyzer, examples_server, client, tmp_path):
    result = run(perf_analyzer, examples_server, client, tmp_path, "digits_cnn", "1", "-x", "1", "-b", "8",
                 "--concurrency-range", "2")
    # Throughput counts rows: 8 per request.
    assert "Batch size: 8" in result["output"], result["output"]
