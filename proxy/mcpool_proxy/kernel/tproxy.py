"""Implicit mode's kernel objects, named once: the nftables table that tells converted MPTCP SYNs
from end-to-end ones and sends the former to a transparent listener (TPROXY), the policy routing
TPROXY needs, and the socket options of transparent sockets. Used by the MCP on the path
(`server.Proxy` with `listen.transparent`) and by the CPE converter (`cpe/converter.py`).

The MCP's table (`mcp_ruleset`, hook prerouting, priority mangle), rule by rule:

1. `socket transparent 1`: a packet for one of our transparent sockets (an accepted connection,
   or an upstream socket bound to the client's address) gets the routing mark, so the fwmark
   rule routes it to the local stack although its destination is not ours.
2. a SYN with MP_CAPABLE (`tcp option mptcp subtype 0`) that carries the marker (DSCP and/or a
   marker source prefix), from an allowed client prefix, arriving on a CPE-facing interface:
   `tproxy` to the transparent listener of its family, marked, accepted (counter `intercepted`).
3. the same SYN when `tproxy` found no transparent listener (not bound yet, or bound by somebody
   else): dropped (counter `unbound`). Without this rule the kernel would route the SYN on to the
   server and the CPE's connection would silently become end-to-end MPTCP (fail open): with it
   the proxy fails closed while its listener is missing, and the client retries.
4. a marked SYN from anybody else: reset (counter `stranger`), never intercepted nor passed.
5. an unmarked MP_CAPABLE SYN (an end host's own MPTCP, e.g. a phone with its own cellular
   link): counted (`passed`) and routed untouched.

The policy routing: `ip rule fwmark M lookup T` and `local default dev lo table T`, both
families. Everything is installed idempotently (the table is replaced in one `nft -f`
transaction; stale rules are deleted before one is added) and removed with `remove_*`.

`tproxy` is not terminal: when it finds no transparent socket the rule stops there (the
statements after it do not run) and the next rule is evaluated, which is what makes rule 3 the
fail-closed path. The listener must be bound to the MCP's own address, not a wildcard, or rule 1
would also catch pass-through flows whose destination port it listens on.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .mptcp import IP_TRANSPARENT, set_transparent
from .steering import nft_counters, run

__all__ = [
    "CPE_TABLE",
    "MCP_TABLE",
    "IP_TRANSPARENT",
    "TproxyTarget",
    "cpe_ruleset",
    "install_routing",
    "install_table",
    "mcp_ruleset",
    "remove_routing",
    "remove_table",
    "set_transparent",
    "table_counters",
    "table_exists",
]

log = logging.getLogger("mcpool.kernel.tproxy")

MCP_TABLE = "mcpool_tproxy"
CPE_TABLE = "mcpool_cpe"


@dataclass(frozen=True)
class TproxyTarget:
    """A transparent listener: its address (IPv4 or IPv6) and port."""

    address: str
    port: int

    @property
    def family(self) -> str:
        return "ip" if ipaddress.ip_address(self.address).version == 4 else "ip6"

    @property
    def nft_address(self) -> str:
        return self.address if self.family == "ip" else f"[{self.address}]"


def _split(prefixes: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ip": [], "ip6": []}
    for prefix in prefixes:
        net = ipaddress.ip_network(prefix, strict=False)
        out["ip" if net.version == 4 else "ip6"].append(str(net))
    return out


def _set(table: str, name: str, family: str, elements: Sequence[str]) -> list[str]:
    kind = "ipv4_addr" if family == "ip" else "ipv6_addr"
    body = f"type {kind}; flags interval;"
    if elements:
        body += f" elements = {{ {', '.join(elements)} }};"
    return [f"add set inet {table} {name} {{ {body} }}"]


def _iif(interfaces: Sequence[str]) -> str:
    if not interfaces:
        return ""
    quoted = ", ".join(f'"{i}"' for i in interfaces)
    return f"iifname {{ {quoted} }} "


def _replace_table(table: str, comment: str) -> list[str]:
    # "add" then "delete" the table: valid whether or not it exists, and one transaction with
    # what follows, so packets never see a half-installed table.
    return [f"add table inet {table}", f"delete table inet {table}",
            f'add table inet {table} {{ comment "{comment}"; }}']  # fmt: skip


def mcp_ruleset(
    targets: Sequence[TproxyTarget],
    *,
    allowed: Sequence[str],
    dscp: int | None,
    marker_sources: Sequence[str] = (),
    interfaces: Sequence[str] = (),
    fwmark: int = 0x1,
    table: str = MCP_TABLE,
) -> str:
    """The MCP's classification table (an `nft -f` script; see the module docstring). Pure.

    `allowed`: client prefixes that may be intercepted (policy.allowed_cpes); `dscp`: the marker
    DSCP (None: no DSCP test); `marker_sources`: prefixes a marked SYN must also come from.
    A family without a target is never intercepted: its marked SYNs from allowed clients are
    dropped (rule 3), as a missing listener's are.
    """
    if dscp is None and not marker_sources:
        raise ValueError("a marker needs a DSCP, source prefixes or both")
    by_family = {t.family: t for t in targets}
    if len(by_family) != len(targets):
        raise ValueError("at most one transparent listener per address family")
    allowed_by = _split(allowed)
    marker_by = _split(marker_sources)
    lines = _replace_table(table, "mcpool implicit mode: TPROXY of converted MPTCP SYNs")
    for name in ("intercepted", "unbound", "stranger", "passed"):
        lines.append(f"add counter inet {table} {name}")
    for fam in ("ip", "ip6"):
        lines += _set(table, f"allowed_{fam}", fam, allowed_by[fam])
        if marker_sources:
            lines += _set(table, f"marker_{fam}", fam, marker_by[fam])
    mark = f"{fwmark:#x}"
    syn = "tcp flags & (syn | ack) == syn tcp option mptcp subtype 0"
    lines += [
        f"table inet {table} {{",
        "  chain prerouting {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    meta l4proto tcp socket transparent 1 meta mark set {mark} accept",
    ]
    iif = _iif(interfaces)
    for fam in ("ip", "ip6"):
        marker = []
        if dscp is not None:
            marker.append(f"{fam} dscp {dscp:#04x}")
        if marker_sources:
            marker.append(f"{fam} saddr @marker_{fam}")
        marked = f"{iif}meta nfproto {'ipv4' if fam == 'ip' else 'ipv6'} {' '.join(marker)} {syn}"
        allowed_match = f"{fam} saddr @allowed_{fam}"
        target = by_family.get(fam)
        if target is not None:
            lines.append(f"    {marked} {allowed_match} tproxy {fam} to {target.nft_address}:{target.port} "
                         f"meta mark set {mark} counter name intercepted accept")  # fmt: skip
        lines.append(f"    {marked} {allowed_match} counter name unbound drop")
        lines.append(f"    {marked} counter name stranger reject with tcp reset")
    lines.append(f"    {iif}{syn} counter name passed")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def cpe_ruleset(
    targets: Sequence[TproxyTarget],
    *,
    lan_interfaces: Sequence[str],
    sources: Sequence[str] = (),
    fwmark: int = 0x1,
    dscp_mark: int | None = None,
    dscp: int | None = None,
    table: str = CPE_TABLE,
) -> str:
    """The CPE converter's table (an `nft -f` script). Pure.

    Prerouting: packets of our transparent sockets are routed locally; a LAN SYN with no MPTCP
    option at all (`tcp option mptcp missing`: a phone's own MPTCP is left alone) from `sources`
    (empty: any) goes by TPROXY to the converter's listener of its family (counter `converted`);
    without a listener it is dropped (`unbound`), as on the MCP. Postrouting: packets whose
    socket carries `dscp_mark` (SO_MARK) get the marker DSCP, both families, because
    IPV6_TCLASS is refused on MPTCP sockets and an IPv6 connection may have IPv4 subflows.
    """
    by_family = {t.family: t for t in targets}
    src_by = _split(sources)
    lines = _replace_table(table, "mcpool CPE converter: TPROXY of the LAN's plain TCP")
    for name in ("converted", "unbound", "passed_mptcp", "marked"):
        lines.append(f"add counter inet {table} {name}")
    for fam in ("ip", "ip6"):
        if sources:
            lines += _set(table, f"lan_{fam}", fam, src_by[fam])
    mark = f"{fwmark:#x}"
    iif = _iif(lan_interfaces)
    lines += [
        f"table inet {table} {{",
        "  chain prerouting {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    meta l4proto tcp socket transparent 1 meta mark set {mark} accept",
        f"    {iif}tcp flags & (syn | ack) == syn tcp option mptcp exists counter name passed_mptcp accept",
    ]
    for fam in ("ip", "ip6"):
        src = f" {fam} saddr @lan_{fam}" if sources else ""
        # Connections to the CPE itself (its LAN address) are its own business, not converted.
        match = (f"{iif}meta nfproto {'ipv4' if fam == 'ip' else 'ipv6'}{src} fib daddr type != local "
                 "tcp flags & (syn | ack) == syn")
        target = by_family.get(fam)
        if target is not None:
            lines.append(f"    {match} tproxy {fam} to {target.nft_address}:{target.port} "
                         f"meta mark set {mark} counter name converted accept")  # fmt: skip
        lines.append(f"    {match} counter name unbound drop")
    lines.append("  }")
    if dscp_mark is not None and dscp is not None:
        lines += [
            "  chain postrouting {",
            "    type filter hook postrouting priority mangle; policy accept;",
            f"    meta mark {dscp_mark:#x} meta nfproto ipv4 ip dscp set {dscp:#04x} counter name marked",
            f"    meta mark {dscp_mark:#x} meta nfproto ipv6 ip6 dscp set {dscp:#04x} counter name marked",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def install_table(script: str) -> None:
    """Apply a ruleset from `mcp_ruleset`/`cpe_ruleset` (replaces the table if it exists)."""
    run(["nft", "-f", "-"], stdin=script)


def remove_table(table: str) -> None:
    run(["nft", "delete", "table", "inet", table], check=False)


def table_exists(table: str) -> bool:
    """Whether this network namespace has nft table `inet <table>` (OSError: no `nft`)."""
    return subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0


def table_counters(table: str) -> dict[str, int]:
    """The table's named counters: name -> packets."""
    return {name: packets for name, (packets, _) in nft_counters(table).items()}


def routing_commands(fwmark: int, route_table: int, priority: int) -> list[list[str]]:
    """The `ip` commands that route marked packets to the local stack, both families."""
    cmds: list[list[str]] = []
    for fam, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        cmds.append(["ip", fam, "rule", "add", "fwmark", f"{fwmark:#x}", "lookup", str(route_table),
                     "pref", str(priority)])  # fmt: skip
        cmds.append(["ip", fam, "route", "replace", "local", default, "dev", "lo", "table", str(route_table)])
    return cmds


def install_routing(fwmark: int, route_table: int, priority: int) -> None:
    """Install the fwmark rule and the local route (idempotent: stale rules are removed first)."""
    remove_routing(fwmark, route_table, priority)
    for cmd in routing_commands(fwmark, route_table, priority):
        run(cmd)


def remove_routing(fwmark: int, route_table: int, priority: int) -> None:
    for fam in ("-4", "-6"):
        for _ in range(64):  # a crashed run may have left duplicates
            rule = ["ip", fam, "rule", "del", "fwmark", f"{fwmark:#x}", "lookup", str(route_table),
                    "pref", str(priority)]  # fmt: skip
            if subprocess.run(rule, capture_output=True).returncode != 0:
                break
        run(["ip", fam, "route", "flush", "table", str(route_table)], check=False)
