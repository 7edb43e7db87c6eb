"""`mcpool proxy` as a real process in its own network namespace (prefix `mtb-`): it applies its
sysctls there (MPTCP checksums, TFO server bit), prints the ready line, serves a 0-RTT Convert
client with a TFO cookie, maps unreachable destinations to their codes, and drains on SIGTERM.
Also: a bad configuration exits 2 with one line per problem."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DataServer, in_netns, pattern, recv_all, recv_exact, send_and_shut, sha256
from mcpool_proxy.codec.convert import ConvertMessage, ErrorCode
from mcpool_proxy.codec.socks5 import Reply
from mcpool_proxy.cpe.convert_client import ConvertRefused, convert_connect
from mcpool_proxy.cpe.socks5_client import Socks5Refused, socks5_connect
from support import requires_netns

MCPOOL = [sys.executable, "-m", "mcpool_proxy.cli"]
_names = itertools.count()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def ns_sysctl(ns: str, name: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-n", name], check=True, capture_output=True, text=True
    ).stdout.strip()


def tcp_ext_counter(ns: str, name: str) -> int:
    text = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    for head, values in zip(text[::2], text[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split(), strict=True))[name])
    raise AssertionError("no TcpExt line")


class ProxyProcess:
    def __init__(self, ns: str, config: dict[str, Any], workdir: Path, prefix: list[str] | None = None) -> None:
        """`prefix`: a command the proxy runs under inside the namespace (e.g. setpriv)."""
        self.ns = ns
        self.config = config
        path = workdir / f"proxy-{next(_names)}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.stderr_path = workdir / f"{path.stem}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *(prefix or []), *MCPOOL, "proxy", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            line = self.lines.get(timeout=20)
        except queue.Empty:
            line = ""
        if line.strip() != "mcpool-proxy ready":
            self.kill()
            raise AssertionError(f"proxy did not get ready: {line!r}\n{self.stderr_path.read_text()}")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def admin(self, path: str, method: str = "GET") -> tuple[int, Any]:
        url = f"http://{self.config['admin']}{path}"
        with in_netns(self.ns):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
                    return r.status, json.loads(r.read()) if path != "/metrics" else r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            out.append(json.loads(line))  # JSON lines: stderr is not a terminal
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mtb-{os.getpid()}-{next(_names)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        # Client side of TFO with cookies (bit 0x1); the proxy must add the server bit itself.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.tcp_fastopen=1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def run_proxy(netns: str) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []
    workdir = Path(tempfile.mkdtemp(prefix="mtb-"))

    def start(**overrides: Any) -> ProxyProcess:
        config: dict[str, Any] = {
            "listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
            "admin": "127.0.0.1:9090",
            "policy": {"allowed_cpes": ["127.0.0.0/8", "198.18.0.0/15"], "deny_default_destinations": False,
                       "handshake_timeout_s": 2},
            "upstream": {"connect_timeout_s": 0.5},
            "drain_timeout_s": 10,
        }
        for key, value in overrides.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
        proc = ProxyProcess(netns, config, workdir)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def ns_server(netns: str) -> Iterator[DataServer]:
    with in_netns(netns):
        server = DataServer("127.0.0.1")
    yield server
    server.close()


def ns_convert(ns: str, dest: tuple[str, int], **kwargs: Any) -> tuple[socket.socket, ConvertMessage, bytes]:
    with in_netns(ns):
        sock, reply, rest = convert_connect(("127.0.0.1", 5124), dest, **kwargs)
    return sock, reply, rest


pytestmark = requires_netns

RunProxy = Callable[..., ProxyProcess]


def test_sysctls_applied_and_reported(run_proxy: RunProxy, netns: str) -> None:
    assert ns_sysctl(netns, "net.mptcp.checksum_enabled") == "0"
    proxy = run_proxy()
    assert ns_sysctl(netns, "net.mptcp.checksum_enabled") == "1"
    assert ns_sysctl(netns, "net.ipv4.tcp_fastopen") == "3"  # client bit kept, server bit added
    status, body = proxy.admin("/readyz")
    assert status == 200 and body["mptcp_checksum"] is True and body["tcp_fastopen_server"] is True
    status, text = proxy.admin("/metrics")
    assert "mcpool_mptcp_checksum_enabled 1.0" in text
    started = [entry for entry in proxy.logs() if entry["msg"] == "proxy listening"]
    assert started and started[0]["listeners_mptcp"] == {"convert": True, "socks5": True}


def test_0rtt_with_tfo_cookie_keeps_mptcp(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    proxy = run_proxy()
    before = tcp_ext_counter(netns, "TCPFastOpenPassive")
    # First connection: no cookie yet, so it only fetches one (1-RTT).
    sock, _, _ = ns_convert(netns, ns_server.address, fastopen=True, early_data=b"ECHO\n")
    with sock:
        sock.sendall(b"one")
        assert recv_exact(sock, 3) == b"one"
    assert tcp_ext_counter(netns, "TCPFastOpenPassive") == before
    # Second: the Convert message (and early data) ride in the SYN.
    sock, _, _ = ns_convert(netns, ns_server.address, fastopen=True, early_data=b"ECHO\n")
    with sock:
        assert tcp_ext_counter(netns, "TCPFastOpenPassive") == before + 1
        status, listing = proxy.admin("/connections")
        assert status == 200 and len(listing) == 1
        assert listing[0]["token"] is not None and len(listing[0]["token"]) == 8  # MPTCP, no fallback
        assert len(listing[0]["subflows"]) == 1
        data = pattern(31, 2_000_000)
        sender = threading.Thread(target=send_and_shut, args=(sock, data))
        sender.start()
        assert sha256(recv_all(sock)) == sha256(data)
        sender.join()


def test_unreachable_destinations_map_to_their_codes(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    ip("-n", netns, "route", "add", "unreachable", "198.18.5.0/24")
    ip("-n", netns, "route", "add", "prohibit", "198.18.6.0/24")
    # A link where SYNs leave and nothing ever answers (peer end has no stack configured; the
    # permanent neighbour entry avoids ARP failing with EHOSTUNREACH first).
    ip("-n", netns, "link", "add", "mtbv0", "type", "veth", "peer", "name", "mtbv1")
    ip("-n", netns, "addr", "add", "198.18.8.1/24", "dev", "mtbv0")
    ip("-n", netns, "link", "set", "mtbv0", "up")
    ip("-n", netns, "link", "set", "mtbv1", "up")
    ip("-n", netns, "neigh", "add", "198.18.8.2", "lladdr", "02:00:00:00:00:02", "dev", "mtbv0", "nud", "permanent")
    run_proxy()
    cases = [
        ("198.18.7.1", ErrorCode.DESTINATION_UNREACHABLE, b"\x00", Reply.NETWORK_UNREACHABLE),  # no route
        ("198.18.5.1", ErrorCode.DESTINATION_UNREACHABLE, b"\x01", Reply.HOST_UNREACHABLE),
        ("198.18.6.1", ErrorCode.DESTINATION_UNREACHABLE, b"\x0d", Reply.NOT_ALLOWED),
        ("198.18.8.2", ErrorCode.NETWORK_FAILURE, b"", Reply.HOST_UNREACHABLE),  # silence: timeout
    ]
    for dest, code, value, reply in cases:
        with pytest.raises(ConvertRefused) as info:
            ns_convert(netns, (dest, 80))
        assert info.value.code == code, dest
        assert info.value.value.rstrip(b"\x00") == value.rstrip(b"\x00"), dest
        with in_netns(netns), pytest.raises(Socks5Refused) as refused:
            socks5_connect(("127.0.0.1", 1080), (dest, 80))
        assert refused.value.reply == reply, dest
    # ...and the next client is served normally.
    sock, _, early = ns_convert(netns, ns_server.address, early_data=b"SEND 100000 3\n")
    with sock:  # the server's first bytes may come with the Convert reply (`early`)
        assert sha256(early + recv_all(sock)) == sha256(pattern(3, 100000))


def test_sigterm_drains_then_exits_zero(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    proxy = run_proxy()
    sock, _, _ = ns_convert(netns, ns_server.address, early_data=b"ECHO\n")
    with sock:
        sock.sendall(b"x")
        assert recv_exact(sock, 1) == b"x"
        proxy.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proxy.admin("/readyz")[0] != 503:
            assert time.monotonic() < deadline, "readyz never turned 503"
            time.sleep(0.02)
        with pytest.raises(ConnectionResetError):  # reset: the listener stays open for joins
            ns_convert(netns, ns_server.address)
        data = pattern(41, 1_000_000)
        sender = threading.Thread(target=send_and_shut, args=(sock, data))
        sender.start()
        assert sha256(recv_all(sock)) == sha256(data)
        sender.join()
    assert proxy.proc.wait(10) == 0
    stopped = [e for e in proxy.logs() if e["msg"] == "stopped"]
    assert stopped and stopped[0]["closed_at_deadline"] == 0


def test_drain_deadline_closes_and_counts(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    proxy = run_proxy(drain_timeout_s=0.5)
    sock, _, _ = ns_convert(netns, ns_server.address, early_data=b"HOLD\n")
    with sock:
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):  # aborted at the deadline: never a clean EOF
            sock.recv(1)
    closed = [e for e in proxy.logs() if e["msg"] == "connection closed"]
    assert [e["mcpool.close_reason"] for e in closed] == ["drained"]
    stopped = [e for e in proxy.logs() if e["msg"] == "stopped"]
    assert stopped[0]["closed_at_deadline"] == 1


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"listen": {"convert": "nowhere"}, "policy": {"max_connections": 0}, "typo": 1}))
    result = subprocess.run([*MCPOOL, "proxy", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("invalid configuration")
    assert any(line.strip().startswith("listen.convert") for line in lines)
    assert any(line.strip().startswith("policy.max_connections") for line in lines)
    assert any(line.strip().startswith("typo") for line in lines)


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """The default soft limit (1024) would cap the proxy at a few hundred connections."""
    import resource
    import subprocess
    import sys

    code = (
        "import resource; from mcpool_proxy.cli import raise_open_files_limit; "
        "print(raise_open_files_limit(10), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(1024, hard)

    def lower_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lower_soft, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert [int(out[0]), int(out[1])] == [expected, expected]
