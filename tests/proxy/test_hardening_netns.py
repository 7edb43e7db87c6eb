"""Issue 10's hardening with `mcpool proxy` as a real process in its own network namespace
(prefix `mhd-`): strangers' SYNs dropped in the kernel (and the userspace check when nft is
missing), no silent TCP when MPTCP is missing, dead peers found by keepalive, 0-RTT upstream with
TCP Fast Open, and floods (strangers, one CPE, slowloris) against the Convert and SOCKS5
listeners while an allowed CPE transfers and checks its bytes.

Addresses: the namespace's lo carries 10.88.0.0/16 (allowed CPEs) and 10.99.0.0/16 (strangers),
both wholly local on lo, plus 2001:db8:88::1 and 2001:db8:99::1; the data server is 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DataServer, in_netns, pattern, recv_all, sha256
from mcpool_proxy.codec.convert import ErrorCode
from mcpool_proxy.cpe.convert_client import ConvertRefused, convert_connect
from prometheus_client.parser import text_string_to_metric_families
from support import requires_netns
from test_proxy_process import ProxyProcess

pytestmark = requires_netns

_names = itertools.count()
CPE = "10.88.1.1"
CPE6 = "2001:db8:88::1"
STRANGER = "10.99.1.1"
STRANGER6 = "2001:db8:99::1"


def sh(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mhd-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        for addr in ("10.88.0.1/16", "10.99.0.1/16"):
            sh(name, "ip", "addr", "add", addr, "dev", "lo")
        for addr in (CPE6, STRANGER6):
            sh(name, "ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        sh(name, "sysctl", "-qw", "net.ipv4.tcp_fastopen=1")
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


RunProxy = Callable[..., ProxyProcess]


def proxy_config(**overrides: Any) -> dict[str, Any]:
    """The tests' proxy configuration, each top-level key of `overrides` merged into it."""
    config: dict[str, Any] = {
        "listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
        "admin": "127.0.0.1:9090",
        "policy": {"allowed_cpes": ["127.0.0.0/8", "10.88.0.0/16", "2001:db8:88::/48"],
                   "deny_default_destinations": False, "handshake_timeout_s": 2, "max_handshakes": 512},
        "upstream": {"connect_timeout_s": 1},
        "drain_timeout_s": 1,
    }  # fmt: skip
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


