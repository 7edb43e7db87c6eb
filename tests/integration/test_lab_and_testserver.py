"""The lab topology and the deterministic test server on their own, without the proxy: source
routing per access link, cutting and restoring a link, teardown of only our namespaces, and
the test server's request types checked by content."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from e2e import MPTCP_SERVER_PORT, SERVER_PORT, kernel_subflows
from mcpool_tools.lab import Lab, LinkShaping, Topology, existing_namespaces
from mcpool_tools.testserver import (
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    recv_all_sha256,
    send_pattern,
)
from support import requires_netns, wait_for

MB = 1_000_000
IPPROTO_MPTCP = 262


def test_pattern_is_deterministic_and_offset_addressable() -> None:
    data = pattern_bytes(5, 300_000)
    assert data == pattern_bytes(5, 300_000)
    assert data != pattern_bytes(6, 300_000)
    assert pattern_bytes(5, 1000, offset=65_000) == data[65_000:66_000]
    assert b"".join(pattern_chunks(5, 300_000)) == data
    assert pattern_sha256(5, 300_000) == hashlib.sha256(data).hexdigest()
    # No repeated block: a replayed span can never look correct.
    assert data[:65536] != data[65536:131072]


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mcpool_tools.testserver", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "testserver ready" in proc.stdout.readline()
        yield port
    finally:
        proc.kill()
        proc.wait()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_testserver_send_sink_echo_http(loopback_server: int) -> None:
    with _connect(loopback_server) as sock:
        sock.sendall(b"SEND 3000000 9\n")
        assert recv_all_sha256(sock) == (pattern_sha256(9, 3 * MB), 3 * MB)

    with _connect(loopback_server) as sock:
        sock.sendall(b"SINK 1000 4\n")
        send_pattern(sock, 3, 2 * MB)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(65536):
            reply += data
        line, _, rest = reply.partition(b"\n")
        assert line.decode() == f"{pattern_sha256(3, 2 * MB)} {2 * MB}"
        assert rest == pattern_bytes(4, 1000)

    with _connect(loopback_server) as sock:
        sock.sendall(b"ECHO\n" + b"hello " * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all_sha256(sock) == (hashlib.sha256(b"hello " * 1000).hexdigest(), 6000)

    with _connect(loopback_server) as sock:
        sock.sendall(b"GET /bytes/70000?seed=8 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while data := sock.recv(65536):
            reply += data
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 70000" in head
        assert body == pattern_bytes(8, 70000)

    with _connect(loopback_server) as sock:
        sock.sendall(b"BOGUS\n")
        assert sock.recv(100).startswith(b"ERR")


@requires_netns
@pytest.mark.netns
def test_lab_routes_per_link_cuts_and_tears_down() -> None:
    bystander = "mtcz-cpe"  # same prefix family, different lab: must survive our teardown
    subprocess.run(["ip", "netns", "add", bystander], check=True)
    try:
        with Lab(Topology(prefix="mtcl", shaping={"lte": LinkShaping(rate_mbit=500)})) as lab:
            assert sorted(existing_namespaces("mtcl")) == sorted(lab.namespaces)
            lab.start_testserver(f"[::]:{SERVER_PORT}")
            lab.start_testserver(f"[::]:{MPTCP_SERVER_PORT}", mptcp=True)

            # A direct MPTCP connection gets a second subflow bound to the LTE address.
            with lab.in_netns("cpe"):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
                sock.connect((lab.srv_ip, MPTCP_SERVER_PORT))
            with sock:
                sock.sendall(f"SEND {20 * MB} 3\n".encode())
                wait_for(lambda: len(kernel_subflows(lab, "srv", MPTCP_SERVER_PORT)) == 2, 10, "two subflows")
                remotes = sorted(sf.remote.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                                 for sf in kernel_subflows(lab, "srv", MPTCP_SERVER_PORT))
                assert remotes == sorted([lab.cpe_dsl_ip, lab.cpe_lte_ip])
                assert recv_all_sha256(sock) == (pattern_sha256(3, 20 * MB), 20 * MB)

            # Source routing: the LTE address leaves on the lte link, IPv6 too.
            for src, dst in ((lab.cpe_lte_ip, lab.srv_ip), (lab.cpe_lte_ip6, lab.srv_ip6)):
                route = lab.exec("cpe", ["ip", "route", "get", dst, "from", src]).stdout
                assert " dev lte " in route, route
            assert " dev dsl " in lab.exec("cpe", ["ip", "route", "get", lab.srv_ip]).stdout
            assert "rate 500Mbit" in lab.exec("cpe", ["tc", "qdisc", "show", "dev", "lte"]).stdout

            # A cut DSL link: a TCP connection from the DSL address times out, LTE still works.
            lab.cut_link("dsl")
            with lab.in_netns("cpe"):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probe.settimeout(1.0)
                probe.bind((lab.cpe_dsl_ip, 0))
                with pytest.raises(OSError):
                    probe.connect((lab.srv_ip, SERVER_PORT))
                probe.close()
                via_lte = socket.create_connection((lab.srv_ip6, SERVER_PORT), 5, (lab.cpe_lte_ip6, 0))
            with via_lte:
                via_lte.sendall(b"SEND 100000 1\n")
                assert recv_all_sha256(via_lte) == (pattern_sha256(1, 100000), 100000)
            lab.restore_link("dsl")
            with lab.in_netns("cpe"):
                again = socket.create_connection((lab.srv_ip6, SERVER_PORT), 5)
            with again:
                again.sendall(b"SEND 100000 2\n")
                assert recv_all_sha256(again) == (pattern_sha256(2, 100000), 100000)
            server_pids = lab.exec("srv", ["true"]) and subprocess.run(
                ["ip", "netns", "pids", lab.ns("srv")], capture_output=True, text=True).stdout.split()
            assert server_pids
        assert existing_namespaces("mtcl") == []
        wait_for(lambda: not any(_alive(int(pid)) for pid in server_pids), 5, "the lab's processes to be gone")
        Lab(Topology(prefix="mtcl")).down()  # idempotent
        assert bystander in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", bystander], check=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
