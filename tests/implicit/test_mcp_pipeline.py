"""What the explicit modes have, in transparent mode, on the real kernel: one span per connection
(on the OTLP wire, from a real receiver in the MCP's namespace) saying mode, client and
destination; `/connections` and metrics with mode/protocol `transparent`; refused destinations
and the per-CPE limit answered with a reset and counted; and the drain: SIGTERM while a marked
connection is live, the transfer completes byte-exact, new marked SYNs are reset by the MCP (they
never reach the server, neither relayed nor end to end), `/readyz` fails, and at exit nothing of
the MCP is left in the kernel."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from implicit_e2e import (
    NO_LEFTOVERS,
    SERVER_PORT,
    finish_download,
    host_of,
    leftovers,
    mcp_config,
    mptcp_connect,
    nft_counters,
    proxy_connection,
    request_download,
    tcp_peers,
)
from mcpool_proxy.kernel.tproxy import MCP_TABLE
from mcpool_tools.lab import ImplicitLab, ProxyProcess
from mcpool_tools.testserver import PatternReader, pattern_sha256
from support import requires_netns, wait_for

sys.path.insert(0, str(Path(__file__).parents[1] / "ops"))
from ops_helpers import environment, logs, otel_env, sample, scrape  # noqa: E402
from otlp_receiver import OtlpReceiver, ReceivedSpan  # noqa: E402

pytestmark = [requires_netns, pytest.mark.netns]

ERROR_SENT = "mcpool.error_sent"


@pytest.fixture
def receiver(lab: ImplicitLab) -> Iterator[tuple[OtlpReceiver, str]]:
    """A real OTLP/HTTP receiver on 127.0.0.1 of the MCP's namespace, and its endpoint."""
    rx = OtlpReceiver()
    with lab.in_netns("mcp"):
        endpoint = rx.start("127.0.0.1")
    yield rx, endpoint
    rx.stop()


def start_mcp(lab: ImplicitLab, name: str, endpoint: str | None = None, **overrides: Any) -> ProxyProcess:
    with environment(otel_env(endpoint) if endpoint else {}):
        return lab.start_proxy(mcp_config(lab, log_level="info", **overrides), name=name)


def span_of(rx: OtlpReceiver, port: int) -> ReceivedSpan:
    (span,) = rx.wait_for(lambda s: s.name == "transparent" and s.attributes.get("client.port") == port)
    return span


def echo(sock: socket.socket) -> None:
    sock.sendall(b"ECHO\nping")
    got = b""
    while len(got) < 4:
        data = sock.recv(16)
        assert data, "closed before the echo"
        got += data
    assert got == b"ping"


def refused_by_reset(connect: Callable[[], socket.socket]) -> None:
    """The kernel completes the handshake with the transparent listener; the MCP then resets."""
    with pytest.raises(ConnectionResetError):
        sock = connect()
        with sock:
            sock.settimeout(10)
            sock.sendall(b"ECHO\nping")
            sock.recv(16)


def established_from(lab: ImplicitLab, host: str) -> int:
    return sum(1 for _, peer in tcp_peers(lab, "srv", SERVER_PORT) if host_of(peer) == host)


def test_span_connections_and_metrics_say_transparent(lab: ImplicitLab, receiver: tuple[OtlpReceiver, str]) -> None:
    rx, endpoint = receiver
    proxy = start_mcp(lab, "traced", endpoint)
    try:
        for family, server, client in (("ipv4", lab.srv_ip, lab.cpe_dsl_ip), ("ipv6", lab.srv_ip6, lab.cpe_dsl_ip6)):
            size = 2_000_000
            with mptcp_connect(lab, "cpe", (server, SERVER_PORT), marked=True) as sock:
                port = sock.getsockname()[1]
                request_download(sock, size, 41)
                conn = wait_for(lambda p=port: proxy_connection(proxy, p), 10, "the connection in /connections")
                assert conn["mode"] == "transparent"
                assert conn["client"] == (f"[{client}]:{port}" if family == "ipv6" else f"{client}:{port}")
                assert host_of(conn["destination"]) == server and conn["destination"].endswith(f":{SERVER_PORT}")
                assert conn["token"] is not None  # the MCP terminated the MPTCP connection itself
                live = scrape(proxy)
                assert sample(live, "mcpool_connections_active_by_mode", mode="transparent", transport="mptcp") == 1
                finish_download(sock, size, 41)
            span = span_of(rx, port)
            a = span.attributes
            assert a["mcpool.mode"] == "transparent"
            assert a["client.address"] == client and a["client.port"] == port
            assert a["server.address"] == server and a["server.port"] == SERVER_PORT
            assert a["network.type"] == family
            assert a["mcpool.mptcp.token"] == conn["token"] and a["mcpool.mptcp.fallback"] is False
            assert a["mcpool.bytes_down"] == size
            assert a["mcpool.close_reason"] in ("server_closed", "client_closed")
            children = {s.name for s in rx.trace(span.trace_id) if s.parent_span_id == span.span_id}
            assert children == {"transparent.handshake", "upstream.connect"}
        done = scrape(proxy)
        assert sample(done, "mcpool_connections_accepted_total", protocol="transparent") == 2
        assert sample(done, "mcpool_connections_active_by_mode", mode="transparent", transport="mptcp") == 0
        assert sample(done, "mcpool_handshake_duration_seconds_count", protocol="transparent") == 2
        assert sample(done, "mcpool_transparent_syns_total", verdict="intercepted") >= 2
    finally:
        assert proxy.stop() == 0
    (line,) = [e for e in logs(proxy) if e["msg"] == "connection closed" and e.get("client.port") == port]
    assert line["mcpool.mode"] == "transparent" and line["trace_id"] == span.trace_id


