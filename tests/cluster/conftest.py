"""Fixtures for the cluster tests: one lab (prefix `mth`) with a director namespace, redis-server
and two MCP pods, built once per module; each test starts its own director and proxies through
`cluster`, which stops them (and empties Redis) afterwards, even when the test fails."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The end-to-end helpers (ss parsing, polling, CPE clients) live with the integration tests.
sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))

from cluster_lab import SERVER_PORT, Cluster  # noqa: E402
from mcpool_proxy.lab import Lab, Topology  # noqa: E402


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(Topology(prefix="mth", pods=2, director=True)) as built:
        built.start_testserver(f"[::]:{SERVER_PORT}")
        built.start_redis()
        yield built


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    handle = Cluster(lab)
    try:
        yield handle
    finally:
        handle.stop()
