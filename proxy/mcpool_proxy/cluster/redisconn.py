"""How the registry and the director talk to Redis: one client factory, one backoff, one error set.

Redis holds only soft state (DESIGN.md), so every caller treats it as optional: operations get a
short timeout and no hidden retries (redis-py retries by default, which would stall a connection
accept for seconds while Redis is down); the callers keep working from local state and reconnect
with `Backoff`.
"""

from __future__ import annotations

import asyncio
import os
import random
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["REDIS_ERRORS", "Backoff", "open_redis"]

# Everything an unreachable, restarting or overloaded Redis can raise through redis-py.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


def open_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """A client for `url` with `timeout_s` per operation and no automatic retries.

    The password may come from $REDIS_PASSWORD (the operator mounts it from a Secret) when the
    URL carries none, so it never has to be written into a ConfigMap.
    """
    password: str | None = None
    if not urlparse(url).password:
        password = os.environ.get("REDIS_PASSWORD") or None
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        **({"password": password} if password else {}),  # type: ignore[arg-type]
    )
    return client


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