def test_refused_destination_and_per_cpe_limit_are_resets_and_counted(
    lab: ImplicitLab, receiver: tuple[OtlpReceiver, str]
) -> None:
    rx, endpoint = receiver
    policy = {"allowed_cpes": lab.subscriber_prefixes, "denied_destinations": [f"{lab.srv_ip6}/128"],
              "max_connections_per_cpe": 1}
    proxy = start_mcp(lab, "policy", endpoint, policy=policy)
    try:
        # A refused destination: reset, never connected upstream.
        refused_by_reset(lambda: mptcp_connect(lab, "cpe", (lab.srv_ip6, SERVER_PORT), marked=True))
        assert established_from(lab, lab.cpe_dsl_ip6) == 0
        denied = rx.wait_for(lambda s: s.name == "transparent" and s.attributes.get("server.address") == lab.srv_ip6)[0]
        (event,) = [e for e in denied.events if e.name == ERROR_SENT]
        assert event.attributes["mcpool.error.name"] == "not_allowed"
        assert denied.attributes["mcpool.close_reason"] == "refused" and denied.status_code == 2
        assert not [s for s in rx.trace(denied.trace_id) if s.name == "upstream.connect"]

        # The per-CPE limit: one live connection, the second is reset, the slot comes back.
        with mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True) as first:
            echo(first)
            refused_by_reset(lambda: mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True))
            assert established_from(lab, lab.cpe_dsl_ip) == 1
        wait_for(lambda: not proxy.connections(), 10, "the first connection to end")
        with mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True) as again:
            echo(again)

        counted = scrape(proxy)
        assert sample(counted, "mcpool_policy_refusals_total", reason="destination_denied") == 1
        assert sample(counted, "mcpool_policy_refusals_total", reason="cpe_limit") == 1
        assert sample(counted, "mcpool_handshake_errors_total", protocol="transparent", error="not_allowed") == 1
        assert sample(counted, "mcpool_handshake_errors_total", protocol="transparent", error="resource_exceeded") == 1
    finally:
        assert proxy.stop() == 0


def test_drain_completes_the_live_transfer_resets_new_marked_syns_and_leaves_nothing(lab: ImplicitLab) -> None:
    proxy = start_mcp(lab, "drain", drain_timeout_s=30)
    size, seed = 30_000_000, 42
    try:
        with mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True) as sock:
            request_download(sock, size, seed)
            reader = PatternReader()
            while reader.count < 1_000_000:  # part of it now; the rest is held back by the window
                reader.update(sock.recv(65536))
            assert proxy.admin_request("GET", "/readyz")[0] == 200

            proxy.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: proxy.admin_request("GET", "/readyz")[0] == 503, 5, "/readyz 503 after SIGTERM")
            assert proxy.admin_request("GET", "/healthz")[0] == 200
            # A new marked SYN still goes to the MCP (its listener stays open for joins), which
            # resets it: it reaches the server neither relayed nor as end-to-end MPTCP.
            before = nft_counters(lab, "mcp", MCP_TABLE)
            refused_by_reset(lambda: mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True))
            after = nft_counters(lab, "mcp", MCP_TABLE)
            assert after["intercepted"] == before["intercepted"] + 1 and after["unbound"] == before["unbound"]
            assert established_from(lab, lab.cpe_dsl_ip) == 1  # the live one only
            during = scrape(proxy)
            assert sample(during, "mcpool_draining") == 1
            assert sample(during, "mcpool_handshake_errors_total", protocol="transparent", error="draining") == 1
            assert sample(during, "mcpool_connections_active_by_mode", mode="transparent", transport="mptcp") == 1

            while data := sock.recv(262_144):
                reader.update(data)
            assert reader.count == size
            assert reader.hexdigest() == pattern_sha256(seed, size), "content changed during the drain"
        assert proxy.proc.wait(15) == 0
    finally:
        proxy.stop()
    (summary,) = [e for e in logs(proxy) if e["msg"] == "stopped"]
    assert summary["drained_in_time"] is True and summary["connections_at_signal"] == 1
    # At exit the table, the routing and the join endpoint are gone.
    assert leftovers(lab, "mcp", MCP_TABLE) == NO_LEFTOVERS
