"""The CPE converter and the MCP together on the real kernel (implicit mode end to end): a laptop's
plain TCP becomes a marked MPTCP connection over DSL and LTE that the on-path MCP terminates with
no address translation; a phone's own MPTCP passes both; half-close and reset cross the CPE;
Convert mode reaches the MCP's Convert listener instead."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from implicit_e2e import (
    JOIN_PORT,
    SERVER_PORT,
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
from mcpool_proxy.kernel.tproxy import CPE_TABLE, MCP_TABLE
from mcpool_tools.lab import ImplicitLab, ProxyProcess
from mcpool_tools.testserver import PatternReader, pattern_chunks, pattern_sha256
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]


@pytest.fixture(scope="module")
def mcp(lab: ImplicitLab) -> Iterator[ProxyProcess]:
    config = mcp_config(lab, listen={"convert": "[::]:5124", "transparent": mcp_config(lab)["listen"]["transparent"]})
    handle = lab.start_proxy(config, name="mcp")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def cpe(lab: ImplicitLab, mcp: ProxyProcess) -> Iterator[ProxyProcess]:
    handle = lab.start_cpe(lab.cpe_config())
    yield handle
    handle.stop()


def laptop_connect(lab: ImplicitLab, dest: tuple[str, int]) -> socket.socket:
    """The laptop's plain TCP (no MPTCP anywhere on the laptop)."""
    with lab.in_netns("lap"):
        sock = socket.create_connection(dest, timeout=10)
    sock.settimeout(60)
    return sock


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_laptop_tcp_is_converted_terminated_at_the_mcp_and_the_server_sees_the_laptop(
    lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess, family: str
) -> None:
    v6 = family == "ipv6"
    server, laptop = (lab.srv_ip6, lab.laptop_ip6) if v6 else (lab.srv_ip, lab.laptop_ip)
    cpe_before = nft_counters(lab, "cpe", CPE_TABLE)
    mcp_before = nft_counters(lab, "mcp", MCP_TABLE)
    with laptop_connect(lab, (server, SERVER_PORT)) as sock:
        port = sock.getsockname()[1]
        # The server's peer is the laptop: no address translation anywhere (asserted before the
        # download, which the server may finish, and close, before the laptop has read it).
        wait_for(lambda: laptop in {host_of(p) for _, p in tcp_peers(lab, "srv", SERVER_PORT)}, 10,
                 "the laptop's address as the server's peer")
        request_download(sock, 8_000_000, 21)
        # The CPE converted it (its own connection, the laptop as client)...
        cpe_conn = wait_for(lambda: proxy_connection(cpe, port), 10, "the CPE's connection")
        assert cpe_conn["mode"] == "transparent" and host_of(cpe_conn["destination"]) == server
        # ...and the MCP terminated the marked MPTCP: two subflows, the initial one from the
        # laptop's own address over DSL, the other from the CPE's LTE address at the join port.
        def at_mcp() -> dict[str, object] | None:
            for conn in mcp.connections():
                remotes = {host_of(s["remote"]) for s in conn["subflows"]}
                if host_of(conn["client"]) == laptop and remotes == {laptop, lab.cpe_lte_ip}:
                    return dict(conn)
            return None
        conn = wait_for(at_mcp, 20, "the MCP's two subflows")
        assert conn["mode"] == "transparent"
        assert any(host_of(p) == lab.cpe_lte_ip for _, p in tcp_peers(lab, "mcp", JOIN_PORT))
        finish_download(sock, 8_000_000, 21)
    assert nft_counters(lab, "cpe", CPE_TABLE)["converted"] > cpe_before["converted"]
    assert nft_counters(lab, "cpe", CPE_TABLE)["marked"] > cpe_before["marked"]
    assert nft_counters(lab, "mcp", MCP_TABLE)["intercepted"] > mcp_before["intercepted"]
    for handle in (cpe, mcp):
        assert 'mcpool_connections_accepted_total{protocol="transparent"}' in handle.admin_get("/metrics")


def test_dsl_cut_mid_transfer_every_byte_arrives(lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess) -> None:
    size, seed = 40_000_000, 22
    with laptop_connect(lab, (lab.srv_ip, SERVER_PORT)) as sock:
        request_download(sock, size, seed)
        wait_for(lambda: any(len(c["subflows"]) == 2 for c in mcp.connections()), 20, "two subflows")
        reader = PatternReader()
        while reader.count < 4_000_000:
            reader.update(sock.recv(262_144))
        lab.cut_link("dsl")
        try:
            while data := sock.recv(262_144):
                reader.update(data)
        finally:
            lab.restore_link("dsl")
        assert reader.count == size
        assert reader.hexdigest() == pattern_sha256(seed, size)


