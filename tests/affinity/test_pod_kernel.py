"""Affinity's kernel side where /proc/sys is read-only (a non-privileged container): a sysctl
that already holds the wanted value is success, not failure; and the pod sets up (and removes)
the receive side of the director's tunnel itself, reporting a failure without crashing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import requires_netns

pytestmark = [requires_netns, pytest.mark.netns]

NS = "mtk-ro"
PROBE = Path(__file__).parent / "ro_sysctl_probe.py"


def sh(*cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", NS, *cmd], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)  # a stale one of ours
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")  # no dummy module here
        sh("ip", "addr", "add", "198.18.77.1/24", "dev", "eth0")
        sh("ip", "link", "set", "eth0", "up")
        # What the kubelet would have set from the pod's securityContext.sysctls.
        for key, value in (("net.mptcp.checksum_enabled", "1"), ("net.mptcp.allow_join_initial_addr_port", "0"),
                           ("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                           ("net.ipv4.conf.default.rp_filter", "0")):  # fmt: skip
            sh("sysctl", "-qw", f"{key}={value}")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def run_read_only(scenario: str) -> dict[str, object]:
    script = (
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
        f"! sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward' 2>/dev/null && exec {sys.executable} {PROBE} {scenario}"
    )
    proc = subprocess.run(["ip", "netns", "exec", NS, "unshare", "--mount", "--propagation", "private",
                           "sh", "-c", script], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_read_only_proc_sys_with_values_already_in_force(netns: str) -> None:
    result = run_read_only("ok")
    assert result["already_set"] is True
    assert result["change_refused"] is True and result["checksum_now"] == "1"
    # The C flag was already set by the kubelet: the join address is announced regardless.
    assert result["join_started"] is True
    assert "198.18.77.1" in str(result["endpoints"]) and "signal" in str(result["endpoints"])
    # ip_forward already 1: the director installs instead of crash-looping.
    assert result["director_installed"] is True
    pod = result["pod"]
    assert pod == {"ready_gauge": 1.0, "errors": 0, "vip_on_lo": True,
                   "vip_on_lo_after_stop": False, "ready_gauge_after_stop": 0.0}  # fmt: skip
    assert sh("ip", "mptcp", "endpoint", "show").strip() == ""  # the join address was removed


def test_receive_side_failure_is_reported_not_raised(netns: str) -> None:
    # A strict reverse-path filter that a read-only /proc/sys cannot lift would drop every
    # decapsulated packet: the pod must say so (gauge 0, error counted) and keep running.
    sh("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=1")
    pod = run_read_only("strict-rp-filter")["pod"]
    assert isinstance(pod, dict)
    assert pod["ready_gauge"] == 0.0 and pod["errors"] == 1
    assert pod["vip_on_lo_after_stop"] is False  # whatever was set up is removed at stop
