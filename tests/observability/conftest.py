"""Fixtures of the observability tests: this directory on sys.path (promlab, render)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