@pytest.fixture
def run_proxy(netns: str) -> Iterator[RunProxy]:
    started: list[ProxyProcess] = []
    workdir = Path(tempfile.mkdtemp(prefix="mhd-"))

    def start(prefix: list[str] | None = None, **overrides: Any) -> ProxyProcess:
        proc = ProxyProcess(netns, proxy_config(**overrides), workdir, prefix)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def ns_server(netns: str) -> Iterator[DataServer]:
    with in_netns(netns):
        server = DataServer("127.0.0.1")
    yield server
    server.close()


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    _, text = proxy.admin("/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def served(ns: str, dest: tuple[str, int], source: str, port: int = 5124) -> None:
    host = "::1" if ":" in source else "127.0.0.1"
    with in_netns(ns):
        sock, _, early = convert_connect((host, port), dest, source=source, early_data=b"SEND 200000 4\n", timeout_s=5)
    with sock:
        sock.settimeout(10)
        # The server's first bytes may arrive with the Convert reply: convert_connect returns them.
        got = early + recv_all(sock)
        assert sha256(got) == sha256(pattern(4, 200_000)), (len(got), got[:64])


def syn_answered(ns: str, source: str, port: int, wait_s: float = 1.5) -> bool:
    """Whether a connection from `source` to the proxy's `port` completes within `wait_s`."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with in_netns(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(wait_s)
        s.bind((source, 0))
        try:
            s.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        except TimeoutError:
            return False
        return True


def strangers_counter(ns: str) -> int:
    out = sh(ns, "nft", "list", "counter", "inet", "mcpool_admission", "strangers").stdout.split()
    return int(out[out.index("packets") + 1])


# -- strangers cost nothing: the kernel drops their SYNs ------------------------------------------------
def test_strangers_syns_are_dropped_in_the_kernel(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    proxy = run_proxy()
    status, ready = proxy.admin("/readyz")
    assert status == 200 and ready["admission_filter"] is True
    for stranger in (STRANGER, STRANGER6):
        for port in (5124, 1080):
            assert not syn_answered(netns, stranger, port), f"{stranger} -> {port} got a SYN-ACK"
    assert strangers_counter(netns) >= 4
    # The proxy never saw them: only the allowed CPEs below are accepted.
    assert metric(proxy, "mcpool_connections_accepted_total") == 0
    assert metric(proxy, "mcpool_admission_filter_active") == 1
    served(netns, ns_server.address, CPE)
    served(netns, ns_server.address, CPE6)
    # The admin port is not filtered, established traffic passes.
    assert syn_answered(netns, STRANGER, 9090)
    # Removed at exit.
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    assert sh(netns, "nft", "list", "table", "inet", "mcpool_admission", check=False).returncode != 0


# What a pod's proxy runs under when its pool's mechanism needs no capability: root of the
# namespace without CAP_NET_ADMIN (nor anything it could pass on).
WITHOUT_NET_ADMIN = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--"]
CAP_NET_ADMIN = 12


def test_filter_installed_before_a_proxy_without_net_admin(run_proxy: RunProxy, netns: str, ns_server: DataServer,
                                                           tmp_path: Path) -> None:  # fmt: skip
    """The pod's init container: `mcpool admission install` (with CAP_NET_ADMIN; without, exit 1) installs the table
    and its status file; the proxy, started without CAP_NET_ADMIN, finds it, reports it, has the
    strangers' SYNs dropped in the kernel, and leaves the table at exit (it did not install it).
    A status file for another configuration is not taken for the filter."""
    status_file = tmp_path / "admission.json"
    kernel = {"admission_status_file": str(status_file)}
    config_file = tmp_path / "proxy.yaml"
    config_file.write_text(yaml.safe_dump(proxy_config(kernel=kernel)))
    install = [sys.executable, "-m", "mcpool_proxy.cli", "admission", "install", "--config", str(config_file)]
    # Without CAP_NET_ADMIN the command fails loudly (the init container, and so the pod, with it).
    refused = sh(netns, *WITHOUT_NET_ADMIN, *install, check=False)
    assert refused.returncode == 1 and "admission filter not installed" in refused.stderr, refused.stderr
    assert not status_file.exists()
    installed = sh(netns, *install, check=False)
    assert installed.returncode == 0, installed.stderr
    assert json.loads(status_file.read_text())["table"] == "mcpool_admission"
    before = strangers_counter(netns)

    proxy = run_proxy(prefix=WITHOUT_NET_ADMIN, kernel=kernel)
    cap_eff = next(line for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines()
                   if line.startswith("CapEff:"))  # fmt: skip
    assert not int(cap_eff.split()[1], 16) & (1 << CAP_NET_ADMIN), cap_eff
    status, ready = proxy.admin("/readyz")
    assert status == 200 and ready["admission_filter"] is True
    assert metric(proxy, "mcpool_admission_filter_active") == 1
    assert any("installed before the proxy" in e["msg"] for e in proxy.logs())
    for stranger in (STRANGER, STRANGER6):
        for port in (5124, 1080):
            assert not syn_answered(netns, stranger, port), f"{stranger} -> {port} got a SYN-ACK"
    assert strangers_counter(netns) >= before + 4
    assert metric(proxy, "mcpool_connections_accepted_total") == 0
    served(netns, ns_server.address, CPE)
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    assert sh(netns, "nft", "list", "table", "inet", "mcpool_admission", check=False).returncode == 0

    # Another configuration (one more allowed prefix): the installed filter is not its filter; the
    # proxy tries its own, which it may not, and says so.
    other = run_proxy(prefix=WITHOUT_NET_ADMIN, kernel=kernel,
                      policy={"allowed_cpes": ["127.0.0.0/8", "10.88.0.0/16", "10.99.0.0/16"]})  # fmt: skip
    status, ready = other.admin("/readyz")
    assert status == 200 and ready["admission_filter"] is False
    messages = [e["msg"] for e in other.logs()]
    assert any("is for another configuration" in m for m in messages), messages
    assert any("admission filter not installed" in m for m in messages), messages


def test_without_nft_strangers_are_refused_in_userspace(tmp_path: Path, netns: str, ns_server: DataServer,
                                                       run_proxy: RunProxy) -> None:  # fmt: skip
    """Fail safe: no `nft` on PATH, so the filter cannot be installed; the proxy says so (log,
    /readyz, metric) and still refuses strangers with Not Authorized."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = os.pathsep.join(p for p in saved.split(os.pathsep) if not Path(p, "nft").exists())
    try:
        proxy = run_proxy()
    finally:
        os.environ["PATH"] = saved
    status, ready = proxy.admin("/readyz")
    assert status == 200 and ready["admission_filter"] is False
    assert metric(proxy, "mcpool_admission_filter_active") == 0
    assert any("admission filter not installed" in e["msg"] for e in proxy.logs())
    with in_netns(netns), pytest.raises(ConvertRefused) as info:
        convert_connect(("127.0.0.1", 5124), ns_server.address, source=STRANGER, timeout_s=5)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED
    served(netns, ns_server.address, CPE)


# -- no silent TCP ------------------------------------------------------------------------------------
def test_no_mptcp_refuses_to_start_or_says_so(run_proxy: RunProxy, netns: str, tmp_path: Path) -> None:
    sh(netns, "sysctl", "-qw", "net.mptcp.enabled=0")
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({"listen": {"convert": "[::]:5124"}, "admin": None,
                                      "kernel": {"admission_filter": False}}))  # fmt: skip
    refused = sh(netns, sys.executable, "-m", "mcpool_proxy.cli", "proxy", "--config", str(config), check=False)
    assert refused.returncode == 1 and "mcpool-proxy ready" not in refused.stdout
    assert "kernel.require_mptcp" in refused.stderr
    proxy = run_proxy(kernel={"require_mptcp": False})
    status, ready = proxy.admin("/readyz")
    assert status == 200 and ready["mptcp"] is False
    assert ready["listeners_mptcp"] == {"convert": False, "socks5": False}
    assert any("plain TCP" in e["msg"] for e in proxy.logs())


