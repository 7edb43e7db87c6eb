"""The director's bucket map in nftables: which pod an initial SYN of a new CPE goes to.

The director's ruleset (kernel/steering.py) hashes an initial SYN's source address into one of B
buckets (`jhash <saddr> mod B seed S`) and looks the bucket up in the map `buckets` (bucket ->
pod mark). The director fills it from the ready pods by rendezvous hashing per bucket
(cluster/hashing.py `bucket_owners`), so it is a function of the pod set alone: every director
of the pool writes the same bucket -> pod content, and a pod that leaves or starts draining
moves only its own buckets. A bucket without an element (no ready pod, a pod without a tunnel
yet, a map not written yet) sends the SYN on to the queue, where userspace decides it.

Unlike the token and CPE maps, its elements have no timeout: the map is the whole pod set's
current answer, rewritten (only the buckets that differ) in one libnftables transaction whenever
that set changes, so packets see the old assignment or the new one, never a mix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .tokenmap import CHUNK, NftError, SyncStats, list_map, open_nftables

__all__ = ["BUCKET_MAP", "BucketMap"]

log = logging.getLogger("mcpool.affinity.bucketmap")

BUCKET_MAP = "buckets"


class BucketMap:
    """The kernel map `inet TABLE buckets` (bucket index -> pod mark), kept equal to `wanted`."""

    def __init__(self, table: str, *, family: str = "inet", name: str = BUCKET_MAP, nft: Any = None) -> None:
        self.table, self.family, self.name = table, family, name
        self._nft = nft if nft is not None else open_nftables()
        self.installed: dict[int, int] = {}  # bucket -> mark, as last written

    def kernel_elements(self) -> dict[int, int]:
        """bucket -> mark as the kernel holds them now."""
        return {int(key): int(mark) for key, mark in list_map(self._nft, self.family, self.table, self.name)}

    def load(self) -> int:
        """Adopt what the kernel map holds (a restarted director's first write then changes only
        what differs); return how many buckets are filled."""
        self.installed = self.kernel_elements()
        return len(self.installed)

    def sync(self, wanted: Mapping[int, int]) -> SyncStats:
        """Make the map hold exactly `wanted`, in one transaction: delete what goes or changes
        (a map's `add` keeps an existing element's value), add what comes or changes."""
        changed = [b for b, m in wanted.items() if self.installed.get(b) != m]
        deletes = [b for b in self.installed if b not in wanted or b in changed]
        stats = SyncStats(added=len(changed), removed=sum(1 for b in self.installed if b not in wanted))
        if not changed and not deletes:
            return stats
        stats.batches = 1
        rc, _, err = self._nft.cmd(self._script(deletes, {b: wanted[b] for b in changed}))
        if rc != 0:
            # Our view of the kernel was wrong (a map flushed by hand, another process writing):
            # rewrite it whole, still in one transaction.
            stats.fallbacks = 1
            log.warning("bucket map update refused (%s); rewriting it whole", err.strip()[:200])
            script = f"flush map {self.family} {self.table} {self.name}\n" + self._script([], dict(wanted))
            rc, _, err = self._nft.cmd(script)
            if rc != 0:
                self.installed = {}
                raise NftError(err.strip() or f"cannot write map {self.name}")
        self.installed = dict(wanted)
        return stats

    def _script(self, deletes: list[int], add: Mapping[int, int]) -> str:
        target = f"{self.family} {self.table} {self.name}"
        lines = []
        for start in range(0, len(deletes), CHUNK):
            keys = ", ".join(str(b) for b in deletes[start : start + CHUNK])
            lines.append(f"delete element {target} {{ {keys} }}")
        items = list(add.items())
        for start in range(0, len(items), CHUNK):
            elems = ", ".join(f"{b} : {m:#010x}" for b, m in items[start : start + CHUNK])
            lines.append(f"add element {target} {{ {elems} }}")
        return "\n".join(lines) + "\n"
