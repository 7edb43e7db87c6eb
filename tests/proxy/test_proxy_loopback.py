"""The proxy end to end on loopback, in-process: Convert and SOCKS5 clients through a real Proxy
to a content-checking server; every refusal gets its protocol answer and the next client is
served; /connections, /readyz and /metrics say what happened."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import (
    DataServer,
    ProxyThread,
    convert_request,
    pattern,
    raw_convert,
    recv_all,
    recv_exact,
    send_and_shut,
    sha256,
)
from mcpool_proxy.codec.convert import (
    ErrorCode,
    ExtendedTcpHeaderTLV,
    InfoTLV,
    SupportedTcpExtensionsTLV,
    decode_message,
    encode_message,
)
from mcpool_proxy.codec.socks5 import Reply
from mcpool_proxy.cpe.convert_client import ConvertRefused, convert_connect
from mcpool_proxy.cpe.socks5_client import Socks5Refused, socks5_connect
from prometheus_client.parser import text_string_to_metric_families
from support import requires_mptcp

pytestmark = requires_mptcp

StartProxy = Callable[..., ProxyThread]


def metrics(proxy: ProxyThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = proxy.admin("/metrics")
    assert status == 200
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(proxy: ProxyThread, name: str, **labels: str) -> float:
    return metrics(proxy).get((name, tuple(sorted(labels.items()))), 0.0)


def echo_roundtrip(sock: socket.socket, size: int, seed: int = 9) -> None:
    """Send ECHO + `size` bytes, half-close, check the echo by sha256."""
    data = pattern(seed, size)
    sender = threading.Thread(target=send_and_shut, args=(sock, data))
    sender.start()
    got = recv_all(sock)
    sender.join()
    assert sha256(got) == sha256(data)


def convert_echo(proxy: ProxyThread, server: DataServer, size: int = 200_000, **kwargs: Any) -> None:
    sock, _, rest = convert_connect(proxy.convert, server.address, early_data=b"ECHO\n", **kwargs)
    with sock:
        assert rest == b""
        echo_roundtrip(sock, size)


def test_convert_1rtt_relays_byte_exact_both_ways(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, reply, rest = convert_connect(proxy.convert, data_server.address)
    with sock:
        # No Extended TCP Header TLV: the kernel does not let the proxy read the server's
        # SYN-ACK, and a header rebuilt from TCP_INFO would carry invented values.
        assert reply.extended_tcp_header is None
        assert not any(isinstance(tlv, ExtendedTcpHeaderTLV) for tlv in reply.tlvs)
        sock.sendall(b"SINK\n")
        up = pattern(11, 3_000_000)
        sock.sendall(up)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock).decode().split() == [sha256(up), str(len(up))]
    sock, _, early = convert_connect(proxy.convert, data_server.address, early_data=b"SEND 3000000 12\n")
    with sock:  # the server's first bytes may come with the Convert reply (`early`)
        assert sha256(early + recv_all(sock)) == sha256(pattern(12, 3_000_000))
    proxy.wait_for(lambda: len(proxy.proxy.table) == 0, what="connections to close")
    assert metric(proxy, "mcpool_relayed_bytes_total", direction="up") >= 3_000_000
    assert metric(proxy, "mcpool_relayed_bytes_total", direction="down") >= 3_000_000


def test_convert_bytes_after_the_message_are_forwarded_in_order(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    # One send: Convert message + early data, as a TFO SYN would carry it.
    sock, reply, _ = raw_convert(proxy.convert, convert_request(data_server.address) + b"ECHO\nfirst-")
    with sock:
        assert reply is not None and reply.error is None
        sock.sendall(b"second")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"first-second"


def test_convert_info_gets_supported_extensions(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, reply, _ = raw_convert(proxy.convert, encode_message([InfoTLV()]))
    with sock:
        assert reply is not None
        ext = reply.supported_tcp_extensions
        assert isinstance(ext, SupportedTcpExtensionsTLV) and 30 in ext.kinds
        assert recv_all(sock) == b""  # nothing to relay: closed
    info_connect = encode_message([InfoTLV(), *_connect_tlvs(data_server.address)]) + b"ECHO\nx"
    sock, reply, _ = raw_convert(proxy.convert, info_connect, shutdown=True)
    with sock:
        assert reply is not None and reply.supported_tcp_extensions is not None
        assert reply.extended_tcp_header is None  # never invented (see fronts/convert.py)
        assert recv_all(sock) == b"x"


def _connect_tlvs(dest: tuple[str, int]) -> list[Any]:
    from mcpool_proxy.codec.convert import ConnectTLV

    return [ConnectTLV(ipaddress.ip_address(dest[0]), dest[1])]


def test_connections_listing_while_live(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, _, _ = convert_connect(proxy.convert, data_server.address, early_data=b"ECHO\n")
    s5 = socks5_connect(proxy.socks5, data_server.address)
    try:
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
        s5.sendall(b"ECHO\nhello")
        assert recv_exact(s5, 5) == b"hello"
        listing = proxy.admin_json("/connections")
        by_mode = {entry["mode"]: entry for entry in listing}
        assert set(by_mode) == {"convert", "socks5"}
        entry = by_mode["convert"]
        local = sock.getsockname()
        assert entry["client"] == f"{local[0]}:{local[1]}"
        assert entry["destination"] == f"{data_server.address[0]}:{data_server.address[1]}"
        assert isinstance(entry["token"], str) and len(entry["token"]) == 8
        int(entry["token"], 16)
        assert [sf["remote"] for sf in entry["subflows"]] == [f"{local[0]}:{local[1]}"]
        assert entry["subflows"][0]["local"] == f"{proxy.convert[0]}:{proxy.convert[1]}"
        assert entry["bytes_up"] == len(b"ECHO\nping") and entry["bytes_down"] == 4
        assert by_mode["socks5"]["bytes_down"] == 5
        status, body = proxy.admin("/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert "mptcp_checksum" in json.loads(body)
        assert proxy.admin("/healthz")[0] == 200
        assert metric(proxy, "mcpool_connections_active") == 2
    finally:
        sock.close()
        s5.close()


def test_tcp_client_is_listed_with_null_token(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, _, _ = convert_connect(proxy.convert, data_server.address, mptcp=False, early_data=b"ECHO\n")
    with sock:
        sock.sendall(b"p")
        assert recv_exact(sock, 1) == b"p"
        (entry,) = proxy.admin_json("/connections")
        assert entry["token"] is None and entry["subflows"] == []


def test_socks5_no_auth_ip_and_domain_name(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    for host in (data_server.address[0], "localhost"):
        sock = socks5_connect(proxy.socks5, (host, data_server.address[1]))
        with sock:
            sock.sendall(b"ECHO\n")
            echo_roundtrip(sock, 1_000_000)


def test_socks5_ipv6_listener_and_destination(start_proxy: StartProxy) -> None:
    server = DataServer("::1")
    try:
        proxy = start_proxy(host="::1")
        sock = socks5_connect(proxy.socks5, server.address)
        with sock:
            sock.sendall(b"ECHO\n")
            echo_roundtrip(sock, 300_000)
        convert_echo(proxy, server)
    finally:
        server.close()


def test_socks5_username_password(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"socks5_users": [{"username": "cpe1", "password": "pw1"}]})
    sock = socks5_connect(proxy.socks5, data_server.address, username="cpe1", password="pw1")
    with sock:
        sock.sendall(b"ECHO\n")
        echo_roundtrip(sock, 100_000)
    with pytest.raises(Socks5Refused):
        socks5_connect(proxy.socks5, data_server.address, username="cpe1", password="wrong")
    with pytest.raises(Socks5Refused) as info:
        socks5_connect(proxy.socks5, data_server.address)  # offers no-auth only
    assert info.value.reply == 0xFF
    assert metric(proxy, "mcpool_policy_refusals_total", reason="auth_failed") == 1
    sock = socks5_connect(proxy.socks5, data_server.address, username="cpe1", password="pw1")
    with sock:
        sock.sendall(b"ECHO\n")
        echo_roundtrip(sock, 1000)


def _refused_convert(proxy: ProxyThread, dest: tuple[str, int], **kwargs: Any) -> ConvertRefused:
    with pytest.raises(ConvertRefused) as info:
        convert_connect(proxy.convert, dest, **kwargs)
    return info.value


def test_refused_cpe_then_next_client_served(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"allowed_cpes": ["127.0.0.1/32"]})
    assert _refused_convert(proxy, data_server.address, source="127.0.0.2").code == ErrorCode.NOT_AUTHORIZED
    s = socket.create_connection(proxy.socks5, source_address=("127.0.0.2", 0))
    with s:
        from mcpool_proxy.codec.socks5 import encode_request

        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(encode_request(*data_server.address))
        assert recv_exact(s, 10)[1] == Reply.NOT_ALLOWED
        assert recv_all(s) == b""
    convert_echo(proxy, data_server)
    assert metric(proxy, "mcpool_policy_refusals_total", reason="client_not_allowed") == 2
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="convert", error="not_authorized") == 1


def test_refused_destinations_with_defaults_on(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"deny_default_destinations": True})
    for dest in (("127.0.0.1", data_server.address[1]), ("169.254.169.254", 80), ("::ffff:127.0.0.1", 80), ("::1", 80)):
        assert _refused_convert(proxy, dest).code == ErrorCode.NOT_AUTHORIZED
        with pytest.raises(Socks5Refused) as info:
            socks5_connect(proxy.socks5, dest)
        assert info.value.reply == Reply.NOT_ALLOWED
    with pytest.raises(Socks5Refused) as info:
        socks5_connect(proxy.socks5, ("localhost", 80))  # resolved, then checked
    assert info.value.reply == Reply.NOT_ALLOWED
    assert data_server.connections == 0
    assert metric(proxy, "mcpool_policy_refusals_total", reason="destination_denied") == 9


def test_refused_destination_extra_cidr_then_next_served(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"denied_destinations": ["127.0.0.3/32"], "allowed_ports": [data_server.address[1], 9]})
    assert _refused_convert(proxy, ("127.0.0.3", data_server.address[1])).code == ErrorCode.NOT_AUTHORIZED
    assert _refused_convert(proxy, ("127.0.0.1", 10)).code == ErrorCode.NOT_AUTHORIZED  # port
    convert_echo(proxy, data_server)


def test_upstream_refused_maps_to_connection_reset(start_proxy: StartProxy, data_server: DataServer) -> None:
    from helpers import free_port

    proxy = start_proxy()
    closed = ("127.0.0.1", free_port())
    assert _refused_convert(proxy, closed).code == ErrorCode.CONNECTION_RESET
    with pytest.raises(Socks5Refused) as info:
        socks5_connect(proxy.socks5, closed)
    assert info.value.reply == Reply.CONNECTION_REFUSED
    assert metric(proxy, "mcpool_upstream_connect_errors_total", reason="refused") == 2
    convert_echo(proxy, data_server)


def test_limits_answer_resource_exceeded(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"max_connections_per_cpe": 2})
    held = [convert_connect(proxy.convert, data_server.address, early_data=b"HOLD\n")[0] for _ in range(2)]
    try:
        assert _refused_convert(proxy, data_server.address).code == ErrorCode.RESOURCE_EXCEEDED
        with pytest.raises(Socks5Refused) as info:
            socks5_connect(proxy.socks5, data_server.address)
        assert info.value.reply == Reply.NOT_ALLOWED
        assert metric(proxy, "mcpool_policy_refusals_total", reason="cpe_limit") == 2
    finally:
        for s in held:
            s.close()
    proxy.wait_for(lambda: len(proxy.proxy.table) == 0, what="held connections to close")
    convert_echo(proxy, data_server)


def test_cookie_required(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"cookies": ["a1b2c3d4"]})
    assert _refused_convert(proxy, data_server.address).code == ErrorCode.MISSING_COOKIE
    # RFC 8803: a Cookie that is there but wrong is Not Authorized (32), not Missing Cookie.
    assert _refused_convert(proxy, data_server.address, cookie=b"\x01\x02\x03\x04").code == ErrorCode.NOT_AUTHORIZED
    convert_echo(proxy, data_server, cookie=bytes.fromhex("a1b2c3d4"))


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.MALFORMED_MESSAGE),
        (b"\x02\x01\x22\x63", ErrorCode.UNSUPPORTED_VERSION),
        (b"\x01\x02\x00\x00\x00\x00\x00\x00", ErrorCode.MALFORMED_MESSAGE),  # bad magic
        (b"\x01\x01\x22\x63", None),  # header only: no Connect, no Info -> just closed or error
    ],
)
def test_garbage_gets_an_error_and_next_client_served(start_proxy: StartProxy, data_server: DataServer, payload: bytes, code: ErrorCode | None) -> None:
    proxy = start_proxy()
    sock, reply, _ = raw_convert(proxy.convert, payload)
    with sock:
        if code is not None:
            assert reply is not None and reply.error is not None and reply.error.code == code
        assert recv_all(sock) == b""
    convert_echo(proxy, data_server)


def test_oversize_message_is_malformed(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"max_handshake_bytes": 64})
    from mcpool_proxy.codec.convert import CookieTLV

    big = encode_message([CookieTLV(b"x" * 200), *_connect_tlvs(data_server.address)])
    sock, reply, _ = raw_convert(proxy.convert, big)
    with sock:
        assert reply is not None and reply.error is not None
        assert reply.error.code == ErrorCode.MALFORMED_MESSAGE
    s = socket.create_connection(proxy.socks5)
    with s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x50")  # 262-byte request
        assert recv_exact(s, 10)[1] == Reply.GENERAL_FAILURE
    convert_echo(proxy, data_server)


def test_handshake_timeout_closes_and_counts(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"handshake_timeout_s": 0.3})
    s = socket.create_connection(proxy.convert)
    s2 = socket.create_connection(proxy.socks5)
    with s, s2:
        s.sendall(b"\x01\x08")  # a partial header, then silence
        s.settimeout(5)
        s2.settimeout(5)
        started = time.monotonic()
        assert s.recv(100) == b""
        assert s2.recv(100) == b""
        assert time.monotonic() - started < 3
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="convert", error="timeout") == 1
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="socks5", error="timeout") == 1
    convert_echo(proxy, data_server)


@pytest.mark.parametrize("mode", ["splice", "buffered"])
def test_relay_modes_byte_exact_few_mb(start_proxy: StartProxy, data_server: DataServer, mode: str) -> None:
    proxy = start_proxy(relay={"mode": mode})
    assert proxy.proxy.relay_mode == mode
    convert_echo(proxy, data_server, size=5_000_000)
    sock = socks5_connect(proxy.socks5, data_server.address)
    with sock:
        sock.sendall(b"ECHO\n")
        echo_roundtrip(sock, 3_000_000)
    assert metric(proxy, "mcpool_relays_total", mode=mode) == 2
    assert metric(proxy, "mcpool_relay_mode_info", mode=mode) == 1


def test_half_close_through_the_proxy(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, _, _ = convert_connect(proxy.convert, data_server.address, early_data=b"SINK\n")
    with sock:
        data = pattern(21, 1_000_000)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the reply must still arrive in full
        assert recv_all(sock).decode().split() == [sha256(data), str(len(data))]
    proxy.wait_for(lambda: len(proxy.proxy.table) == 0)
    assert metric(proxy, "mcpool_connections_closed_total", reason="client_closed") == 1


def test_metrics_count_a_scripted_sequence(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"allowed_cpes": ["127.0.0.1/32"]})
    convert_echo(proxy, data_server)
    convert_echo(proxy, data_server)
    _refused_convert(proxy, data_server.address, source="127.0.0.2")
    raw_convert(proxy.convert, b"garbage!")[0].close()
    proxy.wait_for(lambda: len(proxy.proxy.table) == 0)
    m = metrics(proxy)
    assert m[("mcpool_connections_accepted_total", (("protocol", "convert"),))] == 4
    assert m[("mcpool_connections_closed_total", (("reason", "client_closed"),))] == 2
    assert m[("mcpool_handshake_errors_total", (("error", "not_authorized"), ("protocol", "convert")))] == 1
    assert m[("mcpool_handshake_errors_total", (("error", "malformed_message"), ("protocol", "convert")))] == 1
    assert m[("mcpool_connections_active", ())] == 0
    assert m[("mcpool_mptcp_checksum_enabled", ())] in (0, 1)


def test_drain_stops_accepting_and_lets_live_connections_finish(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy()
    sock, _, _ = convert_connect(proxy.convert, data_server.address, early_data=b"ECHO\n")
    with sock:
        sock.sendall(b"a")
        assert recv_exact(sock, 1) == b"a"
        assert proxy.admin("/drain", method="POST")[0] == 202
        proxy.wait_for(lambda: proxy.proxy.draining)
        assert proxy.admin("/readyz")[0] == 503
        # New connections are reset (the listener stays open for the live ones' MP_JOINs).
        with pytest.raises(ConnectionResetError):
            convert_connect(proxy.convert, data_server.address)
        assert metric(proxy, "mcpool_handshake_errors_total", protocol="convert", error="draining") == 1
        echo_roundtrip(sock, 500_000)  # the live connection still works, byte-exact
    proxy.wait_for(lambda: len(proxy.proxy.table) == 0)


def test_random_input_never_stops_the_proxy(start_proxy: StartProxy, data_server: DataServer) -> None:
    import random

    # Only the data server's port is allowed: a random request that happens to parse can never
    # make the proxy connect anywhere else.
    proxy = start_proxy(policy={"handshake_timeout_s": 0.5, "allowed_ports": [data_server.address[1]]})
    rng = random.Random(1234)
    for i in range(60):
        target = proxy.convert if i % 2 else proxy.socks5
        prefix = rng.choice([b"", b"\x01", b"\x05\x01\x00", b"\x05\x01\x00\x05\x01\x00", b"\x01\x05\x22\x63"])
        payload = prefix + rng.randbytes(rng.randrange(0, 1500))
        s = socket.create_connection(target)
        with s:
            s.settimeout(5)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                recv_all(s)  # an answer or not, the proxy must close within the handshake timeout
            except (ConnectionResetError, BrokenPipeError):
                pass
    proxy.wait_for(lambda: proxy.proxy.metrics.handshaking._value.get() == 0, what="handshakes to end")
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="convert", error="internal") == 0
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="socks5", error="internal") == 0
    convert_echo(proxy, data_server)
    sock = socks5_connect(proxy.socks5, data_server.address)
    with sock:
        sock.sendall(b"ECHO\n")
        echo_roundtrip(sock, 10_000)


def test_refused_cpe_is_answered_before_it_sends_anything(start_proxy: StartProxy, data_server: DataServer) -> None:
    """A stranger is refused at accept: it cannot hold a descriptor for the handshake timeout."""
    proxy = start_proxy(policy={"allowed_cpes": ["127.0.0.1/32"], "handshake_timeout_s": 60})
    s = socket.create_connection(proxy.convert, source_address=("127.0.0.2", 0))
    with s:
        s.settimeout(5)
        reply = decode_message(recv_exact(s, 8))  # header + Error TLV, unasked
        assert reply.error is not None and reply.error.code == ErrorCode.NOT_AUTHORIZED
        assert recv_all(s) == b""
    convert_echo(proxy, data_server)


def test_socks5_credentials_are_not_checked_for_strangers(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(
        policy={"allowed_cpes": ["127.0.0.1/32"], "socks5_users": [{"username": "u", "password": "p"}]}
    )
    s = socket.create_connection(proxy.socks5, source_address=("127.0.0.2", 0))
    with s:
        s.settimeout(5)
        s.sendall(b"\x05\x01\x02")  # offers only username/password
        assert recv_exact(s, 2) == b"\x05\xff"  # no method acceptable: no password oracle
    assert metric(proxy, "mcpool_policy_refusals_total", reason="client_not_allowed") == 1
    assert metric(proxy, "mcpool_handshake_errors_total", protocol="socks5", error="auth_failed") == 0


def test_handshake_flood_is_refused_with_resource_exceeded(start_proxy: StartProxy, data_server: DataServer) -> None:
    proxy = start_proxy(policy={"max_handshakes": 2, "handshake_timeout_s": 60})
    silent = [socket.create_connection(proxy.convert) for _ in range(2)]
    try:
        # The two silent clients hold both handshake slots; wait until the proxy counts them.
        deadline = time.monotonic() + 5
        while metric(proxy, "mcpool_handshakes_in_progress") < 2:
            assert time.monotonic() < deadline, "the proxy never saw the two silent clients"
            time.sleep(0.02)
        s = socket.create_connection(proxy.convert)
        with s:
            s.settimeout(5)
            reply = decode_message(recv_exact(s, 8))
            assert reply.error is not None and reply.error.code == ErrorCode.RESOURCE_EXCEEDED
        assert metric(proxy, "mcpool_policy_refusals_total", reason="max_handshakes") == 1
    finally:
        for sock in silent:
            sock.close()
    deadline = time.monotonic() + 5
    while metric(proxy, "mcpool_handshakes_in_progress") > 0:
        assert time.monotonic() < deadline, "the silent clients were never released"
        time.sleep(0.02)
    convert_echo(proxy, data_server)


def test_admin_state_endpoints_only_for_trusted_clients(start_proxy: StartProxy) -> None:
    """/connections (customer addresses) and POST /drain answer only admin_trusted_clients; a CPE
    relaying to a pod's admin port must not be able to drain it. Probes and metrics stay open."""
    import http.client

    proxy = start_proxy(admin_trusted_clients=["127.0.0.1/32"])
    assert proxy.config.admin is not None
    port = int(proxy.config.admin.rsplit(":", 1)[1])

    def request(method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
        try:
            conn.request(method, path)
            return conn.getresponse().status
        finally:
            conn.close()

    assert request("GET", "/connections") == 403
    assert request("POST", "/drain") == 403
    assert request("GET", "/healthz") == 200
    assert request("GET", "/readyz") == 200  # not drained by the refused POST
    assert request("GET", "/metrics") == 200
    assert proxy.admin("/connections")[0] == 200  # from 127.0.0.1: trusted


def test_private_ranges_and_the_vip_are_refused_and_allowed_destinations_open_one(
    start_proxy: StartProxy, data_server: DataServer
) -> None:
    # own_addresses=None: the proxy lists its namespace's addresses itself, as in production;
    # the VIP is not on any interface yet (the pod affinity adds it to lo later) and must be
    # refused all the same.
    proxy = start_proxy(
        own_addresses=None,
        policy={"deny_default_destinations": True, "allowed_destinations": ["127.0.0.1/32"]},
        affinity={"vip": "198.18.77.7"},
    )
    for dest in (("10.0.0.1", 10250), ("192.168.1.1", 6379), ("100.64.0.1", 443), ("fd00::1", 443),
                 ("198.18.77.7", 5124)):  # fmt: skip
        assert _refused_convert(proxy, dest).code == ErrorCode.NOT_AUTHORIZED, dest
        with pytest.raises(Socks5Refused) as info:
            socks5_connect(proxy.socks5, dest)
        assert info.value.reply == Reply.NOT_ALLOWED, dest
    assert metric(proxy, "mcpool_policy_refusals_total", reason="destination_denied") == 10
    convert_echo(proxy, data_server)  # 127.0.0.1, refused by default, opened by allowed_destinations


async def test_a_dead_affinity_task_makes_the_pod_unready_and_exit_nonzero(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10: never a healthy-looking pod whose registrations silently expired.
    import asyncio

    from helpers import free_port, make_config
    from mcpool_proxy import server

    captured: list[Any] = []

    class DeadAffinity:
        failure = "registry Registry._heartbeat_loop died: RuntimeError: injected"

        def __init__(self) -> None:
            self.died = asyncio.Event()
            asyncio.get_running_loop().call_later(0.1, self.died.set)

        async def drain(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    async def fake_start_affinity(proxy: Any) -> DeadAffinity:
        captured.append(proxy)
        return DeadAffinity()

    monkeypatch.setattr(server, "start_affinity", fake_start_affinity)
    config = make_config({"convert": free_port(), "socks5": free_port(), "admin": free_port()})
    status = await asyncio.wait_for(server.run(config), 30)
    assert status == 1
    proxy = captured[0]
    assert not proxy.ready
    assert proxy.readiness()["failure"] == f"affinity: {DeadAffinity.failure}"
