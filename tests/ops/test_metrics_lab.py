"""`/metrics` of a real `mcpool proxy` on the namespace lab, parsed with prometheus-client's own
parser, against a scripted sequence of connections: every counter that moved must have moved by
exactly what the script did, and nothing else may have moved."""

from __future__ import annotations

import socket

import pytest
from mcpool_proxy.codec.convert import decode_message
from mcpool_proxy.cpe.convert_client import ConvertRefused
from mcpool_proxy.cpe.socks5_client import Socks5Refused
from mcpool_tools.lab import Lab
from ops_helpers import (
    SERVER_PORT,
    cpe_convert,
    cpe_socks5,
    download,
    sample,
    scrape,
    start_proxy,
    wait_subflows,
)
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]


def _garbage(lab: Lab, port: int) -> str:
    """A Convert message with a bad magic; returns the error name the proxy answered with."""
    with lab.in_netns("cpe"):
        sock = socket.create_connection((lab.mcp_ip, port), timeout=10)
    with sock:
        sock.sendall(b"\x01\x01\x00\x00")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    error = decode_message(answer).error
    assert error is not None
    return error.code.name.lower()


def test_metrics_match_a_scripted_sequence_exactly(ops_lab: Lab) -> None:
    lab = ops_lab
    paths = {name: [p for p in lab.cpe_prefixes if p.startswith(link.cpe_ip.rsplit(".", 1)[0] + ".")]
             for name, link in lab.links.items()}
    proxy, (convert_port, socks_port, _) = start_proxy(lab, "metrics", access_paths=paths)
    try:
        up = 0
        # Three MPTCP connections, each waited on until both CPE links carry a subflow.
        for size, seed in ((100_000, 1), (200_000, 2)):
            sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
            with sock:
                wait_subflows(proxy, sock, 2)
                if seed == 1:
                    # wait_subflows reads the kernel (/connections); the gauge follows the
                    # netlink events, which may arrive a little later on a loaded machine.
                    def gauge_at_two() -> dict | None:
                        d = scrape(proxy)
                        return d if sample(d, "mcpool_mptcp_subflows") == 2 else None

                    during = wait_for(gauge_at_two, 10, "the subflow gauge at 2")
                    assert sample(during, "mcpool_connections_active") == 1
                    assert sample(during, "mcpool_mptcp_subflows") == 2
                    assert sample(during, "mcpool_mptcp_subflow_watch_info", source="netlink") == 1
                up += download(sock, size, seed, early)
        sock = cpe_socks5(lab, socks_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            wait_subflows(proxy, sock, 2)
            up += download(sock, 300_000, 3)
        # A plain TCP client: one path, counted as one subflow.
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT), mptcp=False)
        with sock:
            up += download(sock, 50_000, 4, early)
        # Refusals: a loopback destination (Convert), the metadata address (SOCKS5), garbage.
        # Plain TCP clients: whether an MPTCP client's join beats the refusal is a race, and a
        # join accepted on a refused connection counts (it is one the kernel accepted).
        with pytest.raises(ConvertRefused):
            cpe_convert(lab, convert_port, ("127.0.0.1", SERVER_PORT), mptcp=False)
        with pytest.raises(Socks5Refused):
            cpe_socks5(lab, socks_port, ("169.254.169.254", 80), mptcp=False)
        garbage_error = _garbage(lab, convert_port)

        def settled() -> dict | None:
            s = scrape(proxy)
            done = sample(s, "mcpool_connections_active") == 0 and sample(s, "mcpool_handshakes_in_progress") == 0
            return s if done and sample(s, "mcpool_mptcp_subflows_per_connection_count") == 4 else None

        s = wait_for(settled, 10, "every connection closed")
    finally:
        proxy.stop()

    expected_totals = {
        ("mcpool_connections_accepted_total", (("protocol", "convert"),)): 5,
        ("mcpool_connections_accepted_total", (("protocol", "socks5"),)): 2,
        ("mcpool_connections_closed_total", (("reason", "server_closed"),)): 4,
        ("mcpool_relays_total", (("mode", "splice"),)): 4,
        ("mcpool_relayed_bytes_total", (("direction", "up"),)): up,
        ("mcpool_relayed_bytes_total", (("direction", "down"),)): 650_000,
        ("mcpool_handshake_errors_total", (("error", "not_authorized"), ("protocol", "convert"))): 1,
        ("mcpool_handshake_errors_total", (("error", "not_allowed"), ("protocol", "socks5"))): 1,
        ("mcpool_handshake_errors_total", (("error", garbage_error), ("protocol", "convert"))): 1,
        ("mcpool_policy_refusals_total", (("reason", "destination_denied"),)): 2,
        ("mcpool_mptcp_joins_accepted_total", ()): 3,
        ("mcpool_mptcp_fallbacks_total", (("protocol", "convert"),)): 1,  # the plain TCP client
    }
    moved = {
        (name, tuple(sorted(labels))): value
        for (name, labels), value in s.items()
        if name.endswith("_total") and value != 0 and name != "mcpool_access_path_bytes_total"
    }
    assert moved == expected_totals
    assert sample(s, "mcpool_upstream_connect_duration_seconds_count") == 4
    assert sample(s, "mcpool_mptcp_subflows") == 0
    hist = "mcpool_mptcp_subflows_per_connection"
    assert sample(s, f"{hist}_count") == 4 and sample(s, f"{hist}_sum") == 2 + 2 + 2 + 1
    assert sample(s, f"{hist}_bucket", le="1.0") == 1 and sample(s, f"{hist}_bucket", le="2.0") == 4
    assert sample(s, "mcpool_relay_mode_info", mode="splice") == 1
    assert sample(s, "mcpool_otel_tracing_enabled") == 0
    assert sample(s, "mcpool_mptcp_checksum_enabled") == 1
    # Bytes per access path add up to what was relayed (the kernel's subflow counters, sampled
    # mid-connection, also count the Convert messages: a few bytes more at most).
    by_path: dict[tuple[str, str], float] = {}
    for (name, labels), value in s.items():
        if name == "mcpool_access_path_bytes_total":
            d = dict(labels)
            key = (d["path"], d["direction"])
            by_path[key] = by_path.get(key, 0) + value
    assert up <= by_path[("dsl", "up")] + by_path[("lte", "up")] <= up + 1000, by_path
    assert 650_000 <= by_path[("dsl", "down")] + by_path[("lte", "down")] <= 650_000 + 1000, by_path
    assert by_path.get(("other", "up"), 0) == by_path.get(("other", "down"), 0) == 0, by_path
