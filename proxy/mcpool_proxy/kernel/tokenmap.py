"""The director's MP_JOIN token map and CPE map in nftables, written in batches through libnftables.

The director's ruleset (kernel/steering.py) looks every MP_JOIN SYN up in the map `tokens`
(key: the receiver's token, `tcp option @30,32,32`; value: the owning pod's slot mark). A hit is
steered by the kernel alone: the SYN never reaches userspace, and the `remember` chain records the
subflow in the flow map like any queued decision. A miss falls through to the NFQUEUE rule.

`TokenMap` holds what it believes the kernel map contains and turns a wanted content into the
few element additions and deletions that differ, sent as one libnftables transaction per call
(chunked, so one transaction stays small). libnftables runs in process (the `nftables` module
of Debian's python3-nftables): one element costs ~0.1 ms, not the ~2 ms of an `nft` process.

Expiry, twice over: an entry is deleted when its token leaves the table (the pod's CLOSED event
makes the registry delete the token, the director's feed sees the delete), and each element also
carries a kernel timeout, so a map left behind by a director that died empties by itself. The
kernel does not extend an element's timeout when it is added again (measured on 6.18 with nft
1.0.6), so an entry older than half its timeout is deleted and re-added in the same transaction.

Keys are given as the token's integer value: nft puts the 32-bit payload field in network order
itself, and a token read with MPTCP_INFO (host order) is the same integer as the one a parser
reads big-endian from the SYN. The map's listing prints `type 0 : mark` (nft 1.0.6 cannot show a
raw-payload `typeof`), so the ruleset is never restored from a listing; the elements are read
back as JSON, which is exact.

The CPE map (`cpes`: CPE source address -> pod mark, looked up for initial SYNs) is the same kind
of map with addresses for keys: `CpeMap`, the same class with another key.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "CPE_MAP",
    "TOKEN_MAP",
    "CpeMap",
    "NftError",
    "SyncStats",
    "TimedMap",
    "TokenMap",
    "list_map",
    "open_nftables",
]

log = logging.getLogger("mcpool.affinity.tokenmap")

TOKEN_MAP = "tokens"
CPE_MAP = "cpes"
K = TypeVar("K", int, str)
# Elements per nft command: a batch of 10k tokens stays a few hundred kilobytes of text.
CHUNK = 2000


class NftError(RuntimeError):
    """libnftables refused a command (its message is the exception's text)."""


def open_nftables() -> Any:
    """A libnftables context (in process), or RuntimeError naming the missing package."""
    try:
        import nftables  # Debian python3-nftables, linked into the venv by scripts/install-deps.sh
    except ImportError as exc:
        raise RuntimeError(
            "python module nftables missing: install Debian package python3-nftables "
            "(scripts/install-deps.sh links it into the virtualenv)"
        ) from exc
    nft = nftables.Nftables()
    nft.set_json_output(False)
    nft.set_handle_output(False)
    return nft


def _element_key(key: Any) -> str:
    return json.dumps(key["elem"]["val"] if isinstance(key, dict) else key, sort_keys=True)


def list_map(nft: Any, family: str, table: str, name: str, *, attempts: int = 8) -> list[tuple[Any, Any]]:
    """The (key, value) elements of map `family table name`, from one consistent kernel listing.

    The kernel dumps a large hash set in several netlink messages and restarts its walk for each,
    skipping the elements already sent. If the hash table is resized in between (the kernel grows
    it in a background worker, for instance just after a big batch of additions), the skip lands
    elsewhere in the new order: some elements come twice and as many never come. Such a listing is
    recognised by its repeated keys and taken again; RuntimeError (NftError) if none is clean.
    """
    for attempt in range(attempts):
        nft.set_json_output(True)
        try:
            rc, out, err = nft.cmd(f"list map {family} {table} {name}")
        finally:
            nft.set_json_output(False)
        if rc != 0:
            raise NftError(err.strip() or f"cannot list map {name}")
        elements = [(key, value) for item in json.loads(out).get("nftables", [])
                    for key, value in item.get("map", {}).get("elem", [])]  # fmt: skip
        if len({_element_key(key) for key, _ in elements}) == len(elements):
            return elements
        log.info("map %s listed while the kernel resized it (%d repeated keys); listing it again",
                 name, len(elements) - len({_element_key(key) for key, _ in elements}))  # fmt: skip
        time.sleep(0.002 * (attempt + 1))  # the resize worker is running: give it a moment
    raise NftError(f"map {name}: no consistent listing in {attempts} attempts (the kernel kept resizing it)")


@dataclass
class SyncStats:
    """What one call changed in the kernel map."""

    added: int = 0
    removed: int = 0
    refreshed: int = 0
    batches: int = 0
    fallbacks: int = 0  # transactions refused and redone element by element


class TimedMap(Generic[K]):
    """A kernel map `inet TABLE NAME` of K -> mark whose elements time out, kept equal to what the
    caller wants it to hold."""

    default_name = ""

    def __init__(
        self,
        table: str,
        timeout_s: int = 3600,
        *,
        family: str = "inet",
        name: str = "",
        nft: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s < 2:
            raise ValueError("token map timeout_s must be at least 2")
        self.table, self.family, self.name = table, family, name or self.default_name
        self.timeout_s = timeout_s
        self._nft = nft if nft is not None else open_nftables()
        self._clock = clock
        self.installed: dict[K, int] = {}  # key -> mark, as last written
        self._written_at: dict[K, float] = {}  # key -> clock time its element was (re)added

    def _key_text(self, key: K) -> str:
        raise NotImplementedError

    def _parse_key(self, value: Any) -> K:
        raise NotImplementedError

    # -- reading the kernel ------------------------------------------------------------------

    def kernel_elements(self) -> dict[K, tuple[int, float]]:
        """key -> (mark, seconds until it expires) as the kernel holds them now."""
        elements: dict[K, tuple[int, float]] = {}
        for key, mark in list_map(self._nft, self.family, self.table, self.name):
            if isinstance(key, dict):  # {"elem": {"val": K, "timeout": T, "expires": E}}
                inner = key.get("elem", {})
                elements[self._parse_key(inner["val"])] = (int(mark), float(inner.get("expires", self.timeout_s)))
            else:
                elements[self._parse_key(key)] = (int(mark), float(self.timeout_s))
        return elements

    def load(self) -> int:
        """Adopt what the kernel map holds (a restarted director keeps a predecessor's entries
        steering until its first full sync); return how many."""
        now = self._clock()
        self.installed, self._written_at = {}, {}
        for token, (mark, expires) in self.kernel_elements().items():
            self.installed[token] = mark
            self._written_at[token] = now - max(0.0, self.timeout_s - expires)
        return len(self.installed)

    # -- writing -----------------------------------------------------------------------------

    def sync(self, wanted: Mapping[K, int]) -> SyncStats:
        """Make the map hold exactly `wanted` (key -> mark); refresh entries near expiry."""
        remove = [t for t in self.installed if t not in wanted]
        return self._write(wanted, list(wanted), remove)

    def update(self, wanted: Mapping[K, int], tokens: Iterable[K]) -> SyncStats:
        """Bring only `tokens` (keys) in line with `wanted` (absent from it: delete)."""
        tokens = list(dict.fromkeys(tokens))
        present = [t for t in tokens if t in wanted]
        remove = [t for t in tokens if t not in wanted and t in self.installed]
        return self._write(wanted, present, remove)

    def refresh_due(self) -> SyncStats:
        """Re-add every entry older than half its timeout (the kernel would expire it)."""
        return self._write(self.installed.copy(), [], [], refresh_only=True)

    def clear(self) -> None:
        rc, _, err = self._nft.cmd(f"flush map {self.family} {self.table} {self.name}")
        if rc != 0:
            raise NftError(err.strip())
        self.installed, self._written_at = {}, {}

    def _write(
        self, wanted: Mapping[K, int], candidates: list[K], remove: list[K], refresh_only: bool = False
    ) -> SyncStats:
        now = self._clock()
        stale_before = now - self.timeout_s / 2
        add: dict[K, int] = {}
        replace: list[K] = []  # in the kernel already: deleted first (a map's add keeps the old value)
        for token in self.installed if refresh_only else candidates:
            mark = wanted[token]
            current = self.installed.get(token)
            if current is None:
                add[token] = mark
            elif current != mark or self._written_at.get(token, now) < stale_before:
                replace.append(token)
                add[token] = mark
        stats = SyncStats(added=len(add) - len(replace), removed=len(remove))
        stats.refreshed = sum(1 for t in replace if self.installed[t] == add[t])
        if not add and not remove:
            return stats
        deletes = remove + replace
        script = self._script(deletes, add)
        stats.batches = 1
        rc, _, err = self._nft.cmd(script)
        if rc != 0:
            # One element of the batch was refused (most often: deleting one the kernel already
            # expired), so the whole transaction was. Redo it element by element, ignoring deletes
            # of what is gone; an add that still fails is an error for the caller.
            stats.fallbacks = 1
            log.debug("token map batch refused (%s); retrying element by element", err.strip()[:200])
            for token in deletes:
                self._nft.cmd(self._script([token], {}))
            failed = [t for t, m in add.items() if self._nft.cmd(self._script([], {t: m}))[0] != 0]
            if failed:
                for token in deletes:
                    self._forget(token)
                for token in add:
                    if token not in failed:
                        self._remember(token, add[token], now)
                raise NftError(f"cannot add {len(failed)} element(s) to map {self.name}, e.g. {self._key_text(failed[0])}")
        for token in deletes:
            self._forget(token)
        for token, mark in add.items():
            self._remember(token, mark, now)
        return stats

    def _remember(self, token: K, mark: int, now: float) -> None:
        self.installed[token] = mark
        self._written_at[token] = now

    def _forget(self, token: K) -> None:
        self.installed.pop(token, None)
        self._written_at.pop(token, None)

    def _script(self, deletes: list[K], add: Mapping[K, int]) -> str:
        target = f"{self.family} {self.table} {self.name}"
        lines = []
        for start in range(0, len(deletes), CHUNK):
            keys = ", ".join(self._key_text(t) for t in deletes[start : start + CHUNK])
            lines.append(f"delete element {target} {{ {keys} }}")
        items = list(add.items())
        for start in range(0, len(items), CHUNK):
            elems = ", ".join(f"{self._key_text(t)} timeout {self.timeout_s}s : {m:#010x}"
                              for t, m in items[start : start + CHUNK])  # fmt: skip
            lines.append(f"add element {target} {{ {elems} }}")
        return "\n".join(lines) + "\n"


class TokenMap(TimedMap[int]):
    """The kernel map `inet TABLE tokens`: MP_JOIN receiver token -> the owning pod's mark."""

    default_name = TOKEN_MAP

    def _key_text(self, key: int) -> str:
        return f"{key:#010x}"

    def _parse_key(self, value: Any) -> int:
        return int(value)


class CpeMap(TimedMap[str]):
    """The kernel map `inet TABLE cpes`: CPE source address -> the mark of the ready pod that holds
    its live connections (an initial SYN from it goes there, as `decide`'s cpe_hit)."""

    default_name = CPE_MAP

    def _key_text(self, key: str) -> str:
        return str(ipaddress.ip_address(key))

    def _parse_key(self, value: Any) -> str:
        return str(ipaddress.ip_address(str(value)))
