"""Our .proto files decode and encode exactly like the ones tritonclient ships."""

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
