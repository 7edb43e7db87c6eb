"""The MCP in implicit mode on the real kernel: marked MPTCP is terminated with no address
translation, unmarked MPTCP passes end to end, strangers are refused, and a missing listener
fails closed. Every claim is read from the kernel's own view: the MCP's subflows (MPTCP_INFO
through /connections and `ss`), the server's peers, nft counters."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from implicit_e2e import (
    JOIN_PORT,
    SERVER_PORT,
    TRANSPARENT_PORT,
    download,
    finish_download,
    host_of,
    mcp_config,
    mptcp_connect,
    nft_counters,
    proxy_connection,
    request_download,
    server_subflows_for,
    tcp_peers,
)
from mcpool_proxy.kernel.tproxy import MCP_TABLE
from mcpool_tools.lab import ImplicitLab, ProxyProcess
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]


@pytest.fixture(scope="module")
def mcp(lab: ImplicitLab) -> Iterator[ProxyProcess]:
    handle = lab.start_proxy(mcp_config(lab), name="mcp")
    yield handle
    handle.stop()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_marked_mptcp_is_terminated_with_two_subflows_and_the_clients_address(
    lab: ImplicitLab, mcp: ProxyProcess, family: str
) -> None:
    v6 = family == "ipv6"
    server = lab.srv_ip6 if v6 else lab.srv_ip
    client = lab.cpe_dsl_ip6 if v6 else lab.cpe_dsl_ip
    before = nft_counters(lab, "mcp", MCP_TABLE)["intercepted"]
    with mptcp_connect(lab, "cpe", (server, SERVER_PORT), marked=True) as sock:
        port = sock.getsockname()[1]
        # The MCP terminated it: its transparent connection, with the LTE subflow joined at the
        # announced port (IPv6 connections take the IPv4 announcement, see docs/implicit.md).
        conn = wait_for(lambda: (c := proxy_connection(mcp, port)) and len(c["subflows"]) == 2 and c,
                        20, "two subflows at the MCP")
        assert conn["mode"] == "transparent"
        assert host_of(conn["destination"]) == server
        remotes = {host_of(s["remote"]) for s in conn["subflows"]}
        assert remotes == {client, lab.cpe_lte_ip}
        assert any(s["local"].endswith(f":{JOIN_PORT}") for s in conn["subflows"])
        # The kernel agrees: a subflow on the join port from the CPE's LTE address.
        assert any(host_of(peer) == lab.cpe_lte_ip for _, peer in tcp_peers(lab, "mcp", JOIN_PORT))
        # No address translation: the server's peer is the client's own address, and the
        # server holds one plain connection (upstream is TCP), not the CPE's two subflows.
        peers = [host_of(peer) for _, peer in tcp_peers(lab, "srv", SERVER_PORT)]
        assert client in peers
        assert lab.cpe_lte_ip not in peers
        download(sock, 3_000_000, 11)
    assert nft_counters(lab, "mcp", MCP_TABLE)["intercepted"] > before
    metrics = mcp.admin_get("/metrics")
    assert 'mcpool_connections_accepted_total{protocol="transparent"}' in metrics or 'mode="transparent"' in metrics


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_unmarked_mptcp_from_an_allowed_prefix_passes_end_to_end(
    lab: ImplicitLab, mcp: ProxyProcess, family: str
) -> None:
    """The phone's own MPTCP: Wi-Fi through the CPE and the MCP, cellular around both."""
    before = nft_counters(lab, "mcp", MCP_TABLE)
    server = lab.srv_ip6 if family == "ipv6" else lab.srv_ip
    with mptcp_connect(lab, "phn", (server, SERVER_PORT), marked=False) as sock:
        port = sock.getsockname()[1]
        hosts = {lab.phone_ip6, lab.phone_cell_ip6} if family == "ipv6" else {lab.phone_ip, lab.phone_cell_ip}
        request_download(sock, 20_000_000, 12)
        wait_for(lambda: server_subflows_for(lab, hosts) == 2, 20, "the phone's two subflows at the server")
        assert proxy_connection(mcp, port) is None
        assert not [p for _, p in tcp_peers(lab, "mcp", SERVER_PORT)]
        finish_download(sock, 20_000_000, 12)
    after = nft_counters(lab, "mcp", MCP_TABLE)
    assert after["passed"] > before["passed"]
    assert after["intercepted"] == before["intercepted"]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_marked_syn_from_a_stranger_is_refused(lab: ImplicitLab, mcp: ProxyProcess, family: str) -> None:
    v6 = family == "ipv6"
    stranger, server = ("2001:db8:99::2", lab.srv_ip6) if v6 else ("198.18.9.2", lab.srv_ip)
    fam = ["-6"] if v6 else []
    lab.exec("cpe", ["ip", *fam, "addr", "replace", f"{stranger}/{128 if v6 else 32}", "dev", "lo"])
    lab.exec("mcp", ["ip", *fam, "route", "replace", stranger, "via", lab.cpe_dsl_ip6 if v6 else lab.cpe_dsl_ip])
    before = nft_counters(lab, "mcp", MCP_TABLE)["stranger"]
    with pytest.raises(ConnectionRefusedError):
        mptcp_connect(lab, "cpe", (server, SERVER_PORT), marked=True, source=stranger)
    assert nft_counters(lab, "mcp", MCP_TABLE)["stranger"] == before + 1
    assert stranger not in {host_of(p) for _, p in tcp_peers(lab, "srv", SERVER_PORT)}


def test_the_table_and_routing_go_at_exit_and_a_busy_listener_fails_closed(
    lab: ImplicitLab, mcp: ProxyProcess
) -> None:
    assert mcp.stop() == 0
    assert lab.exec("mcp", ["nft", "list", "table", "inet", MCP_TABLE], check=False).returncode != 0
    assert "fwmark" not in lab.exec("mcp", ["ip", "rule"]).stdout
    # Somebody else holds the transparent port: the proxy starts, says it is not ready, and the
    # kernel drops marked SYNs instead of letting them reach the server end to end.
    with lab.in_netns("mcp"):
        blockers = [socket.create_server((lab.mcp_ip, TRANSPARENT_PORT)),
                    socket.create_server((lab.mcp_ip6, TRANSPARENT_PORT), family=socket.AF_INET6)]
    try:
        proxy = lab.start_proxy(mcp_config(lab), name="failclosed")
        status, body = proxy.admin_request("GET", "/readyz")
        assert status == 503, body
        assert b"transparent_unbound" in body
        for server, client in ((lab.srv_ip, lab.cpe_dsl_ip), (lab.srv_ip6, lab.cpe_dsl_ip6)):
            before = nft_counters(lab, "mcp", MCP_TABLE)["unbound"]
            with pytest.raises((TimeoutError, socket.timeout)):
                mptcp_connect(lab, "cpe", (server, SERVER_PORT), marked=True, timeout_s=2.5)
            assert nft_counters(lab, "mcp", MCP_TABLE)["unbound"] > before
            assert client not in {host_of(p) for _, p in tcp_peers(lab, "srv", SERVER_PORT)}
    finally:
        for blocker in blockers:
            blocker.close()
    # The ports are free again: the retry binds them, /readyz turns 200, marked SYNs are served.
    wait_for(lambda: proxy.admin_request("GET", "/readyz")[0] == 200, 10, "/readyz 200 once the port is free")
    for server in (lab.srv_ip, lab.srv_ip6):
        with mptcp_connect(lab, "cpe", (server, SERVER_PORT), marked=True) as sock:
            download(sock, 500_000, 13)
    assert proxy.stop() == 0
