"""The affinity registry against a real redis-server, and the in-memory backend.

Covers: registration (one Lua round trip), the change stream directors follow (numbered
entries), compare-and-delete on close, expiry of a pod that died (its one key; its tokens are then
free for another pod and reaped), token collisions, and Redis dying and coming back (no
exception, local state kept, everything re-registered).
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from conftest import RedisServer
from mcpool_proxy.cluster import MemoryRegistry, MemoryStore, RedisRegistry, make_registry
from mcpool_proxy.cluster.keys import KeySchema
from mcpool_proxy.config import AffinityConfig
from prometheus_client import CollectorRegistry

POOL = "mtf"
KEYS = KeySchema(POOL)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll `check` until true (nothing to await on: Redis expiry has no event here)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def read_feed(client: aioredis.Redis, after: str = "0-0") -> list[dict[str, object]]:
    """The pool's change stream after `after`, checking that entries are numbered 1, 2, 3..."""
    entries = await client.xrange(KEYS.feed, min=f"({after}" if after != "0-0" else "-")
    numbers = [int(fields["n"]) for _, fields in entries]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True, numbers
    return [json.loads(fields["e"]) for _, fields in entries]


def make(redis_server: RedisServer, name: str, ttl_s: float = 10.0) -> RedisRegistry:
    return RedisRegistry(redis_server.url, POOL, name, f"198.18.10.{len(name)}", heartbeat_ttl_s=ttl_s)


