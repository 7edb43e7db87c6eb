"""The director's local copy of the affinity table, and the pure steering decision over it.

The director must decide a SYN without a network round trip, so it keeps pods, tokens and CPEs
in memory, fed by the entries of the pool's change stream (`apply_event`) and replaced wholesale
by a full read of Redis (`replace`) on (re)connect, on a gap in the stream and rarely for safety.
A pod that leaves (`pod del`, or its heartbeat ran out) takes its tokens and CPEs with it. `decide` is a pure function of a SYN and this table.
Nothing here does I/O; waiting for a late token is an asyncio.Event per awaited token, shared by
every join waiting for it and removed when the last of them leaves.

A full read right after Redis restarted is empty until the pods re-register (within one heartbeat
TTL): `replace(..., keep_missing_s=TTL)` keeps what such a snapshot lacks for that long, so
initial SYNs are not dropped and joins not missed meanwhile. Explicit `del` events still remove
entries at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .hashing import BucketHash
from .packet import Syn

__all__ = ["AffinityTable", "Decision", "Outcome", "PodEntry", "decide"]

Outcome = Literal[
    "hashed",  # initial subflow, new CPE: its bucket's rendezvous winner among ready pods
    "cpe_hit",  # initial subflow of a CPE the table already maps to a ready pod
    "token_hit",  # MP_JOIN whose token's owner is known
    "token_hit_after_wait",  # MP_JOIN whose token arrived during the bounded wait
    "token_miss_after_wait",  # MP_JOIN still unknown after the wait: dropped (client retries)
    "collision",  # MP_JOIN for a token two pods hold: steered to the first owner
    "no_ready_pod",  # initial subflow with no ready pod: dropped
    "wait",  # not final: the caller waits for the token, then decides again with waited=True
]


@dataclass(frozen=True, slots=True)
class PodEntry:
    name: str
    addr: str
    state: str  # "ready" | "draining"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    pod: str | None  # None: drop the SYN

    @property
    def final(self) -> bool:
        return self.outcome != "wait"


class _TokenWaiter(asyncio.Event):
    """The event the joins waiting for one token share, and how many of them wait."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0