# -- dead peers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mptcp", [False, True], ids=["tcp-client", "mptcp-client"])
def test_silent_client_is_found_by_keepalive(run_proxy: RunProxy, netns: str, ns_server: DataServer,
                                            mptcp: bool) -> None:  # fmt: skip
    """A client that vanishes (its packets dropped) on an idle relay is closed after keepalive
    idle + count x interval (~3 s here; MPTCP: then limits.subflow_loss_grace_s without a
    subflow), not after relay.idle_timeout_s (an hour)."""
    proxy = run_proxy(limits={"keepalive_idle_s": 1, "keepalive_interval_s": 1, "keepalive_count": 2,
                              "subflow_loss_grace_s": 1})  # fmt: skip
    with in_netns(netns):
        sock, _, _ = convert_connect(("127.0.0.1", 5124), ns_server.address, source=CPE, mptcp=mptcp,
                                     early_data=b"HOLD\n", timeout_s=5)  # fmt: skip
    with sock:
        port = sock.getsockname()[1]
        deadline = time.monotonic() + 5
        while metric(proxy, "mcpool_connections_active") < 1:
            assert time.monotonic() < deadline, "connection not relayed"
            time.sleep(0.05)
        rules = f"table inet mhd_blackhole {{\n chain c {{\n type filter hook output priority 0; tcp dport {port} drop\n }}\n}}\n"
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)
        started = time.monotonic()
        while metric(proxy, "mcpool_connections_closed_total") < 1:
            assert time.monotonic() - started < 15, "dead client not found by keepalive"
            time.sleep(0.1)
        assert metric(proxy, "mcpool_connections_active") == 0
        reason = "client_lost" if mptcp else "client_reset"
        assert metric(proxy, "mcpool_connections_closed_total", reason=reason) == 1


