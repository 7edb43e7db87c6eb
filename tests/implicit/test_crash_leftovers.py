"""What a killed MCP or CPE converter leaves in its network namespace (on an on-path node that is
the host's own), and how it goes: a SIGKILLed process leaves its nft table, ip rules, routes and
join endpoint; the leftover table still fails closed; a restart replaces them (exactly one of
each afterwards); `--cleanup-only` removes every one of them, and running it twice is harmless."""

from __future__ import annotations

import socket

import pytest
from implicit_e2e import NO_LEFTOVERS as NONE
from implicit_e2e import (
    ONE_MCP,
    SERVER_PORT,
    download,
    leftovers,
    mcp_config,
    mptcp_connect,
    nft_counters,
)
from mcpool_proxy.kernel.tproxy import CPE_TABLE, MCP_TABLE
from mcpool_tools.lab import ImplicitLab, ProxyProcess
from support import requires_netns

pytestmark = [requires_netns, pytest.mark.netns]

def kill(handle: ProxyProcess) -> None:
    handle.proc.kill()
    assert handle.proc.wait(10) == -9
    handle.stop()


def cleanup_only(lab: ImplicitLab, ns: str, command: str, handle: ProxyProcess) -> None:
    argv = lab.python_argv("mcpool_proxy.cli", command, "--config", str(handle.config_path), "--cleanup-only")
    for _ in range(2):  # idempotent: the second run finds nothing and still succeeds
        done = lab.exec(ns, argv, check=False)
        assert done.returncode == 0, done.stderr


def test_a_killed_mcp_fails_closed_is_replaced_at_restart_and_cleaned_up(lab: ImplicitLab) -> None:
    assert leftovers(lab, "mcp", MCP_TABLE) == NONE
    first = lab.start_proxy(mcp_config(lab), name="killed")
    assert leftovers(lab, "mcp", MCP_TABLE) == ONE_MCP
    kill(first)
    assert leftovers(lab, "mcp", MCP_TABLE) == ONE_MCP
    # The leftover table still drops marked SYNs: without a listener they would otherwise reach
    # the server and become end-to-end MPTCP.
    before = nft_counters(lab, "mcp", MCP_TABLE)["unbound"]
    with pytest.raises((TimeoutError, socket.timeout)):
        mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True, timeout_s=2.0)
    assert nft_counters(lab, "mcp", MCP_TABLE)["unbound"] > before

    # A restart replaces them: one table, one rule and one route per family, one endpoint.
    second = lab.start_proxy(mcp_config(lab), name="restarted")
    assert leftovers(lab, "mcp", MCP_TABLE) == ONE_MCP
    with mptcp_connect(lab, "cpe", (lab.srv_ip, SERVER_PORT), marked=True) as sock:
        download(sock, 300_000, 31)
    kill(second)
    assert leftovers(lab, "mcp", MCP_TABLE) == ONE_MCP

    cleanup_only(lab, "mcp", "proxy", second)
    assert leftovers(lab, "mcp", MCP_TABLE) == NONE


def test_a_killed_cpe_converter_is_replaced_at_restart_and_cleaned_up(lab: ImplicitLab) -> None:
    one = {"tables": 1, "rules-4": 1, "rules-6": 1, "routes-4": 1, "routes-6": 1, "join_endpoints": 0}
    assert leftovers(lab, "cpe", CPE_TABLE) == NONE
    first = lab.start_cpe(lab.cpe_config(), name="cpe-killed")
    assert leftovers(lab, "cpe", CPE_TABLE) == one
    kill(first)
    assert leftovers(lab, "cpe", CPE_TABLE) == one
    second = lab.start_cpe(lab.cpe_config(), name="cpe-restarted")
    assert leftovers(lab, "cpe", CPE_TABLE) == one
    kill(second)
    cleanup_only(lab, "cpe", "cpe", second)
    assert leftovers(lab, "cpe", CPE_TABLE) == NONE