class AffinityTable:
    """Pods, token owners, CPE owners and known collisions, as last learned from Redis.

    `hashing` is how a new CPE is hashed into a bucket: the director's nft rule's parameters, so
    `decide` picks the pod the kernel's bucket map would have."""

    def __init__(self, hashing: BucketHash | None = None) -> None:
        self.hashing = hashing if hashing is not None else BucketHash()
        self.pods: dict[str, PodEntry] = {}
        self.tokens: dict[int, str] = {}
        self.cpes: dict[str, str] = {}
        self.collided: set[int] = set()
        self._token_waiters: dict[int, _TokenWaiter] = {}
        # (kind, key) -> time it was first missing from a snapshot while kept (see replace)
        self._missing_since: dict[tuple[str, object], float] = {}
        self.version = 0  # bumped whenever the pod set changes (the kernel plumbing follows it)

    def ready_pods(self) -> list[str]:
        return [p.name for p in self.pods.values() if p.state == "ready"]

    def replace(
        self,
        pods: Mapping[str, PodEntry],
        tokens: Mapping[int, str],
        cpes: Mapping[str, str],
        *,
        now: float = 0.0,
        keep_missing_s: float = 0.0,
    ) -> None:
        """Install a full snapshot (periodic resync); collisions seen so far are kept.

        With `keep_missing_s` > 0, an entry this table has but the snapshot lacks stays until it
        has been missing for `keep_missing_s` (clock: `now`); with 0 it goes at once.
        """
        new_pods = self._merge("pod", self.pods, pods, now, keep_missing_s)
        if new_pods != self.pods:
            self.version += 1
        self.pods = new_pods
        self.tokens = self._merge("token", self.tokens, tokens, now, keep_missing_s)
        self.cpes = self._merge("cpe", self.cpes, cpes, now, keep_missing_s)
        self.collided &= set(self.tokens)
        for token in list(self._token_waiters):
            if token in self.tokens:
                self._token_waiters.pop(token).set()

    def _merge(self, kind: str, old: Mapping[Any, Any], snapshot: Mapping[Any, Any], now: float,
               keep_missing_s: float) -> dict[Any, Any]:  # fmt: skip
        merged = dict(snapshot)
        for key in snapshot:
            self._missing_since.pop((kind, key), None)
        for key, value in old.items():
            if key in merged:
                continue
            since = self._missing_since.setdefault((kind, key), now)
            if keep_missing_s > 0 and now - since < keep_missing_s:
                merged[key] = value
            else:
                del self._missing_since[(kind, key)]
        return merged

    def apply_event(self, event: Mapping[str, Any]) -> None:
        """Apply one registry event (JSON from the pool's events channel); ignore unknown ones."""
        kind, op = event.get("t"), event.get("op")
        pod = str(event.get("pod", ""))
        if kind == "token" and "token" in event:
            token = int(str(event["token"]), 16)
            if op == "add":
                self.tokens[token] = pod
                waiter = self._token_waiters.pop(token, None)
                if waiter is not None:
                    waiter.set()
            elif op == "del" and self.tokens.get(token) == pod:
                del self.tokens[token]
                self.collided.discard(token)
        elif kind == "cpe" and "cpe" in event:
            cpe = str(event["cpe"])
            if op == "add":
                self.cpes[cpe] = pod
            elif op == "del" and self.cpes.get(cpe) == pod:
                del self.cpes[cpe]
        elif kind == "pod" and pod:
            if op == "add":
                entry = PodEntry(pod, str(event.get("addr", "")), str(event.get("state", "ready")))
                if self.pods.get(pod) != entry:
                    self.pods[pod] = entry
                    self.version += 1
            elif op == "del":
                if self.pods.pop(pod, None) is not None:
                    self.version += 1
                self.drop_orphans()
        elif kind == "collision" and "token" in event:
            token = int(str(event["token"]), 16)
            self.collided.add(token)
            self.tokens.setdefault(token, str(event.get("owner", "")))
            # A held join of this token can be decided now (it goes to the first owner).
            waiter = self._token_waiters.pop(token, None)
            if waiter is not None:
                waiter.set()

    def drop_orphans(self) -> None:
        """Forget tokens and CPEs whose owner is not a pod of the table (they steer nothing:
        `decide` ignores them; a pod that comes back registers them again)."""
        for token in [t for t, owner in self.tokens.items() if owner not in self.pods]:
            del self.tokens[token]
            self.collided.discard(token)
        for cpe in [c for c, owner in self.cpes.items() if owner not in self.pods]:
            del self.cpes[cpe]

    async def wait_for_token(self, token: int, timeout_s: float) -> None:
        """Return when `token` is in the table or `timeout_s` has passed."""
        if token in self.tokens or timeout_s <= 0:
            return
        waiter = self._token_waiters.setdefault(token, _TokenWaiter())
        waiter.count += 1
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout_s)
        finally:
            # The event is shared: only the last join to stop waiting may remove it, or the
            # token's arrival would no longer wake the joins still waiting.
            waiter.count -= 1
            if waiter.count == 0 and self._token_waiters.get(token) is waiter:
                del self._token_waiters[token]


def decide(syn: Syn, table: AffinityTable, *, waited: bool = False) -> Decision:
    """Where a queued SYN goes. Joins follow their token; initial subflows follow the CPE.

    A draining pod takes no new initial subflows but keeps receiving the joins of connections
    it owns; a pod missing from the table (heartbeat expired) receives nothing. A new CPE goes to
    its bucket's owner (`table.hashing`): the same pod the kernel's bucket map holds for the same
    ready pods, so a SYN queued only because the map was not written yet lands where the kernel
    will send the CPE's next one.
    """
    if syn.join_token is not None:
        owner = table.tokens.get(syn.join_token)
        if owner is not None and owner in table.pods:
            if syn.join_token in table.collided:
                return Decision("collision", owner)
            return Decision("token_hit_after_wait" if waited else "token_hit", owner)
        if not waited:
            return Decision("wait", None)
        return Decision("token_miss_after_wait", None)
    ready = table.ready_pods()
    if not ready:
        return Decision("no_ready_pod", None)
    known = table.cpes.get(syn.src)
    if known is not None and known in ready:
        return Decision("cpe_hit", known)
    return Decision("hashed", table.hashing.pick(ready, syn.src))
