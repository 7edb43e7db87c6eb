"""mcpool_proxy.kernel.mptcp: struct decoding on hand-built bytes, then the kernel's own view of real
loopback MPTCP and TCP connections, fallback to TCP, and sysctls in a private namespace."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from mcpool_proxy.kernel import mptcp, sysctl
from mcpool_proxy.kernel.mptcp import (
    MPTCP_INFO_FLAG_FALLBACK,
    MptcpInfo,
    create_socket,
    decode_mptcp_info,
    decode_subflow_addrs,
    get_mptcp_info,
    get_subflows,
)
from support import requires_mptcp, requires_netns

# --- pure decoding --------------------------------------------------------------------------------


def build_mptcp_info(**fields: int) -> bytes:
    """A 96-byte struct mptcp_info as 6.18 returns it, laid out independently of the decoder."""
    f = {
        name: 0
        for name in (
            "subflows add_addr_signal add_addr_accepted subflows_max add_addr_signal_max "
            "add_addr_accepted_max flags token write_seq snd_una rcv_nxt local_addr_used "
            "local_addr_max csum_enabled retransmits bytes_retrans bytes_sent bytes_received "
            "bytes_acked subflows_total last_data_sent last_data_recv last_ack_recv"
        ).split()
    }
    f.update(fields)
    raw = struct.pack(
        "=6B2xIIQQQ3BxIQQQQB3xIII",
        f["subflows"], f["add_addr_signal"], f["add_addr_accepted"], f["subflows_max"],
        f["add_addr_signal_max"], f["add_addr_accepted_max"], f["flags"], f["token"],
        f["write_seq"], f["snd_una"], f["rcv_nxt"], f["local_addr_used"], f["local_addr_max"],
        f["csum_enabled"], f["retransmits"], f["bytes_retrans"], f["bytes_sent"],
        f["bytes_received"], f["bytes_acked"], f["subflows_total"], f["last_data_sent"],
        f["last_data_recv"], f["last_ack_recv"],
    )  # fmt: skip
    assert len(raw) == 96
    return raw


FULL = build_mptcp_info(
    subflows=1, add_addr_signal=2, add_addr_accepted=3, subflows_max=8, add_addr_signal_max=4,
    add_addr_accepted_max=5, flags=2, token=0xDEADBEEF, write_seq=1 << 40, snd_una=(1 << 40) - 7,
    rcv_nxt=12345678901, local_addr_used=1, local_addr_max=2, csum_enabled=1, retransmits=9,
    bytes_retrans=1000, bytes_sent=50_000_000, bytes_received=60_000_000, bytes_acked=49_999_000,
    subflows_total=2, last_data_sent=11, last_data_recv=12, last_ack_recv=13,
)  # fmt: skip


def test_decode_full_96_byte_struct() -> None:
    info = decode_mptcp_info(FULL)
    assert info == MptcpInfo(
        subflows=1, add_addr_signal=2, add_addr_accepted=3, subflows_max=8, add_addr_signal_max=4,
        add_addr_accepted_max=5, flags=2, token=0xDEADBEEF, write_seq=1 << 40,
        snd_una=(1 << 40) - 7, rcv_nxt=12345678901, local_addr_used=1, local_addr_max=2,
        csum_enabled=True, retransmits=9, bytes_retrans=1000, bytes_sent=50_000_000,
        bytes_received=60_000_000, bytes_acked=49_999_000, subflows_total=2,
        last_data_sent_ms=11, last_data_recv_ms=12, last_ack_recv_ms=13, returned_bytes=96,
    )  # fmt: skip
    assert info.token_hex == "deadbeef"
    assert not info.fallback
    assert info.subflow_count == 2


@pytest.mark.parametrize(
    ("length", "kernel"),
    [(40, "5.16 base"), (43, "csum_enabled"), (48, "5.16 padded"), (80, "6.5"), (88, "6.8")],
)
def test_decode_shorter_structs_of_older_kernels(length: int, kernel: str) -> None:
    info = decode_mptcp_info(FULL[:length])
    assert info.token == 0xDEADBEEF and info.rcv_nxt == 12345678901  # always present
    assert info.csum_enabled is (length >= 43)
    assert info.bytes_sent == (50_000_000 if length >= 64 else 0)
    assert info.subflows_total == (2 if length >= 81 else 0)
    assert info.last_ack_recv_ms == 0
    # Without subflows_total the count is the initial subflow plus the additional ones.
    assert info.subflow_count == 2


def test_token_hex_is_zero_padded_and_fallback_flag() -> None:
    info = decode_mptcp_info(build_mptcp_info(token=0xAB, flags=MPTCP_INFO_FLAG_FALLBACK))
    assert info.token_hex == "000000ab"
    assert info.fallback


def test_decode_empty_and_truncated_never_raises() -> None:
    assert decode_mptcp_info(b"").token == 0
    assert decode_mptcp_info(FULL[:13]).flags == 2 and decode_mptcp_info(FULL[:13]).token == 0


def sockaddr_storage(family: int, ip: str, port: int) -> bytes:
    if family == socket.AF_INET:
        raw = struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_pton(family, ip)
    else:
        raw = (
            struct.pack("=H", family) + struct.pack("!H", port) + b"\x00" * 4
            + socket.inet_pton(family, ip) + b"\x00" * 4
        )  # fmt: skip
    return raw.ljust(128, b"\x00")


def test_decode_subflow_addrs_v4_and_v6() -> None:
    raw = sockaddr_storage(socket.AF_INET, "198.18.1.2", 40000) + sockaddr_storage(
        socket.AF_INET, "198.18.9.1", 5124
    )
    assert decode_subflow_addrs(raw) == (("198.18.1.2", 40000), ("198.18.9.1", 5124))
    raw6 = sockaddr_storage(socket.AF_INET6, "2001:db8::2", 1) + sockaddr_storage(
        socket.AF_INET6, "2001:db8:ffff::1", 65535
    )
    assert decode_subflow_addrs(raw6) == (("2001:db8::2", 1), ("2001:db8:ffff::1", 65535))


def test_sysctl_names_map_to_proc_paths() -> None:
    assert sysctl.read_sysctl(sysctl.SYSCTL_MPTCP_ENABLED) in ("0", "1")
    assert sysctl.read_sysctl("net.mptcp.no_such_knob") is None
    assert sysctl.write_sysctl("net.mptcp.no_such_knob", 1) is False
    assert mptcp.kernel_version() >= (4, 0, 0)


# --- real connections -----------------------------------------------------------------------------


@pytest.fixture
def loopback_pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, accepted server) sockets over loopback; request.param = (family, client mptcp, server mptcp)."""
    family, client_mptcp, server_mptcp = request.param
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    listener, _ = create_socket(family, mptcp=server_mptcp)
    client, _ = create_socket(family, mptcp=client_mptcp)
    with listener, client:
        listener.bind((host, 0))
        listener.listen()
        client.settimeout(5)
        client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
        with server:
            # Exchange bytes so both ends are fully established and counters are non-zero.
            client.sendall(b"ping" * 1000)
            received = b""
            while len(received) < 4000:
                received += server.recv(65536)
            assert received == b"ping" * 1000
            yield client, server


