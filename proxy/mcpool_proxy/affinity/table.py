"""The director's local copy of the affinity table, and the pure steering decision over it.

The director must decide a SYN without a network round trip, so it keeps pods, tokens and CPEs
in memory, fed by the registry's pub/sub events (`apply_event`) and replaced wholesale by a
periodic full read of Redis (`replace`). `decide` is a pure function of a SYN and this table.
Nothing here does I/O; waiting for a late token is an asyncio.Event per awaited token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .hashing import rendezvous_pick
from .packet import Syn

__all__ = ["AffinityTable", "Decision", "Outcome", "PodEntry", "decide"]

Outcome = Literal[
    "hashed",  # initial subflow, new CPE: rendezvous hash over ready pods
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


class AffinityTable:
    """Pods, token owners, CPE owners and known collisions, as last learned from Redis."""

    def __init__(self) -> None:
        self.pods: dict[str, PodEntry] = {}
        self.tokens: dict[int, str] = {}
        self.cpes: dict[str, str] = {}
        self.collided: set[int] = set()
        self._token_waiters: dict[int, asyncio.Event] = {}
        self.version = 0  # bumped whenever the pod set changes (the kernel plumbing follows it)

    def ready_pods(self) -> list[str]:
        return [p.name for p in self.pods.values() if p.state == "ready"]

    def replace(
        self,
        pods: Mapping[str, PodEntry],
        tokens: Mapping[int, str],
        cpes: Mapping[str, str],
    ) -> None:
        """Install a full snapshot (periodic resync); collisions seen so far are kept."""
        if dict(pods) != self.pods:
            self.version += 1
        self.pods = dict(pods)
        self.tokens = dict(tokens)
        self.cpes = dict(cpes)
        self.collided &= set(self.tokens)
        for token in list(self._token_waiters):
            if token in self.tokens:
                self._token_waiters.pop(token).set()

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
            elif op == "del" and self.pods.pop(pod, None) is not None:
                self.version += 1
        elif kind == "collision" and "token" in event:
            token = int(str(event["token"]), 16)
            self.collided.add(token)
            self.tokens.setdefault(token, str(event.get("owner", "")))
            # A held join of this token can be decided now (it goes to the first owner).
            waiter = self._token_waiters.pop(token, None)
            if waiter is not None:
                waiter.set()

    async def wait_for_token(self, token: int, timeout_s: float) -> None:
        """Return when `token` is in the table or `timeout_s` has passed."""
        if token in self.tokens or timeout_s <= 0:
            return
        waiter = self._token_waiters.setdefault(token, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout_s)
        if not waiter.is_set() and self._token_waiters.get(token) is waiter:
            del self._token_waiters[token]


def decide(syn: Syn, table: AffinityTable, *, waited: bool = False) -> Decision:
    """Where a queued SYN goes. Joins follow their token; initial subflows follow the CPE.

    A draining pod takes no new initial subflows but keeps receiving the joins of connections
    it owns; a pod missing from the table (heartbeat expired) receives nothing.
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
    return Decision("hashed", rendezvous_pick(ready, syn.src))
