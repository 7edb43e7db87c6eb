"""End to end on the real kernel: a CPE with DSL and LTE bonds both through `mcpool proxy`.

Each test drives real sockets from the lab's CPE namespace through the proxy (its own process in
the MCP namespace) to the deterministic test server, checks content by sha256, and checks
multipath both in the proxy's `/connections` and in the kernel's own view (`ss`, counters).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest
from e2e import (
    CONVERT_PORT,
    MPTCP_SERVER_PORT,
    SERVER_PORT,
    SOCKS5_PORT,
    cpe_convert,
    download,
    host_of,
    kernel_subflows,
    mptcp_sockets,
    netstat_counters,
    port_of,
    proxy_config,
    proxy_conn_for,
    served_normally,
    upload_and_reply,
    wait_two_subflows,
)
from mcpool_proxy.cpe.convert_client import ConvertRefused
from mcpool_proxy.kernel.mptcp import fastopen_used, get_mptcp_info, get_subflows
from mcpool_tools.lab import Lab, ProxyProcess
from mcpool_tools.testserver import pattern_sha256
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]

MB = 1_000_000


def test_two_subflows_50mb_each_way(lab: Lab, proxy: ProxyProcess) -> None:
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT))
    with sock:
        conn = wait_two_subflows(lab, proxy, sock)
        assert re.fullmatch(r"[0-9a-f]{8}", conn["token"]), conn
        assert conn["mode"] == "convert"
        assert host_of(conn["client"]) == lab.cpe_dsl_ip
        assert host_of(conn["destination"]) == lab.srv_ip and port_of(conn["destination"]) == SERVER_PORT

        # The kernel's own view in the MCP namespace: two subflows of one MPTCP connection,
        # one from each CPE link, carrying the token the proxy reports.
        subflows = [sf for sf in kernel_subflows(lab, "mcp", CONVERT_PORT) if sf.token == int(conn["token"], 16)]
        assert sorted(host_of(sf.remote) for sf in subflows) == sorted([lab.cpe_dsl_ip, lab.cpe_lte_ip])
        assert any(f"token:{int(conn['token'], 16):x}" in entry for entry in mptcp_sockets(lab, "mcp", CONVERT_PORT))
        # ... and the client's: MPTCP_INFO counts one additional subflow.
        info = get_mptcp_info(sock)
        assert info is not None and info.subflows == 1

        upload_and_reply(sock, 50 * MB, seed=11, reply_size=50 * MB, reply_seed=12, initial=early)


def test_dsl_cut_mid_transfer_finishes_on_lte(lab: Lab, proxy: ProxyProcess) -> None:
    size, seed = 50 * MB, 13
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT))
    try:
        with sock:
            wait_two_subflows(lab, proxy, sock)
            sock.sendall(f"SEND {size} {seed}\n".encode())
            digest = hashlib.sha256(early)
            count = len(early)
            buf = bytearray(262_144)
            lte_at_cut: int | None = None
            while True:
                got = sock.recv_into(buf)
                if not got:
                    break
                digest.update(memoryview(buf)[:got])
                count += got
                if lte_at_cut is None and count >= 15 * MB:
                    # Reading stops while the link is cut, so most of the 50 MB is still on
                    # the server side: the rest has to come over LTE.
                    lte_at_cut = sum(sf.bytes_received or 0 for sf in get_subflows(sock)
                                     if sf.local[0] == lab.cpe_lte_ip)
                    lab.cut_link("dsl")
            assert count == size
            assert digest.hexdigest() == pattern_sha256(seed, size)
            assert lte_at_cut is not None
            lte_now = max((sf.bytes_received or 0 for sf in get_subflows(sock)
                           if sf.local[0] == lab.cpe_lte_ip), default=0)
            assert lte_now - lte_at_cut >= 20 * MB, "the bytes after the cut did not come over LTE"
    finally:
        lab.restore_link("dsl")
    served_normally(lab)


def test_one_rtt_and_zero_rtt_both_keep_two_subflows(lab: Lab, proxy: ProxyProcess) -> None:
    # 1-RTT: the Convert message follows the handshake.
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), fastopen=False)
    with sock:
        wait_two_subflows(lab, proxy, sock)
        assert fastopen_used(sock) is False
        download(sock, 2 * MB, 21, early)

    # The first TFO connection fetches a cookie from the proxy; the second carries the Convert
    # message in its SYN, which the proxy's kernel accepts (TCPFastOpenPassive counts it).
    first, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), fastopen=True)
    with first:
        download(first, 1 * MB, 22, early)
    before = netstat_counters(lab, "mcp")
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), fastopen=True)
    with sock:
        after = netstat_counters(lab, "mcp")
        assert fastopen_used(sock) is True, "the Convert message did not travel in the SYN"
        assert after["TcpExtTCPFastOpenPassive"] - before["TcpExtTCPFastOpenPassive"] == 1
        wait_two_subflows(lab, proxy, sock)
        download(sock, 2 * MB, 23, early)


@pytest.mark.parametrize("use_ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_socks5_with_curl_under_mptcpize(lab: Lab, proxy: ProxyProcess, use_ipv6: bool) -> None:
    size, seed = 5 * MB, 31 + use_ipv6
    assert lab.workdir is not None
    out = lab.workdir / f"curl-{seed}.bin"
    server = f"[{lab.srv_ip6}]" if use_ipv6 else lab.srv_ip
    before = netstat_counters(lab, "mcp")
    lab.exec("cpe", ["mptcpize", "run", "curl", "-sS", "--fail", "--max-time", "30",
                     "--socks5", f"{lab.mcp_ip}:{SOCKS5_PORT}",
                     "-o", str(out), f"http://{server}:{SERVER_PORT}/bytes/{size}?seed={seed}"])
    after = netstat_counters(lab, "mcp")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(seed, size)
    # curl really spoke MPTCP to the proxy (not a silent fallback to TCP).
    assert after["MPTcpExtMPCapableSYNRX"] > before["MPTcpExtMPCapableSYNRX"]
    assert after["MPTcpExtMPCapableFallbackACK"] == before["MPTcpExtMPCapableFallbackACK"]


def test_ipv6_destination_through_convert(lab: Lab, proxy: ProxyProcess) -> None:
    sock, _, early = cpe_convert(lab, (lab.srv_ip6, SERVER_PORT))
    with sock:
        conn = wait_two_subflows(lab, proxy, sock)
        assert host_of(conn["destination"]) == lab.srv_ip6
        download(sock, 5 * MB, 41, early)


@pytest.fixture(scope="module")
def mptcp_upstream_proxy(lab: Lab) -> Iterator[ProxyProcess]:
    handle = lab.start_proxy(proxy_config(lab, listen={"convert": "[::]:5125", "socks5": None},
                                          admin="127.0.0.1:9091", upstream={"protocol": "mptcp"}),
                             name="mptcp-upstream")
    yield handle
    handle.stop()


def test_upstream_mptcp_to_mptcp_server(lab: Lab, proxy: ProxyProcess,
                                        mptcp_upstream_proxy: ProxyProcess) -> None:
    def upstream_is_mptcp() -> bool:
        # In the server's namespace: an MPTCP connection from the proxy (ss -M), whose subflow
        # carries the MPTCP ULP.
        from_mcp = [sf for sf in kernel_subflows(lab, "srv", MPTCP_SERVER_PORT) if host_of(sf.remote) == lab.mcp_ip]
        return bool(from_mcp) and bool(mptcp_sockets(lab, "srv", MPTCP_SERVER_PORT))

    sock, _, early = cpe_convert(lab, (lab.srv_ip, MPTCP_SERVER_PORT), port=5125)
    with sock:
        wait_two_subflows(lab, mptcp_upstream_proxy, sock)
        assert upstream_is_mptcp()
        download(sock, 10 * MB, 51, early)
    wait_for(lambda: not mptcp_sockets(lab, "srv", MPTCP_SERVER_PORT), 10, "the upstream MPTCP connection to close")

    # Control: the default proxy (upstream TCP) reaches the same server without MPTCP.
    sock, _, early = cpe_convert(lab, (lab.srv_ip, MPTCP_SERVER_PORT))
    with sock:
        wait_two_subflows(lab, proxy, sock)
        assert not upstream_is_mptcp()
        download(sock, 1 * MB, 52, early)


def _refused(lab: Lab, destination: tuple[str, int], port: int = CONVERT_PORT, **kwargs: object) -> int:
    with pytest.raises(ConvertRefused) as excinfo:
        sock, _, _ = cpe_convert(lab, destination, port=port, **kwargs)
        sock.close()
    return int(excinfo.value.code)


def test_refused_destinations_then_next_client_served(lab: Lab, proxy: ProxyProcess) -> None:
    assert _refused(lab, ("127.0.0.1", SERVER_PORT)) == 32
    served_normally(lab)
    assert _refused(lab, ("169.254.169.254", 80)) == 32
    served_normally(lab)
    assert _refused(lab, (lab.unreachable_ip, SERVER_PORT)) in (97, 65)
    served_normally(lab)


def test_refused_cpe_then_allowed_cpe_served(lab: Lab) -> None:
    lte_only = [p for p in lab.cpe_prefixes if p.startswith("198.18.2.") or p.startswith("2001:db8:2:")]
    handle = lab.start_proxy(proxy_config(lab, listen={"convert": "[::]:5126", "socks5": None},
                                          admin="127.0.0.1:9092", policy={"allowed_cpes": lte_only}),
                             name="lte-only")
    try:
        # Default route: the connection starts on DSL, which this proxy does not allow: its SYN is
        # dropped in the kernel (kernel.admission_filter), so it never gets an answer.
        with pytest.raises((TimeoutError, OSError)) as dropped:
            sock, _, _ = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), port=5126, timeout_s=2.0)
            sock.close()
        assert not isinstance(dropped.value, ConvertRefused)
        sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), port=5126, source=lab.cpe_lte_ip)
        with sock:
            download(sock, 1 * MB, 61, early)
    finally:
        handle.stop()


def test_limit_exceeded_then_next_client_served(lab: Lab) -> None:
    handle = lab.start_proxy(proxy_config(lab, listen={"convert": "[::]:5127", "socks5": None},
                                          admin="127.0.0.1:9093", policy={"max_connections_per_cpe": 1}),
                             name="limit")
    try:
        holder, _, _ = cpe_convert(lab, (lab.srv_ip, SERVER_PORT), port=5127)
        with holder:
            wait_for(lambda: proxy_conn_for(handle, holder.getsockname()[1]), 10, "the first connection")
            assert _refused(lab, (lab.srv_ip, SERVER_PORT), port=5127) == 64
        wait_for(lambda: not handle.connections(), 10, "the proxy to forget the closed connection")
        served_normally(lab, port=5127)
    finally:
        handle.stop()


def test_half_close_client_still_gets_full_reply(lab: Lab, proxy: ProxyProcess) -> None:
    sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT))
    with sock:
        wait_two_subflows(lab, proxy, sock)
        # 1 KB up, FIN, then 20 MB that the server sends only after it has seen our FIN.
        upload_and_reply(sock, 1000, seed=71, reply_size=20 * MB, reply_seed=72, initial=early)


def test_proxy_still_healthy(lab: Lab, proxy: ProxyProcess) -> None:
    """After every refusal and cut above, the main proxy process is alive and serving."""
    assert proxy.proc.poll() is None, proxy.stderr_text()
    served_normally(lab)