def test_silent_server_is_found_by_keepalive(run_proxy: RunProxy, netns: str, ns_server: DataServer) -> None:
    """The upstream leg (TCP): keepalive probes, bounded by TCP_USER_TIMEOUT (which, once set,
    decides when unanswered probes end the connection)."""
    proxy = run_proxy(limits={"keepalive_idle_s": 1, "keepalive_interval_s": 1, "keepalive_count": 2,
                              "tcp_user_timeout_s": 3})  # fmt: skip
    server_port = ns_server.address[1]
    rules = f"table inet mhd_blackhole {{\n chain c {{\n type filter hook output priority 0; tcp sport {server_port} drop\n }}\n}}\n"
    with in_netns(netns):
        sock, _, _ = convert_connect(("127.0.0.1", 5124), ns_server.address, source=CPE, early_data=b"HOLD\n",
                                     timeout_s=5)  # fmt: skip
    with sock:
        deadline = time.monotonic() + 5
        while metric(proxy, "mcpool_connections_active") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # From now on the server answers nothing (keepalive probes go unanswered).
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)
        started = time.monotonic()
        while metric(proxy, "mcpool_connections_closed_total") < 1:
            assert time.monotonic() - started < 15, "dead server not found by keepalive"
            time.sleep(0.1)
        assert metric(proxy, "mcpool_connections_closed_total", reason="server_reset") == 1


# -- 0-RTT upstream ------------------------------------------------------------------------------------
class _TfoServer:
    """A TCP Fast Open server that records, per connection, whether its SYN carried data."""

    def __init__(self, ns: str) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, 23, 16)  # TCP_FASTOPEN
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.syn_data: list[bool] = []
        self.first_bytes: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from mcpool_proxy.kernel.mptcp import fastopen_used

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.syn_data.append(bool(fastopen_used(conn)))
                conn.settimeout(5)
                data = conn.recv(100)
                self.first_bytes.append(data)
                conn.sendall(data[::-1])