@requires_mptcp
@pytest.mark.parametrize(
    "loopback_pair",
    [(socket.AF_INET, True, True), (socket.AF_INET6, True, True)],
    indirect=True,
    ids=["v4", "v6"],
)
def test_real_mptcp_connection(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = loopback_pair
    for sock in (client, server):
        info = get_mptcp_info(sock)
        assert info is not None
        assert info.token != 0
        assert not info.fallback
        assert info.subflow_count == 1
        assert info.returned_bytes <= mptcp.MPTCP_INFO_SIZE
        subflows = get_subflows(sock)
        assert len(subflows) == 1
        local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
        assert subflows[0].local == local
        assert subflows[0].remote == remote
    # Each side has its own token; the byte counters agree on what crossed.
    client_info, server_info = get_mptcp_info(client), get_mptcp_info(server)
    assert client_info is not None and server_info is not None
    assert client_info.token != server_info.token
    if client_info.returned_bytes >= 72:  # 6.5+ byte counters
        assert client_info.bytes_sent == 4000
        assert server_info.bytes_received == 4000
    client_subflow, server_subflow = get_subflows(client)[0], get_subflows(server)[0]
    if client_subflow.bytes_sent is not None:
        assert client_subflow.bytes_sent >= 4000
        assert server_subflow.bytes_received == 4000
        assert server_subflow.rtt_us is not None and server_subflow.rtt_us > 0


@requires_mptcp
def test_full_info_and_legacy_options_agree() -> None:
    family = socket.AF_INET
    listener, _ = create_socket(family)
    client, _ = create_socket(family)
    with listener, client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with server:
            legacy = mptcp._subflows_legacy(client.fileno())
            full = get_subflows(client)
            assert [(s.local, s.remote) for s in legacy] == [(s.local, s.remote) for s in full]
            assert len(full) == 1


@pytest.mark.parametrize(
    "loopback_pair",
    [(socket.AF_INET, False, False), (socket.AF_INET6, False, False)],
    indirect=True,
    ids=["v4", "v6"],
)
def test_plain_tcp_has_no_mptcp_view(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = loopback_pair
    for sock in (client, server):
        assert get_mptcp_info(sock) is None
        assert get_subflows(sock) == []
        assert not mptcp.is_mptcp_socket(sock)


@requires_mptcp
@pytest.mark.parametrize(
    "loopback_pair", [(socket.AF_INET, True, False)], indirect=True, ids=["v4"]
)
def test_mptcp_client_to_tcp_server_falls_back(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = loopback_pair
    assert mptcp.is_mptcp_socket(client)
    # The kernel fell back to TCP: MPTCP_INFO answers EOPNOTSUPP, which reads as "no MPTCP".
    assert get_mptcp_info(client) is None
    assert get_subflows(client) == []


@requires_mptcp
def test_closed_socket_has_no_view() -> None:
    sock, is_mptcp = create_socket(socket.AF_INET)
    assert is_mptcp
    sock.close()
    assert get_mptcp_info(sock) is None
    assert get_subflows(sock) == []


@requires_mptcp
def test_fastopen_listener_option_is_accepted_on_mptcp() -> None:
    listener, _ = create_socket(socket.AF_INET)
    with listener:
        listener.bind(("127.0.0.1", 0))
        assert mptcp.enable_fastopen_listener(listener, 16)
        listener.listen()
        assert listener.getsockopt(socket.IPPROTO_TCP, mptcp.TCP_FASTOPEN) == 16


# --- private network namespaces (unshare --net: nothing to clean up, dies with the process) --------


def run_in_private_netns(code: str) -> str:
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@requires_netns
def test_create_socket_falls_back_when_mptcp_is_disabled() -> None:
    out = run_in_private_netns(
        """
        import logging, socket
        from mcpool_proxy.kernel import mptcp, sysctl
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        assert sysctl.write_sysctl(sysctl.SYSCTL_MPTCP_ENABLED, 0)
        assert sysctl.read_sysctl(sysctl.SYSCTL_MPTCP_ENABLED) == "0"
        assert not mptcp.mptcp_supported()
        for _ in range(2):
            sock, is_mptcp = mptcp.create_socket(socket.AF_INET6)
            assert not is_mptcp and sock.proto == socket.IPPROTO_TCP
            sock.close()
        print("ok")
        """
    )
    assert out.endswith("ok")


@requires_netns
def test_write_sysctl_in_own_namespace() -> None:
    out = run_in_private_netns(
        """
        from mcpool_proxy.kernel import sysctl
        assert sysctl.read_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM) == "0"
        assert sysctl.write_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM, 1)
        assert sysctl.read_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM) == "1"
        assert sysctl.write_sysctl(sysctl.SYSCTL_TCP_FASTOPEN, "3")
        assert int(sysctl.read_sysctl(sysctl.SYSCTL_TCP_FASTOPEN)) == 3
        assert sysctl.write_sysctl(sysctl.SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT, 0)
        assert not sysctl.write_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM, "not-a-number")
        print("ok")
        """
    )
    assert out == "ok"
