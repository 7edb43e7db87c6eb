"""How the registry and the director talk to Redis: one client factory, one backoff, one error set.

Three ways to reach the table (`config.RedisTarget`): one URL; Redis behind Sentinel (the client
asks the sentinels for the current primary on every new connection, so after a failover the next
reconnect lands on the promoted replica); a Redis Cluster (the client follows the slot map; every
key of a pool carries the pool's hash tag, so each pool's table lives in one slot).

Redis holds only soft state (docs/affinity.md), so every caller treats it as optional: operations get a
short timeout and no hidden retries (redis-py retries by default, which would stall a connection
accept for seconds while Redis is down); the callers keep working from local state and reconnect
with `Backoff`.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ..config import RedisClusterConfig, RedisSentinelConfig, RedisTarget, split_redis_address

__all__ = [
    "REDIS_ERRORS",
    "Backoff",
    "RedisClient",
    "connect",
    "describe_target",
    "is_cluster",
    "open_redis",
    "redis_error_text",
    "redacted_url",
]

# What `open_redis` returns: a plain client (single URL or Sentinel-managed) or a cluster client.
RedisClient = aioredis.Redis | RedisCluster

# Everything an unreachable, restarting or overloaded Redis can raise through redis-py.
# RedisClusterException ("cannot be connected", "slot not covered") is no RedisError in redis-py.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def open_redis(target: RedisTarget, timeout_s: float) -> RedisClient:
    """A client for `target` with `timeout_s` per operation and no automatic retries.

    The password may come from $REDIS_PASSWORD (the operator mounts it from a Secret) when a URL
    carries none, so it never has to be written into a ConfigMap; the sentinels' own password
    from $REDIS_SENTINEL_PASSWORD.
    """
    password = os.environ.get("REDIS_PASSWORD") or None
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": True,
    }
    if isinstance(target, str):
        if urlparse(target).password:
            password = None
        kwargs: dict[str, Any] = dict(common)
        if password:
            kwargs["password"] = password
        client: aioredis.Redis = aioredis.Redis.from_url(target, retry=Retry(NoBackoff(), 0), **kwargs)
        return client
    if isinstance(target, RedisSentinelConfig):
        return _open_sentinel(target, password, common)
    return _open_cluster(target, password, common)


class _Sentinel(Sentinel):
    """redis-py's Sentinel, with the reasons each sentinel gave when none names a primary.

    redis-py words that failure with each sentinel client's repr and the refusal's repr
    (`auth:AuthenticationError`), which loses the server's text ("invalid username-password
    pair ..."): this says which sentinel answered what, in the server's words.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        reasons: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"sentinel {kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = await sentinel.sentinel_masters()
            except REDIS_ERRORS as exc:
                reasons.append(f"{where}: {redis_error_text(exc)}")
                continue
            state = masters.get(service_name) if isinstance(masters, dict) else None
            if not state:
                reasons.append(f"{where}: monitors no primary named {service_name!r}")
                continue
            if not self.check_master_state(state, service_name):
                reasons.append(f"{where}: primary {state.get('ip')}:{state.get('port')} is down or failing over")
                continue
            # Ask the one that answered first next time.
            self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
            return str(state.get("ip")), int(state.get("port", 0))
        raise MasterNotFoundError(f"no sentinel names a primary for {service_name!r}: {'; '.join(reasons)}")


def _open_sentinel(target: RedisSentinelConfig, password: str | None, common: dict[str, Any]) -> aioredis.Redis:
    sentinel_password = os.environ.get("REDIS_SENTINEL_PASSWORD") or None
    tls: dict[str, Any] = {"ssl": True} if target.tls else {}
    sentinel_kwargs: dict[str, Any] = {**common, **tls, "retry": Retry(NoBackoff(), 0)}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    sentinel = _Sentinel(  # type: ignore[no-untyped-call]
        [split_redis_address(a) for a in target.addresses],
        sentinel_kwargs=sentinel_kwargs,
        **common,
        **tls,
        db=target.db,
        retry=Retry(NoBackoff(), 0),
        **({"password": password} if password else {}),
        **({"username": target.username} if target.username else {}),
    )
    # A new connection asks the sentinels for the primary; a connection to a node that was demoted
    # fails (READONLY), is dropped, and the caller's reconnect finds the promoted one.
    client: aioredis.Redis = sentinel.master_for(target.master_name)
    return client


def _open_cluster(target: RedisClusterConfig, password: str | None, common: dict[str, Any]) -> RedisCluster:
    nodes = [ClusterNode(*split_redis_address(a)) for a in target.addresses]
    kwargs: dict[str, Any] = dict(common)
    if target.tls:
        kwargs["ssl"] = True
    if password:
        kwargs["password"] = password
    if target.username:
        kwargs["username"] = target.username
    # One attempt per operation, as for a single Redis: the caller answers from local state and
    # reconnects with its own backoff, rather than stall a connection accept in hidden retries.
    return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0), **kwargs)


def is_cluster(client: RedisClient) -> bool:
    """Whether `client` talks to a Redis Cluster (no multi-command scripts in one pipeline there)."""
    return isinstance(client, RedisCluster)


async def connect(client: RedisClient, timeout_s: float) -> None:
    """Make sure `client` can route: a cluster client learns the slot map first (its pub/sub picks
    the node by the channel's slot and cannot do that before). A no-op for the other modes."""
    if isinstance(client, RedisCluster):
        await asyncio.wait_for(client.initialize(), timeout_s)


def describe_target(target: RedisTarget) -> str:
    """`target` for log lines, without any password."""
    if isinstance(target, str):
        return redacted_url(target)
    if isinstance(target, RedisSentinelConfig):
        return f"sentinel {target.master_name} via {','.join(target.addresses)}"
    return f"cluster via {','.join(target.addresses)}"


def redis_error_text(exc: BaseException) -> str:
    """What went wrong, in the server's own words where it sent any.

    `repr()` of a redis-py error is e.g. `server:ResponseError`, which loses exactly the text that
    explains it ("DENIED Redis is running in protected mode ...", "invalid username-password
    pair ..."); the message is in `str()`. A timeout has no message at all: name it.
    """
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        return f"{name} (no answer within the operation timeout)"
    return f"{name}: {text}" if text else name


def redacted_url(url: str) -> str:
    """`url` without its password, for log lines."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.rsplit("@", 1)[1]
    user = f"{parsed.username}:***@" if parsed.username else ":***@"
    return parsed._replace(netloc=user + netloc).geturl()


class Backoff:
    """Exponential backoff with full jitter, so many pods do not reconnect in lockstep."""

    def __init__(self, initial_s: float = 0.05, maximum_s: float = 5.0) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.maximum_s, self.initial_s * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)
