"""The affinity registry: a pod publishes itself and the MPTCP connections it owns.

Two backends behind one interface (`AffinityRegistry`):
- `MemoryRegistry`: in-process, for a single pod (the default) and for tests; several instances
  may share one `MemoryStore` to model several pods.
- `RedisRegistry`: the shared table the director reads (key schema in `keys.py` and
  docs/affinity.md). One round trip per connection event (a Lua script), keys that expire on
  their own when a pod dies (heartbeat TTL), and a local copy of everything live so the table is
  rebuilt after a Redis restart without the pod noticing.

What this module must never do: raise into the caller because Redis is unavailable. Every Redis
failure is logged (once per outage), counted, and answered from local state; a background loop
reconnects with backoff and re-registers everything live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter as Multiset
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import AffinityConfig, RedisTarget
from .keys import KeySchema, token_hex
from .redisconn import (
    REDIS_ERRORS,
    Backoff,
    describe_target,
    is_cluster,
    open_redis,
    redis_error_text,
)

__all__ = [
    "AffinityRegistry",
    "MemoryRegistry",
    "MemoryStore",
    "PodState",
    "RedisRegistry",
    "RegistrationResult",
    "RegistryMetrics",
    "make_registry",
    "resolve_pod_name",
]

log = logging.getLogger("mcpool.affinity.registry")

PodState = Literal["ready", "draining"]
RegistrationStatus = Literal["registered", "collision", "deferred"]

# Largest number of tokens sent in one Lua call when refreshing: keeps each script short so
# Redis (single-threaded) never blocks other clients for long.
REFRESH_CHUNK = 500


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """Outcome of registering one connection.

    - `registered`: this pod owns the token in the table (`owner` is this pod).
    - `collision`: another live pod already owns the same 32-bit token (`owner` names it). The
      existing owner keeps it; joins carrying this token go to `owner` (see docs/affinity.md).
    - `deferred`: Redis is unreachable; the connection is kept locally and registered as soon as
      Redis is back (`owner` is None).
    """

    status: RegistrationStatus
    owner: str | None


@runtime_checkable
class AffinityRegistry(Protocol):
    """What the proxy server calls. No method raises because the backend is unavailable."""

    pod_name: str

    async def start(self) -> None:
        """Connect and start the heartbeat; returns even if the backend is down."""

    async def stop(self) -> None:
        """Deregister the pod and its connections, stop background tasks."""

    async def register_pod(self, state: PodState) -> None:
        """Publish (or update) this pod's state: `ready` or `draining`."""

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        """Publish that this pod owns MPTCP connection `token` from client address `cpe`."""

    async def unregister_connection(self, token: int, cpe: str | None = None) -> None:
        """Forget connection `token` (its CPE is remembered locally if not given)."""

    def live_connections(self) -> Mapping[int, str]:
        """Token -> CPE address of every connection registered and not yet unregistered."""


class RegistryMetrics:
    """Counters of one registry, registered in the caller's Prometheus registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registrations = Counter(
            "mcpool_affinity_registrations",
            "Connection registrations by result (registered, collision, deferred).",
            ["result"],
            registry=registry,
        )
        self.collisions = Counter(
            "mcpool_affinity_token_collisions",
            "Tokens this pod accepted that another live pod already owned.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "mcpool_affinity_redis_errors",
            "Redis operations that failed, by operation.",
            ["op"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "mcpool_affinity_redis_up", "1 while the registry reaches Redis.", registry=registry
        )
        self.live = Gauge(
            "mcpool_affinity_live_connections",
            "Connections this pod has registered and not closed.",
            registry=registry,
        )
        # --- collisions made visible (issue 10) ---
        self.collided = Gauge(
            "mcpool_affinity_collided_connections",
            "Live connections of this pod whose token another pod owns: single-path (their joins go "
            "to the owner and are reset) until the owner's connection closes. See docs/affinity.md.",
            registry=registry,
        )
        self.resyncs = Counter(
            "mcpool_affinity_reregistrations",
            "Full re-registrations of this pod's state after Redis came back.",
            registry=registry,
        )


def resolve_pod_name(config: AffinityConfig) -> str:
    """This pod's registry name: `affinity.pod_name`, else $POD_NAME, else the hostname."""
    return config.pod_name or os.environ.get("POD_NAME") or socket.gethostname()


