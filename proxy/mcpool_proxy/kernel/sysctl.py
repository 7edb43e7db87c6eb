"""Sysctls: every sysctl mcpool reads or writes is named here, with the one read-before-write
helper (`write_sysctl`) and the proxy's own settings (`apply_kernel_settings`).

All of them are per network namespace. Writing is done only where the value differs, because in a
non-privileged container /proc/sys is read-only although the kubelet may already have set the
value (pod `securityContext.sysctls`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import KernelConfig

__all__ = [
    "SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT",
    "SYSCTL_IPV4_FORWARD",
    "SYSCTL_IPV6_FORWARDING",
    "SYSCTL_MPTCP_CHECKSUM",
    "SYSCTL_MPTCP_ENABLED",
    "SYSCTL_RP_FILTER",
    "SYSCTL_TCP_FASTOPEN",
    "SYN_OPTION_SYSCTLS",
    "syn_option_kinds",
    "TFO_CLIENT_ENABLE",
    "TFO_SERVER_ENABLE",
    "apply_kernel_settings",
    "read_sysctl",
    "write_sysctl",
]

# The logger these warnings had when this lived in mptcp.py: log lines keep their logger field.
log = logging.getLogger("mcpool_proxy.mptcp")

# net.ipv4.tcp_fastopen bits: 0x1 client may send data in SYN (with a cookie), 0x2 server accepts
# data in SYN on listeners with TCP_FASTOPEN set; 0x4 (client without cookie) is *not* used: on
# 6.18 an MPTCP SYN with data but no cookie falls back to plain TCP (no second subflow).
TFO_CLIENT_ENABLE = 0x1
TFO_SERVER_ENABLE = 0x2

# 5.6+: 0 makes socket(IPPROTO_MPTCP) fail with ENOPROTOOPT (create_socket then falls back to TCP).
SYSCTL_MPTCP_ENABLED = "net.mptcp.enabled"
# 5.14+: DSS checksums. Off by default; on 6.18 two-subflow streams were measured to corrupt data
# occasionally without them. Missing before 5.14: no checksums.
SYSCTL_MPTCP_CHECKSUM = "net.mptcp.checksum_enabled"
# 5.14+: 0 sets the MP_CAPABLE "C" bit: peers must not open extra subflows to the initial
# address/port (the per-pod join address mechanism). Missing before 5.14: joins always allowed.
SYSCTL_ALLOW_JOIN_INITIAL_ADDR_PORT = "net.mptcp.allow_join_initial_addr_port"
# TCP Fast Open bitmask (see TFO_* above); 3.7+.
SYSCTL_TCP_FASTOPEN = "net.ipv4.tcp_fastopen"
# Routing sysctls of cluster affinity (kernel/steering.py): the director forwards the VIP's
# packets; a pod decapsulating the director's tunnel must not drop packets whose source (the CPE)
# routes out of another interface (strict reverse-path filter, value 1). Per interface:
# `net.ipv4.conf.<dev>.rp_filter`, effective value max(all, <dev>).
SYSCTL_IPV4_FORWARD = "net.ipv4.ip_forward"
SYSCTL_IPV6_FORWARDING = "net.ipv6.conf.all.forwarding"
SYSCTL_RP_FILTER = "net.ipv4.conf.{scope}.rp_filter"
# The TCP options every SYN of this namespace carries, by option kind (each sysctl since 2.6,
# per network namespace): window scale (3), SACK permitted (4), timestamps (8). A value of 0
# leaves the option out of SYNs; timestamps are on for any non-zero value.
SYN_OPTION_SYSCTLS: dict[int, str] = {
    3: "net.ipv4.tcp_window_scaling",
    4: "net.ipv4.tcp_sack",
    8: "net.ipv4.tcp_timestamps",
}


@functools.cache
def syn_option_kinds() -> frozenset[int]:
    """Option kinds (3, 4, 8) the kernel puts in this namespace's SYNs, read once (the proxy
    runs in one namespace); unreadable sysctls count as off."""
    kinds = set()
    for kind, name in SYN_OPTION_SYSCTLS.items():
        value = read_sysctl(name)
        if value is not None and value.strip() not in ("", "0"):
            kinds.add(kind)
    return frozenset(kinds)


def _sysctl_path(name: str) -> Path:
    # "net.mptcp.enabled" -> net/mptcp/enabled; a name written with "/" is taken as is, which is
    # how sysctl(8) spells components that contain dots (interface names such as eth0.100).
    relative = name if "/" in name else name.replace(".", "/")
    return Path("/proc/sys") / relative.strip("/")


def read_sysctl(name: str) -> str | None:
    """The value of a sysctl in this process's network namespace, stripped; None if absent."""
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str | int) -> bool:
    """Make sysctl `name` hold `value`; True when it does (already or after writing). Never raises.

    Reads first and writes only when the value differs: in a non-privileged container /proc/sys is
    read-only, yet the kubelet may already have set the value (pod `securityContext.sysctls`), and
    that must count as success. False (logged) when the value is still different afterwards: the
    sysctl does not exist, or may not be written.
    """
    current = read_sysctl(name)
    if current is not None and current.split() == str(value).split():
        return True
    path = _sysctl_path(name)
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        log.warning(
            "cannot set %s=%s (%s): continuing with %s",
            name,
            value,
            exc.strerror,
            current,
        )
        return False
    return True


def apply_kernel_settings(kernel: KernelConfig) -> dict[str, Any]:
    """Apply `config.kernel` in this network namespace (if `apply_sysctls`) and report what is in
    force: {"mptcp_checksum": bool|None, "tcp_fastopen": int|None, "tcp_fastopen_server": bool|None}.

    A checksum setting of false leaves the namespace's value alone (it is never turned off).
    """
    if kernel.apply_sysctls:
        if kernel.mptcp_checksum:
            write_sysctl(SYSCTL_MPTCP_CHECKSUM, 1)
        if kernel.tcp_fastopen_server:
            current = read_sysctl(SYSCTL_TCP_FASTOPEN)
            if current is not None and current.isdigit() and not int(current) & TFO_SERVER_ENABLE:
                write_sysctl(SYSCTL_TCP_FASTOPEN, int(current) | TFO_SERVER_ENABLE)
    checksum = read_sysctl(SYSCTL_MPTCP_CHECKSUM)
    tfo = read_sysctl(SYSCTL_TCP_FASTOPEN)
    tfo_value = int(tfo) if tfo is not None and tfo.isdigit() else None
    return {
        "mptcp_checksum": None if checksum is None else checksum == "1",
        "tcp_fastopen": tfo_value,
        "tcp_fastopen_server": None if tfo_value is None else bool(tfo_value & TFO_SERVER_ENABLE),
    }
