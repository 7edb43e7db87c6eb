"""The director's table feed against a real redis-server (no kernel plumbing needed).

A malformed event or key costs only itself (the feed keeps following), and a Redis that
restarts empty does not empty the director's table before the pods had time to re-register.
(The change stream itself, gaps and per-pod liveness: test_feed_stream.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer, sample, until
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.cluster.keys import KeySchema

POOL = "mtk"
KEYS = KeySchema(POOL)


async def running_feed(director: Director) -> asyncio.Task[None]:
    task: asyncio.Task[None] = asyncio.ensure_future(director._feed())
    await until(lambda: sample(director, "mcpool_director_redis_up") == 1, "the feed to reach Redis")
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def append(client: aioredis.Redis, event: str) -> None:
    """Append `event` to the feed as the pods' scripts do (numbered from the pool's counter)."""
    await client.xadd(KEYS.feed, {"n": await client.incr(KEYS.seq), "e": event})


def config(redis_server: RedisServer, **overrides: object) -> DirectorConfig:
    return DirectorConfig.model_validate({
        "vip": "198.19.255.1", "ports": [5124], "redis_url": redis_server.url, "pool": POOL,
        "resync_interval_s": 0.2, "metrics_listen": None, **overrides,
    })  # fmt: skip


async def test_malformed_events_and_keys_are_skipped(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    director = Director(config(redis_server))
    feed = await running_feed(director)
    try:
        for bad in ('{"t": "token", "op": "add", "token": "not-hex", "pod": "a"}', "[1, 2]", "{not json",
                    '{"t": "collision", "token": {"x": 1}}'):  # fmt: skip
            await append(redis_client, bad)
        await redis_client.xadd(KEYS.feed, {"e": "no sequence number"})
        await append(redis_client, '{"t": "token", "op": "add", "token": "0000abcd", "pod": "a"}')
        await until(lambda: director.table.tokens.get(0xABCD) == "a", "the good event after the bad ones")
        assert sample(director, "mcpool_director_malformed_entries_total", source="event") == 5
        assert sample(director, "mcpool_director_feed_gaps_total") == 0

        await redis_client.set(f"{KEYS.prefix}token:zzzzzzzz", "a")
        await redis_client.set(f"{KEYS.prefix}token:123", "a")
        await redis_client.set(KEYS.token(0x1234), "b")
        await redis_client.hset(KEYS.pod("b"), mapping={"addr": "198.18.10.2", "state": "ready"})
        await until(lambda: director.table.tokens.get(0x1234) == "b", "a resync past the bad keys")
        assert sample(director, "mcpool_director_malformed_entries_total", source="key") >= 2
        assert set(director.table.pods) == {"b"}
        assert not feed.done()
    finally:
        await stop(feed)


async def test_redis_restarting_empty_keeps_the_table_until_pods_reregister(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    grace_s = 1.5
    director = Director(config(redis_server, snapshot_grace_s=grace_s))
    await redis_client.hset(KEYS.pod("a"), mapping={"addr": "198.18.10.2", "state": "ready"})
    await redis_client.set(KEYS.token(0x51), "a")
    feed = await running_feed(director)
    try:
        await until(lambda: 0x51 in director.table.tokens and "a" in director.table.pods, "the table")
        # Outlive the grace window of the first connection: from now on, missing entries would go.
        await asyncio.sleep(grace_s)  # noqa: ASYNC110 - waiting out a configured period, not an event
        redis_server.kill()
        await until(lambda: sample(director, "mcpool_director_redis_up") == 0, "the feed to see Redis down")
        redis_server.start()  # empty: persistence is off
        resyncs = sample(director, "mcpool_director_resyncs_total")
        await until(lambda: sample(director, "mcpool_director_redis_up") == 1, "the feed back on Redis")
        await until(lambda: sample(director, "mcpool_director_resyncs_total") >= resyncs + 2, "two resyncs")
        # Several empty snapshots later the pod and its token are still steerable...
        assert "a" in director.table.pods and director.table.tokens.get(0x51) == "a"
        # ...and once the grace period has passed without the pod re-registering, they go.
        await until(lambda: not director.table.pods and not director.table.tokens, "the entries to go", 3 * grace_s)
    finally:
        await stop(feed)


async def test_entries_missing_in_normal_operation_go_at_once(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # The grace period applies only after (re)connecting: a pod whose keys expire in steady
    # state leaves at the next resync.
    director = Director(config(redis_server, snapshot_grace_s=0.5))
    await redis_client.hset(KEYS.pod("a"), mapping={"addr": "198.18.10.2", "state": "ready"})
    feed = await running_feed(director)
    try:
        await until(lambda: "a" in director.table.pods, "the pod")
        await asyncio.sleep(0.6)  # noqa: ASYNC110 - past the post-connect grace window
        await redis_client.delete(KEYS.pod("a"))  # as an expiry would: no event published
        started = time.monotonic()
        await until(lambda: not director.table.pods, "the pod to leave")
        assert time.monotonic() - started < 0.2 + 0.3  # one resync interval, plus slack
    finally:
        await stop(feed)
