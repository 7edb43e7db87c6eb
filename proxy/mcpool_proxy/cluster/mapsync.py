"""Keeps the director's kernel token map (kernel/tokenmap.py) in step with its affinity table.

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
import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..kernel.tokenmap import NftError, SyncStats, TokenMap

__all__ = ["TokenMapSync"]

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
