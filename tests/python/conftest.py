"""Shared fixtures for the Python end-to-end tests of the Mantissa server.

The fixtures start the real server binary (``$MANTISSA_BIN`` or
``<repo>/target/debug/mantissa``) on ephemeral 127.0.0.1 ports, parse the
``listening`` log line from its JSON stderr, wait (bounded) for readiness and
stop it with SIGTERM on teardown, asserting a clean exit (code 0).

Usage:

* ``examples_server`` / ``fixture_store_server``: module-scoped servers for
  ``examples/models`` and ``tests/fixtures/store``.
* ``mantissa_server``: module-scoped, parametrizable by store path through
  indirect parametrization::

      @pytest.mark.parametrize("mantissa_server", [FIXTURE_STORE], indirect=True)
      def test_x(mantissa_server): ...

  Without a parameter it serves ``examples/models``.
* ``start_mantissa``: a factory for ad-hoc servers in a single test (stopped
  at the end of that test).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_STORE = REPO_ROOT / "examples" / "models"
FIXTURE_STORE = REPO_ROOT / "tests" / "fixtures" / "store"

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0


def mantissa_binary() -> Path:
    env = os.environ.get("MANTISSA_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "debug" / "mantissa"


class ServerStartError(RuntimeError):
    pass


@dataclass
class MantissaServer:
    """A running ``mantissa serve`` process."""

    store: Path
    process: subprocess.Popen
    grpc_url: str = ""
    metrics_url: str = ""
    _lines: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cond: threading.Condition = None  # type: ignore[assignment]
    _reader: threading.Thread = None  # type: ignore[assignment]
    _stdout_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))

    # ---- log handling -------------------------------------------------
    @property
    def log_lines(self) -> list[str]:
        """Raw stderr lines seen so far (copy)."""
        with self._lock:
            return list(self._lines)

    def log_records(self) -> list[dict]:
        """The stderr lines that parse as JSON objects."""
        out = []
        for line in self.log_lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def logs_text(self, last: int = 80) -> str:
        lines = self.log_lines
        return "\n".join(lines[-last:]) if lines else "<no stderr output>"

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            self._stdout_tail.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def wait_for_log(self, predicate, timeout: float) -> dict:
        """Wait until a JSON log record satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                while seen < len(self._lines):
                    line = self._lines[seen]
                    seen += 1
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and predicate(rec):
                        return rec
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise ServerStartError(
                        f"mantissa exited with code {self.process.returncode} "
                        f"before the expected log line.\n--- stderr ---\n{self.logs_text()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerStartError(
                        f"timed out after {timeout:.0f}s waiting for a log line.\n"
                        f"--- stderr ---\n{self.logs_text()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    # ---- lifecycle -----------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Poll grpc.health.v1 Check("") until SERVING (bounded)."""
        deadline = time.monotonic() + timeout
        last_err = None
        with grpc.insecure_channel(self.grpc_url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"mantissa exited with code {self.process.returncode} while "
                        f"waiting for readiness.\n--- stderr ---\n{self.logs_text()}"
                    )
                failed = [r for r in self.log_records()
                          if str(r.get("message", "")).startswith("not every model loaded")]
                if failed:
                    raise ServerStartError(
                        "the server reports that not every model loaded (it stays NOT_SERVING).\n"
                        f"--- stderr ---\n{self.logs_text()}"
                    )
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last_err = f"health status {resp.status}"
                except grpc.RpcError as e:  # not up yet
                    last_err = f"{e.code()}: {e.details()}"
                time.sleep(0.1)
        raise ServerStartError(
            f"server not ready after {timeout:.0f}s (last: {last_err}).\n"
            f"--- stderr ---\n{self.logs_text()}"
        )

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
        """SIGTERM and wait; kill on timeout. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                self._reader.join(timeout=5)
                raise AssertionError(
                    f"mantissa did not exit within {timeout:.0f}s of SIGTERM (killed).\n"
                    f"--- stderr ---\n{self.logs_text()}"
                )
        self._reader.join(timeout=5)
        return self.process.returncode


def start_server(store: Path | str, extra_args: list[str] | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S) -> MantissaServer:
    binary = mantissa_binary()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"mantissa binary not found or not executable at {binary}. "
            f"Build it with `cargo build` in {REPO_ROOT} or set MANTISSA_BIN.",
            pytrace=False,
        )
    store = Path(store)
    if not store.is_dir():
        pytest.fail(f"model store {store} does not exist", pytrace=False)
    cmd = [
        str(binary), "--log-format", "json", "serve",
        "--model-store", str(store),
        "--grpc-addr", "127.0.0.1:0",
        "--metrics-addr", "127.0.0.1:0",
        *(extra_args or []),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    server = MantissaServer(store=store, process=proc)
    server._cond = threading.Condition(server._lock)
    server._reader = threading.Thread(target=server._read_stderr, name="mantissa-stderr", daemon=True)
    server._reader.start()
    threading.Thread(target=server._read_stdout, name="mantissa-stdout", daemon=True).start()
    try:
        rec = server.wait_for_log(lambda r: r.get("message") == "listening", startup_timeout)
        server.grpc_url = rec["grpc_addr"]
        server.metrics_url = rec["metrics_addr"]
        assert server.grpc_url.startswith("127.0.0.1:"), rec
        assert server.metrics_url.startswith("127.0.0.1:"), rec
        server.wait_ready(startup_timeout)
    except BaseException as e:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if isinstance(e, ServerStartError):
            pytest.fail(f"failed to start mantissa ({' '.join(cmd)}): {e}", pytrace=False)
        raise
    return server


def served_variant(response) -> str:
    """The variant named by a ModelInferResponse's ``variant`` parameter (its ``model_version``
    is the variant's version number)."""
    return response.parameters["variant"].string_param


def variant_versions(client, model: str) -> dict[str, str]:
    """Variant name -> version number of ``model``, from the ``versions`` parameter of its
    default variant's ModelConfig ("1 (fp32), 2 (int8)")."""
    config = client.get_model_config(model, as_json=True)["config"]
    listing = config["parameters"]["versions"]["string_value"]
    pairs = (entry.split(" (") for entry in listing.split(", "))
    return {name.rstrip(")"): number for number, name in pairs}


def _stop_and_check(server: MantissaServer) -> None:
    rc = server.stop()
    assert rc == 0, (
        f"mantissa exited with code {rc} after SIGTERM (expected 0).\n"
        f"--- stderr ---\n{server.logs_text()}"
    )


@pytest.fixture(scope="module")
def mantissa_server(request):
    """A server for ``request.param`` (a store path; default examples/models)."""
    store = getattr(request, "param", EXAMPLES_STORE)
    server = start_server(store)
    yield server
    _stop_and_check(server)


@pytest.fixture(scope="module")
def examples_server():
    server = start_server(EXAMPLES_STORE)
    yield server
    _stop_and_check(server)


@pytest.fixture(scope="module")
def fixture_store_server():
    server = start_server(FIXTURE_STORE)
    yield server
    _stop_and_check(server)


@pytest.fixture
def start_mantissa():
    """Factory: ``start_mantissa(store, extra_args=None)``; stopped after the test."""
    started: list[MantissaServer] = []

    def _start(store, extra_args=None):
        s = start_server(store, extra_args)
        started.append(s)
        return s

    yield _start
    for s in started:
        _stop_and_check(s)


# ---- report collection (accuracy figures etc.) ------------------------------
_REPORT_LINES: list[str] = []


@pytest.fixture(scope="session")
def report_line():
    """Append a line to the end-of-run 'mantissa report' terminal section."""
    return _REPORT_LINES.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _REPORT_LINES:
        terminalreporter.section("mantissa report")
        for line in _REPORT_LINES:
            terminalreporter.write_line(line)
