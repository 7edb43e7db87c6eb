"""The packages stay clean under ruff and mypy --strict: a regression fails `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", "proxy", "operator", "tests", "bench", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run(str(BIN / "mypy"), "proxy/mcpool_proxy", "proxy/mcpool_tools", "proxy/mcpool_dashboards",
                  "operator/mcpool_operator", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
