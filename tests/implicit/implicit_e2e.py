"""Helpers for the implicit-mode tests: marked and unmarked MPTCP clients opened from inside the
lab's namespaces, the kernel's own view (`ss`, nft counters), and polling with a timeout."""

from __future__ import annotations

import re
import socket
from typing import Any, TypeVar

from mcpool_proxy.kernel.mptcp import IPPROTO_MPTCP
from mcpool_tools.lab import ImplicitLab, ProxyProcess
from mcpool_tools.testserver import pattern_sha256, recv_all_sha256

T = TypeVar("T")

SERVER_PORT = 8001  # the MPTCP-capable test server in srv
TRANSPARENT_PORT = 5125
JOIN_PORT = 5126
AF11_TOS = 0x28
MARK_SCRIPT = (
    "add table inet mtimark; add chain inet mtimark p { type filter hook postrouting priority mangle; }; "
    "add rule inet mtimark p meta mark 0x28 ip6 dscp set af11; add rule inet mtimark p meta mark 0x28 ip dscp set af11"
)


def mcp_config(lab: ImplicitLab, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"convert": None, "transparent": [f"{lab.mcp_ip}:{TRANSPARENT_PORT}",
                                                    f"[{lab.mcp_ip6}]:{TRANSPARENT_PORT}"]},
        "admin": "127.0.0.1:9090",
        "policy": {"allowed_cpes": lab.subscriber_prefixes},
        "transparent": {"join_address": f"{lab.mcp_ip}:{JOIN_PORT}", "cpe_interfaces": ["dsl"]},
        "log_level": "debug",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def mptcp_connect(lab: ImplicitLab, ns: str, dest: tuple[str, int], *, marked: bool,
                  source: str | None = None, timeout_s: float = 10.0) -> socket.socket:
    """An MPTCP connection from namespace `ns`; `marked`: with the CPE converter's marker (AF11:
    IP_TOS for IPv4, SO_MARK turned into the DSCP by an nft rule for IPv6)."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    if marked and family == socket.AF_INET6:
        lab.exec(ns, ["nft", MARK_SCRIPT], check=False)
    with lab.in_netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        try:
            if marked and family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, AF11_TOS)
            elif marked:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AF11_TOS)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(timeout_s)
            sock.connect(dest)
        except BaseException:
            sock.close()
            raise
    sock.settimeout(60)
    return sock


def request_download(sock: socket.socket, size: int, seed: int) -> None:
    """Ask the test server for `size` pattern bytes (the data also makes MPTCP fully established,
    after which the client's path manager opens its extra subflows)."""
    sock.sendall(f"SEND {size} {seed}\n".encode())


def finish_download(sock: socket.socket, size: int, seed: int) -> None:
    digest, count = recv_all_sha256(sock)
    assert count == size
    assert digest == pattern_sha256(seed, size), "downloaded content differs from the server's stream"


def download(sock: socket.socket, size: int, seed: int) -> None:
    request_download(sock, size, seed)
    finish_download(sock, size, seed)


def nft_counters(lab: ImplicitLab, ns: str, table: str) -> dict[str, int]:
    """Packets of each named counter of nft table `table` in `ns` (the kernel's own count)."""
    out = lab.exec(ns, ["nft", "list", "counters", "table", "inet", table]).stdout
    found = re.findall(r"counter (\w+) \{\s*packets (\d+)", out)
    return {name: int(packets) for name, packets in found}


def tcp_peers(lab: ImplicitLab, ns: str, local_port: int) -> list[tuple[str, str]]:
    """(local, peer) of established TCP sockets (MPTCP subflows included) on `local_port`."""
    out = lab.exec(ns, ["ss", "-tnH", "state", "established", f"( sport = :{local_port} )"]).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return [(row[2], row[3]) for row in rows]


def host_of(addr: str) -> str:
    text = addr.strip()
    host = text[1 : text.index("]")] if text.startswith("[") else text.rsplit(":", 1)[0]
    return host.removeprefix("::ffff:")


def server_subflows_for(lab: ImplicitLab, token_hosts: set[str]) -> int:
    """How many of the server's subflows on SERVER_PORT come from the given hosts."""
    return sum(1 for _, peer in tcp_peers(lab, "srv", SERVER_PORT) if host_of(peer) in token_hosts)


def proxy_connection(proxy: ProxyProcess, client_port: int) -> dict[str, Any] | None:
    for conn in proxy.connections():
        if int(conn["client"].rsplit(":", 1)[1]) == client_port:
            return dict(conn)
    return None


ROUTE_TABLE = 100  # transparent.route_table and the CPE's route_table (their defaults)


def leftovers(lab: ImplicitLab, ns: str, table: str) -> dict[str, int]:
    """How many of each kernel object of a table named `table` (and the fwmark routing) `ns` holds."""
    tables = lab.exec(ns, ["nft", "list", "tables"]).stdout.splitlines()
    found = {"tables": sum(1 for line in tables if line.strip() == f"table inet {table}")}
    for fam in ("-4", "-6"):
        rules = lab.exec(ns, ["ip", fam, "rule", "show"]).stdout.splitlines()
        found[f"rules{fam}"] = sum(1 for line in rules if "fwmark 0x1" in line and f"lookup {ROUTE_TABLE}" in line)
        routes = lab.exec(ns, ["ip", fam, "route", "show", "table", str(ROUTE_TABLE)], check=False).stdout
        found[f"routes{fam}"] = len([line for line in routes.splitlines() if line.strip()])
    endpoints = lab.exec(ns, ["ip", "mptcp", "endpoint", "show"]).stdout.splitlines()
    found["join_endpoints"] = sum(1 for line in endpoints if "signal" in line and f"port {JOIN_PORT}" in line)
    return found


# One MCP's kernel objects (table, fwmark rule and local route per family, join endpoint), and none.
ONE_MCP = {"tables": 1, "rules-4": 1, "rules-6": 1, "routes-4": 1, "routes-6": 1, "join_endpoints": 1}
NO_LEFTOVERS = dict.fromkeys(ONE_MCP, 0)