async def test_register_and_unregister(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    reg = make(redis_server, "pod-a")
    await reg.start()
    await reg.register_pod("ready")
    result = await reg.register_connection(0x1D1BBEFA, "198.18.1.2")
    assert (result.status, result.owner) == ("registered", "pod-a")

    pod = await redis_client.hgetall(KEYS.pod("pod-a"))
    assert (pod["addr"], pod["state"]) == ("198.18.10.5", "ready")
    assert abs(float(pod["ts"]) - time.time()) < 5
    assert pod["connections"] == "0"  # written before the connection; the next heartbeat counts it
    assert await redis_client.get("mcpool:{mtf}:token:1d1bbefa") == "pod-a"
    assert await redis_client.get(KEYS.cpe("198.18.1.2")) == "pod-a"
    # Liveness is per pod: the pod key has the TTL, the token and CPE keys have none.
    assert 0 < await redis_client.pttl(KEYS.pod("pod-a")) <= 10_000
    assert await redis_client.pttl(KEYS.token(0x1D1BBEFA)) == -1
    assert await redis_client.smembers(KEYS.owned("pod-a")) == {"t:1d1bbefa", "c:198.18.1.2"}

    assert await read_feed(redis_client) == [
        {"t": "pod", "op": "add", "pod": "pod-a", "addr": "198.18.10.5", "state": "ready", "ttl": 10000},
        {"t": "token", "op": "add", "token": "1d1bbefa", "pod": "pod-a"},
        {"t": "cpe", "op": "add", "cpe": "198.18.1.2", "pod": "pod-a"},
    ]
    assert await redis_client.get(KEYS.seq) == "3"

    # A second connection of the same CPE: the CPE key stays until the last one closes.
    await reg.register_connection(7, "198.18.1.2")
    await reg.unregister_connection(0x1D1BBEFA)
    assert await redis_client.get(KEYS.token(0x1D1BBEFA)) is None
    assert await redis_client.get(KEYS.cpe("198.18.1.2")) == "pod-a"
    await reg.unregister_connection(7)
    assert await redis_client.get(KEYS.cpe("198.18.1.2")) is None

    await reg.register_connection(8, "198.18.1.9")
    await reg.stop()
    # Only the feed and its counter remain: every key of the pod is gone, and the last entry says so.
    assert sorted(await redis_client.keys(f"{KEYS.prefix}*")) == sorted([KEYS.feed, KEYS.seq])
    assert (await read_feed(redis_client))[-1] == {"t": "pod", "op": "del", "pod": "pod-a"}


async def test_draining_state_is_published(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    reg = make(redis_server, "pod-a")
    await reg.start()
    await reg.register_pod("ready")
    await reg.register_pod("draining")
    assert await redis_client.hget(KEYS.pod("pod-a"), "state") == "draining"
    # The drain notice reaches directors on the feed (issue 13's drain relies on it).
    assert (await read_feed(redis_client))[-1]["state"] == "draining"
    await reg.stop()


async def test_heartbeat_keeps_a_live_pod_and_a_dead_pod_expires(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    script = textwrap.dedent(f"""
        import asyncio
        from mcpool_proxy.cluster import RedisRegistry
        async def main():
            reg = RedisRegistry({redis_server.url!r}, {POOL!r}, "pod-dead", "198.18.10.9", heartbeat_ttl_s=0.6)
            await reg.start()
            await reg.register_pod("ready")
            await reg.register_connection(0xABCDEF01, "198.18.1.2")
            print("registered", flush=True)
            await asyncio.Future()
        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"registered"
        # Three TTLs later the heartbeat has kept everything alive.
        await asyncio.sleep(1.8)
        assert await redis_client.exists(KEYS.pod("pod-dead"), KEYS.token(0xABCDEF01)) == 2
        proc.kill()
        await proc.wait()
        started = time.monotonic()

        async def gone() -> bool:
            return await redis_client.exists(KEYS.pod("pod-dead")) == 0

        await eventually(gone, timeout_s=5)
        assert time.monotonic() - started < 1.5  # within about one TTL
        # Its token key has no TTL of its own, but a dead owner's token is free for the next pod...
        assert await redis_client.get(KEYS.token(0xABCDEF01)) == "pod-dead"
        other = make(redis_server, "pod-b", ttl_s=0.6)
        await other.start()
        await other.register_pod("ready")
        result = await other.register_connection(0xABCDEF01, "198.18.1.7")
        assert (result.status, result.owner) == ("registered", "pod-b")

        # ...and the live pod's heartbeat reaps what is left of the dead one (its CPE key, its
        # set of owned keys, its name in the pool's pod set), once.
        async def reaped() -> bool:
            return (await redis_client.exists(KEYS.cpe("198.18.1.2"), KEYS.owned("pod-dead")) == 0
                    and await redis_client.smembers(KEYS.pods) == {"pod-b"})  # fmt: skip

        await eventually(reaped, timeout_s=5)
        assert await redis_client.get(KEYS.token(0xABCDEF01)) == "pod-b"  # the reaper left the new owner's key
        feed = await read_feed(redis_client)
        assert feed.count({"t": "pod", "op": "del", "pod": "pod-dead"}) == 1
        await other.stop()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_collision_first_owner_keeps_the_token(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    a = make(redis_server, "pod-a", ttl_s=0.9)
    b = make(redis_server, "pod-b", ttl_s=0.9)
    await a.start()
    await b.start()
    await a.register_pod("ready")  # a live owner: a token of a pod without a pod key is free
    assert (await a.register_connection(42, "198.18.1.2")).status == "registered"
    result = await b.register_connection(42, "198.18.1.7")
    assert (result.status, result.owner) == ("collision", "pod-a")
    assert await redis_client.get(KEYS.token(42)) == "pod-a"
    assert b.collided_tokens() == {42: "pod-a"}
    assert b.metrics.collisions._value.get() == 1
    assert b.metrics.collided._value.get() == 1  # live single-path connections (issue 10)
    seen = await read_feed(redis_client)
    assert {"t": "collision", "token": "0000002a", "pod": "pod-b", "owner": "pod-a"} in seen

    # Closing the collided connection on b must not delete a's entry.
    await b.unregister_connection(42)
    assert await redis_client.get(KEYS.token(42)) == "pod-a"
    assert b.metrics.collided._value.get() == 0

    # When the first owner closes, the other pod's heartbeat claims a token it still holds.
    await b.register_connection(42, "198.18.1.7")
    await a.unregister_connection(42)

    async def claimed() -> bool:
        return await redis_client.get(KEYS.token(42)) == "pod-b"

    await eventually(claimed, timeout_s=3)
    await eventually(lambda: asyncio.sleep(0, result=b.collided_tokens() == {}), timeout_s=3)
    await a.stop()
    await b.stop()


async def test_redis_down_never_raises_and_restart_rebuilds(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    metrics = CollectorRegistry()
    config = AffinityConfig(
        mechanism="director", backend="redis", redis_url=redis_server.url, pool=POOL,
        advertise="198.18.10.2", heartbeat_ttl_s=0.9,
    )  # fmt: skip
    reg = make_registry(config, "pod-a", metrics_registry=metrics)
    assert isinstance(reg, RedisRegistry)
    await reg.start()
    await reg.register_pod("ready")
    await reg.register_connection(1, "198.18.1.2")

    redis_server.kill()
    started = time.monotonic()
    result = await reg.register_connection(2, "198.18.1.3")
    await reg.register_connection(3, "198.18.1.3")
    await reg.unregister_connection(1)
    await reg.register_pod("ready")
    assert time.monotonic() - started < 2.0  # short timeouts, no hidden retries
    assert result.status == "deferred" and not reg.redis_up
    assert dict(reg.live_connections()) == {2: "198.18.1.3", 3: "198.18.1.3"}
    assert metrics.get_sample_value("mcpool_affinity_redis_up") == 0
    assert (metrics.get_sample_value("mcpool_affinity_redis_errors_total", {"op": "register_connection"}) or 0) >= 1
    await asyncio.sleep(0.3)  # the reconnect loop runs while Redis is away, without raising

    redis_server.start()  # empty: no persistence

    async def rebuilt() -> bool:
        return (
            await redis_client.get(KEYS.token(2)) == "pod-a"
            and await redis_client.get(KEYS.token(3)) == "pod-a"
            and await redis_client.hget(KEYS.pod("pod-a"), "state") == "ready"
        )

    await eventually(rebuilt, timeout_s=10)
    assert await redis_client.get(KEYS.token(1)) is None  # closed while Redis was down
    assert await redis_client.get(KEYS.cpe("198.18.1.3")) == "pod-a"
    assert reg.redis_up and metrics.get_sample_value("mcpool_affinity_reregistrations_total") == 1
    await reg.stop()


async def test_start_with_redis_down_then_up(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    redis_server.kill()
    reg = make(redis_server, "pod-a", ttl_s=0.9)
    await reg.start()  # must not raise
    await reg.register_pod("ready")
    assert (await reg.register_connection(5, "198.18.1.2")).status == "deferred"
    redis_server.start()

    async def registered() -> bool:
        return await redis_client.get(KEYS.token(5)) == "pod-a"

    await eventually(registered)
    await reg.stop()


async def test_memory_backend() -> None:
    store = MemoryStore()
    a = MemoryRegistry("pod-a", "198.18.10.2", store=store)
    b = MemoryRegistry("pod-b", "198.18.11.2", store=store)
    for reg in (a, b):
        await reg.start()
        await reg.register_pod("ready")
    assert (await a.register_connection(9, "198.18.1.2")).status == "registered"
    result = await b.register_connection(9, "198.18.1.3")
    assert (result.status, result.owner) == ("collision", "pod-a")
    await b.unregister_connection(9)
    assert store.tokens == {9: "pod-a"} and store.cpes == {"198.18.1.2": "pod-a"}
    await a.register_pod("draining")
    assert store.pods["pod-a"] == ("198.18.10.2", "draining")
    await a.stop()
    assert store.tokens == {} and store.cpes == {} and "pod-a" not in store.pods


def test_make_registry_defaults_to_memory() -> None:
    reg = make_registry(AffinityConfig(), "pod-x")
    assert isinstance(reg, MemoryRegistry) and reg.pod_name == "pod-x"
