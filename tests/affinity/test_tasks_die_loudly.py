"""A background task that dies must not leave a healthy-looking process (issue 10).

Director: the Redis feed or the plumbing ending makes `mcpool director` exit 1 (the DaemonSet
restarts it). Pod side: the registry's heartbeat dying, or the token publisher failing over and
over, sets `PodAffinity.died`; the proxy then answers /readyz 503 with the reason, drains and
exits 1. Each test injects the exception into the real component.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from conftest import RedisServer, run_unshared
from mcpool_proxy.cluster import podside
from mcpool_proxy.cluster.podside import PodAffinity
from mcpool_proxy.config import AffinityConfig
from support import requires_netns

_DIRECTOR_PROBE = textwrap.dedent(
    """
    import asyncio, logging, sys
    from mcpool_proxy.cluster import director as d

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")

    async def feed(self):
        await asyncio.sleep(0.2)
        raise RuntimeError("injected feed failure")

    d.Director._feed = feed
    d.Director.install = lambda self: None  # the kernel side is not under test here
    with open(sys.argv[1], "w") as f:
        f.write("vip: 198.19.255.1\\nports: [5124]\\nredis_url: redis://127.0.0.1:1/0\\nmetrics_listen: null\\n")
    print("exit", d.main(["--config", sys.argv[1]]))
    """
)


@requires_netns
def test_director_exits_nonzero_when_its_feed_dies(tmp_path: Path) -> None:
    # An anonymous namespace: the NFQUEUE the director binds is nobody else's.
    proc = run_unshared("-c", _DIRECTOR_PROBE, str(tmp_path / "d.yaml"))
    assert "exit 1" in proc.stdout, proc.stdout + proc.stderr
    assert "CRITICAL mcpool.director director task redis feed ended: RuntimeError('injected feed failure')" in proc.stdout


def _affinity(redis_server: RedisServer) -> PodAffinity:
    config = AffinityConfig(mechanism="director", backend="redis", redis_url=redis_server.url, pool="mtd",
                            pod_name="pod-a", advertise="198.18.10.1", heartbeat_ttl_s=0.3)  # fmt: skip
    return PodAffinity(config, [5124])


async def test_pod_side_heartbeat_dying_sets_died(redis_server: RedisServer) -> None:
    affinity = _affinity(redis_server)
    registry = affinity.registry
    assert registry is not None

    async def broken() -> None:
        raise RuntimeError("injected heartbeat failure")

    registry._heartbeat_once = broken  # type: ignore[attr-defined, method-assign]
    affinity.publish = False  # no netlink subscription needed for this
    await affinity.start()
    try:
        await asyncio.wait_for(affinity.died.wait(), 5)
        assert affinity.failure is not None and "injected heartbeat failure" in affinity.failure
        assert "_heartbeat_loop" in affinity.failure
    finally:
        await affinity.stop()


class _Events:
    """A subscription whose iteration always fails (a broken netlink pump)."""

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> object:
        raise OSError("injected netlink failure")

    def close(self) -> None:
        pass


async def test_pod_side_publisher_failing_again_and_again_sets_died(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podside, "PUBLISHER_RESTART_S", 0.01)
    affinity = _affinity(redis_server)
    assert affinity.registry is not None
    await affinity.registry.start()
    task = asyncio.get_running_loop().create_task(affinity._publish(_Events(), affinity.registry))  # type: ignore[arg-type]
    affinity._watch(task, "token publisher")
    await asyncio.wait_for(affinity.died.wait(), 5)
    assert affinity.failure is not None and "token publisher" in affinity.failure
    assert f"failed {podside.PUBLISHER_MAX_FAILURES} times in a row" in affinity.failure
    assert affinity.errors >= podside.PUBLISHER_MAX_FAILURES
    await affinity.registry.stop()
