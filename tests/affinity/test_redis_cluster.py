"""The registry and the director's feed on a real three-master Redis Cluster (issue 13).

Every key of a pool shares the pool's hash tag, so one pool lives in one slot; different pools
land on different masters. For a pool on each master, pods register (the Lua scripts, the pod
pipeline, the heartbeat's refresh script), collide, unregister and leave, while a director's feed
(cluster pub/sub, SCAN over every master, MGET and pipelined HGETALL within the slot) follows and
steers a join to its pod. No kernel plumbing: the feed and `decide` are what a director runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from conftest import sample, until
from mcpool_proxy.cluster import RedisRegistry
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.cluster.keys import KeySchema
from mcpool_proxy.cluster.packet import Syn
from mcpool_proxy.cluster.table import decide
from mcpool_proxy.config import RedisClusterConfig
from redis_ha import ClusterGroup
from support import require_command


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    require_command("redis-server", "redis-server")
    require_command("redis-cli", "redis-tools")
    group = ClusterGroup(tmp_path_factory.mktemp("redis-cluster"))
    try:
        group.start()
        yield group
    finally:
        group.stop()


def pools_on_every_master(group: ClusterGroup) -> dict[int, str]:
    """Master port -> a pool name whose keys that master serves."""
    found: dict[int, str] = {}
    for i in range(200):
        pool = f"mtk{i}"
        found.setdefault(group.slot_owner(KeySchema(pool).feed), pool)
        if len(found) == len(group.ports):
            return found
    raise AssertionError("no pool names cover every master")


def join(token: int) -> Syn:
    return Syn(src="198.18.1.7", dst="198.19.255.1", sport=40000, dport=5124, join_token=token, mp_capable=False)


async def test_registration_and_director_lookup_on_every_master(redis_cluster: ClusterGroup) -> None:
    target = RedisClusterConfig(addresses=redis_cluster.addresses)
    pools = pools_on_every_master(redis_cluster)
    assert len(pools) == 3
    for master, pool in pools.items():
        await exercise_pool(redis_cluster, target, master, pool)


async def exercise_pool(redis_cluster: ClusterGroup, target: RedisClusterConfig, master: int, pool: str) -> None:
    keys = KeySchema(pool)
    director = Director(DirectorConfig(vip="198.19.255.1", ports=[5124], redis_cluster=target, pool=pool,
                                       resync_interval_s=0.2, metrics_listen=None))  # fmt: skip
    feed = asyncio.ensure_future(director._feed())
    a = RedisRegistry(target, pool, "pod-a", "198.18.10.1", heartbeat_ttl_s=1.0)
    b = RedisRegistry(target, pool, "pod-b", "198.18.10.2", heartbeat_ttl_s=1.0)
    try:
        await until(lambda: sample(director, "mcpool_director_redis_up") == 1, f"the feed on pool {pool}")
        await a.start()
        await b.start()
        assert a.redis_up and b.redis_up
        await a.register_pod("ready")
        await b.register_pod("ready")
        assert (await a.register_connection(0x0A0B0C01, "198.18.1.7")).status == "registered"
        # The same token from another pod: the first owner keeps it (the script's compare).
        result = await b.register_connection(0x0A0B0C01, "198.18.1.8")
        assert result.status == "collision" and result.owner == "pod-a"
        assert (await b.register_connection(0x0A0B0C02, "198.18.1.8")).status == "registered"

        # The keys are on this pool's master, and only there.
        assert redis_cluster.cli(master, "get", keys.token(0x0A0B0C01)) == "pod-a"
        await until(lambda: director.table.tokens.get(0x0A0B0C02) == "pod-b"
                    and {"pod-a", "pod-b"} <= set(director.table.pods), f"the director's table ({pool})")  # fmt: skip
        decision = decide(join(0x0A0B0C02), director.table)
        assert decision.pod == "pod-b" and decision.outcome == "token_hit", decision
        # The collision event reached the director too: joins go to the owner, marked so.
        assert decide(join(0x0A0B0C01), director.table).pod == "pod-a"
        assert 0x0A0B0C01 in director.table.collided

        # The heartbeat script (pod key, reaper; keys built from the prefix, inside the slot) and
        # the claim script (after a reconnect; the heartbeat's retry of collided tokens) keep
        # what is ours and report the collision again. Only the pod key has a TTL.
        await a._heartbeat_once()
        await b._heartbeat_once()
        await a._refresh_all()
        await b._refresh_all()
        assert b.collided_tokens() == {0x0A0B0C01: "pod-a"}
        assert int(redis_cluster.cli(master, "pttl", keys.pod("pod-b"))) > 500
        assert int(redis_cluster.cli(master, "pttl", keys.token(0x0A0B0C02))) == -1
        assert int(redis_cluster.cli(master, "xlen", keys.feed)) > 0

        # A full read (SCAN over every master, MGET and HGETALL in the slot) sees the same.
        before = sample(director, "mcpool_director_resyncs_total")
        await until(lambda: sample(director, "mcpool_director_resyncs_total") >= before + 2, "two resyncs")
        assert director.table.tokens.get(0x0A0B0C01) == "pod-a"

        await a.unregister_connection(0x0A0B0C01)
        # pod-b still holds the collided token: its next heartbeat may claim it at once, so the
        # table may go straight from pod-a to pod-b (both entries in one read of the stream).
        await until(lambda: director.table.tokens.get(0x0A0B0C01) != "pod-a", "the token to leave pod-a")
        await a.stop()
        await until(lambda: "pod-a" not in director.table.pods, "pod-a to leave the table")
        assert not feed.done()
    finally:
        await b.stop()
        if not a._stopped:
            await a.stop()
        feed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await feed


def test_cluster_config_names_its_keys() -> None:
    from mcpool_proxy.config import AffinityConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="affinity.redis_url and affinity.redis_cluster"):
        AffinityConfig(backend="redis", redis_url="redis://r:6379/0",
                       redis_cluster=RedisClusterConfig(addresses=["r:6379"]))  # fmt: skip
    with pytest.raises(ValidationError, match="redis_cluster.addresses"):
        AffinityConfig.model_validate({"backend": "redis", "redis_cluster": {"addresses": []}})
    with pytest.raises(ValidationError, match="needs a host and a port"):
        AffinityConfig.model_validate({"backend": "redis", "redis_cluster": {"addresses": [":6379"]}})
    with pytest.raises(ValidationError, match="redis_sentinel.master_name"):
        AffinityConfig.model_validate({"backend": "redis", "redis_sentinel": {"addresses": ["s:26379"]}})
    with pytest.raises(ValidationError, match="set one of redis_url, redis_sentinel or redis_cluster"):
        DirectorConfig.model_validate({"vip": "198.19.255.1", "ports": [5124]})

