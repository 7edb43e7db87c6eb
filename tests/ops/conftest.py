"""Fixtures for the operations tests: one namespace lab (prefix `mtg1`) for the whole session,
with a plain TCP and an MPTCP test server in its server namespace, and OTLP receivers bound on
127.0.0.1 inside the proxy's namespace. Teardown always runs and removes only this lab's
namespaces and the processes in them; every receiver is stopped."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mcpool_tools.lab import Lab, Topology  # noqa: E402
from ops_helpers import SERVER_PORT  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402


@pytest.fixture(scope="session")
def ops_lab() -> Iterator[Lab]:
    with Lab(Topology(prefix="mtg1")) as lab:
        lab.start_testserver(f"[::]:{SERVER_PORT}")
        yield lab


@pytest.fixture
def receiver_in_mcp(ops_lab: Lab) -> Iterator[Callable[[str], tuple[OtlpReceiver, str]]]:
    """receiver_in_mcp(mode) -> (receiver, endpoint URL reachable from the MCP namespace)."""
    started: list[OtlpReceiver] = []

    def start(mode: str = "ok") -> tuple[OtlpReceiver, str]:
        receiver = OtlpReceiver(mode=mode)
        with ops_lab.in_netns("mcp"):
            endpoint = receiver.start("127.0.0.1")
        started.append(receiver)
        return receiver, endpoint

    yield start
    for receiver in started:
        receiver.stop()