def test_the_phones_own_mptcp_passes_cpe_and_mcp(lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess) -> None:
    cpe_before = nft_counters(lab, "cpe", CPE_TABLE)
    with mptcp_connect(lab, "phn", (lab.srv_ip, SERVER_PORT), marked=False) as sock:
        request_download(sock, 20_000_000, 23)
        wait_for(lambda: server_subflows_for(lab, {lab.phone_ip, lab.phone_cell_ip}) == 2, 20,
                 "the phone's two subflows at the server")
        assert not [c for c in mcp.connections() if host_of(c["client"]) == lab.phone_ip]
        assert not [c for c in cpe.connections() if host_of(c["client"]) == lab.phone_ip]
        finish_download(sock, 20_000_000, 23)
    assert nft_counters(lab, "cpe", CPE_TABLE)["passed_mptcp"] > cpe_before["passed_mptcp"]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_half_close_crosses_the_converter(lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess, family: str) -> None:
    up, reply = 3_000_000, 2_000_000
    server = lab.srv_ip6 if family == "ipv6" else lab.srv_ip
    with laptop_connect(lab, (server, SERVER_PORT)) as sock:
        sock.sendall(f"SINK {reply} 25\n".encode())
        for chunk in pattern_chunks(24, up):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        buffered = b""
        while b"\n" not in buffered:
            data = sock.recv(65536)
            assert data, "closed before the server's verdict"
            buffered += data
        line, _, rest = buffered.partition(b"\n")
        digest, count = line.decode().split()
        assert int(count) == up and digest == pattern_sha256(24, up)
        reader = PatternReader()
        reader.update(rest)
        while data := sock.recv(262_144):
            reader.update(data)
        assert reader.count == reply and reader.hexdigest() == pattern_sha256(25, reply)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_reset_from_the_laptop_closes_both_hops(
    lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess, family: str
) -> None:
    server, laptop = (lab.srv_ip6, lab.laptop_ip6) if family == "ipv6" else (lab.srv_ip, lab.laptop_ip)
    resets_before = _sample(cpe, 'mcpool_connections_closed_total{reason="client_reset"}')
    sock = laptop_connect(lab, (server, SERVER_PORT))
    sock.sendall(b"ECHO\n")
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    port = sock.getsockname()[1]
    assert proxy_connection(cpe, port) is not None
    # Both hops carry it: the MCP terminated the CPE's marked MPTCP for this laptop.
    wait_for(lambda: [c for c in mcp.connections() if host_of(c["client"]) == laptop], 10, "the MCP's relay")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_for(lambda: proxy_connection(cpe, port) is None, 10, "the CPE's relay to end")
    wait_for(lambda: not [c for c in mcp.connections() if host_of(c["client"]) == laptop], 10,
             "the MCP's relay to end")
    assert _sample(cpe, 'mcpool_connections_closed_total{reason="client_reset"}') == resets_before + 1


def _sample(handle: ProxyProcess, series: str) -> float:
    for line in handle.admin_get("/metrics").splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_convert_mode_reaches_the_mcps_convert_listener(
    lab: ImplicitLab, mcp: ProxyProcess, cpe: ProxyProcess
) -> None:
    # The implicit converter goes (its table and routing with it); a Convert-mode one replaces it.
    assert cpe.stop() == 0
    assert lab.exec("cpe", ["nft", "list", "table", "inet", CPE_TABLE], check=False).returncode != 0
    config = lab.cpe_config(mode="convert", converter=f"{lab.mcp_ip}:5124")
    handle = lab.start_cpe(config, name="cpe-convert")
    try:
        with laptop_connect(lab, (lab.srv_ip, SERVER_PORT)) as sock:
            request_download(sock, 2_000_000, 26)
            conn = wait_for(lambda: [c for c in mcp.connections() if c["mode"] == "convert"], 10, "a Convert connection")
            assert host_of(conn[0]["client"]) in {lab.cpe_dsl_ip, lab.cpe_lte_ip}
            assert host_of(conn[0]["destination"]) == lab.srv_ip
            finish_download(sock, 2_000_000, 26)
        # Not marked: the MCP's transparent table saw no converted SYN for it.
        assert nft_counters(lab, "cpe", CPE_TABLE)["marked"] == 0
    finally:
        handle.stop()
