"""Shared test helpers (import as `from support import requires_netns`): capability checks that make a test skip with a clear reason.

CI runs as root on a kernel with MPTCP, so there every test runs; on a laptop without root the
kernel tests say exactly why they skip instead of failing obscurely.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

IPPROTO_MPTCP = 262


def _is_root() -> bool:
    return os.geteuid() == 0


def _kernel_has_mptcp() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError:
        return False
    return True


def _why_no_netns() -> str | None:
    if not _is_root():
        return "needs root to create network namespaces (run `make test` as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (scripts/install-deps.sh installs it)"
    if not _kernel_has_mptcp():
        return "kernel has no MPTCP (CONFIG_MPTCP) or net.mptcp.enabled=0"
    return None


requires_mptcp = pytest.mark.skipif(
    not _kernel_has_mptcp(), reason="kernel has no MPTCP (CONFIG_MPTCP) or net.mptcp.enabled=0"
)
_NETNS_REASON = _why_no_netns()
requires_netns = pytest.mark.skipif(_NETNS_REASON is not None, reason=_NETNS_REASON or "")


def require_command(name: str, package: str) -> str:
    """The path of `name`, or fail the test: scripts/install-deps.sh installs every command the
    tests call, so a missing one is a broken install, never a reason to skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed (Debian package {package}); run scripts/install-deps.sh")
    return path


def wait_for(condition: Callable[[], T | None], timeout_s: float = 10.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy and return that; fail naming `what`.

    Only for states no event announces (a kernel path manager adding a subflow, a proxy's
    bookkeeping after a close); wherever an event exists, tests wait on the event instead.
    """
    deadline = time.monotonic() + timeout_s
    last = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value {last!r}")
        time.sleep(0.05)
        last = condition()
    return last
