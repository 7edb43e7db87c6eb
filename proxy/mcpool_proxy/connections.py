"""The table of live relayed connections: what `/connections` lists and what drain waits for.

One `Connection` per relayed client connection, from the moment its upstream is connected until
its relay ends. Kernel views (MPTCP token, subflows) are read when asked, not stored, so the table
costs nothing per byte and reports the subflows as they are now.

Observers (`ConnectionObserver`) are told when a connection opens and closes; the affinity registry
and telemetry hook in there without the server knowing them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .kernel.mptcp import get_mptcp_info, get_subflows
from .observe.telemetry import NOOP_TRACE, ConnectionTrace
from .policy import format_endpoint
from .relay import Relay

__all__ = ["Connection", "ConnectionObserver", "ConnectionTable"]

Mode = Literal["convert", "socks5", "transparent"]


@dataclass(eq=False)
class Connection:
    id: int
    mode: Mode
    client: tuple[str, int]
    destination: tuple[str, int]
    relay: Relay
    requested: str | None = None  # the name a SOCKS5 client asked for, when it was a domain
    token: str | None = None  # MPTCP token at open (None: TCP or fallback); describe() reads it live
    mptcp: bool = False  # the client connection was MPTCP (not TCP, not fallen back) at open
    trace: ConnectionTrace = NOOP_TRACE  # its span, ended when the relay ends
    started_monotonic: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """The `/connections` entry: kernel views read now from the client socket."""
        sock = self.relay.client
        token: str | None = None
        subflows: list[dict[str, Any]] = []
        if sock.fileno() >= 0:
            info = get_mptcp_info(sock)
            if info is not None and not info.fallback:
                token = info.token_hex
                for sf in get_subflows(sock):
                    subflows.append(
                        {
                            "local": format_endpoint(*sf.local),
                            "remote": format_endpoint(*sf.remote),
                            "bytes_sent": sf.bytes_sent,
                            "bytes_received": sf.bytes_received,
                            "rtt_us": sf.rtt_us,
                        }
                    )
        entry: dict[str, Any] = {
            "id": self.id,
            "mode": self.mode,
            "token": token,
            "client": format_endpoint(*self.client),
            "destination": format_endpoint(*self.destination),
            "subflows": subflows,
            "bytes_up": self.relay.bytes_up,
            "bytes_down": self.relay.bytes_down,
            "relay": "splice" if self.relay.spliced else "buffered",
            "age_s": round(time.monotonic() - self.started_monotonic, 3),
        }
        if self.requested is not None:
            entry["requested"] = self.requested
        return entry


class ConnectionObserver(Protocol):
    def opened(self, conn: Connection) -> None: ...

    def closed(self, conn: Connection, reason: str) -> None: ...


class ConnectionTable:
    """Live connections by id."""

    def __init__(self) -> None:
        self._by_id: dict[int, Connection] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, conn: Connection) -> None:
        self._by_id[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        self._by_id.pop(conn.id, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def totals(self) -> tuple[int, int, int]:
        """(live connections, bytes up, bytes down) over live connections."""
        up = down = 0
        for conn in self._by_id.values():
            up += conn.relay.bytes_up
            down += conn.relay.bytes_down
        return len(self._by_id), up, down
