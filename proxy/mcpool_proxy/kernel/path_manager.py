"""The in-kernel MPTCP path manager and the namespace's MPTCP connections, through iproute2: the
`signal` endpoints of the join-address mechanism (`ip mptcp endpoint`, the path manager's
netlink commands) and the tokens of every MPTCP connection (`ss -M`, the kernel's MPTCP
sock_diag). Without MPTCP the commands fail: a missing endpoint is logged by the caller, a failed
listing returns None and the caller compares nothing.

The commands are the ones a person would type to check the same objects; they run at start, at
stop and once per heartbeat, never per connection.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Collection

from ..config import split_hostport

__all__ = ["add_signal_endpoint", "delete_endpoint", "endpoint_command", "find_signal_endpoint", "kernel_tokens"]

# The loggers these lines had before they moved here: log lines keep their logger field.
log = logging.getLogger("mcpool.affinity.pod")


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


def add_signal_endpoint(join_address: str, listen_ports: Collection[int]) -> tuple[str, str] | None:
    """Run `endpoint_command(...)`; None when it worked, else (the command, its error)."""
    cmd = endpoint_command(join_address, listen_ports)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return " ".join(cmd), proc.stderr.strip()
    return None


def find_signal_endpoint(host: str, port: int | None) -> int | None:
    """The id of an existing `signal` endpoint for address `host` (and `port`, None: no port)."""
    out = subprocess.run(["ip", "mptcp", "endpoint", "show"], capture_output=True, text=True, check=False).stdout
    addr = str(ipaddress.ip_address(host))
    for line in out.splitlines():
        words = line.split()
        if not words or words[0] != addr or "signal" not in words:
            continue
        endpoint_port = int(words[words.index("port") + 1]) if "port" in words else None
        match = re.search(r"\bid (\d+)", line)
        if endpoint_port == port and match:
            return int(match.group(1))
    return None


def delete_endpoint(endpoint_id: int) -> None:
    subprocess.run(["ip", "mptcp", "endpoint", "delete", "id", str(endpoint_id)], capture_output=True, check=False)


_SS_TOKEN = re.compile(r"\btoken:([0-9a-f]+)")


def kernel_tokens() -> set[int] | None:
    """Tokens of every MPTCP connection in this network namespace (`ss -M`); None if unknown."""
    try:
        proc = subprocess.run(["ss", "-MHni"], capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot list MPTCP connections with ss: %r", exc)
        return None
    if proc.returncode != 0:
        log.warning("ss -M failed (%d): %s", proc.returncode, proc.stderr.strip())
        return None
    return {int(m, 16) for m in _SS_TOKEN.findall(proc.stdout)}
