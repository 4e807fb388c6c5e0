"""Bounded draining: SIGTERM with more queued work than `--exit-timeout` allows. Every request
gets an answer (OK, or UNAVAILABLE naming the exit timeout), none is dropped silently, and the
process exits 0 within the timeout plus a second."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import start_server
from corpus_harness import infer_inputs, model_dir

REQUESTS = 300
EXIT_TIMEOUT_S = 2.0


def minilm_store(tmp_path):
    directory = model_dir("minilm-l6-int8")  # one of corpus_models.txt
    target = tmp_path / "store" / "minilm"
    target.mkdir(parents=True)
    (target / "model.onnx").symlink_to(directory / "model.onnx")
    # The INT8 MiniLM served as it is. Batch-4 requests on a batch-4 variant: each request is
    # one run of its own.
    (target / "policy.yaml").write_text(
        "serving:\n  max_batch_size: 4\n  instances: 1\n  intra_op_threads: 2\n"
        "variants:\n  fp32:\n    precision: fp32\n"
    )
    return tmp_path / "store"


def test_sigterm_answers_every_queued_request_and_exits_within_the_exit_timeout(tmp_path):
    server = start_server(minilm_store(tmp_path), ["--exit-timeout", f"{EXIT_TIMEOUT_S}s",
                                                   "--queue-capacity", str(REQUESTS)])
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(4, 128), dtype=np.int64)
    sample = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    outcomes: list[str] = []
    done = threading.Condition()

    def answered(result, error):
        with done:
            if error is None:
                outcomes.append("ok")
            elif isinstance(error, InferenceServerException) and error.status() == "StatusCode.UNAVAILABLE":
                outcomes.append("unavailable" if "exit timeout" in error.message() else f"other unavailable: {error}")
            else:
                outcomes.append(f"error: {error}")
            done.notify_all()

    try:
        for _ in range(REQUESTS):
            client.async_infer("minilm", infer_inputs(sample), callback=answered)
        # Let the queue fill and the first runs finish before the stop.
        with done:
            assert done.wait_for(lambda: len(outcomes) >= 3, timeout=60), outcomes
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rc = server.process.wait(timeout=EXIT_TIMEOUT_S + 10)
        took = time.monotonic() - stopped
        with done:
            assert done.wait_for(lambda: len(outcomes) == REQUESTS, timeout=10), f"{len(outcomes)} answered"
    finally:
        if server.process.poll() is None:
            server.process.kill()
        client.close()
    assert rc == 0, server.logs_text()
    assert took <= EXIT_TIMEOUT_S + 1.0, f"exited {took:.2f} s after SIGTERM (exit timeout {EXIT_TIMEOUT_S} s)"
    counts = {kind: outcomes.count(kind) for kind in set(outcomes)}
    assert set(counts) == {"ok", "unavailable"}, counts
    print(f"exited {took:.2f} s after SIGTERM: {counts}")
    cut = [r for r in server.log_records() if r.get("message", "").startswith("shutdown complete; requests still queued")]
    assert cut and int(cut[0]["cut"]) == counts["unavailable"], server.logs_text()
