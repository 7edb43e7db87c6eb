"""Keeps the director's kernel maps (token, CPE and bucket maps) in step with its affinity table.

`TokenMapSync` feeds the MP_JOIN token map, `InitialMapSync` the two maps initial SYNs are
decided by (CPE map, bucket map), and `MapFeeds` hands the director's table events to both.

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

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..kernel.bucketmap import BucketMap
from ..kernel.tokenmap import CpeMap, NftError, SyncStats, TokenMap
from .hashing import BucketHash, bucket_owners

__all__ = ["InitialMapSync", "MapFeeds", "TokenMapSync", "bucket_marks", "cpe_marks"]

log = logging.getLogger("mcpool.director.tokenmap")

# Batches larger than this go to a thread (libnftables releases the GIL): the SYN queue keeps
# being served while 10k elements are written (~50 ms).
_THREAD_ABOVE = 64
_RETRY_S = 1.0


class TokenMapSync:
    """Writes `wanted()` (token -> mark) into a TokenMap, incrementally where it can."""

    def __init__(
        self,
        tokenmap: TokenMap,
        owner_mark: Callable[[], Mapping[str, int]],
        tokens: Callable[[], Mapping[int, str]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.map = tokenmap
        self._owner_mark = owner_mark  # pod -> mark, for pods in the table that have a slot
        self._tokens = tokens  # the table's token -> owner
        self._dirty: set[int] = set()
        self._full = False
        self._loaded = False
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()  # set after each batch that left nothing pending (tests, bench)
        registry = registry if registry is not None else CollectorRegistry()
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
        self.errors = Counter(
            "mcpool_director_token_map_errors",
            "Token map batches libnftables refused even element by element.",
            registry=registry,
        )

    # -- what the director calls (on its loop) -------------------------------------------------

    def snapshot_loaded(self) -> None:
        """A full read of the table happened: rewrite the map from it."""
        self._loaded = True
        self._full = True
        self._changed.set()

    def pods_changed(self) -> None:
        """The pods or their slots changed: every token's mark may have."""
        self._full = True
        self._changed.set()

    def event_applied(self, event: Mapping[str, Any]) -> None:
        """One table event was applied; a token event dirties that token only."""
        if event.get("t") in ("token", "collision") and "token" in event:
            self._dirty.add(int(str(event["token"]), 16))
            self._changed.set()
        elif event.get("t") == "pod":
            self.pods_changed()

    # -- the task ----------------------------------------------------------------------------

    async def run(self, refresh_interval_s: float | None = None) -> None:
        try:
            adopted = await asyncio.to_thread(self.map.load)
        except NftError as exc:  # no map (yet): writes will say so, and retry
            log.warning("token map: cannot read the kernel map: %s", exc)
        else:
            self.entries.set(adopted)
            log.info("token map: %d entries adopted from the kernel", adopted)
        last_error = ""
        refresh_s = refresh_interval_s if refresh_interval_s is not None else self.map.timeout_s / 4
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), refresh_s)
            except TimeoutError:
                pass
            self._changed.clear()
            if not self._loaded:
                continue
            try:
                stats = await self._write_pending()
            except NftError as exc:
                self.errors.inc()
                if str(exc) != last_error:  # once per reason, not once a second
                    log.error("cannot write the token map: %s; retrying with a full write", exc)
                last_error = str(exc)
                self._full = True
                await asyncio.sleep(_RETRY_S)
                self._changed.set()
                continue
            last_error = ""
            self.entries.set(len(self.map.installed))
            self.writes.labels("add").inc(stats.added)
            self.writes.labels("remove").inc(stats.removed)
            self.writes.labels("refresh").inc(stats.refreshed)
            if not self._changed.is_set():
                self.synced.set()

    async def _write_pending(self) -> SyncStats:
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

    @staticmethod
    async def _call(size: int, fn: Callable[..., SyncStats], *args: Any) -> SyncStats:
        if size > _THREAD_ABOVE:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)


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


