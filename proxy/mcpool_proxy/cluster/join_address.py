"""The per-pod join address mechanism (`affinity.mechanism: join-address`), in the pod's namespace.

The pod sets `net.mptcp.allow_join_initial_addr_port=0`, so its MP_CAPABLE carries the C bit
(RFC 8684 3.1): clients must not open extra subflows to the address they first connected to
(the shared VIP). It then announces its own address (ADD_ADDR) through an in-kernel path
manager `signal` endpoint, so every extra subflow goes straight to this pod and no shared state
or director decision is needed for joins. The in-kernel PM can announce only local addresses, so
`affinity.join_address` must be an address of this pod.

Client requirement (measured on 6.18, documented for CPE vendors in docs/affinity.md): the CPE's
extra endpoints must be `fullmesh` (or 6.18's `laminar`) and `add_addr_accepted >= 1`; with plain
`subflow` endpoints the client opens its extra subflow from its default link only.

Kernel objects are managed through `kernel.path_manager` (iproute2's `ip mptcp`) and
`kernel.sysctl`, at start and stop only; this module never raises into the proxy: failures are logged
and reported by `active`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from ..config import split_hostport
from ..kernel.path_manager import add_signal_endpoint, delete_endpoint, find_signal_endpoint
from ..kernel.sysctl import SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, read_sysctl, write_sysctl

__all__ = ["JoinAddress"]

log = logging.getLogger("mcpool.affinity.join_address")


class JoinAddress:
    """Set up the C flag and the `signal` endpoint at `start()`, undo both at `stop()`."""

    def __init__(self, join_address: str, listen_ports: Collection[int]) -> None:
        self.join_address = join_address
        self.listen_ports = frozenset(listen_ports)
        self.host, self.port = split_hostport(join_address)
        self.endpoint_id: int | None = None
        self.active = False
        self._sysctl_before: str | None = None

    def start(self) -> bool:
        """Apply both; True when the pod now announces its join address with the C flag set."""
        self._sysctl_before = read_sysctl(SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT)
        if self._sysctl_before is None:
            log.error("%s missing (kernel < 5.14?): join-address cannot work", SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT)
            return False
        if not write_sysctl(SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, 0):
            return False
        self.endpoint_id = self._find_endpoint()
        if self.endpoint_id is None:
            failure = add_signal_endpoint(self.join_address, self.listen_ports)
            if failure is not None:
                log.error("cannot announce join address (%s): %s", *failure)
                return False
            self.endpoint_id = self._find_endpoint()
        self.active = self.endpoint_id is not None
        log.info(
            "join-address: C flag set, announcing %s (endpoint id %s)", self.join_address, self.endpoint_id
        )
        return self.active

    def stop(self) -> None:
        if self.endpoint_id is not None:
            delete_endpoint(self.endpoint_id)
            self.endpoint_id = None
        if self._sysctl_before is not None:
            write_sysctl(SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, self._sysctl_before)
            self._sysctl_before = None
        self.active = False

    def _find_endpoint(self) -> int | None:
        """The id of an existing `signal` endpoint for our address (and port, if announced)."""
        return find_signal_endpoint(self.host, None if self.port in self.listen_ports else self.port)
