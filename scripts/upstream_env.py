"""Locate (or create) the separate virtual environment that holds upstream auto-round.

Upstream auto-round pins its own dependency versions, so it lives in its own venv; our scripts talk
to it through subprocesses only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# SIGNROUND_UPSTREAM_VENV: where the venv lives (CI keeps it in the user's cache between runs)
DEFAULT_VENV = Path(os.environ.get("SIGNROUND_UPSTREAM_VENV") or REPO / ".venv-upstream")
UPSTREAM_VERSION = "0.16.1"


def upstream_python() -> Path | None:
    """The interpreter of the upstream venv, or None when it is not installed."""
    env = os.environ.get("SIGNROUND_UPSTREAM_PYTHON")
    py = Path(env) if env else DEFAULT_VENV / "bin" / "python"
    if not py.exists():
        return None
    ok = subprocess.run([str(py), "-c", "import auto_round"], capture_output=True).returncode == 0
    return py if ok else None


def setup_upstream(venv: Path = DEFAULT_VENV) -> Path:
    """Create the venv and install upstream auto-round (torch pinned to the local CPU build)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # auto-round-lib provides the CPU kernels upstream needs for AWQ-packed files; compressed-tensors
    # its llm_compressor format (MXFP / NVFP outputs in benchmarks/bench_autoscheme.py), gguf its
    # GGUF schemes (AutoScheme over GGUF options there; its GGUF writer needs sentencepiece)
    subprocess.run(pip + ["torch==2.13.0", f"auto-round=={UPSTREAM_VERSION}", "auto-round-lib", "compressed-tensors",
                          "gguf", "sentencepiece"], check=True)
    return venv / "bin" / "python"


MISSING = (
    "upstream auto-round is not installed: run `python3 scripts/check_upstream_load.py --setup` "
    f"(creates {DEFAULT_VENV.name}/ with auto-round=={UPSTREAM_VERSION}) or point "
    "SIGNROUND_UPSTREAM_PYTHON at a python that can import auto_round"
)