class _LocalState:
    """What this pod owns, kept locally so nothing is lost while the backend is away."""

    def __init__(self) -> None:
        self.live: dict[int, str] = {}  # token -> CPE address
        self.cpe_refs: Multiset[str] = Multiset()
        self.collided: dict[int, str] = {}  # token -> the other pod that owns it
        self.state: PodState | None = None

    def add(self, token: int, cpe: str) -> None:
        if token in self.live:
            old = self.live[token]
            if old == cpe:
                return
            self._drop_cpe(old)
        self.live[token] = cpe
        self.cpe_refs[cpe] += 1

    def remove(self, token: int, cpe: str | None) -> tuple[str | None, bool]:
        """Forget `token`; return its CPE and whether that CPE has no connection left here."""
        known = self.live.pop(token, None)
        self.collided.pop(token, None)
        cpe = known if known is not None else cpe
        if known is None or cpe is None:
            return cpe, False
        return cpe, self._drop_cpe(cpe)

    def _drop_cpe(self, cpe: str) -> bool:
        self.cpe_refs[cpe] -= 1
        if self.cpe_refs[cpe] <= 0:
            del self.cpe_refs[cpe]
            return True
        return False


# ---------------------------------------------------------------------------------------------
# In-memory backend


@dataclass
class MemoryStore:
    """The table the in-memory backend writes; share one between registries to model pods."""

    pods: dict[str, tuple[str, PodState]] = field(default_factory=dict)  # name -> (addr, state)
    tokens: dict[int, str] = field(default_factory=dict)  # token -> pod
    cpes: dict[str, str] = field(default_factory=dict)  # CPE address -> pod


