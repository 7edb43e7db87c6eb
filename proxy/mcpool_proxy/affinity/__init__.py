"""Cluster affinity: every subflow of an MPTCP connection reaches the pod that owns it.

- `registry`: pods publish themselves and their connections' tokens (memory or Redis backend).
- `mptcp_events`: the kernel's MPTCP netlink events, the earliest source of a new token.
- `table`, `hashing`, `packet`: the director's pure decision logic.
- `director`, `kernel`: the director process and the kernel objects it manages.
See docs/affinity.md.
"""

from .mptcp_events import MptcpEvent, MptcpEventListener, publish_tokens
from .registry import (
    AffinityRegistry,
    MemoryRegistry,
    MemoryStore,
    PodState,
    RedisRegistry,
    RegistrationResult,
    RegistryMetrics,
    make_registry,
    resolve_pod_name,
)

__all__ = [
    "AffinityRegistry",
    "MemoryRegistry",
    "MemoryStore",
    "MptcpEvent",
    "MptcpEventListener",
    "PodState",
    "RedisRegistry",
    "RegistrationResult",
    "RegistryMetrics",
    "make_registry",
    "publish_tokens",
    "resolve_pod_name",
]
