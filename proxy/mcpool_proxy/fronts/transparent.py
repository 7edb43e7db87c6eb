"""The transparent front (implicit mode): the MCP on the CPE's path terminates an MPTCP connection
the kernel handed it by TPROXY (`kernel/tproxy.py`), and nothing is read from the client.

The original destination is the accepted socket's own local address (`getsockname()` of an
IP_TRANSPARENT socket is the address the client connected to). The policy checks it like any
other front's destination; every refusal is a reset, since the client asked nothing it could be
answered in: to the CPE's converter (and its LAN host) the connection looks refused by the server.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from ..kernel.mptcp import reset_on_close
from ..policy import Refusal, address_text, normalize_address
from .base import Destination, Front, Handshake

if TYPE_CHECKING:
    from ..upstream import UpstreamError

__all__ = ["TransparentFront", "original_destination"]


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the client meant to go: the local address of a TPROXY-accepted socket."""
    local = sock.getsockname()
    return address_text(str(local[0])), int(local[1])


class TransparentFront(Front[Destination]):
    protocol = "transparent"

    def _refuse(self, hs: Handshake, error: str, detail: str, refusal: Refusal | None = None) -> None:
        hs.count_error(error)
        hs.count_refusal(refusal)
        hs.log_refusal(error, detail)
        hs.trace.error_sent("transparent", error, None, detail)
        hs.answered = True
        # The pipeline closes the socket: with SO_LINGER 0 that close is a reset.
        reset_on_close(hs.sock)

    async def refuse_at_accept(self, hs: Handshake, refusal: Refusal) -> None:
        self._refuse(hs, "not_allowed", refusal.detail, refusal)

    async def handshake(self, hs: Handshake) -> Destination | None:
        try:
            host, port = original_destination(hs.sock)
        except OSError as exc:
            hs.count_error("client_closed")
            hs.log_refusal("client_closed", f"no original destination: {exc}")
            return None
        hs.set_destination(host, port)
        addr = normalize_address(host)
        refusal = hs.policy.check_destination(addr, port)
        if refusal is not None:
            self._refuse(hs, "not_allowed", refusal.detail, refusal)
            return None
        return Destination([addr], port)

    async def refuse_over_limit(self, hs: Handshake, dest: Destination, refusal: Refusal) -> None:
        self._refuse(hs, "resource_exceeded", refusal.detail, refusal)

    async def refuse_upstream(self, hs: Handshake, dest: Destination, error: UpstreamError) -> None:
        self._refuse(hs, error.reason, error.detail)

    async def answer_connected(self, hs: Handshake, dest: Destination, upstream: socket.socket) -> None:
        # Nothing to say: the client's handshake completed with the kernel at accept.
        return None
