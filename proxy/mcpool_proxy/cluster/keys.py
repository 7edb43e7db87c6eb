"""The Redis key schema of the affinity table, named once for the registry and the director.

Every key of a pool carries the pool name in braces (`mcpool:{pool}:...`): that is a Redis
Cluster hash tag, so all keys of one pool live in one slot and the registration Lua script may
touch several of them atomically. See docs/affinity.md for the schema and its lifetimes.
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

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

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
