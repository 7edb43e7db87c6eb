"""Health and graceful drain of a real `mcpool proxy` on the namespace lab, with two-subflow MPTCP
connections in flight:

- SIGTERM: `/readyz` answers 503 at once (while `/healthz` stays 200), new connections are
  reset, the transfer in flight completes byte-exact over both subflows, the process exits 0
  with a summary line;
- while draining, a live connection can still add a subflow (the listener stays open: an
  MP_JOIN needs it);
- a connection still open at `drain_timeout_s` is closed, logged with reason `drained` and
  counted in the summary;
- `POST /drain` drains like SIGTERM; a second SIGTERM exits at once.
"""

from __future__ import annotations

import signal
import time

import pytest
from mcpool_tools.lab import Lab, ProxyProcess
from mcpool_tools.testserver import PatternReader, pattern_sha256
from ops_helpers import (
    MB,
    SERVER_PORT,
    cpe_convert,
    logs,
    sample,
    scrape,
    start_proxy,
    wait_subflows,
)
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]


def _status(proxy: ProxyProcess, path: str) -> int:
    return proxy.admin_request("GET", path)[0]


def _summary(proxy: ProxyProcess) -> dict:
    (line,) = [e for e in logs(proxy) if e["msg"] == "stopped"]
    return line


def test_sigterm_drains_a_two_subflow_transfer_then_exits_zero(ops_lab: Lab) -> None:
    lab = ops_lab
    proxy, (convert_port, _, _) = start_proxy(lab, "drain", drain_timeout_s=30)
    try:
        size, seed = 30 * MB, 77
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            wait_subflows(proxy, sock, 2)
            sock.sendall(f"SEND {size} {seed}\n".encode())
            reader = PatternReader()
            reader.update(early)
            while reader.count < 1 * MB:  # part of it now; the rest is held back by the window
                reader.update(sock.recv(65536))
            assert _status(proxy, "/readyz") == 200

            proxy.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _status(proxy, "/readyz") == 503, 5, "/readyz 503 after SIGTERM")
            assert _status(proxy, "/healthz") == 200
            during = scrape(proxy)
            assert sample(during, "mcpool_draining") == 1 and sample(during, "mcpool_connections_active") == 1
            with pytest.raises(ConnectionResetError):
                cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))

            while data := sock.recv(262_144):
                reader.update(data)
            assert reader.count == size
            assert reader.hexdigest() == pattern_sha256(seed, size), "content changed during the drain"
        assert proxy.proc.wait(15) == 0
    finally:
        proxy.stop()
    summary = _summary(proxy)
    assert summary["drained_in_time"] is True and summary["closed_at_deadline"] == 0
    assert summary["connections_at_signal"] == 1
    (closed,) = [e for e in logs(proxy) if e["msg"] == "connection closed"]
    assert closed["mcpool.mptcp.max_subflows"] == 2 and closed["mcpool.bytes_down"] == size


def test_connection_open_at_drain_deadline_is_closed_and_counted(ops_lab: Lab) -> None:
    lab = ops_lab
    proxy, (convert_port, _, _) = start_proxy(lab, "deadline", drain_timeout_s=1.0)
    try:
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            wait_subflows(proxy, sock, 2)
            sock.sendall(b"ECHO\nping")
            got = early
            while len(got) < 4:
                got += sock.recv(16)
            assert got == b"ping"
            signalled = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(15) == 0
            # The proxy aborted our idle connection at the deadline: a reset, never a clean EOF
            # a client could take for a complete transfer.
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                sock.recv(16)
        assert time.monotonic() - signalled >= 1.0
    finally:
        proxy.stop()
    summary = _summary(proxy)
    assert summary["closed_at_deadline"] == 1 and summary["drained_in_time"] is False
    (closed,) = [e for e in logs(proxy) if e["msg"] == "connection closed"]
    assert closed["mcpool.close_reason"] == "drained"


def test_post_drain_and_second_sigterm(ops_lab: Lab) -> None:
    lab = ops_lab
    proxy, (convert_port, _, _) = start_proxy(lab, "postdrain", drain_timeout_s=300)
    try:
        sock, _ = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            sock.sendall(b"ECHO\n")
            status, _body = proxy.admin_request("POST", "/drain")
            assert status == 202
            assert _status(proxy, "/readyz") == 503  # at once: before the answer to POST returned
            assert proxy.proc.poll() is None  # still serving the live connection
            proxy.proc.send_signal(signal.SIGTERM)  # drain already requested: this one is "now"
            assert proxy.proc.wait(10) == 0
    finally:
        proxy.stop()
    summary = _summary(proxy)
    assert summary["drained_in_time"] is False and summary["connections_at_signal"] == 1


def test_a_join_still_reaches_a_live_connection_while_draining(ops_lab: Lab) -> None:
    """The CPE gains a link during the drain (its LTE endpoint appears): the new subflow must
    reach the draining pod. Closing the listener at SIGTERM would reset that MP_JOIN."""
    lab = ops_lab
    proxy, (convert_port, _, _) = start_proxy(lab, "drainjoin", drain_timeout_s=30)
    cpe = lab.ns("cpe")
    try:
        lab.exec(cpe, ["ip", "mptcp", "endpoint", "flush"])  # start with the DSL subflow only
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            sock.sendall(b"ECHO\nping")
            got = early
            while len(got) < 4:
                got += sock.recv(16)
            assert got == b"ping"
            (conn,) = proxy.connections()
            assert len(conn["subflows"]) == 1
            proxy.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _status(proxy, "/readyz") == 503, 5, "/readyz 503 after SIGTERM")
            lab.exec(cpe, ["ip", "mptcp", "endpoint", "add", lab.cpe_lte_ip, "dev", "lte", "subflow"])
            wait_subflows(proxy, sock, 2)
            sock.sendall(b"pong")
            got = b""
            while len(got) < 4:
                got += sock.recv(16)
            assert got == b"pong"
        assert proxy.proc.wait(15) == 0
    finally:
        lab.set_cpe_endpoints(["subflow"])  # the lab's default, for the tests that follow
        proxy.stop()
