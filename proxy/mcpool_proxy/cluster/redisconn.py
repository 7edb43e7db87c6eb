"""How the registry and the director talk to Redis: one client factory, one backoff, one error set.

Redis holds only soft state (docs/affinity.md), so every caller treats it as optional: operations get a
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

__all__ = ["REDIS_ERRORS", "Backoff", "open_redis", "redis_error_text", "redacted_url"]

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
