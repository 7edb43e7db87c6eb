"""Fixtures for the cluster tests: one lab (prefix `mtkc`) with a director namespace, redis-server
and two MCP pods, built once per module; each test starts its own director and proxies through
`cluster`, which stops them (and empties Redis) afterwards, even when the test fails. The pods'
proxies set up the VIP and the tunnel's receive side themselves (`affinity.vip`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The end-to-end helpers (ss parsing, polling, CPE clients) live with the integration tests.
sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))

from cluster_lab import Cluster, director_lab  # noqa: E402
from mcpool_tools.lab import Lab  # noqa: E402


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with director_lab("mtkc") as built:
        yield built


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    handle = Cluster(lab)
    try:
        yield handle
    finally:
        handle.stop()
