"""Keeps the director's kernel maps (token, CPE and bucket maps) in step with its affinity table.

`TokenMapSync` feeds the MP_JOIN token map, `InitialMapSync` the two maps initial SYNs are
decided by (CPE map, bucket map), both on one run loop (`_MapSync`), and `MapFeeds` hands the
director's table events to both.

Token map:

What the map must hold is a function of the table and of the kernel plumbing: every token whose
owner is a pod in the table with a tunnel slot, mapped to that slot's mark. That is exactly the
set of joins userspace would steer with `token_hit`, so the kernel decides the same way, only
without the queue. A token whose owner has no slot yet is left out (its joins reach userspace
and are held or dropped as before).

Changes arrive three ways, all coalesced into the next batch: one token's table event (an add or
the delete that follows the pod's CLOSED event), a full read of the table, and a change of the
pods' slots. Nothing is written before the first full read: a restarted director keeps its
predecessor's map steering until it knows the table, rather than empty it on a Redis outage.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..kernel.bucketmap import BucketMap
from ..kernel.tokenmap import CpeMap, NftError, SyncStats, TimedMap, TokenMap
from .hashing import BucketHash, bucket_owners

__all__ = ["InitialMapSync", "MapFeeds", "TokenMapSync", "bucket_marks", "cpe_marks"]

log = logging.getLogger("mcpool.director.tokenmap")

# Batches larger than this go to a thread (libnftables releases the GIL): the SYN queue keeps
# being served while 10k elements are written (~50 ms).
_THREAD_ABOVE = 64
_RETRY_S = 1.0

K = TypeVar("K", int, str)  # a map's key as the table spells it: a token, a CPE address


def _count_writes(writes: Counter, stats: SyncStats, *labels: str) -> None:
    """Count one batch's elements on a feed's writes counter (`labels`: the map's, if it has one)."""
    writes.labels(*labels, "add").inc(stats.added)
    writes.labels(*labels, "remove").inc(stats.removed)
    writes.labels(*labels, "refresh").inc(stats.refreshed)


class _MapSync(abc.ABC, Generic[K]):
    """What both feeds share: the pending work (dirty keys, a full rewrite), the gate that writes
    nothing before the first full read, and the task that adopts the kernel's maps, then writes a
    batch whenever something changed (or every refresh interval, to refresh timeouts) and retries
    a refused batch as a full write.

    A subclass says which table events dirty which key (`_event_key`), which maps it adopts and
    counts (`_maps`), and how it writes a batch (`_write_pending`)."""

    _what = ""  # as log lines name the maps: "the token map"

    def __init__(self, errors: Counter) -> None:
        self._dirty: set[K] = set()
        self._full = False
        self._loaded = False
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()  # set after each batch that left nothing pending (tests, bench)
        self.errors = errors

    # -- what the director calls (on its loop) -------------------------------------------------

    def snapshot_loaded(self) -> None:
        """A full read of the table happened: rewrite the maps from it."""
        self._loaded = True
        self._full = True
        self._changed.set()

    def pods_changed(self) -> None:
        """The pods or their slots changed: every element's mark may have."""
        self._full = True
        self._changed.set()

    def event_applied(self, event: Mapping[str, Any]) -> None:
        """One table event was applied; an event about one key dirties that key only."""
        if event.get("t") == "pod":
            self.pods_changed()
            return
        key = self._event_key(event)
        if key is not None:
            self._dirty.add(key)
            self._changed.set()

    # -- what a subclass says ------------------------------------------------------------------

    @abc.abstractmethod
    def _event_key(self, event: Mapping[str, Any]) -> K | None:
        """The key a table event dirties, or None when it changes nothing this feed writes."""
        raise NotImplementedError

    @abc.abstractmethod
    def _maps(self) -> Sequence[tuple[str, TimedMap[Any] | BucketMap, Gauge]]:
        """(name, map, its entries gauge) of each map this feed writes; the first with a timeout
        sets the default refresh interval."""
        raise NotImplementedError

    @abc.abstractmethod
    async def _write_pending(self) -> None:
        """Write one batch: everything when `_full`, else the `_dirty` keys, else the refreshes
        due; count what was written. An NftError leaves the retry to `run`."""
        raise NotImplementedError

    def _failed(self) -> None:
        """A batch was refused: the next one is a full write."""
        self._full = True

    # -- the task ----------------------------------------------------------------------------

    async def run(self, refresh_interval_s: float | None = None) -> None:
        maps = self._maps()
        for name, kmap, gauge in maps:
            try:
                adopted = await asyncio.to_thread(kmap.load)
            except NftError as exc:  # no map (yet): writes will say so, and retry
                log.warning("%s map: cannot read the kernel map: %s", name, exc)
            else:
                gauge.set(adopted)
                log.info("%s map: %d entries adopted from the kernel", name, adopted)
        timeout_s = next(m.timeout_s for _, m, _ in maps if isinstance(m, TimedMap))
        refresh_s = refresh_interval_s if refresh_interval_s is not None else timeout_s / 4
        last_error = ""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), refresh_s)
            self._changed.clear()
            if not self._loaded:
                continue
            try:
                await self._write_pending()
            except NftError as exc:
                self.errors.inc()
                if str(exc) != last_error:  # once per reason, not once a second
                    log.error("cannot write %s: %s; retrying with a full write", self._what, exc)
                last_error = str(exc)
                self._failed()
                await asyncio.sleep(_RETRY_S)
                self._changed.set()
                continue
            last_error = ""
            for _, kmap, gauge in maps:
                gauge.set(len(kmap.installed))
            if not self._changed.is_set():
                self.synced.set()

    @staticmethod
    async def _call(size: int, fn: Callable[..., SyncStats], *args: Any) -> SyncStats:
        if size > _THREAD_ABOVE:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)


