"""Our .proto files match the public definitions: the inference protocol decodes like the
classes tritonclient ships, and onnx.proto like the onnx package's own descriptors."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_protos_are_wire_compatible_with_tritonclient():
    result = subprocess.run(
        [sys.executable, str(REPO / "proto/tests/check_wire_compat.py"), str(REPO / "proto/proto")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALL CHECKS PASSED" in result.stdout


def test_onnx_proto_matches_the_onnx_package():
    result = subprocess.run(
        [sys.executable, str(REPO / "quantize/tests/check_onnx_proto.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALL CHECKS PASSED" in result.stdout
