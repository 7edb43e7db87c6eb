"""The change stream between pods and directors, against a real redis-server (issue 12, point 2).

A director follows changes from its cursor without reading the table again; entries it missed
(trimmed past it, or a stream recreated from scratch) cost exactly one full read; a pod that dies
without cleaning up leaves every director's table after its TTL, through the stream alone, and
its token is free for another pod; and the background load on Redis does not grow with the number
of live connections (what the old per-token heartbeat and periodic full reads did). The pods
trim the stream to `affinity.feed_retain_s`; a director's `feed_retain_s` is bounded like it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from conftest import RedisServer, sample, until
from mcpool_proxy.cluster import RedisRegistry, make_registry
from mcpool_proxy.cluster.director import (
    _CURSOR_LUA,
    Director,
    DirectorConfig,
    load_director_config,
)
from mcpool_proxy.cluster.keys import KeySchema
from mcpool_proxy.cluster.redisconn import open_redis
from mcpool_proxy.config import ConfigError, parse_config

POOL = "mtf"
KEYS = KeySchema(POOL)


@pytest.fixture
async def director(redis_server: RedisServer) -> AsyncIterator[Director]:
    # The default resync_interval_s (10 minutes): any full read during a test is a reconnect or a gap.
    config = DirectorConfig.model_validate({"vip": "198.19.255.1", "ports": [5124], "redis_url": redis_server.url,
                                            "pool": POOL, "metrics_listen": None})  # fmt: skip
    director = Director(config)
    task: asyncio.Task[None] = asyncio.ensure_future(director._feed())
    await until(lambda: sample(director, "mcpool_director_redis_up") == 1, "the feed to reach Redis")
    yield director
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def pod(redis_server: RedisServer, name: str, ttl_s: float = 10.0) -> RedisRegistry:
    return RedisRegistry(redis_server.url, POOL, name, f"198.18.10.{len(name)}", heartbeat_ttl_s=ttl_s)


async def test_director_follows_changes_without_reading_the_table_again(
    redis_server: RedisServer, director: Director
) -> None:
    assert sample(director, "mcpool_director_resyncs_total") == 1  # the one at connect
    a = pod(redis_server, "pod-a")
    await a.start()
    await a.register_pod("ready")
    for token in range(1, 51):
        await a.register_connection(token, f"198.18.1.{token}")
    await until(lambda: len(director.table.tokens) == 50 and "pod-a" in director.table.pods, "50 tokens")
    assert director.table.cpes["198.18.1.7"] == "pod-a"
    await a.register_pod("draining")  # the drain notice travels on the same stream
    await until(lambda: director.table.pods["pod-a"].state == "draining", "the drain notice")
    await a.unregister_connection(7)
    await until(lambda: 7 not in director.table.tokens and "198.18.1.7" not in director.table.cpes, "a close")
    await a.stop()
    await until(lambda: not director.table.pods and not director.table.tokens, "the pod's stop")
    assert sample(director, "mcpool_director_resyncs_total") == 1
    assert sample(director, "mcpool_director_feed_gaps_total") == 0
    assert sample(director, "mcpool_director_feed_entries_total") >= 50 + 50 + 4


# Registers `ARGV[2]` tokens of pod ARGV[1] the way the pods' script does (key, counter, entry),
# then loses the entries: trimmed to nothing, or the stream and its counter deleted (what a
# recreated stream looks like), in the same atomic call, so the director cannot have read them.
_LOSE_ENTRIES_LUA = """
local prefix, pod, count, how = ARGV[3], ARGV[1], tonumber(ARGV[2]), ARGV[4]
for i = 1, count do
  local hex = string.format('%08x', 0x7000 + i)
  redis.call('SET', prefix .. 'token:' .. hex, pod)
  local n = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], '*', 'n', n, 'e', cjson.encode({t='token', op='add', token=hex, pod=pod}))
end
if how == 'trim' then
  redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
