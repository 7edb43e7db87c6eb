"""Issue 10's data-plane hardening, on loopback with an in-process proxy: per-CPE caps, RFC 8803
cookies and TCP options as written, the splice pipe budget, the bounded SOCKS5 resolver and the
liveness options. (Kernel filter, dead peers, 0-RTT upstream and floods: test_hardening_netns.py.)"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DataServer, ProxyThread, pattern, recv_all, recv_exact, sha256
from mcpool_proxy.codec.convert import ConnectTLV, CookieTLV, ErrorCode, encode_message
from mcpool_proxy.codec.socks5 import Reply, encode_request
from mcpool_proxy.config import LimitsConfig
from mcpool_proxy.cpe.convert_client import ConvertRefused, convert_connect
from mcpool_proxy.cpe.socks5_client import socks5_connect
from mcpool_proxy.fronts.convert import check_tcp_options
from mcpool_proxy.kernel.mptcp import set_liveness
from mcpool_proxy.limits import ClientLimits
from mcpool_proxy.policy import client_cookie, normalize_address
from prometheus_client.parser import text_string_to_metric_families
from support import requires_mptcp

StartProxy = Callable[..., ProxyThread]


def metric(proxy: ProxyThread, name: str, **labels: str) -> float:
    status, body = proxy.admin("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _silent(target: tuple[str, int], source: str) -> socket.socket:
    """A connection that never sends its handshake (it holds a handshake slot)."""
    s = socket.create_connection(target, timeout=5, source_address=(source, 0))
    return s


def _refused(target: tuple[str, int], dest: tuple[str, int], source: str, **kwargs: Any) -> ConvertRefused:
    with pytest.raises(ConvertRefused) as info:
        convert_connect(target, dest, source=source, mptcp=False, timeout_s=5, **kwargs)
    return info.value


def _served(proxy: ProxyThread, server: DataServer, source: str = "127.0.0.1", **kwargs: Any) -> None:
    sock, _, early = convert_connect(proxy.convert, server.address, source=source, mptcp=False,
                                     early_data=b"SEND 100000 5\n", timeout_s=5, **kwargs)  # fmt: skip
    with sock:  # the server's first bytes may come with the Convert reply (`early`)
        assert sha256(early + recv_all(sock)) == sha256(pattern(5, 100_000))


# -- per-CPE caps ------------------------------------------------------------------------------------
def test_one_cpe_cannot_take_every_handshake_slot(start_proxy: StartProxy, data_server: DataServer) -> None:
    """limits.max_handshakes_per_cpe: the 4th silent connection of 127.0.0.2 is refused at once with
    Resource Exceeded (Convert) / method refusal (SOCKS5), counted, while 127.0.0.1 is still served
    (policy.max_handshakes alone would let one CPE take all 100 slots)."""
    proxy = start_proxy(policy={"max_handshakes": 100, "handshake_timeout_s": 30},
                        limits={"max_handshakes_per_cpe": 3})  # fmt: skip
    held = [_silent(proxy.convert, "127.0.0.2") for _ in range(3)]
    try:
        proxy.wait_for(lambda: proxy.proxy.limits.handshakes_of(normalize_address("127.0.0.2")) == 3,
                       what="3 handshakes of 127.0.0.2")  # fmt: skip
        started = time.monotonic()
        assert _refused(proxy.convert, data_server.address, "127.0.0.2").code == ErrorCode.RESOURCE_EXCEEDED
        assert time.monotonic() - started < 2  # at once, not after the handshake timeout
        with socket.create_connection(proxy.socks5, timeout=5, source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"\x05\x01\x00")
            assert recv_exact(s, 2) == b"\x05\xff"
        _served(proxy, data_server, "127.0.0.1")
        assert metric(proxy, "mcpool_policy_refusals_total", reason="cpe_handshakes") == 2
        assert metric(proxy, "mcpool_handshake_errors_total", protocol="convert", error="resource_exceeded") == 1
    finally:
        for s in held:
            s.close()
    # The slots come back when the silent connections go.
    proxy.wait_for(lambda: proxy.proxy.limits.handshakes_of(normalize_address("127.0.0.2")) == 0,
                   what="slots of 127.0.0.2 released")  # fmt: skip
    _served(proxy, data_server, "127.0.0.2")


def test_new_connections_per_cpe_are_rate_limited(start_proxy: StartProxy, data_server: DataServer) -> None:
    """limits.new_connections_per_cpe_per_s: a token bucket per client; beyond the burst the client
    is refused (Convert 64, counted as cpe_rate), another client is not affected."""
    proxy = start_proxy(limits={"new_connections_per_cpe_per_s": 0.01, "new_connections_burst_per_cpe": 3})
    for _ in range(3):
        _served(proxy, data_server, "127.0.0.3")
    assert _refused(proxy.convert, data_server.address, "127.0.0.3").code == ErrorCode.RESOURCE_EXCEEDED
    with socket.create_connection(proxy.socks5, timeout=5, source_address=("127.0.0.3", 0)) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\xff"
    _served(proxy, data_server, "127.0.0.1")
    assert metric(proxy, "mcpool_policy_refusals_total", reason="cpe_rate") == 2


def test_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    limits = ClientLimits(LimitsConfig(new_connections_per_cpe_per_s=2.0, new_connections_burst_per_cpe=2),
                          clock=lambda: now[0])  # fmt: skip
    cpe = normalize_address("198.18.0.1")
    for _ in range(2):
        assert limits.admit(cpe) is None
        limits.handshake_done(cpe)
    refusal = limits.admit(cpe)
    assert refusal is not None and refusal.reason == "cpe_rate"
    now[0] += 0.5  # one token at 2/s
    assert limits.admit(cpe) is None
    limits.handshake_done(cpe)
    assert limits.admit(cpe) is not None
    assert limits.admit(normalize_address("198.18.0.2")) is None  # per client


# -- RFC 8803 cookies --------------------------------------------------------------------------------
def test_per_client_cookies(start_proxy: StartProxy, data_server: DataServer, tmp_path: Path) -> None:
    """policy.cookie_secret_file: each client's Cookie is HMAC(secret, its address); another client's
    cookie is Not Authorized (32), none is Missing Cookie (3)."""
    secret = os.urandom(32)
    path = tmp_path / "cookie-secret"
    path.write_bytes(secret + b"\n")
    proxy = start_proxy(policy={"cookie_secret_file": str(path)})
    mine = client_cookie(secret, "127.0.0.1")
    assert len(mine) == 16 and mine != client_cookie(secret, "127.0.0.4")
    _served(proxy, data_server, "127.0.0.1", cookie=mine)
    assert _refused(proxy.convert, data_server.address, "127.0.0.4", cookie=mine).code == ErrorCode.NOT_AUTHORIZED
    assert _refused(proxy.convert, data_server.address, "127.0.0.4").code == ErrorCode.MISSING_COOKIE
    _served(proxy, data_server, "127.0.0.4", cookie=client_cookie(secret, "::ffff:127.0.0.4"))
    assert metric(proxy, "mcpool_policy_refusals_total", reason="wrong_cookie") == 1


def test_unreadable_cookie_secret_stops_the_start(tmp_path: Path) -> None:
    from helpers import free_port, make_config

    config = make_config({"convert": free_port(), "socks5": free_port(), "admin": free_port()},
                         policy={"cookie_secret_file": str(tmp_path / "missing")})  # fmt: skip
    with pytest.raises(OSError, match="policy.cookie_secret_file"):
        ProxyThread(config, own_addresses=())


# -- RFC 8803 TCP options in the Connect TLV ----------------------------------------------------------
class _MssServer:
    """Accepts one connection and reports the MSS the kernel uses towards its peer (the proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.mss: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.mss.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
                conn.sendall(b"ok")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def mss_server() -> Iterator[_MssServer]:
    server = _MssServer()
    yield server
    server.close()


def _connect_with_options(proxy: ProxyThread, dest: tuple[str, int], options: bytes) -> socket.socket:
    import ipaddress

    from helpers import raw_convert

    message = encode_message([ConnectTLV(ipaddress.ip_address(dest[0]), dest[1], options)])
    sock, reply, _ = raw_convert(proxy.convert, message)
    sock.settimeout(5)
    if reply is not None and reply.error is not None:
        sock.close()
        raise ConvertRefused(reply.error.code, reply.error.value)
    return sock


def test_connect_tlv_mss_is_applied(start_proxy: StartProxy, mss_server: _MssServer) -> None:
    """An MSS option in the Connect TLV is the MSS the proxy's SYN announces to the server."""
    proxy = start_proxy()
    with _connect_with_options(proxy, mss_server.address, struct.pack("!BBH", 2, 4, 1000)) as sock:
        assert recv_all(sock) == b"ok"
    assert 0 < mss_server.mss[0] <= 1000
    with _connect_with_options(proxy, mss_server.address, b"") as sock:
        assert recv_all(sock) == b"ok"
    assert mss_server.mss[1] > 1000  # loopback's own MSS when none is asked for


def test_connect_tlv_options_that_cannot_be_applied_are_refused(
    start_proxy: StartProxy, mss_server: _MssServer
) -> None:
    """Kind 30 (MPTCP) with a TCP upstream, and options the kernel cannot put in a SYN, are
    Unsupported TCP Option (33) with the kind as value; the server never sees a connection."""
    proxy = start_proxy()
    for options, kind in ((bytes([30, 4, 0, 0]), 30), (bytes([5, 10]) + bytes(8), 5), (bytes([28, 4, 0, 10]), 28)):
        with pytest.raises(ConvertRefused) as info:
            _connect_with_options(proxy, mss_server.address, options)
        assert info.value.code == ErrorCode.UNSUPPORTED_TCP_OPTION
        assert info.value.value == bytes([kind])
    assert mss_server.mss == []


def test_check_tcp_options_rules() -> None:
    sack_ts = bytes([4, 2, 8, 10]) + bytes(8)
    assert check_tcp_options(sack_ts, upstream_mptcp=False, syn_kinds=frozenset({3, 4, 8}))[0] is None
    error, _ = check_tcp_options(sack_ts, upstream_mptcp=False, syn_kinds=frozenset({4}))
    assert error is not None and error.code == ErrorCode.UNSUPPORTED_TCP_OPTION and error.value == b"\x08"
    assert check_tcp_options(bytes([30, 4, 0, 0]), upstream_mptcp=True)[0] is None
    error, plan = check_tcp_options(struct.pack("!BBH", 2, 4, 1200) + bytes([1, 0]), upstream_mptcp=False)
    assert error is None and plan.mss == 1200
    error, _ = check_tcp_options(struct.pack("!BBH", 2, 4, 10), upstream_mptcp=False)
    assert error is not None and error.value == b"\x02"


# -- splice pipe budget -------------------------------------------------------------------------------
def test_pipe_budget_falls_back_to_buffered_visibly(start_proxy: StartProxy, data_server: DataServer) -> None:
    """With room for one pipe (limits.pipe_budget_bytes), concurrent transfers still arrive intact:
    the directions without a pipe go buffered, counted in mcpool_splice_fallbacks_total{budget}."""
    proxy = start_proxy(relay={"mode": "splice", "buffer_bytes": 65536}, limits={"pipe_budget_bytes": 65536})
    assert proxy.proxy.pools.pipes.max_pipes == 1
    results: list[bool] = []

    def transfer(seed: int) -> None:
        sock, _, _ = convert_connect(proxy.convert, data_server.address, mptcp=False,
                                     early_data=f"SEND 4000000 {seed}\n".encode(), timeout_s=10)  # fmt: skip
        with sock:
            results.append(sha256(recv_all(sock)) == sha256(pattern(seed, 4_000_000)))

    threads = [threading.Thread(target=transfer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 4
    assert proxy.proxy.pools.pipes.allocated_bytes <= 65536
    assert metric(proxy, "mcpool_splice_fallbacks_total", reason="budget") >= 1


_SMALL_PIPE_CHILD = r"""
import logging, os, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.WARNING)
from mcpool_proxy.relay import PipePool
os.setgid(65534); os.setuid(65534)  # nobody: no CAP_SYS_RESOURCE, fs.pipe-max-size applies
pool = PipePool(4 * 1024 * 1024)  # above the default fs.pipe-max-size of 1 MiB
print(pool.get(), pool.get(), pool.fallbacks, pool.allocated_bytes)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to user nobody")
def test_pipe_smaller_than_asked_is_detected_not_used() -> None:
    """F_SETPIPE_SZ refused (here: above fs.pipe-max-size without CAP_SYS_RESOURCE; on a node: the
    user's pipe pages spent) is detected by reading the size back: no pipe, a fallback counted,
    one warning for two refusals."""
    max_size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert max_size < 4 * 1024 * 1024, "this test needs fs.pipe-max-size below 4 MiB"
    proxy_dir = str(Path(__file__).resolve().parents[2] / "proxy")
    proc = subprocess.run([sys.executable, "-c", _SMALL_PIPE_CHILD, proxy_dir], capture_output=True, text=True,
                          timeout=30, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("{")[0].split() == ["None", "None"]
    assert "'small_pipe': 2" in proc.stdout and proc.stdout.strip().endswith(" 0")
    assert proc.stderr.count("falls back to buffered") == 1


def test_open_files_estimate_counts_pipes() -> None:
    import resource

    from mcpool_proxy.cli import raise_open_files_limit

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # Enough for the connections alone, not with the pipes: the warning names the pipes.
    connections = max((soft - 256) // 2 - 10, 1)
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("mcpool.proxy")
    logger.addHandler(handler)
    try:
        raise_open_files_limit(connections, 0)
        assert not records
        raise_open_files_limit(connections, 1000)
    finally:
        logger.removeHandler(handler)
    assert records and "1000 splice pipes" in records[0].getMessage()


# -- SOCKS5 names: bounded resolver --------------------------------------------------------------------
@pytest.fixture
def silent_dns() -> Iterator[tuple[str, int]]:
    """A DNS server that reads queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()
    sock.close()


def _socks5_by_name(proxy: ProxyThread, name: str, port: int) -> int:
    """The SOCKS5 reply code for CONNECT name:port."""
    with socket.create_connection(proxy.socks5, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(encode_request(name, port))
        return recv_exact(s, 10)[1]


def test_socks5_names_resolve_bounded_by_a_silent_dns_server(
    start_proxy: StartProxy, data_server: DataServer, silent_dns: tuple[str, int]
) -> None:
    """20 clients ask for names a silent DNS server never answers: each is answered Host
    Unreachable within resolver.timeout_s (not queued behind the others in a thread pool), and a
    name from /etc/hosts still resolves and is served meanwhile."""
    proxy = start_proxy(resolver={"servers": [f"127.0.0.1:{silent_dns[1]}"], "timeout_s": 1.0})
    replies: list[tuple[int, float]] = []

    def ask(i: int) -> None:
        started = time.monotonic()
        replies.append((_socks5_by_name(proxy, f"n{i}.example.test", 80), time.monotonic() - started))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    sock = socks5_connect(proxy.socks5, ("localhost", data_server.address[1]), mptcp=False, timeout_s=5)
    with sock:
        sock.sendall(b"SEND 1000 3\n")
        assert recv_all(sock) == pattern(3, 1000)
    for t in threads:
        t.join(20)
    assert len(replies) == 20
    assert all(code == Reply.HOST_UNREACHABLE for code, _ in replies)
    assert max(elapsed for _, elapsed in replies) < 3.0


def test_socks5_resolver_refuses_beyond_max_in_flight(
    start_proxy: StartProxy, silent_dns: tuple[str, int]
) -> None:
    proxy = start_proxy(resolver={"servers": [f"127.0.0.1:{silent_dns[1]}"], "timeout_s": 5.0, "max_in_flight": 2})
    waiting = [threading.Thread(target=_socks5_by_name, args=(proxy, f"w{i}.example.test", 80)) for i in range(2)]
    for t in waiting:
        t.start()
    proxy.wait_for(lambda: proxy.proxy.resolver.in_flight == 2, what="two names in flight")
    started = time.monotonic()
    assert _socks5_by_name(proxy, "third.example.test", 80) == Reply.GENERAL_FAILURE
    assert time.monotonic() - started < 2
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="socks5", error="resolver_busy") == 1
    for t in waiting:
        t.join(15)


# -- dead peers: the options each socket kind accepts ------------------------------------------------
@pytest.mark.parametrize("proto", [socket.IPPROTO_TCP, pytest.param(262, marks=requires_mptcp)])
def test_liveness_options_per_socket_kind(proto: int) -> None:
    """What kernel/mptcp.py's table says: keepalive is set on TCP and MPTCP sockets, TCP_USER_TIMEOUT
    on TCP only (6.18 refuses it on MPTCP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as s:
        refused = set_liveness(s, user_timeout_s=7, keepalive_idle_s=11, keepalive_interval_s=3, keepalive_count=4)
        assert refused == []
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 11
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        if proto == socket.IPPROTO_TCP:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
        else:
            with pytest.raises(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)


def test_cookie_tlv_helper_round_trip() -> None:
    # The Cookie TLV body a CPE sends is client_cookie(...) as is: 16 bytes, no padding needed.
    body = client_cookie(b"k" * 32, "198.18.0.9")
    assert CookieTLV(body).cookie == body


def test_admission_ruleset() -> None:
    """The kernel filter's script (pure): merged prefixes, IPv4-mapped prefixes as IPv4 too,
    listener ports, MP_JOIN SYNs let through, the per-CPE SYN rate when asked."""
    from mcpool_proxy.kernel.admission import admission_ruleset

    script = admission_ruleset(["10.0.0.0/8", "10.1.0.0/16", "::ffff:192.0.2.0/120", "2001:db8::/32"], [5124, 1080],
                               syn_rate_per_cpe=399.5, syn_burst_per_cpe=800)  # fmt: skip
    assert "elements = { 10.0.0.0/8, 192.0.2.0/24 }" in script
    assert "2001:db8::/32" in script and "elements = { 1080, 5124 }" in script
    assert "tcp option mptcp subtype 1 accept" in script
    # Non-TCP (ICMPv6 neighbour discovery, the director's VXLAN) passes before any address rule.
    assert script.index("meta l4proto != tcp accept") < script.index("@cpes4")
    assert "limit rate over 400/second burst 800 packets" in script
    assert "update @rate4" not in admission_ruleset([], [5124])
    assert "cpes4 { type ipv4_addr; flags interval; auto-merge; }" in admission_ruleset([], [5124])
    with pytest.raises(ValueError):
        admission_ruleset(["10.0.0.0/8"], [])


def test_preinstalled_filter_is_recognised_only_for_its_own_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The status file of `mcpool admission install` (pure: no nft on PATH, so nft cannot tell
    whether the table is there and the file decides): same ruleset -> installed; another ruleset,
    another table, no file or garbage -> not, the mismatch with a warning."""
    from mcpool_proxy.config import parse_config
    from mcpool_proxy.kernel.admission import config_ports, preinstalled, ruleset_for, write_status

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config = parse_config({"listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
                           "policy": {"allowed_cpes": ["198.18.0.0/15"]}})  # fmt: skip
    assert config_ports(config) == [1080, 5124]
    script = ruleset_for(config, config_ports(config))
    status = tmp_path / "admission.json"
    assert not preinstalled(status, "mcpool_admission", script)  # no file yet
    assert not preinstalled(None, "mcpool_admission", script)
    write_status(status, "mcpool_admission", script)
    assert status.stat().st_mode & 0o777 == 0o644  # the proxy runs as another user
    assert preinstalled(status, "mcpool_admission", script)
    assert not preinstalled(status, "other_table", script)
    other = parse_config({"listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
                          "policy": {"allowed_cpes": ["198.18.0.0/15", "203.0.113.0/24"]}})  # fmt: skip
    assert not preinstalled(status, "mcpool_admission", ruleset_for(other, config_ports(other)))
    assert "is for another configuration" in caplog.text
    status.write_text("{not json")
    assert not preinstalled(status, "mcpool_admission", script)


def test_admission_command_refuses_what_it_cannot_install(tmp_path: Path) -> None:
    """`mcpool admission install`: invalid configuration or a port the kernel would choose -> 2,
    kernel.admission_filter false -> nothing done, 0 (no nft needed for either)."""
    from mcpool_proxy.admission_cli import main

    config = tmp_path / "proxy.yaml"
    config.write_text("listen: {convert: '[::]:0'}\n")
    assert main(["install", "--config", str(config)]) == 2
    config.write_text("listen: {convert: '[::]:5124'}\nkernel: {admission_filter: false}\n")
    assert main(["install", "--config", str(config)]) == 0
    config.write_text("listen: {convert: 5124}\n")
    assert main(["install", "--config", str(config)]) == 2
    # Transparent listeners are not filtered (their SYNs carry the original destination's port,
    # and implicit mode's own table refuses strangers): nothing to install, 0, no nft needed.
    config.write_text("listen: {transparent: ['192.0.2.1:7000']}\n")
    assert main(["install", "--config", str(config)]) == 0
