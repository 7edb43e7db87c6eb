"""A draining pod, as every director of the pool sees it (real redis-server, real registry and
director feeds, no kernel plumbing needed).

A pod that starts draining re-registers as `draining`; the registry publishes that on the
pool's events channel, which every director follows. So all directors stop sending it initial
subflows within one pub/sub delivery, not one resync later (the resync interval here is a minute,
so only the event can explain it), while joins of its connections still go to it.
"""

from __future__ import annotations

import asyncio
import time

from conftest import RedisServer, until
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.cluster.hashing import initial_pick
from mcpool_proxy.cluster.packet import Syn
from mcpool_proxy.cluster.registry import RedisRegistry
from mcpool_proxy.cluster.table import decide

POOL = "mtd"
DIRECTORS = 3
# A bound, not the measurement: delivery takes a few milliseconds on an idle machine; this is
# two orders of magnitude above that and still far below the (disabled) resync.
EVENT_BOUND_S = 0.5


def syn(src: str, token: int | None = None) -> Syn:
    return Syn(
        src=src,
        dst="198.19.255.1",
        sport=40000,
        dport=5124,
        join_token=token,
        mp_capable=token is None,
    )


async def test_every_director_stops_sending_initial_subflows_to_a_draining_pod(redis_server: RedisServer) -> None:
    config = DirectorConfig.model_validate({
        "vip": "198.19.255.1", "ports": [5124], "redis_url": redis_server.url, "pool": POOL,
        "resync_interval_s": 60.0, "metrics_listen": None,
    })  # fmt: skip
    directors = [Director(config) for _ in range(DIRECTORS)]
    feeds = [asyncio.ensure_future(d._feed()) for d in directors]
    pods = {name: RedisRegistry(redis_server.url, POOL, name, f"198.18.10.{i + 1}", heartbeat_ttl_s=30.0)
            for i, name in enumerate(("pod-a", "pod-b"))}  # fmt: skip
    try:
        for d in directors:
            await until(
                lambda d=d: d.metrics.registry.get_sample_value("mcpool_director_redis_up") == 1,  # type: ignore[misc]
                "the feed to reach Redis",
            )
        for reg in pods.values():
            await reg.start()
            await reg.register_pod("ready")
        # A CPE address whose initial subflows hash to pod-a while both are ready.
        cpe = next(
            f"198.18.1.{i}"
            for i in range(1, 255)
            if initial_pick(list(pods), f"198.18.1.{i}", POOL) == "pod-a"
        )
        token = 0x5EED0001
        await pods["pod-a"].register_connection(token, "198.18.2.1")
        for d in directors:
            await until(
                lambda d=d: len(d.table.ready_pods()) == 2 and token in d.table.tokens,
                "both pods, the token",
            )  # type: ignore[misc]
            assert decide(syn(cpe), d.table).pod == "pod-a"

        started = time.monotonic()
        await pods["pod-a"].register_pod("draining")  # what PodAffinity.drain() does on SIGTERM
        learned = []
        for d in directors:
            await until(lambda d=d: d.table.pods["pod-a"].state == "draining", "the drain at every director",  # type: ignore[misc]
                        timeout_s=EVENT_BOUND_S * 4, step_s=0.001)  # fmt: skip
            learned.append(time.monotonic() - started)
        assert max(learned) < EVENT_BOUND_S, learned
        for d in directors:
            # A new connection from that CPE goes to the ready pod; the live connection's join
            # still goes to the draining pod that owns its token.
            assert decide(syn(cpe), d.table).pod == "pod-b"
            assert decide(syn("198.18.2.1", token), d.table).pod == "pod-a"
        # The registry also says how much the draining pod still carries (for people looking).
        fields = await pods["pod-a"]._redis.hgetall(pods["pod-a"].keys.pod("pod-a"))
        assert {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}[
            "connections"
        ] in ("1", b"1")

        # The drain ends (the pod stops): it leaves every director's table at once.
        await pods["pod-a"].stop()
        for d in directors:
            # (Its tokens leave at the next resync; a join naming one meanwhile finds no pod.)
            await until(
                lambda d=d: "pod-a" not in d.table.pods, "the pod gone", timeout_s=EVENT_BOUND_S * 4
            )  # type: ignore[misc]
            assert decide(syn("198.18.2.1", token), d.table, waited=True).pod is None
    finally:
        for reg in pods.values():
            await reg.stop()
        for feed in feeds:
            feed.cancel()
        await asyncio.gather(*feeds, return_exceptions=True)