return 1
"""


@pytest.mark.parametrize("how", ["trim", "recreate"])
async def test_a_gap_in_the_stream_costs_exactly_one_full_read(
    redis_server: RedisServer, redis_client: aioredis.Redis, director: Director, how: str
) -> None:
    a = pod(redis_server, "pod-a")
    await a.start()
    await a.register_pod("ready")
    await a.register_connection(1, "198.18.1.1")
    await until(lambda: 1 in director.table.tokens, "the first token")
    resyncs = sample(director, "mcpool_director_resyncs_total")
    await redis_client.eval(_LOSE_ENTRIES_LUA, 2, KEYS.feed, KEYS.seq, "pod-a", "20", KEYS.prefix, how)
    # The next change carries a number the director does not expect: it reads the table once.
    await a.register_connection(2, "198.18.1.2")
    wanted = {1, 2, *range(0x7001, 0x7015)}
    await until(lambda: set(director.table.tokens) == wanted, "the table complete after the gap")
    assert sample(director, "mcpool_director_feed_gaps_total") == 1
    assert sample(director, "mcpool_director_resyncs_total") == resyncs + 1
    # And it follows the stream again from there, without reading the table.
    await a.register_connection(3, "198.18.1.3")
    await until(lambda: 3 in director.table.tokens, "a change after the gap")
    assert sample(director, "mcpool_director_resyncs_total") == resyncs + 1
    await a.stop()


@pytest.mark.parametrize(("retain_s", "old_kept"), [(20.0, False), (None, True)])
async def test_the_pods_trim_the_stream_to_affinity_feed_retain_s(
    redis_server: RedisServer, redis_client: aioredis.Redis, retain_s: float | None, old_kept: bool
) -> None:
    # One entry per stream node, so that the pods' approximate trim (`MINID ~`, which drops whole
    # nodes only) is exact here.
    await redis_client.config_set("stream-node-max-entries", 1)
    seconds, micros = await redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    old, recent = f"{now_ms - 30_000}-0", f"{now_ms - 5_000}-0"  # on Redis's clock, as the trim is
    for entry_id in (old, recent):
        await redis_client.xadd(KEYS.feed, {"n": 0, "e": "{}"}, id=entry_id)
    settings = {} if retain_s is None else {"feed_retain_s": retain_s}  # None: the default, 120 s
    config = parse_config({"affinity": {"mechanism": "director", "backend": "redis", "redis_url": redis_server.url,
                                        "pool": POOL, "advertise": "198.18.10.2", **settings}})  # fmt: skip
    reg = make_registry(config.affinity, "pod-a")
    assert isinstance(reg, RedisRegistry)
    await reg.start()
    try:
        await reg.register_pod("ready")  # a write: its script trims the stream
        ids = [entry_id for entry_id, _ in await redis_client.xrange(KEYS.feed)]
        # Kept, and the pod's own entry written after it.
        assert recent in ids and int(ids[-1].split("-")[0]) > now_ms - 5_000, ids
        assert (old in ids) == old_kept, ids
    finally:
        await reg.stop()


async def test_a_full_read_longer_than_half_the_retention_is_logged(
    redis_server: RedisServer, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # One that outlasts feed_retain_s finds its cursor trimmed away and ends in a gap, repeatedly.
    config = DirectorConfig.model_validate({"vip": "198.19.255.1", "ports": [5124], "redis_url": redis_server.url,
                                            "pool": POOL, "metrics_listen": None, "feed_retain_s": 10,
                                            "redis_timeout_s": 1.0})  # fmt: skip
    director = Director(config)
    redis = open_redis(config.redis, 8.0)
    cursor_script = redis.register_script(_CURSOR_LUA)
    try:
        with caplog.at_level(logging.WARNING, logger="mcpool.director"):
            await director._resync(redis, cursor_script)  # milliseconds: nothing to say
            assert not [r for r in caplog.records if "full read" in r.getMessage()]
            # Redis answers nobody for 5.2 s (more than half of 10 s): the next full read waits.
            await redis_client.execute_command("CLIENT", "PAUSE", "5200", "ALL")
            await director._resync(redis, cursor_script)
        [warning] = [r.getMessage() for r in caplog.records if "full read" in r.getMessage()]
        assert "more than half of feed_retain_s (10 s)" in warning and "affinity.feed_retain_s" in warning
    finally:
        await redis.aclose()


@pytest.mark.parametrize("value", [5, 7200, "two minutes"])
def test_a_directors_feed_retain_s_out_of_bounds_names_the_key(tmp_path: Path, value: object) -> None:
    path = tmp_path / "director.yaml"
    path.write_text(yaml.safe_dump({"vip": "198.19.255.1", "ports": [5124], "redis_url": "redis://127.0.0.1:1/0",
                                    "feed_retain_s": value}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"(?s)invalid director configuration.*\nfeed_retain_s\n"):
        load_director_config(path)
    path.write_text(yaml.safe_dump({"vip": "198.19.255.1", "ports": [5124], "redis_url": "redis://127.0.0.1:1/0",
                                    "feed_retain_s": 300}))  # fmt: skip
    assert load_director_config(path).feed_retain_s == 300


async def test_a_killed_pod_leaves_the_table_after_its_ttl_and_frees_its_token(
    redis_server: RedisServer, redis_client: aioredis.Redis, director: Director
) -> None:
    ttl_s = 0.6
    script = textwrap.dedent(f"""
        import asyncio
        from mcpool_proxy.cluster import RedisRegistry
        async def main():
            reg = RedisRegistry({redis_server.url!r}, {POOL!r}, "pod-dead", "198.18.10.9", heartbeat_ttl_s={ttl_s})
            await reg.start()
            await reg.register_pod("ready")
            for token in (0xABCDEF01, 0xABCDEF02):
                await reg.register_connection(token, "198.18.1.2")
            print("registered", flush=True)
            await asyncio.Future()
        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
    survivor = pod(redis_server, "pod-b", ttl_s=ttl_s)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"registered"
        await until(lambda: {0xABCDEF01, 0xABCDEF02} <= set(director.table.tokens), "the pod's tokens")
        await asyncio.sleep(3 * ttl_s)  # noqa: ASYNC110 - heartbeats alone must keep it in the table
        assert "pod-dead" in director.table.pods
        proc.kill()  # no cleanup: no `pod del`, no token deleted
        await proc.wait()
        killed = time.monotonic()
        await until(lambda: "pod-dead" not in director.table.pods, "the dead pod to leave", 5)
        assert time.monotonic() - killed < ttl_s + 0.5
        assert not {0xABCDEF01, 0xABCDEF02} & set(director.table.tokens)
        assert "198.18.1.2" not in director.table.cpes
        # No other pod is alive to reap or announce anything: the director's own deadline did it.
        assert sample(director, "mcpool_director_pods_expired_total") == 1
        # Its token is free for another pod now, though its key is still there (no TTL of its own).
        assert await redis_client.get(KEYS.token(0xABCDEF01)) == "pod-dead"
        await survivor.start()
        await survivor.register_pod("ready")
        result = await survivor.register_connection(0xABCDEF01, "198.18.1.5")
        assert (result.status, result.owner) == ("registered", "pod-b")
        await until(lambda: director.table.tokens.get(0xABCDEF01) == "pod-b", "the new owner")
        assert sample(director, "mcpool_director_resyncs_total") == 1  # all through the stream
        # The survivor's heartbeat reaps the rest of the dead pod's keys, once.
        for _ in range(200):
            if not await redis_client.exists(KEYS.token(0xABCDEF02), KEYS.owned("pod-dead")):
                break
            await asyncio.sleep(0.05)
        assert await redis_client.exists(KEYS.token(0xABCDEF02), KEYS.cpe("198.18.1.2"), KEYS.owned("pod-dead")) == 0
        assert await redis_client.get(KEYS.token(0xABCDEF01)) == "pod-b"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await survivor.stop()


