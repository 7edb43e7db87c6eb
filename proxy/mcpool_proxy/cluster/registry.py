"""The affinity registry: a pod publishes itself and the MPTCP connections it owns.

Two backends behind one interface (`AffinityRegistry`):
- `MemoryRegistry`: in-process, for a single pod (the default) and for tests; several instances
  may share one `MemoryStore` to model several pods.
- `RedisRegistry`: the shared table the director reads (key schema in `keys.py` and
  docs/affinity.md). One round trip per connection event (a Lua script), a pod key that expires
  on its own when the pod dies (heartbeat TTL), and a local copy of everything live so the table is
  rebuilt after a Redis restart without the pod noticing. Every change is also appended to the
  pool's stream (`KeySchema.feed`) in the same script, which is what directors follow. Liveness is
  per pod: the heartbeat refreshes the pod key only; tokens and CPEs carry no TTL and are freed
  by their owner's key expiring (then reaped by the other pods' heartbeats).

What this module must never do: raise into the caller because Redis is unavailable. Every Redis
failure is logged (once per outage), counted, and answered from local state; a background loop
reconnects with backoff and re-registers everything live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter as Multiset
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import FEED_RETAIN_S, AffinityConfig, RedisTarget
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

# Every script starts with this: ARGV[1] is the pool's key prefix, ARGV[2] this pod, ARGV[3] how
# many milliseconds of history the feed keeps (entries older are trimmed, approximately, at each
# XADD: `MINID ~`, on Redis's own clock); KEYS[1] is the feed (it routes the call to the pool's slot on a
# Cluster; the other key names are built from the prefix and share that slot). `feed` appends one
# change to the pool's stream in the same script that makes it, so a key and its event cannot
# diverge; `alive` says whether a pod's heartbeat key exists (tokens and CPEs of a pod whose key
# expired are free to take: they carry no TTL of their own).
_LUA_PRELUDE = """
local prefix, pod = ARGV[1], ARGV[2]
local minid
local function feed(event)
  if not minid then
    local now = redis.call('TIME')
    minid = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3]))
  end
  local n = redis.call('INCR', prefix .. 'seq')
  redis.call('XADD', KEYS[1], 'MINID', '~', minid, '*', 'n', n, 'e', cjson.encode(event))
end
local function alive(owner)
  return redis.call('EXISTS', prefix .. 'pod:' .. owner) == 1
end
local owned = prefix .. 'owned:' .. pod
"""

# KEYS: feed, token key, CPE key. ARGV: (prelude), token hex, CPE address ('' = none).
# Returns {1, pod} when this pod owns the token, {0, owner} on a collision. The token is claimed
# with "set if free or already mine": the first live pod to register a token keeps it.
_REGISTER_LUA = _LUA_PRELUDE + """
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= pod and alive(cur) then
  feed({t='collision', token=ARGV[4], pod=pod, owner=cur})
  return {0, cur}
end
if cur ~= pod then
  redis.call('SET', KEYS[2], pod)
  redis.call('SADD', owned, 't:' .. ARGV[4])
  feed({t='token', op='add', token=ARGV[4], pod=pod})
end
if ARGV[5] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if (not holder) or (holder ~= pod and not alive(holder)) then
    redis.call('SET', KEYS[3], pod)
    redis.call('SADD', owned, 'c:' .. ARGV[5])
    feed({t='cpe', op='add', cpe=ARGV[5], pod=pod})
  end
end
return {1, pod}
"""

# KEYS: feed, token key, CPE key. ARGV: (prelude), token hex, CPE address, '1' if the CPE has no
# other connection on this pod. Deletes only what this pod owns (compare-and-delete).
_UNREGISTER_LUA = _LUA_PRELUDE + """
if redis.call('GET', KEYS[2]) == pod then
  redis.call('DEL', KEYS[2])
  feed({t='token', op='del', token=ARGV[4], pod=pod})
end
redis.call('SREM', owned, 't:' .. ARGV[4])
if ARGV[6] == '1' then
  if redis.call('GET', KEYS[3]) == pod then
    redis.call('DEL', KEYS[3])
    feed({t='cpe', op='del', cpe=ARGV[5], pod=pod})
  end
  redis.call('SREM', owned, 'c:' .. ARGV[5])