class MemoryRegistry:
    """In-process registry with the same semantics as the Redis one (minus expiry)."""

    def __init__(
        self,
        pod_name: str,
        advertise: str = "",
        store: MemoryStore | None = None,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.pod_name = pod_name
        self.advertise = advertise
        self.store = store if store is not None else MemoryStore()
        self.metrics = metrics if metrics is not None else RegistryMetrics()
        self._local = _LocalState()

    async def start(self) -> None:
        self.metrics.redis_up.set(1)  # nothing to reach: always "up"

    async def stop(self) -> None:
        for token in list(self._local.live):
            await self.unregister_connection(token)
        self.store.pods.pop(self.pod_name, None)

    async def register_pod(self, state: PodState) -> None:
        self._local.state = state
        self.store.pods[self.pod_name] = (self.advertise, state)

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        self._local.add(token, cpe)
        self.metrics.live.set(len(self._local.live))
        owner = self.store.tokens.setdefault(token, self.pod_name)
        if owner != self.pod_name:
            self._local.collided[token] = owner
            self.metrics.collisions.inc()
            self.metrics.registrations.labels("collision").inc()
            return RegistrationResult("collision", owner)
        self.store.cpes.setdefault(cpe, self.pod_name)
        self.metrics.registrations.labels("registered").inc()
        return RegistrationResult("registered", self.pod_name)

    async def unregister_connection(self, token: int, cpe: str | None = None) -> None:
        cpe, last = self._local.remove(token, cpe)
        self.metrics.live.set(len(self._local.live))
        self.metrics.collided.set(len(self._local.collided))
        if self.store.tokens.get(token) == self.pod_name:
            del self.store.tokens[token]
        if last and cpe is not None and self.store.cpes.get(cpe) == self.pod_name:
            del self.store.cpes[cpe]

    def live_connections(self) -> Mapping[int, str]:
        return dict(self._local.live)


# ---------------------------------------------------------------------------------------------
# Redis backend

# KEYS: token key, CPE key, events channel. ARGV: pod, ttl ms, token hex, CPE address ('' = none).
# Returns {1, pod} when this pod owns the token, {0, owner} on a collision. The token is claimed
# with "set if absent or already mine": the first pod to register a token keeps it.
_REGISTER_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  redis.call('PUBLISH', KEYS[3], cjson.encode({t='collision', token=ARGV[3], pod=ARGV[1], owner=cur}))
  return {0, cur}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not cur then
  redis.call('PUBLISH', KEYS[3], cjson.encode({t='token', op='add', token=ARGV[3], pod=ARGV[1]}))
end
if ARGV[4] ~= '' then
  local owner = redis.call('GET', KEYS[2])
  if (not owner) or owner == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
    if not owner then
      redis.call('PUBLISH', KEYS[3], cjson.encode({t='cpe', op='add', cpe=ARGV[4], pod=ARGV[1]}))
    end
  end
end
return {1, ARGV[1]}
"""

# KEYS: token key, CPE key, events. ARGV: pod, token hex, CPE address, '1' if the CPE has no
# other connection on this pod. Deletes only what this pod owns (compare-and-delete).
_UNREGISTER_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[3], cjson.encode({t='token', op='del', token=ARGV[2], pod=ARGV[1]}))
end
if ARGV[4] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', KEYS[3], cjson.encode({t='cpe', op='del', cpe=ARGV[3], pod=ARGV[1]}))
end
return 1
"""

# KEYS: events. ARGV: key prefix, pod, ttl ms, number of tokens N, N token hex, then CPEs.
# Claims what is missing (after a Redis restart or an expiry), extends what is ours, and returns
# the tokens another pod owns. Key names are built here from the prefix: they all share the
# pool's hash tag, so this stays valid on Redis Cluster.
_REFRESH_LUA = """
local prefix, pod, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local collided = {}
for i = 5, 4 + n do
  local key = prefix .. 'token:' .. ARGV[i]
  local cur = redis.call('GET', key)
  if not cur then
    redis.call('SET', key, pod, 'PX', ttl)
    redis.call('PUBLISH', KEYS[1], cjson.encode({t='token', op='add', token=ARGV[i], pod=pod}))
  elseif cur == pod then
    redis.call('PEXPIRE', key, ttl)
  else
    collided[#collided + 1] = ARGV[i]
    collided[#collided + 1] = cur
  end
end
for i = 5 + n, #ARGV do
  local key = prefix .. 'cpe:' .. ARGV[i]
  local cur = redis.call('GET', key)
  if not cur then
    redis.call('SET', key, pod, 'PX', ttl)
    redis.call('PUBLISH', KEYS[1], cjson.encode({t='cpe', op='add', cpe=ARGV[i], pod=pod}))
  elseif cur == pod then
    redis.call('PEXPIRE', key, ttl)
  end
end
return collided
"""

# KEYS: events. ARGV: key prefix, pod, then token hex... '--', then CPEs. Used at stop.
_RELEASE_ALL_LUA = """
local prefix, pod = ARGV[1], ARGV[2]
local kind = 'token:'
for i = 3, #ARGV do
  if ARGV[i] == '--' then
    kind = 'cpe:'
  else
    local key = prefix .. kind .. ARGV[i]
    if redis.call('GET', key) == pod then redis.call('DEL', key) end
  end
end
redis.call('DEL', prefix .. 'pod:' .. pod)
redis.call('PUBLISH', KEYS[1], cjson.encode({t='pod', op='del', pod=pod}))
return 1
"""


class RedisRegistry:
    """The shared registry. See the module docstring for the failure contract."""

    def __init__(
        self,
        redis_url: RedisTarget,
        pool: str,
        pod_name: str,
        advertise: str,
        heartbeat_ttl_s: float = 10.0,
        op_timeout_s: float = 0.5,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.pod_name = pod_name
        self.advertise = advertise
        self.keys = KeySchema(pool)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        # Refresh three times per TTL: one lost heartbeat must not expire a live pod.
        self.heartbeat_interval_s = heartbeat_ttl_s / 3
        self.op_timeout_s = op_timeout_s
        self.metrics = metrics if metrics is not None else RegistryMetrics()
        # A URL, Sentinel or Cluster (redisconn.open_redis); the name is historical.
        self._where = describe_target(redis_url)
        self._redis = open_redis(redis_url, op_timeout_s)
        self._register = self._redis.register_script(_REGISTER_LUA)
        self._unregister = self._redis.register_script(_UNREGISTER_LUA)
        self._refresh = self._redis.register_script(_REFRESH_LUA)
        self._release_all = self._redis.register_script(_RELEASE_ALL_LUA)
        self._local = _LocalState()
        self._up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self._stopped = False
        self._logged_error: str | None = None  # the last Redis failure logged above debug
        # Called when a background loop (heartbeat, reconnect) dies of an unexpected error: the
        # pod would look healthy while its registrations silently expire (PodAffinity wires it).
        self.on_task_failure: Callable[[str, BaseException], None] | None = None

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.heartbeat_ttl_s * 1000))

    @property
    def redis_up(self) -> bool:
        return self._up

    def live_connections(self) -> Mapping[int, str]:
        return dict(self._local.live)

    def collided_tokens(self) -> Mapping[int, str]:
        """Tokens this pod holds whose table entry belongs to another pod (token -> owner)."""
        return dict(self._local.collided)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopped = False
        try:
            await asyncio.wait_for(self._redis.ping(), self.op_timeout_s)
        except REDIS_ERRORS as exc:
            # The registry begins "down", so _mark_down would not warn: say it now, once, in
            # the server's own words (a protected-mode or password refusal explains itself).
            self._logged_error = redis_error_text(exc)
            log.error(
                "redis %s unreachable at start: %s. This pod serves, but directors cannot steer to "
                "it until it registers; retrying",
                self._where,
                self._logged_error,
            )
            self._mark_down("connect", exc)
        else:
            self._set_up(True)
        self._spawn(self._heartbeat_loop())

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._up:
            args: list[str] = [self.keys.prefix, self.pod_name]
            args += [token_hex(t) for t in self._local.live if t not in self._local.collided]
            args.append("--")
            args += list(self._local.cpe_refs)
            try:
                await asyncio.wait_for(
                    self._release_all(keys=[self.keys.events], args=args), self.op_timeout_s * 4
                )
            except REDIS_ERRORS as exc:
                # The keys expire within the heartbeat TTL anyway.
                self._count_error("stop", exc)
        self._local = _LocalState()
        self.metrics.live.set(0)
        self._set_up(False)
        await self._redis.aclose()

    # -- the API the server calls --------------------------------------------------------------

    async def register_pod(self, state: PodState) -> None:
        self._local.state = state
        if self._up:
            try:
                await self._write_pod()
            except REDIS_ERRORS as exc:
                self._mark_down("register_pod", exc)

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        token &= 0xFFFFFFFF
        self._local.add(token, cpe)
        self.metrics.live.set(len(self._local.live))
        if not self._up:
            self.metrics.registrations.labels("deferred").inc()
            return RegistrationResult("deferred", None)
        try:
            reply = await asyncio.wait_for(
                self._register(
                    keys=[self.keys.token(token), self.keys.cpe(cpe), self.keys.events],
                    args=[self.pod_name, self.ttl_ms, token_hex(token), cpe],
                ),
                self.op_timeout_s,
            )
        except REDIS_ERRORS as exc:
            self._mark_down("register_connection", exc)
            self.metrics.registrations.labels("deferred").inc()
            return RegistrationResult("deferred", None)
        ok, owner = int(reply[0]), str(reply[1])
        if token not in self._local.live:
            # Closed while the registration was in flight: undo it so nothing dangles.
            await self._release(token, cpe, True)
            return RegistrationResult("registered" if ok else "collision", owner)
        if ok:
            self.metrics.registrations.labels("registered").inc()
            return RegistrationResult("registered", owner)
        self._local.collided[token] = owner
        self.metrics.collided.set(len(self._local.collided))
        self.metrics.collisions.inc()
        self.metrics.registrations.labels("collision").inc()
        log.warning(
            "token %s collides with pod %s: that pod keeps it; joins to this connection will be "
            "steered there and reset",
            token_hex(token),
            owner,
        )
        return RegistrationResult("collision", owner)

    async def unregister_connection(self, token: int, cpe: str | None = None) -> None:
        token &= 0xFFFFFFFF
        was_collided = token in self._local.collided
        cpe, last = self._local.remove(token, cpe)
        self.metrics.live.set(len(self._local.live))
        self.metrics.collided.set(len(self._local.collided))
        if self._up and cpe is not None and not was_collided:
            await self._release(token, cpe, last)

    # -- internals ------------------------------------------------------------------------------

    async def _release(self, token: int, cpe: str, last: bool) -> None:
        try:
            await asyncio.wait_for(
                self._unregister(
                    keys=[self.keys.token(token), self.keys.cpe(cpe), self.keys.events],
                    args=[self.pod_name, token_hex(token), cpe, "1" if last else "0"],
                ),
                self.op_timeout_s,
            )
        except REDIS_ERRORS as exc:
            # The key expires by itself within the TTL since nobody refreshes it any more.
            self._mark_down("unregister_connection", exc)

    async def _write_pod(self) -> None:
        state = self._local.state
        if state is None:
            return
        key = self.keys.pod(self.pod_name)
        # `connections`: what this pod still carries, for whoever looks at Redis during a drain
        # (directors ignore it; the operator reads the same count from the pod's /readyz).
        fields: dict[str | bytes, str | bytes] = {"addr": self.advertise, "state": state, "ts": f"{time.time():.3f}",
                                                  "connections": str(len(self._local.live))}
        event = json.dumps(
            {"t": "pod", "op": "add", "pod": self.pod_name, "addr": self.advertise, "state": state}
        )
        cluster = is_cluster(self._redis)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpire(key, self.ttl_ms)
            if not cluster:
                pipe.publish(self.keys.events, event)
            await asyncio.wait_for(pipe.execute(), self.op_timeout_s)
        if cluster:
            # A cluster pipeline refuses PUBLISH (not a key command): send it on its own.
            await asyncio.wait_for(self._redis.publish(self.keys.events, event), self.op_timeout_s)

    async def _refresh_all(self) -> None:
        """Heartbeat: the pod key and every live token/CPE, claimed or extended, pipelined."""
        await self._write_pod()
        tokens = [token_hex(t) for t in self._local.live]
        cpes = list(self._local.cpe_refs)
        if not tokens and not cpes:
            return
        collided: dict[int, str] = {}
        chunks: list[list[Any]] = []
        for start in range(0, max(len(tokens), len(cpes)), REFRESH_CHUNK):
            chunk_t = tokens[start : start + REFRESH_CHUNK]
            chunk_c = cpes[start : start + REFRESH_CHUNK]
            chunks.append([self.keys.prefix, self.pod_name, self.ttl_ms, len(chunk_t), *chunk_t, *chunk_c])
        replies: list[Any] = []
        if is_cluster(self._redis):
            # A cluster pipeline cannot load a script the node lacks (NOSCRIPT after a failover or
            # on a fresh node); one call per chunk can, and all chunks go to the pool's one slot.
            for args in chunks:
                replies.append(
                    await asyncio.wait_for(self._refresh(keys=[self.keys.events], args=args), self.op_timeout_s * 4)
                )
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args in chunks:
                    await self._refresh(keys=[self.keys.events], args=args, client=pipe)  # type: ignore[arg-type]
                replies = await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 4)
        for reply in replies:
            pairs = list(reply)
            for i in range(0, len(pairs), 2):
                collided[int(pairs[i], 16)] = str(pairs[i + 1])
        # A token's collision ends when its first owner releases it and we claim it here.
        self._local.collided = {t: o for t, o in collided.items() if t in self._local.live}
        self.metrics.collided.set(len(self._local.collided))

    async def _heartbeat_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.heartbeat_interval_s)
            if not self._up:
                continue  # the reconnect loop owns recovery
            try:
                await self._refresh_all()
            except REDIS_ERRORS as exc:
                self._mark_down("heartbeat", exc)

    async def _reconnect_loop(self) -> None:
        self._backoff.reset()
        while not self._stopped:
            await asyncio.sleep(self._backoff.next_delay_s())
            try:
                await asyncio.wait_for(self._redis.ping(), self.op_timeout_s)
                await self._refresh_all()
            except REDIS_ERRORS as exc:
                self._count_error("reconnect", exc)
                continue
            self.metrics.resyncs.inc()
            log.warning(
                "redis reachable again: re-registered pod %s and %d connections",
                self.pod_name,
                len(self._local.live),
            )
            self._set_up(True)
            self._logged_error = None
            return

    def _mark_down(self, op: str, exc: BaseException) -> None:
        self._count_error(op, exc)
        if self._up:
            self._logged_error = redis_error_text(exc)
            log.warning("redis unreachable (%s: %s): keeping local state, retrying", op, self._logged_error)
        self._set_up(False)
        if not self._stopped and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = self._spawn(self._reconnect_loop())

    def _count_error(self, op: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(op).inc()
        text = redis_error_text(exc)
        if op == "reconnect" and text != self._logged_error:
            # A new reason while retrying (e.g. the server now answers, but refuses us).
            self._logged_error = text
            log.warning("redis %s still unreachable: %s", self._where, text)
        else:
            log.debug("redis %s failed: %s", op, text)

    def _set_up(self, up: bool) -> None:
        self._up = up
        self.metrics.redis_up.set(1 if up else 0)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        name = getattr(task.get_coro(), "__qualname__", "registry task")
        log.critical("registry background task %s died: %s", name, exc, exc_info=exc)
        if self.on_task_failure is not None:
            self.on_task_failure(f"registry {name}", exc)


def make_registry(
    config: AffinityConfig,
    pod_name: str,
    metrics_registry: CollectorRegistry | None = None,
    store: MemoryStore | None = None,
) -> AffinityRegistry:
    """The registry `config.backend` asks for; `metrics_registry` receives its counters."""
    metrics = RegistryMetrics(metrics_registry)
    advertise = config.advertise or ""
    if config.backend == "redis":
        target = config.redis
        assert target is not None  # AffinityConfig validates this
        return RedisRegistry(
            target,
            config.pool,
            pod_name,
            advertise,
            heartbeat_ttl_s=config.heartbeat_ttl_s,
            metrics=metrics,
        )
    return MemoryRegistry(pod_name, advertise, store=store, metrics=metrics)