async def test_a_pod_restarted_under_its_name_drops_what_its_killed_process_held(
    redis_server: RedisServer, redis_client: aioredis.Redis, director: Director
) -> None:
    # A StatefulSet restarts a killed pod under the same name, usually within its TTL and before
    # any other pod reaped its keys: the new process must not inherit the old one's tokens, which
    # its heartbeat would otherwise keep alive for ever (and make other pods' equal tokens collide).
    old = pod(redis_server, "pod-r")
    await old.start()
    await old.register_pod("ready")
    for token in (0x5EED0001, 0x5EED0002):
        await old.register_connection(token, "198.18.1.7")
    await until(lambda: {0x5EED0001, 0x5EED0002} <= set(director.table.tokens), "the old process's tokens")
    for task in list(old._tasks):  # killed: no heartbeat any more and no cleanup, keys left as they are
        task.cancel()
    assert await redis_client.get(KEYS.token(0x5EED0001)) == "pod-r"

    new = pod(redis_server, "pod-r")
    try:
        await new.start()
        await new.register_pod("ready")
        result = await new.register_connection(0x5EED0003, "198.18.1.8")
        assert result.status == "registered"
        assert await redis_client.exists(KEYS.token(0x5EED0001), KEYS.token(0x5EED0002), KEYS.cpe("198.18.1.7")) == 0
        assert await redis_client.smembers(KEYS.owned("pod-r")) == {"t:5eed0003", "c:198.18.1.8"}
        await until(lambda: director.table.tokens.get(0x5EED0003) == "pod-r", "the new process's token")
        # Every director dropped the old incarnation's tokens and CPE through the stream alone.
        assert not {0x5EED0001, 0x5EED0002} & set(director.table.tokens)
        assert "198.18.1.7" not in director.table.cpes
        assert "pod-r" in director.table.pods
        assert sample(director, "mcpool_director_resyncs_total") == 1
    finally:
        await new.stop()
        await old._redis.aclose()


