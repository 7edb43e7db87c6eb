"""Cluster affinity: every subflow of an MPTCP connection reaches the pod that owns it.

- `registry`: pods publish themselves and their connections' tokens (memory or Redis backend).
- `podside`: what one pod does (register, publish tokens from the kernel's MPTCP events).
- `table`, `hashing`, `packet`: the director's pure decision logic.
- `director`: the director process (its kernel objects: `mcpool_proxy.kernel.steering`).
See docs/affinity.md.
"""

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
    "PodState",
    "RedisRegistry",
    "RegistrationResult",
    "RegistryMetrics",
    "make_registry",
    "resolve_pod_name",
]
