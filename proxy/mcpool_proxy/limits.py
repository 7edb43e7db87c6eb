"""Per-client (per-CPE) admission caps, applied by the pipeline to every front before it reads a
byte: how many of one client's connections may be in their handshake at once, and how fast one
client may open new connections (a token bucket).

Both exist so that one allowed CPE, faulty or hostile, cannot take every `policy.max_handshakes`
slot or the accept loop for everyone else. Like `policy.py` this module only decides: no I/O, the
clock is passed in (or read from `time.monotonic`), and every "no" is a `policy.Refusal` whose
reason is one of `RESOURCE_REASONS` (metric label values), which the fronts answer as a resource
problem (Convert Resource Exceeded, a SOCKS5 method refusal) rather than as a policy "no".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import LimitsConfig
from .policy import IPAddress, Refusal

__all__ = ["CPE_HANDSHAKES", "CPE_RATE", "MAX_HANDSHAKES", "RESOURCE_REASONS", "ClientLimits"]

# Refusal reasons (stable metric label values).
MAX_HANDSHAKES = "max_handshakes"  # policy.max_handshakes: all clients together
CPE_HANDSHAKES = "cpe_handshakes"  # limits.max_handshakes_per_cpe
CPE_RATE = "cpe_rate"  # limits.new_connections_per_cpe_per_s
RESOURCE_REASONS = frozenset({MAX_HANDSHAKES, CPE_HANDSHAKES, CPE_RATE})

# Buckets kept at most; beyond, full buckets (clients quiet for long enough) are forgotten, which
# changes nothing for them: a new bucket starts full too.
_MAX_BUCKETS = 65_536


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class ClientLimits:
    """The caps of one proxy. `admit(client)` when a connection is accepted (None: it may start
    its handshake, and `handshake_done(client)` must follow exactly once), else the Refusal."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._rate = config.new_connections_per_cpe_per_s
        self._burst = float(config.new_connections_burst_per_cpe)
        self._handshakes: dict[IPAddress, int] = {}
        self._buckets: dict[IPAddress, _Bucket] = {}

    def admit(self, client: IPAddress) -> Refusal | None:
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[client] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return Refusal(
                CPE_RATE,
                f"client {client} opens connections faster than limits.new_connections_per_cpe_per_s "
                f"({self._rate:g}/s, burst {self.config.new_connections_burst_per_cpe})",
            )
        in_progress = self._handshakes.get(client, 0)
        if in_progress >= self.config.max_handshakes_per_cpe:
            return Refusal(
                CPE_HANDSHAKES,
                f"client {client} has {in_progress} connections in their handshake "
                f"(limits.max_handshakes_per_cpe={self.config.max_handshakes_per_cpe})",
            )
        bucket.tokens -= 1.0
        self._handshakes[client] = in_progress + 1
        return None

    def handshake_done(self, client: IPAddress) -> None:
        current = self._handshakes.get(client, 0)
        if current <= 1:
            self._handshakes.pop(client, None)
        else:
            self._handshakes[client] = current - 1

    def handshakes_of(self, client: IPAddress) -> int:
        return self._handshakes.get(client, 0)

    def _forget_full(self, now: float) -> None:
        full = [
            addr for addr, b in self._buckets.items() if b.tokens + (now - b.stamp) * self._rate >= self._burst
        ]
        for addr in full:
            del self._buckets[addr]
        if len(self._buckets) >= _MAX_BUCKETS:
            # Everyone is busy: forget the oldest half rather than grow without bound.
            for addr in sorted(self._buckets, key=lambda a: self._buckets[a].stamp)[: _MAX_BUCKETS // 2]:
                del self._buckets[addr]
