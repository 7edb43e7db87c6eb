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

from cluster_lab import SERVER_PORT, Cluster  # noqa: E402
from mcpool_tools.lab import Lab, Topology  # noqa: E402


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(Topology(prefix="mtkc", pods=2, director=True)) as built:
        # The lab prepares each pod to receive the director's tunnel; undo that, so the pods'
        # own proxies must do it (affinity.vip), as in a cluster where nobody else would.
        for pod in built.pods:
            built.exec(pod.ns, [sys.executable, "-c", "import sys; from mcpool_proxy.kernel import steering; "
                                "steering.teardown_pod_receive(sys.argv[1])", built.vip])  # fmt: skip
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