class InitialMapSync:
    """Writes the CPE map (incrementally, like the token map) and the bucket map (whenever the
    ready pods or their slots change) from the director's table."""

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
        self.buckets, self.cpemap, self.hashing = buckets, cpemap, hashing
        self._ready, self._marks, self._cpes, self._v6 = ready, marks, cpes, v6
        self._dirty: set[str] = set()
        self._full = False
        self._loaded = False
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()  # set after each batch that left nothing pending (tests, bench)
        self._bucket_input: tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None = None
        registry = registry if registry is not None else CollectorRegistry()
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
        self.errors = Counter(
            "mcpool_director_initial_map_errors",
            "Batches to the initial-SYN maps libnftables refused.",
            registry=registry,
        )

    def snapshot_loaded(self) -> None:
        self._loaded = True
        self._full = True
        self._changed.set()

    def pods_changed(self) -> None:
        self._full = True
        self._changed.set()

    def event_applied(self, event: Mapping[str, Any]) -> None:
        if event.get("t") == "cpe" and "cpe" in event:
            cpe = str(event["cpe"])
            if cpe_key(cpe, self._v6) is not None:
                self._dirty.add(cpe)  # as the table spells it (the table's key)
                self._changed.set()
        elif event.get("t") == "pod":
            self.pods_changed()

    async def run(self, refresh_interval_s: float | None = None) -> None:
        for name, loader in (("bucket", self.buckets.load), ("cpe", self.cpemap.load)):
            try:
                adopted = await asyncio.to_thread(loader)
            except NftError as exc:
                log.warning("%s map: cannot read the kernel map: %s", name, exc)
            else:
                self.entries.labels(name).set(adopted)
                log.info("%s map: %d entries adopted from the kernel", name, adopted)
        last_error = ""
        refresh_s = refresh_interval_s if refresh_interval_s is not None else self.cpemap.timeout_s / 4
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
                if str(exc) != last_error:
                    log.error("cannot write the initial-SYN maps: %s; retrying with a full write", exc)
                last_error = str(exc)
                self._full = True
                self._bucket_input = None
                await asyncio.sleep(_RETRY_S)
                self._changed.set()
                continue
            last_error = ""
            self.entries.labels("bucket").set(len(self.buckets.installed))
            self.entries.labels("cpe").set(len(self.cpemap.installed))
            if not self._changed.is_set():
                self.synced.set()

    def _count(self, name: str, stats: SyncStats) -> None:
        self.writes.labels(name, "add").inc(stats.added)
        self.writes.labels(name, "remove").inc(stats.removed)
        self.writes.labels(name, "refresh").inc(stats.refreshed)

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
                self._count("bucket", await asyncio.to_thread(self.buckets.sync, wanted_buckets))
                self._bucket_input = bucket_input
            wanted = cpe_marks(self._cpes(), ready, marks, self._v6)
            self._count("cpe", await TokenMapSync._call(len(wanted) + len(self.cpemap.installed),
                                                        self.cpemap.sync, wanted))  # fmt: skip
            return
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            cpes = self._cpes()
            wanted = cpe_marks({c: cpes[c] for c in dirty if c in cpes}, ready, marks, self._v6)
            keys = {k for c in dirty if (k := cpe_key(c, self._v6)) is not None}
            self._count("cpe", await TokenMapSync._call(len(keys), self.cpemap.update, wanted, keys))
            return
        self._count("cpe", await TokenMapSync._call(len(self.cpemap.installed), self.cpemap.refresh_due))


class _Feed(Protocol):
    def snapshot_loaded(self) -> None: ...
    def pods_changed(self) -> None: ...
    def event_applied(self, event: Mapping[str, Any]) -> None: ...


class MapFeeds:
    """The director's kernel map feeds behind one interface: each table change goes to all."""

    def __init__(self, tokens: TokenMapSync | None = None, initial: InitialMapSync | None = None) -> None:
        self.tokens, self.initial = tokens, initial
        self._feeds: list[_Feed] = [f for f in (tokens, initial) if f is not None]

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
