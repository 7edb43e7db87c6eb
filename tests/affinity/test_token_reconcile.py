"""Tokens whose connection the kernel no longer has (a lost CLOSED event) are unregistered by
the pod's periodic reconcile, and live ones are kept; checked against real kernel MPTCP sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from mcpool_proxy.cluster import MemoryRegistry
from mcpool_proxy.cluster.podside import PodAffinity
from mcpool_proxy.config import AffinityConfig
from mcpool_proxy.kernel.mptcp import IPPROTO_MPTCP, get_mptcp_info
from mcpool_proxy.kernel.path_manager import kernel_tokens
from prometheus_client import CollectorRegistry
from support import requires_mptcp

pytestmark = [requires_mptcp]


@pytest.fixture
def mptcp_connection() -> Iterator[int]:
    """A live loopback MPTCP connection in this namespace; yields the server side's token."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        try:
            server.sendall(b"x")  # MPTCP v1: the connection is fully established once data flowed
            assert client.recv(1) == b"x"
            info = get_mptcp_info(server)
            assert info is not None and not info.fallback
            yield info.token
        finally:
            server.close()
            client.close()


async def test_reconcile_drops_only_tokens_the_kernel_lost(mptcp_connection: int) -> None:
    live_token = mptcp_connection
    tokens = kernel_tokens()
    assert tokens is not None and live_token in tokens
    lost_token = next(t for t in range(0x7A000000, 0x7B000000) if t not in tokens)

    registry = MemoryRegistry("pod-a")
    await registry.register_pod("ready")
    await registry.register_connection(live_token, "127.0.0.1")
    await registry.register_connection(lost_token, "198.18.1.2")
    metrics = CollectorRegistry()
    config = AffinityConfig(mechanism="director", backend="redis", redis_url="redis://127.0.0.1:9/0", pod_name="pod-a")
    affinity = PodAffinity(config, [5124], metrics_registry=metrics, registry=registry)
    affinity.state = "ready"  # registered (start() would also listen to this namespace's events)

    assert await affinity.reconcile_tokens()
    # One listing without it is not enough: the token stays for the next round.
    assert set(registry.live_connections()) == {live_token, lost_token}
    assert await affinity.reconcile_tokens()
    assert set(registry.live_connections()) == {live_token}
    assert lost_token not in registry.store.tokens and registry.store.tokens[live_token] == "pod-a"
    assert "198.18.1.2" not in registry.store.cpes
    assert metrics.get_sample_value("mcpool_affinity_stale_tokens_dropped_total") == 1
    assert await affinity.reconcile_tokens()
    assert set(registry.live_connections()) == {live_token}