class TokenMapSync(_MapSync[int]):
    """Writes `wanted()` (token -> mark) into a TokenMap, incrementally where it can."""

    _what = "the token map"

    def __init__(
        self,
        tokenmap: TokenMap,
        owner_mark: Callable[[], Mapping[str, int]],
        tokens: Callable[[], Mapping[int, str]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        super().__init__(
            Counter(
                "mcpool_director_token_map_errors",
                "Token map batches libnftables refused even element by element.",
                registry=registry,
            )
        )
        self.map = tokenmap
        self._owner_mark = owner_mark  # pod -> mark, for pods in the table that have a slot
        self._tokens = tokens  # the table's token -> owner
        self.entries = Gauge(
            "mcpool_director_token_map_entries",
            "Tokens in the kernel's token map (joins to them are steered without userspace).",
            registry=registry,
        )
        self.writes = Counter(
            "mcpool_director_token_map_writes",
            "Token map elements written, by operation (add, remove, refresh).",
            ["op"],
            registry=registry,
        )

    def _event_key(self, event: Mapping[str, Any]) -> int | None:
        if event.get("t") in ("token", "collision") and "token" in event:
            return int(str(event["token"]), 16)
        return None

    def _maps(self) -> Sequence[tuple[str, TimedMap[Any] | BucketMap, Gauge]]:
        return [("token", self.map, self.entries)]

    async def _write_pending(self) -> None:
        _count_writes(self.writes, await self._write())

    async def _write(self) -> SyncStats:
        marks = dict(self._owner_mark())
        tokens = self._tokens()
        if self._full:
            self._full = False
            self._dirty.clear()
            wanted = {t: marks[o] for t, o in tokens.items() if o in marks}
            return await self._call(len(wanted) + len(self.map.installed), self.map.sync, wanted)
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            wanted = {}
            for token in dirty:
                owner = tokens.get(token)
                if owner is not None and owner in marks:
                    wanted[token] = marks[owner]
            return await self._call(len(dirty), self.map.update, wanted, dirty)
        return await self._call(len(self.map.installed), self.map.refresh_due)


# -- initial SYNs: the CPE map and the bucket map -------------------------------------------------


def bucket_marks(ready: Sequence[str], marks: Mapping[str, int], buckets: int) -> dict[int, int]:
    """What the bucket map must hold: each bucket's rendezvous winner among the ready pods, as its
    mark. A bucket whose winner has no tunnel slot is left out (its SYNs reach userspace, which
    decides the same winner and drops the SYN as pod_not_plumbed), so the kernel never steers a
    bucket to a pod userspace would not."""
    return {b: marks[o] for b, o in enumerate(bucket_owners(ready, buckets)) if o is not None and o in marks}


def cpe_key(cpe: str, v6: bool) -> str | None:
    """A CPE address as the CPE map's key (the VIP's family only; an IPv4-mapped IPv6 address is
    its IPv4 address), or None."""
    try:
        addr = ipaddress.ip_address(cpe)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) if (addr.version == 6) == v6 else None


def cpe_marks(cpes: Mapping[str, str], ready: Sequence[str], marks: Mapping[str, int], v6: bool) -> dict[str, int]:
    """What the CPE map must hold: every CPE whose owner is ready and has a slot (exactly the
    CPEs `decide` calls cpe_hit), as that owner's mark. A draining pod's CPEs are left out: their
    new connections go by bucket, like userspace sends them."""
    ready_set = set(ready)
    wanted: dict[str, int] = {}
    for cpe, owner in cpes.items():
        key = cpe_key(cpe, v6)
        if key is not None and owner in ready_set and owner in marks:
            wanted[key] = marks[owner]
    return wanted


class InitialMapSync(_MapSync[str]):
    """Writes the CPE map (incrementally, like the token map) and the bucket map (whenever the
    ready pods or their slots change) from the director's table."""

    _what = "the initial-SYN maps"

    def __init__(
        self,
        buckets: BucketMap,
        cpemap: CpeMap,
        hashing: BucketHash,
        ready: Callable[[], Sequence[str]],
        marks: Callable[[], Mapping[str, int]],
        cpes: Callable[[], Mapping[str, str]],
        *,
        v6: bool,
        registry: CollectorRegistry | None = None,
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        super().__init__(
            Counter(
                "mcpool_director_initial_map_errors",
                "Batches to the initial-SYN maps libnftables refused.",
                registry=registry,
            )
        )
        self.buckets, self.cpemap, self.hashing = buckets, cpemap, hashing
        self._ready, self._marks, self._cpes, self._v6 = ready, marks, cpes, v6
        self._bucket_input: tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None = None
        self.entries = Gauge(
            "mcpool_director_initial_map_entries",
            "Elements of the kernel maps that decide initial SYNs without userspace, by map (cpe, bucket).",
            ["map"],
            registry=registry,
        )
        self.writes = Counter(
            "mcpool_director_initial_map_writes",
            "Elements written to the initial-SYN maps, by map (cpe, bucket) and operation (add, remove, refresh).",
            ["map", "op"],
            registry=registry,
        )

    def _event_key(self, event: Mapping[str, Any]) -> str | None:
        if event.get("t") == "cpe" and "cpe" in event:
            cpe = str(event["cpe"])
            if cpe_key(cpe, self._v6) is not None:
                return cpe  # as the table spells it (the table's key)
        return None

    def _maps(self) -> Sequence[tuple[str, TimedMap[Any] | BucketMap, Gauge]]:
        return [
            ("bucket", self.buckets, self.entries.labels("bucket")),
            ("cpe", self.cpemap, self.entries.labels("cpe")),
        ]

    def _failed(self) -> None:
        super()._failed()
        self._bucket_input = None

    async def _write_pending(self) -> None:
        ready = list(self._ready())
        marks = dict(self._marks())
        if self._full:
            self._full = False
            self._dirty.clear()
            # The buckets depend on the ready pods and their marks only: a full read of the
            # table every few seconds recomputes nothing unless they changed.
            bucket_input = (tuple(sorted(ready)), tuple(sorted((p, m) for p, m in marks.items() if p in ready)))
            if bucket_input != self._bucket_input:
                # Thousands of hashes per new pod: off the loop, so SYNs keep being decided.
                wanted_buckets = await asyncio.to_thread(bucket_marks, ready, marks, self.hashing.buckets)
                stats = await asyncio.to_thread(self.buckets.sync, wanted_buckets)
                _count_writes(self.writes, stats, "bucket")
                self._bucket_input = bucket_input
            wanted = cpe_marks(self._cpes(), ready, marks, self._v6)
            stats = await self._call(len(wanted) + len(self.cpemap.installed), self.cpemap.sync, wanted)
            _count_writes(self.writes, stats, "cpe")
            return
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            cpes = self._cpes()
            wanted = cpe_marks({c: cpes[c] for c in dirty if c in cpes}, ready, marks, self._v6)
            keys = {k for c in dirty if (k := cpe_key(c, self._v6)) is not None}
            stats = await self._call(len(keys), self.cpemap.update, wanted, keys)
            _count_writes(self.writes, stats, "cpe")
            return
        stats = await self._call(len(self.cpemap.installed), self.cpemap.refresh_due)
        _count_writes(self.writes, stats, "cpe")


class MapFeeds:
    """The director's kernel map feeds behind one interface: each table change goes to all."""

    def __init__(self, tokens: TokenMapSync | None = None, initial: InitialMapSync | None = None) -> None:
        self.tokens, self.initial = tokens, initial
        self._feeds: list[_MapSync[Any]] = [f for f in (tokens, initial) if f is not None]

    def __bool__(self) -> bool:
        return bool(self._feeds)

    def snapshot_loaded(self) -> None:
        for feed in self._feeds:
            feed.snapshot_loaded()

    def pods_changed(self) -> None:
        for feed in self._feeds:
            feed.pods_changed()

    def event_applied(self, event: Mapping[str, Any]) -> None:
        for feed in self._feeds:
            feed.event_applied(event)

    def runners(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """(name, coroutine) of each feed's task."""
        out: list[tuple[str, Coroutine[Any, Any, None]]] = []
        if self.tokens is not None:
            out.append(("token map", self.tokens.run()))
        if self.initial is not None:
            out.append(("initial-SYN maps", self.initial.run()))
        return out
