"""The Redis key schema of the affinity table, named once for the registry and the director.

Every key of a pool carries the pool name in braces (`mcpool:{pool}:...`): that is a Redis
Cluster hash tag, so all keys of one pool live in one slot and the registration Lua script may
touch several of them atomically. See docs/affinity.md for the schema and its lifetimes.

The changes themselves travel on one Redis Stream per pool (`feed`): every entry carries a
sequence number from `seq`, so a director that sees a number other than the one it expects knows
it missed entries (the stream was trimmed past it, deleted, or Redis restarted empty).
"""

from __future__ import annotations

__all__ = ["KeySchema", "token_hex"]


def token_hex(token: int) -> str:
    """A 32-bit MPTCP token as the 8 lowercase hex digits used in keys and events."""
    return f"{token & 0xFFFFFFFF:08x}"


class KeySchema:
    """Key names for one pool."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.prefix = f"mcpool:{{{pool}}}:"

    def pod(self, name: str) -> str:
        return f"{self.prefix}pod:{name}"

    def token(self, token: int) -> str:
        return f"{self.prefix}token:{token_hex(token)}"

    def cpe(self, address: str) -> str:
        return f"{self.prefix}cpe:{address}"

    def owned(self, name: str) -> str:
        """The set of what pod `name` holds (`t:<token hex>`, `c:<CPE>`): reaped when it dies."""
        return f"{self.prefix}owned:{name}"

    @property
    def pods(self) -> str:
        """The set of pod names that have registered (what the reaper walks: O(pods), not O(keys))."""
        return f"{self.prefix}pods"

    @property
    def feed(self) -> str:
        """The pool's change stream (XADD by the pods' scripts, XREAD by the directors)."""
        return f"{self.prefix}feed"

    @property
    def seq(self) -> str:
        """The counter numbering the feed's entries (`n` field), one increment per entry."""
        return f"{self.prefix}seq"

    @property
    def pod_pattern(self) -> str:
        return f"{self.prefix}pod:*"

    @property
    def token_pattern(self) -> str:
        return f"{self.prefix}token:*"

    @property
    def cpe_pattern(self) -> str:
        return f"{self.prefix}cpe:*"

    def suffix(self, key: str, kind: str) -> str:
        """The part of `key` after `mcpool:{pool}:KIND:`."""
        head = f"{self.prefix}{kind}:"
        return key[len(head) :] if key.startswith(head) else key