async def test_pods_of_an_older_mcpool_are_followed_by_full_reads_during_an_upgrade(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # An older pod heartbeats by rewriting keys with TTLs and writes nothing to the stream: its
    # pod key lacks `feed`. A new director (upgraded first) must neither expire it after one TTL
    # nor miss its new tokens for the 10-minute safety interval: it reads the table every 2 s
    # while such a pod remains, as older directors did.
    await redis_client.hset(KEYS.pod("pod-old"), mapping={"addr": "198.18.10.50", "state": "ready"})
    await redis_client.pexpire(KEYS.pod("pod-old"), 1500)
    await redis_client.set(KEYS.token(0x01D00001), "pod-old", px=10_000)
    config = DirectorConfig.model_validate({"vip": "198.19.255.1", "ports": [5124], "redis_url": redis_server.url,
                                            "pool": POOL, "metrics_listen": None,
                                            "snapshot_grace_s": 0.5})  # fmt: skip
    director = Director(config)
    task: asyncio.Task[None] = asyncio.ensure_future(director._feed())
    try:
        await until(lambda: sample(director, "mcpool_director_redis_up") == 1, "the feed to reach Redis")
        assert "pod-old" in director.table.pods and director.table.tokens.get(0x01D00001) == "pod-old"
        # The older pod goes on: its heartbeat and a new connection's token, keys only.
        await redis_client.pexpire(KEYS.pod("pod-old"), 10_000)
        await redis_client.set(KEYS.token(0x01D00002), "pod-old", px=10_000)
        await until(lambda: director.table.tokens.get(0x01D00002) == "pod-old", "the older pod's new token", 5)
        reads = sample(director, "mcpool_director_resyncs_total")
        await until(lambda: sample(director, "mcpool_director_resyncs_total") >= reads + 1, "another full read", 5)
        assert "pod-old" in director.table.pods  # past its first TTL (1.5 s), kept by the full reads
        # Upgraded away: its key goes, the next full read drops it, and the reads stop.
        await redis_client.delete(KEYS.pod("pod-old"))
        await until(lambda: "pod-old" not in director.table.pods, "the older pod to leave", 5)
        assert director._resync_every_s() == config.resync_interval_s
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def commands_per_s(client: aioredis.Redis, window_s: float) -> float:
    """Redis commands per second over `window_s` (INFO commandstats, Lua's own calls included,
    our INFO calls left out)."""

    async def calls() -> int:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    before = await calls()
    started = time.monotonic()
    await asyncio.sleep(window_s)  # noqa: ASYNC110 - a measuring window, not a wait for an event
    return (await calls() - before) / (time.monotonic() - started)


async def test_steady_state_load_does_not_grow_with_live_connections(
    redis_server: RedisServer, redis_client: aioredis.Redis, director: Director
) -> None:
    # A short TTL makes the old design's per-token refresh loud: 2 commands per token every
    # TTL/3 would be +18,000 commands/s between the two sizes; the directors' rescans more.
    ttl_s = 0.6
    pods = [pod(redis_server, f"pod-{i}", ttl_s=ttl_s) for i in range(2)]
    for p in pods:
        await p.start()
        await p.register_pod("ready")

    async def grow_to(live: int) -> None:
        for token in range(len(director.table.tokens) + 1, live + 1):
            await pods[token % 2].register_connection(token, f"10.0.{token >> 8}.{token & 255}")
        await until(lambda: len(director.table.tokens) == live, f"{live} tokens in the table")

    await grow_to(200)
    small = await commands_per_s(redis_client, 2.0)
    await grow_to(2_000)
    large = await commands_per_s(redis_client, 2.0)
    # Heartbeats (one script per pod per TTL/3) and the director's reads of them: the same at
    # both sizes, up to timing noise. 1,800 more connections may add at most 0.01 command/s each.
    assert large - small < 18, (small, large)
    assert small < 200, small
    assert sample(director, "mcpool_director_resyncs_total") == 1
    for p in pods:
        await p.stop()
