"""Helpers for the end-to-end tests: clients that run inside the lab's CPE namespace, the
kernel's own view of MPTCP (ss, /proc/net/netstat), and polling with a timeout.

Client sockets are created by this process with the calling thread switched into the CPE
namespace (`lab.in_netns`), so the tests drive real kernel sockets without helper processes.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, TypeVar

from mcpool_tools.lab import Lab, ProxyProcess
from mcpool_tools.testserver import PatternReader, pattern_chunks, pattern_sha256, recv_all_sha256
from support import wait_for

T = TypeVar("T")

CONVERT_PORT = 5124
SOCKS5_PORT = 1080
SERVER_PORT = 8000  # plain TCP test server in srv
MPTCP_SERVER_PORT = 8001  # MPTCP test server in srv


def host_of(addr: str) -> str:
    """'ip:port', '[v6]:port' or '::ffff:1.2.3.4:port' -> bare IP, IPv4-mapped unwrapped."""
    text = addr.strip()
    if text.startswith("["):
        host = text[1 : text.index("]")]
    else:
        host = text.rsplit(":", 1)[0]
    return host.removeprefix("::ffff:")


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def cpe_convert(lab: Lab, destination: tuple[str, int], *, port: int = CONVERT_PORT,
                **kwargs: Any) -> tuple[socket.socket, Any, bytes]:
    """convert_connect from the CPE namespace to the proxy in pod 0."""
    from mcpool_proxy.cpe.convert_client import convert_connect

    with lab.in_netns("cpe"):
        kwargs.setdefault("timeout_s", 20.0)
        sock, reply, early = convert_connect((lab.mcp_ip, port), destination, **kwargs)
    sock.settimeout(60)
    return sock, reply, early


def proxy_conn_for(proxy: ProxyProcess, client_port: int) -> dict[str, Any] | None:
    """The /connections entry whose client port is `client_port` (the CPE's initial subflow)."""
    connections: list[dict[str, Any]] = proxy.connections()
    for conn in connections:
        if port_of(conn["client"]) == client_port:
            return conn
    return None


def wait_two_subflows(lab: Lab, proxy: ProxyProcess, sock: socket.socket) -> dict[str, Any]:
    """Wait until the proxy lists the connection with subflows from both CPE links."""
    client_port = sock.getsockname()[1]
    want = {lab.cpe_dsl_ip, lab.cpe_lte_ip} if sock.family == socket.AF_INET or "." in sock.getsockname()[0] \
        else {lab.cpe_dsl_ip6, lab.cpe_lte_ip6}

    def check() -> dict[str, Any] | None:
        conn = proxy_conn_for(proxy, client_port)
        if conn and {host_of(s["remote"]) for s in conn["subflows"]} == want and len(conn["subflows"]) == 2:
            return conn
        return None

    return wait_for(check, 20.0, f"two subflows from {sorted(want)} on the proxy's /connections")


@dataclass(frozen=True)
class KernelSubflow:
    local: str
    remote: str
    token: int  # the MPTCP connection's local token, as `ss` prints it for each subflow


_SS_TOKEN = re.compile(r"token:[0-9a-f]+\(id:\d+\)/([0-9a-f]+)\(id:\d+\)")


def kernel_subflows(lab: Lab, ns: str, local_port: int) -> list[KernelSubflow]:
    """TCP subflows (tcp-ulp-mptcp) in `ns` whose local port is `local_port`, from `ss -tni`."""
    out = lab.exec(ns, ["ss", "-tniH", "state", "established", f"( sport = :{local_port} )"]).stdout
    result = []
    # ss prints each socket as an address line followed by an indented detail line.
    entries = re.split(r"\n(?=\S)", out.strip()) if out.strip() else []
    for entry in entries:
        fields = entry.split()
        match = _SS_TOKEN.search(entry)
        if "tcp-ulp-mptcp" not in entry or match is None:
            continue
        # With a state filter, ss omits the State column: Recv-Q Send-Q Local Peer.
        result.append(KernelSubflow(local=fields[2], remote=fields[3], token=int(match.group(1), 16)))
    return result


def mptcp_sockets(lab: Lab, ns: str, local_port: int) -> list[str]:
    """`ss -Mni` entries (MPTCP-level sockets) in `ns` on `local_port`."""
    out = lab.exec(ns, ["ss", "-MniH", "state", "established", f"( sport = :{local_port} )"]).stdout
    return re.split(r"\n(?=\S)", out.strip()) if out.strip() else []


def netstat_counters(lab: Lab, ns: str) -> dict[str, int]:
    """TcpExt and MPTcpExt counters of a namespace (/proc/net/netstat read from inside it)."""
    text = lab.exec(ns, ["cat", "/proc/net/netstat"]).stdout.splitlines()
    counters: dict[str, int] = {}
    for header, values in zip(text[::2], text[1::2], strict=False):
        section, names = header.split(":", 1)
        _, nums = values.split(":", 1)
        for name, num in zip(names.split(), nums.split(), strict=True):
            counters[f"{section}{name}"] = int(num)
    return counters


def download(sock: socket.socket, size: int, seed: int, initial: bytes = b"") -> None:
    """Ask the test server for `size` pattern bytes and assert they arrive intact."""
    sock.sendall(f"SEND {size} {seed}\n".encode())
    digest, count = recv_all_sha256(sock, initial=initial)
    assert count == size
    assert digest == pattern_sha256(seed, size), "downloaded content differs from the server's stream"


def upload_and_reply(sock: socket.socket, up_size: int, seed: int, reply_size: int,
                     reply_seed: int, initial: bytes = b"") -> None:
    """SINK: send `up_size` bytes, half-close, then read the server's verdict and its reply.

    Asserts the server received exactly our bytes (its sha256) and that the whole reply,
    sent after our FIN, arrives intact.
    """
    sock.sendall(f"SINK {reply_size} {reply_seed}\n".encode())
    for chunk in pattern_chunks(seed, up_size):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    buffered = bytearray(initial)
    while b"\n" not in buffered:
        data = sock.recv(65536)
        assert data, f"connection closed before the server's verdict (got {bytes(buffered)!r})"
        buffered += data
    line, _, rest = bytes(buffered).partition(b"\n")
    server_digest, server_count = line.decode().split()
    assert int(server_count) == up_size
    assert server_digest == pattern_sha256(seed, up_size), "server received different bytes than sent"
    reader = PatternReader()
    reader.update(rest)
    while data := sock.recv(262_144):
        reader.update(data)
    assert reader.count == reply_size
    assert reader.hexdigest() == pattern_sha256(reply_seed, reply_size), "reply after half-close differs"


def proxy_config(lab: Lab, **overrides: Any) -> dict[str, Any]:
    """The lab's standard proxy configuration: Convert and SOCKS5 listeners, CPE prefixes allowed."""
    config: dict[str, Any] = {
        "listen": {"convert": f"[::]:{CONVERT_PORT}", "socks5": f"[::]:{SOCKS5_PORT}"},
        "admin": "127.0.0.1:9090",
        "policy": {"allowed_cpes": lab.cpe_prefixes},
        "log_level": "debug",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def served_normally(lab: Lab, port: int = CONVERT_PORT, size: int = 1_000_000, seed: int = 99) -> None:
    """A fresh Convert client through `port` gets a byte-exact download."""
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), port=port)
    with sock:
        download(sock, size, seed, early)