def test_client_0rtt_opens_the_upstream_with_tcp_fast_open(run_proxy: RunProxy, netns: str) -> None:
    sh(netns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=3")
    proxy = run_proxy()
    server = _TfoServer(netns)
    try:
        for _ in range(3):
            with in_netns(netns):
                sock, _, early = convert_connect(("127.0.0.1", 5124), server.address, fastopen=True,
                                                 early_data=b"zero-rtt", timeout_s=5)  # fmt: skip
            with sock:
                sock.settimeout(5)
                got = early + recv_all(sock)
            assert got == b"zero-rtt"[::-1]
        # 1st: no cookies anywhere; 2nd: the client's SYN carries data, the proxy fetches the
        # server's cookie; 3rd: both SYNs carry data.
        assert server.syn_data[-1] is True, server.syn_data
        assert server.first_bytes[-1] == b"zero-rtt"
        assert metric(proxy, "mcpool_upstream_fastopen_total", outcome="syn_data") >= 1
    finally:
        server.sock.close()


# -- floods while an allowed CPE transfers --------------------------------------------------------------
def _flood_argv(ns: str, mode: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "mcpool_tools.flood", mode, *args]


def run_flood(ns: str, server: DataServer, mode: str, target_port: int, *args: str,
              duration_s: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(flood result, transfer result): the allowed CPE transfers 1 MB at a time through the
    flooded listener (`target_port`: Convert 5124 or SOCKS5 1080) for `duration_s` while the flood
    runs against it."""
    dest = f"{server.address[0]}:{server.address[1]}"
    protocol = "socks5" if target_port == 1080 else "convert"
    transfer = subprocess.Popen(_flood_argv(ns, "transfer", "--target", f"127.0.0.1:{target_port}", "--dest", dest,
                                            "--source", CPE, "--duration", str(duration_s + 1),
                                            "--pattern", "random", "--protocol", protocol),
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    flood = subprocess.run(_flood_argv(ns, mode, "--target", f"127.0.0.1:{target_port}", "--duration",
                                       str(duration_s), *args), capture_output=True, text=True, timeout=60)  # fmt: skip
    out, _ = transfer.communicate(timeout=60)
    assert flood.returncode == 0, flood.stderr
    moved = json.loads(out)
    assert moved["protocol"] == protocol, moved
    return json.loads(flood.stdout), moved


def _check_transfer(result: dict[str, Any]) -> None:
    assert result["errors"] == 0, result
    assert result["bad"] == 0, result
    assert result["transfers"] >= 3, result


@pytest.mark.parametrize("port", [5124, 1080], ids=["convert", "socks5"])
def test_stranger_flood_while_a_cpe_transfers(run_proxy: RunProxy, netns: str, ns_server: DataServer,
                                             port: int) -> None:  # fmt: skip
    proxy = run_proxy()
    flood, transfer = run_flood(netns, ns_server, "strangers", port, "--prefix", "10.99.0.0/16", "--hold", "2000")
    _check_transfer(transfer)
    assert flood["attempts"] >= 1000, flood
    assert flood["held_connected_at_end"] == 0, flood  # no stranger got a SYN-ACK
    assert metric(proxy, "mcpool_connections_accepted_total") == transfer["transfers"]
    assert strangers_counter(netns) >= flood["attempts"]


@pytest.mark.parametrize("port", [5124, 1080], ids=["convert", "socks5"])
def test_single_cpe_flood_while_another_cpe_transfers(run_proxy: RunProxy, netns: str, ns_server: DataServer,
                                                     port: int) -> None:  # fmt: skip
    proxy = run_proxy(limits={"max_handshakes_per_cpe": 32})
    flood, transfer = run_flood(netns, ns_server, "cpe-flood", port, "--source", "10.88.2.2", "--hold", "3000")
    _check_transfer(transfer)
    assert flood["attempts"] >= 1000, flood
    # Its SYNs beyond twice the per-CPE rate are dropped in the kernel; those the proxy accepts
    # beyond the caps are refused at once, and the global slots are never exhausted.
    refused = metric(proxy, "mcpool_policy_refusals_total", reason="cpe_rate") + metric(
        proxy, "mcpool_policy_refusals_total", reason="cpe_handshakes")
    dropped = sh(netns, "nft", "list", "counter", "inet", "mcpool_admission", "cpe_flood").stdout.split()
    in_kernel = int(dropped[dropped.index("packets") + 1])
    assert refused + in_kernel >= flood["attempts"] // 2, (refused, in_kernel, flood)
    assert in_kernel > 0  # the kernel's per-CPE SYN limit (twice the userspace bucket) took most
    assert metric(proxy, "mcpool_policy_refusals_total", reason="max_handshakes") == 0


@pytest.mark.parametrize("port", [5124, 1080], ids=["convert", "socks5"])
def test_slowloris_while_a_cpe_transfers(run_proxy: RunProxy, netns: str, ns_server: DataServer,
                                        port: int) -> None:  # fmt: skip
    proxy = run_proxy(limits={"max_handshakes_per_cpe": 32})
    protocol = "convert" if port == 5124 else "socks5"
    flood, transfer = run_flood(netns, ns_server, "slowloris", port, "--source", "10.88.3.3", "--count", "300",
                                "--protocol", protocol)  # fmt: skip
    _check_transfer(transfer)
    # Beyond its 32 handshakes the slow client is refused at once; the 32 are timed out
    # (policy.handshake_timeout_s 2 < the 3 s run).
    assert flood["open_at_end"] == 0, flood
    assert metric(proxy, "mcpool_policy_refusals_total", reason="cpe_handshakes") >= 300 - 32
    assert metric(proxy, "mcpool_handshake_errors_total", protocol=protocol, error="timeout") >= 1
