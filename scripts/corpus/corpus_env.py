"""Runs the corpus scripts inside their own virtual environment.

`fetch.py` and `robustness.py` need onnx, onnxruntime, numpy and (for making inputs) Pillow,
scikit-learn, scipy and tokenizers at the versions pinned in requirements.txt. `ensure_venv`
creates `<cache>/venv` with them the first time (and again when requirements.txt changes)
and re-executes the calling script with that interpreter. Set CORPUS_NO_VENV=1 to run with
the current interpreter instead (it must have the packages).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
DEFAULT_CACHE = REPO / ".corpus"


def cache_from_argv(argv: list[str]) -> Path:
    """The --cache value of a command line, before argparse runs (the venv lives there)."""
    for i, arg in enumerate(argv):
        if arg == "--cache" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--cache="):
            return Path(arg.split("=", 1)[1]).resolve()
    return DEFAULT_CACHE


def ensure_venv(argv: list[str]) -> None:
    if os.environ.get("CORPUS_NO_VENV") == "1":
        return
    venv = cache_from_argv(argv) / "venv"
    python = venv / "bin" / "python"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not python.exists() or not stamp.exists() or stamp.read_text().strip() != wanted:
        print(f"corpus: creating {venv} from {REQUIREMENTS.name}", file=sys.stderr, flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(wanted + "\n")
    os.execv(str(python), [str(python), *argv])
