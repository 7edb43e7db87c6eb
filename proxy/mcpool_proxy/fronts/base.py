"""What every front shares: the `Front` interface, the `Destination` it hands the pipeline, and
the `Handshake` of one accepted connection (its socket, its trace, and the reading, answering,
counting and logging every front does the same way).

A front never connects upstream, never relays and never closes the client's socket: the pipeline
in `server.py` does, so each of those is written once for every way in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..policy import IPAddress, Policy, Refusal, format_endpoint

if TYPE_CHECKING:
    from ..config import ProxyConfig
    from ..observe.metrics import ProxyMetrics
    from ..observe.telemetry import ConnectionTrace
    from ..resolver import Resolver
    from ..upstream import UpstreamError

__all__ = ["ClientGone", "Destination", "Front", "Handshake", "Oversize"]

log = logging.getLogger("mcpool.proxy")

# After a refusal the proxy half-closes and reads (discarding) for this long before closing:
# closing a socket with unread input sends RST, which can destroy the answer in flight.
_REFUSAL_LINGER_S = 1.0


class ClientGone(Exception):
    """The client closed before completing its handshake."""


class Oversize(Exception):
    """A handshake message longer than policy.max_handshake_bytes."""


@dataclass(eq=False, slots=True)
class Destination:
    """Where a client may go, once its front has read the request and asked the policy.

    `candidates` are the addresses the policy allows, tried in order until one connects (a
    Convert request names one address; a SOCKS5 name may resolve to several); `requested` is the
    name the client asked for, if it asked by name; `tcp_mss` and `early_data` say how to open
    the upstream (see the fields).
    """

    candidates: list[IPAddress]
    port: int
    requested: str | None = None
    # What the client asked of the upstream SYN (a Convert Connect TLV's TCP options): the MSS to
    # announce (TCP_MAXSEG), None for the kernel's.
    tcp_mss: int | None = None
    # Bytes the client's own SYN carried past its request (TCP Fast Open): the upstream is opened
    # with TCP Fast Open too, with these in its SYN where the server's cookie allows; what does not
    # fit goes first in the relay.
    early_data: bytes = b""


D = TypeVar("D", bound=Destination)


@dataclass(eq=False, slots=True)
class Handshake:
    """One accepted connection until it reaches the relay (or does not): what its handshake
    learnt, for its span and counters, and the I/O every front does the same way."""

    sock: socket.socket
    client: tuple[str, int]
    protocol: str
    trace: ConnectionTrace
    policy: Policy
    config: ProxyConfig
    metrics: ProxyMetrics
    resolver: Resolver
    error: str | None = None  # the handshake_errors label, once it failed
    answered: bool = False  # an error answer (Convert Error TLV, SOCKS5 reply) was sent
    destination: tuple[str, int] | None = None
    requested: str | None = None
    started: float = field(default_factory=time.monotonic)  # accept, for the handshake latency
    # How long a refusal may linger reading what the client still sends (see close_after_answer);
    # the pipeline sets 0 when too many refusals linger already (a flood: see server.py).
    linger_s: float = _REFUSAL_LINGER_S
    # The proxy's loop, when the pipeline knows it: asyncio.get_running_loop() costs a getpid()
    # system call per call on Python 3.11, several times per connection.
    loop: asyncio.AbstractEventLoop | None = None
    # Bytes read past the handshake's last message (read_message with `spill`): the client's
    # first bytes for the server, which the relay sends upstream before anything else.
    pending: bytes = b""

    def deadline(self, timeout_s: float | None = None) -> float:
        """The loop time by which the client's messages must be complete."""
        limit = self.config.policy.handshake_timeout_s if timeout_s is None else timeout_s
        return (self.loop or asyncio.get_running_loop()).time() + limit

    def count_error(self, error: str) -> None:
        """Count a handshake that ended without a relay, and remember why for its span."""
        self.metrics.child(self.metrics.handshake_errors, self.protocol, error).inc()
        self.error = error

    def count_refusal(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            self.metrics.child(self.metrics.policy_refusals, refusal.reason).inc()

    def log_refusal(self, error: str, detail: str, **fields: Any) -> None:
        trace = self.trace
        if trace.trace_id is not None:
            fields.update(trace_id=trace.trace_id, span_id=trace.span_id)
        log.info(
            "refused: %s",
            detail,
            extra={"fields": {"protocol": self.protocol, "client": format_endpoint(*self.client), "error": error,
                              **fields}},
        )

    def set_destination(self, host: str, port: int, requested: str | None = None) -> None:
        self.destination = (host, port)
        self.trace.set_destination(host, port, requested)

    async def send(self, data: bytes) -> None:
        # A handshake answer fits the empty send buffer of a new connection: one send, no
        # future; only what the kernel did not take goes the awaiting way.
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            await asyncio.get_running_loop().sock_sendall(self.sock, data[sent:])

    async def read_message(self, length_of: Callable[[bytes], int], deadline: float, *, spill: int = 0) -> bytes:
        """Read exactly one message whose length `length_of` reveals as its prefix arrives.

        Without `spill`, never reads past it: bytes the client sent after its handshake belong
        to the relay. With `spill` (the handshake's last message, when nothing else must be told
        apart from what follows it), the first read may take up to `spill` bytes: what it took
        past the message is kept in `pending` for the relay, in order (one read instead of the
        message's two and the relay's first)."""
        sock = self.sock
        limit = self.config.policy.max_handshake_bytes

        def missing(buf: bytes) -> int:
            """How many more bytes the message needs (0: complete)."""
            need = length_of(buf)
            if need > limit:
                raise Oversize(f"handshake message of {need} bytes exceeds policy.max_handshake_bytes ({limit})")
            return max(need - len(buf), 0)

        def append(buf: bytes, chunk: bytes) -> bytes:
            if not chunk:
                raise ClientGone(f"client closed after {len(buf)} handshake bytes")
            return buf + chunk

        def complete(buf: bytes) -> bytes:
            need = length_of(buf)
            if len(buf) > need:
                self.pending = buf[need:]
                return buf[:need]
            return buf

        buf = b""
        # The message is usually in the socket already (it came with or right after the SYN):
        # read what is there without a timeout context and an awaited recv, which cost more than
        # the reads themselves; only a message still on its way takes the awaiting path.
        size = spill
        while want := missing(buf):
            try:
                chunk = sock.recv(max(want, size))
            except (BlockingIOError, InterruptedError):
                break
            size = 0  # only a first read may take more than the message
            buf = append(buf, chunk)
        else:
            return complete(buf)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            while want := missing(buf):
                buf = append(buf, await loop.sock_recv(sock, want))
        return complete(buf)

    async def close_after_answer(self) -> None:
        """Half-close, discard what the client still sends (briefly); the pipeline closes."""
        loop = asyncio.get_running_loop()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            if self.linger_s <= 0:
                return
            async with asyncio.timeout(self.linger_s):
                while await loop.sock_recv(self.sock, 4096):
                    pass
        except (TimeoutError, OSError):
            pass


class Front(ABC, Generic[D]):
    """One way into the proxy: reads the client's request with its codec, asks the policy, and
    answers in its own protocol. See the package docstring for the order of the calls."""

    #: The listener's name in `listen.*`, the `protocol`/`mode` label of metrics and logs, and
    #: the name of the connection's span.
    protocol: ClassVar[str]

    @abstractmethod
    async def refuse_at_accept(self, hs: Handshake, refusal: Refusal) -> None:
        """Answer a client refused before its handshake (policy.allowed_cpes, max_handshakes)."""

    @abstractmethod
    async def handshake(self, hs: Handshake) -> D | None:
        """Read the request, check it against the policy; the destination, or None when the
        connection ends here (already answered, counted and logged)."""

    @abstractmethod
    async def refuse_over_limit(self, hs: Handshake, dest: D, refusal: Refusal) -> None:
        """Answer a client whose connection slot the policy refused (policy.acquire)."""

    @abstractmethod
    async def refuse_upstream(self, hs: Handshake, dest: D, error: UpstreamError) -> None:
        """Answer a client whose destination could not be reached (the last attempt's error)."""

    @abstractmethod
    async def answer_connected(self, hs: Handshake, dest: D, upstream: socket.socket) -> None:
        """Tell the client its connection is open; raises OSError if the client is gone."""