end
return 1
"""

# KEYS: feed, pod key. ARGV: (prelude), ttl ms, addr, state, ts, connections, reap budget.
# The pod's heartbeat, and the only key it refreshes: liveness is per pod, not per token. The
# field `feed` tells directors that this pod heartbeats on the stream (an older pod's key lacks it). Returns
# {1 if the pod key still existed, members reaped}. Reaping: the tokens and CPEs of pods whose
# key expired (SIGKILL, node loss) are deleted here, up to `budget` per call, by whichever pod
# beats first; a dead pod leaves `pods` (with a `pod del` entry) once nothing of it is left.
_HEARTBEAT_LUA = _LUA_PRELUDE + """
local existed = redis.call('EXISTS', KEYS[2])
redis.call('HSET', KEYS[2], 'addr', ARGV[5], 'state', ARGV[6], 'ts', ARGV[7], 'connections', ARGV[8], 'feed', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', prefix .. 'pods', pod)
feed({t='pod', op='add', pod=pod, addr=ARGV[5], state=ARGV[6], ttl=tonumber(ARGV[4])})
local budget, reaped = tonumber(ARGV[9]), 0
if budget > 0 then
  for _, other in ipairs(redis.call('SMEMBERS', prefix .. 'pods')) do
    if budget <= 0 then break end
    if other ~= pod and not alive(other) then
      local set = prefix .. 'owned:' .. other
      local members = redis.call('SPOP', set, budget)
      for _, m in ipairs(members) do
        local key = prefix .. (string.sub(m, 1, 1) == 't' and 'token:' or 'cpe:') .. string.sub(m, 3)
        if redis.call('GET', key) == other then redis.call('DEL', key) end
      end
      budget = budget - #members
      reaped = reaped + #members
      if redis.call('EXISTS', set) == 0 then
        redis.call('SREM', prefix .. 'pods', other)
        feed({t='pod', op='del', pod=other})
      end
    end
  end
end
return {existed, reaped}
"""

# KEYS: feed. ARGV: (prelude), number of tokens N, N token hex, then CPEs. Claims what is free
# (missing after a Redis restart, or held by a pod that died), keeps what is ours, and returns the
# tokens another live pod owns. Run after a reconnect (everything live) and by the heartbeat for
# the collided tokens only (a collision ends when the first owner releases the token).
_CLAIM_LUA = _LUA_PRELUDE + """
local n = tonumber(ARGV[4])
local collided = {}
for i = 5, 4 + n do
  local key = prefix .. 'token:' .. ARGV[i]
  local cur = redis.call('GET', key)
  if cur == pod then
    redis.call('SADD', owned, 't:' .. ARGV[i])
  elseif (not cur) or not alive(cur) then
    redis.call('SET', key, pod)
    redis.call('SADD', owned, 't:' .. ARGV[i])
    feed({t='token', op='add', token=ARGV[i], pod=pod})
  else
    collided[#collided + 1] = ARGV[i]
    collided[#collided + 1] = cur
  end
end
for i = 5 + n, #ARGV do
  local key = prefix .. 'cpe:' .. ARGV[i]
  local cur = redis.call('GET', key)
  if cur == pod then
    redis.call('SADD', owned, 'c:' .. ARGV[i])
  elseif (not cur) or not alive(cur) then
    redis.call('SET', key, pod)
    redis.call('SADD', owned, 'c:' .. ARGV[i])
    feed({t='cpe', op='add', cpe=ARGV[i], pod=pod})
  end
end
return collided
"""

# KEYS: feed. ARGV: (prelude), then token hex... '--', then CPEs. Used at stop: one `pod del`
# entry tells every director to drop the pod with its tokens and CPEs.
_RELEASE_ALL_LUA = _LUA_PRELUDE + """
local kind = 'token:'
for i = 4, #ARGV do
  if ARGV[i] == '--' then
    kind = 'cpe:'
  else
    local key = prefix .. kind .. ARGV[i]
    if redis.call('GET', key) == pod then redis.call('DEL', key) end
  end
end
redis.call('DEL', prefix .. 'pod:' .. pod, owned)
redis.call('SREM', prefix .. 'pods', pod)
feed({t='pod', op='del', pod=pod})
return 1
"""

# KEYS: feed. ARGV: (prelude), budget. A new process under this pod name (a StatefulSet restarts
# a killed pod under the same name, usually before another pod has reaped what the old one held):
# what the old process owned is not ours. Deletes up to `budget` of it per call and returns how
# many; the caller repeats until it returns less. The first call also ends the old incarnation in
# every director (`pod del`: they drop its tokens and CPEs); the new one's heartbeat adds it back.
_PURGE_LUA = _LUA_PRELUDE + """
local budget = tonumber(ARGV[4])
local members = redis.call('SPOP', owned, budget)
for _, m in ipairs(members) do
  local key = prefix .. (string.sub(m, 1, 1) == 't' and 'token:' or 'cpe:') .. string.sub(m, 3)
  if redis.call('GET', key) == pod then redis.call('DEL', key) end
end
if ARGV[5] == '1' and (#members > 0 or redis.call('EXISTS', prefix .. 'pod:' .. pod) == 1) then
  redis.call('DEL', prefix .. 'pod:' .. pod)
  feed({t='pod', op='del', pod=pod})
end
return #members
"""

# Members of dead pods reaped per heartbeat at most: keeps each script short, so Redis
# (single-threaded) never blocks other clients for long.
REAP_BUDGET = 1000


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
        feed_retain_s: float = FEED_RETAIN_S,
    ) -> None:
        self.pod_name = pod_name
        self.advertise = advertise
        self.keys = KeySchema(pool)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        # Refresh three times per TTL: one lost heartbeat must not expire a live pod.
        self.heartbeat_interval_s = heartbeat_ttl_s / 3
        self.op_timeout_s = op_timeout_s
        self.feed_retain_ms = max(1, int(feed_retain_s * 1000))
        self.metrics = metrics if metrics is not None else RegistryMetrics()
        # A URL, Sentinel or Cluster (redisconn.open_redis); the name is historical.
        self._where = describe_target(redis_url)
        self._redis = open_redis(redis_url, op_timeout_s)
        self._register = self._redis.register_script(_REGISTER_LUA)
        self._unregister = self._redis.register_script(_UNREGISTER_LUA)
        self._heartbeat = self._redis.register_script(_HEARTBEAT_LUA)
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._release_all = self._redis.register_script(_RELEASE_ALL_LUA)
        self._purge = self._redis.register_script(_PURGE_LUA)
        # Until this process has written to Redis once, anything there under its name is an
        # earlier incarnation's (see _PURGE_LUA).
        self._fresh = True
        self._purge_lock = asyncio.Lock()  # one purge, before any write of this process
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
            args: list[Any] = self._head()
            args += [token_hex(t) for t in self._local.live if t not in self._local.collided]
            args.append("--")
            args += list(self._local.cpe_refs)
            try:
                await asyncio.wait_for(
                    self._release_all(keys=[self.keys.feed], args=args), self.op_timeout_s * 4
                )
            except REDIS_ERRORS as exc:
                # The pod key expires within the heartbeat TTL; the other pods' heartbeats reap the rest.
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
            if self._fresh:
                await self._purge_earlier()
            reply = await asyncio.wait_for(
                self._register(
                    keys=[self.keys.feed, self.keys.token(token), self.keys.cpe(cpe)],
                    args=[*self._head(), token_hex(token), cpe],
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
                    keys=[self.keys.feed, self.keys.token(token), self.keys.cpe(cpe)],
                    args=[*self._head(), token_hex(token), cpe, "1" if last else "0"],
                ),
                self.op_timeout_s,
            )
        except REDIS_ERRORS as exc:
            # The reconnect re-claims only what is still live; a key left behind here is taken
            # over by whoever registers the token next once this pod's own key is gone.
            self._mark_down("unregister_connection", exc)

    def _head(self) -> list[Any]:
        """The arguments every script starts with (see _LUA_PRELUDE)."""
        return [self.keys.prefix, self.pod_name, self.feed_retain_ms]

    async def _purge_earlier(self) -> None:
        """Delete what an earlier process of this pod name left in Redis (once per process,
        before its first write): its tokens would otherwise look alive again under the new
        process's heartbeat, never be reaped, and collide with other pods' new tokens."""
        async with self._purge_lock:
            if self._fresh:  # another caller may have purged while this one waited
                await self._purge_locked()

    async def _purge_locked(self) -> None:
        first, purged = True, 0
        while True:
            n = int(await asyncio.wait_for(
                self._purge(keys=[self.keys.feed], args=[*self._head(), REAP_BUDGET, "1" if first else "0"]),
                self.op_timeout_s * 4,
            ))  # fmt: skip
            first, purged = False, purged + n
            if n < REAP_BUDGET:
                break
        self._fresh = False
        if purged:
            log.info("removed %d keys an earlier process of pod %s left in Redis", purged, self.pod_name)

    async def _write_pod(self, reap: int = 0) -> bool:
        """The heartbeat: write the pod key (its one TTL), append a `pod add` entry to the feed,
        reap up to `reap` leftovers of dead pods. Returns whether the pod key still existed."""
        if self._fresh:
            await self._purge_earlier()
        state = self._local.state
        if state is None:
            return True
        # `connections`: what this pod still carries, for whoever looks at Redis during a drain
        # (directors ignore it; the operator reads the same count from the pod's /readyz).
        reply = await asyncio.wait_for(
            self._heartbeat(
                keys=[self.keys.feed, self.keys.pod(self.pod_name)],
                args=[*self._head(), self.ttl_ms, self.advertise, state, f"{time.time():.3f}",
                      str(len(self._local.live)), reap],
            ),
            self.op_timeout_s * 4,
        )  # fmt: skip
        if int(reply[1]):
            log.info("reaped %d leftover keys of pods whose heartbeat expired", int(reply[1]))
        return bool(int(reply[0]))

    async def _claim_all(self, tokens: list[int], cpes: list[str]) -> None:
        """Claim `tokens` and `cpes` (free ones become ours, ours stay); record the collided."""
        if self._fresh:
            await self._purge_earlier()
        hexes = [token_hex(t) for t in tokens]
        collided: dict[int, str] = {}
        chunks: list[list[Any]] = []
        for start in range(0, max(len(hexes), len(cpes)), REFRESH_CHUNK):
            chunk_t = hexes[start : start + REFRESH_CHUNK]
            chunk_c = cpes[start : start + REFRESH_CHUNK]
            chunks.append([*self._head(), len(chunk_t), *chunk_t, *chunk_c])
        replies: list[Any] = []
        if is_cluster(self._redis):
            # A cluster pipeline cannot load a script the node lacks (NOSCRIPT after a failover or
            # on a fresh node); one call per chunk can, and all chunks go to the pool's one slot.
            for args in chunks:
                replies.append(
                    await asyncio.wait_for(self._claim(keys=[self.keys.feed], args=args), self.op_timeout_s * 4)
                )
        elif chunks:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args in chunks:
                    await self._claim(keys=[self.keys.feed], args=args, client=pipe)  # type: ignore[arg-type]
                replies = await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 4)
        for reply in replies:
            pairs = list(reply)
            for i in range(0, len(pairs), 2):
                collided[int(pairs[i], 16)] = str(pairs[i + 1])
        # A token's collision ends when its first owner releases it and we claim it here.
        self._local.collided = {t: o for t, o in collided.items() if t in self._local.live}
        self.metrics.collided.set(len(self._local.collided))

    async def _refresh_all(self) -> None:
        """After a reconnect: the pod key, then every live token and CPE claimed again."""
        await self._write_pod()
        await self._claim_all(list(self._local.live), list(self._local.cpe_refs))

    async def _heartbeat_once(self) -> None:
        """One heartbeat: the pod key only, whatever the number of live connections, unless the
        key had expired (the pod was stalled, or Redis lost it): then everything is claimed again,
        as after a reconnect. Collided tokens are retried each time (few: see docs/affinity.md)."""
        existed = await self._write_pod(reap=REAP_BUDGET)
        if not existed and self._local.live:
            log.warning("pod key %s had expired: re-registering %d connections", self.pod_name,
                        len(self._local.live))  # fmt: skip
            await self._claim_all(list(self._local.live), list(self._local.cpe_refs))
        elif self._local.collided:
            await self._claim_all(list(self._local.collided), [])

    async def _heartbeat_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.heartbeat_interval_s)
            if not self._up:
                continue  # the reconnect loop owns recovery
            try:
                await self._heartbeat_once()
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
            feed_retain_s=config.feed_retain_s,
        )
    return MemoryRegistry(pod_name, advertise, store=store, metrics=metrics)
