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

Kernel objects are managed with iproute2's `ip mptcp` (the commands a person would type to
check them), at start and stop only; this module never raises into the proxy: failures are logged
and reported by `active`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Collection

from ..config import split_hostport
from ..kernel.sysctl import SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, read_sysctl, write_sysctl

__all__ = ["JoinAddress", "endpoint_command"]

log = logging.getLogger("mcpool.affinity.join_address")


def endpoint_command(join_address: str, listen_ports: Collection[int]) -> list[str]:
    """`ip mptcp endpoint add ...` for `join_address` ("addr:port").

    A port equal to one of the proxy's listener ports is left out: clients then join the
    announced address on the connection's own port, which the listener already accepts (a port
    endpoint would make the kernel open a second listener on a port that is taken). Any other
    port is announced with the address and gets the kernel's own join-only listener.
    """
    host, port = split_hostport(join_address)
    addr = str(ipaddress.ip_address(host))
    cmd = ["ip", "mptcp", "endpoint", "add", addr]
    if port not in listen_ports:
        cmd += ["port", str(port)]
    return [*cmd, "signal"]


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
            cmd = endpoint_command(self.join_address, self.listen_ports)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                log.error("cannot announce join address (%s): %s", " ".join(cmd), proc.stderr.strip())
                return False
            self.endpoint_id = self._find_endpoint()
        self.active = self.endpoint_id is not None
        log.info(
            "join-address: C flag set, announcing %s (endpoint id %s)", self.join_address, self.endpoint_id
        )
        return self.active

    def stop(self) -> None:
        if self.endpoint_id is not None:
            subprocess.run(
                ["ip", "mptcp", "endpoint", "delete", "id", str(self.endpoint_id)],
                capture_output=True,
                check=False,
            )
            self.endpoint_id = None
        if self._sysctl_before is not None:
            write_sysctl(SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, self._sysctl_before)
            self._sysctl_before = None
        self.active = False

    def _find_endpoint(self) -> int | None:
        """The id of an existing `signal` endpoint for our address (and port, if announced)."""
        out = subprocess.run(["ip", "mptcp", "endpoint", "show"], capture_output=True, text=True, check=False).stdout
        want_port = None if self.port in self.listen_ports else self.port
        addr = str(ipaddress.ip_address(self.host))
        for line in out.splitlines():
            words = line.split()
            if not words or words[0] != addr or "signal" not in words:
                continue
            port = int(words[words.index("port") + 1]) if "port" in words else None
            match = re.search(r"\bid (\d+)", line)
            if port == want_port and match:
                return int(match.group(1))
        return None
