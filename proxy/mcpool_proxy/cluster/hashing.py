"""Consistent hashing of CPEs onto pods: rendezvous (highest random weight) hashing.

Rendezvous hashing gives every (pod, key) pair a pseudo-random score and picks the pod with the
highest one. Adding or removing one of N pods moves only the keys whose winner changes, about
1/N of them, with no ring, no virtual nodes and no state: every director computes the same
answer from the same set of pod names. O(N) per decision, which is cheap for the tens of pods a
pool has. Pure functions; no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["rendezvous_score", "rendezvous_pick"]


def rendezvous_score(pod: str, key: str) -> int:
    # blake2b is keyed by nothing secret: the point is a stable, well-mixed 64-bit value that is
    # identical across processes (Python's hash() is salted per process, so it cannot be used).
    digest = hashlib.blake2b(f"{pod}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_pick(pods: Iterable[str], key: str) -> str | None:
    """The pod that owns `key` among `pods`, or None when there is no pod."""
    best: str | None = None
    best_score = -1
    for pod in pods:
        score = rendezvous_score(pod, key)
        # Ties are astronomically rare; break them by name so every director agrees.
        if score > best_score or (score == best_score and best is not None and pod < best):
            best, best_score = pod, score
    return best
