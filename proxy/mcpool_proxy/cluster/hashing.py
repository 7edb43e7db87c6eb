"""Consistent hashing of CPEs onto pods: rendezvous (highest random weight) hashing.

Rendezvous hashing gives every (pod, key) pair a pseudo-random score and picks the pod with the
highest one. Adding or removing one of N pods moves only the keys whose winner changes, about
1/N of them, with no ring, no virtual nodes and no state: every director computes the same
answer from the same set of pod names. O(N) per decision, which is cheap for the tens of pods a
pool has. Pure functions; no I/O.

Initial SYNs are hashed in two steps so the kernel can take the first: the CPE address into one
of B buckets by the kernel's own jhash (nft `jhash ... mod B seed S`, reproduced by `jhash`), and
each bucket onto a pod by rendezvous (`bucket_owners`, `BucketHash.pick`).
"""

from __future__ import annotations

import functools
import hashlib
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MAX_BUCKETS", "BucketHash", "bucket_owners", "initial_pick", "jhash", "pool_seed", "rendezvous_score", "rendezvous_pick"]


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


# -- initial SYNs in buckets: the kernel's hash, reproduced ---------------------------------------
#
# The director's nftables table decides an initial SYN by `jhash <saddr> mod B seed S`, looked up
# in a bucket -> pod map that the director fills with rendezvous_pick(ready pods, bucket). nft's
# jhash is the kernel's jhash() (include/linux/jhash.h: Bob Jenkins' lookup3 with the initial
# value 0xdeadbeef) over the address bytes as they sit in the register (network order), and its
# `mod B` is reciprocal_scale (hash * B >> 32), not a remainder. Reproduced here so a SYN the
# kernel queued (its bucket not filled yet) is decided in userspace exactly as the kernel would
# have: tests/affinity/test_bucket_hash.py checks it against the kernel.

_M32 = 0xFFFFFFFF
MAX_BUCKETS = 65536
_JHASH_INITVAL = 0xDEADBEEF


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def jhash(data: bytes, seed: int) -> int:
    """The kernel's jhash(data, len(data), seed)."""
    length = len(data)
    a = b = c = (_JHASH_INITVAL + length + seed) & _M32
    k = data
    while length > 12:
        # __get_unaligned_cpu32: the CPU's byte order (little-endian on x86-64 and arm64).
        a = (a + int.from_bytes(k[0:4], sys.byteorder)) & _M32
        b = (b + int.from_bytes(k[4:8], sys.byteorder)) & _M32
        c = (c + int.from_bytes(k[8:12], sys.byteorder)) & _M32
        a = (a - c) & _M32; a ^= _rol32(c, 4); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rol32(a, 6); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rol32(b, 8); b = (b + a) & _M32  # noqa: E702
        a = (a - c) & _M32; a ^= _rol32(c, 16); c = (c + b) & _M32  # noqa: E702
        b = (b - a) & _M32; b ^= _rol32(a, 19); a = (a + c) & _M32  # noqa: E702
        c = (c - b) & _M32; c ^= _rol32(b, 4); b = (b + a) & _M32  # noqa: E702
        length -= 12
        k = k[12:]
    if length == 0:
        return c
    # The last block is added byte by byte, k[0] lowest, whatever the CPU's byte order.
    tail = k + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    c ^= b; c = (c - _rol32(b, 14)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 11)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & _M32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & _M32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & _M32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & _M32  # noqa: E702
    return c


def pool_seed(pool: str) -> int:
    """The bucket hash's seed of a pool: fixed by its name, so every director of the pool (on
    every node, after every restart) hashes a CPE into the same bucket."""
    return int.from_bytes(hashlib.blake2b(f"mcpool-buckets\x00{pool}".encode(), digest_size=4).digest(), "big")


@dataclass(frozen=True, slots=True)
class BucketHash:
    """`jhash <saddr> mod buckets seed seed`, as the director's nft rule computes it."""

    buckets: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be in 1..{MAX_BUCKETS}, not {self.buckets}")
        if not 0 <= self.seed <= _M32:
            raise ValueError(f"bucket seed must be a 32-bit value, not {self.seed}")

    def bucket(self, addr: str) -> int | None:
        """The bucket of a CPE address; None if it is not an IP address."""
        return _bucket(addr, self.buckets, self.seed)

    def pick(self, pods: Iterable[str], addr: str) -> str | None:
        """The pod a CPE address's initial SYN goes to: its bucket's rendezvous winner."""
        bucket = self.bucket(addr)
        return rendezvous_pick(pods, addr if bucket is None else str(bucket))


@functools.lru_cache(maxsize=1 << 16)
def _bucket(addr: str, buckets: int, seed: int) -> int | None:
    # Cached: a CPE's SYNs come again (each new connection), and the hash is ~60 Python operations.
    # inet_pton, not ipaddress: a tenth of the time on the director's hot path.
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    except (OSError, ValueError):
        return None
    return (jhash(packed, seed) * buckets) >> 32


@functools.lru_cache(maxsize=256)
def _bucket_scores(pod: str, buckets: int) -> tuple[int, ...]:
    # Per pod, not per pod set: a pod set that changes by one pod recomputes nothing for the others.
    return tuple(rendezvous_score(pod, str(b)) for b in range(buckets))


def bucket_owners(pods: Iterable[str], buckets: int) -> list[str | None]:
    """Owner of every bucket among `pods` (rendezvous_pick(pods, str(bucket)) for each), so a pod
    that leaves moves only its own buckets. None everywhere when there is no pod."""
    names = sorted(set(pods))  # ties go to the smaller name, as in rendezvous_pick
    owners: list[str | None] = [None] * buckets
    best = [-1] * buckets
    for pod in names:
        scores = _bucket_scores(pod, buckets)
        for b in range(buckets):
            if scores[b] > best[b]:
                best[b], owners[b] = scores[b], pod
    return owners


def initial_pick(pods: Iterable[str], addr: str, pool: str, buckets: int = 4096) -> str | None:
    """The pod a director of pool `pool` (with `buckets` buckets) sends a new CPE's initial SYN to,
    in the kernel or in userspace alike."""
    return BucketHash(buckets, pool_seed(pool)).pick(pods, addr)
