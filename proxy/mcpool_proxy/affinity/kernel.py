"""Every kernel object the director and its pods need, named once: nftables, xtables, routes, tunnels.

Only SYNs to the VIP reach userspace. The packet path in the director's namespace:

1. nft `steer` (prerouting, priority -200): an MP_JOIN SYN (`tcp option mptcp subtype 1`) is
   marked JOIN, any other SYN INITIAL; any other packet of a known flow gets its pod mark back
   from the `flows` map (keyed by CPE address, CPE port, VIP port); anything else to the VIP is
   an unknown flow and dropped (counted).
2. xtables mangle (priority -150): marks JOIN/INITIAL go to NFQUEUE (`--queue-bypass`: with no
   director listening, SYNs pass unsteered and die, so clients retry). This kernel (6.18 as
   built here) has no `nft queue` (CONFIG_NFT_QUEUE off), hence the xtables target.
3. userspace sets a verdict carrying the pod's mark (`mark_base | slot << 8`).
4. nft `remember` (priority -140): a packet with a pod mark adds/refreshes its flow in `flows`,
   so every later packet of the subflow is steered in step 1 without userspace.
5. forwarding by mark:
   - `vxlan` (default; the production design, direct server return): `ip rule fwmark M lookup
     T`, table T routes the VIP into a per-pod VXLAN device whose remote is the pod; a permanent
     neighbour entry gives the VIP the pod receive device's fixed MAC. The pod holds the VIP on
     `lo`, decapsulates on a collect-metadata VXLAN device and answers the CPE directly with
     the VIP as source, so replies need not pass the director, and nothing here depends on
     seeing them: the flow map is stateless with respect to TCP (conntrack would mark a
     one-directional subflow INVALID after the SYN), and VIP traffic is `notrack`.
     This kernel has no IPIP/GRE/GENEVE/FOU modules (measured: `ip link add type ipip` fails),
     but has VXLAN; the design is the same as IPIP/GUE encapsulation (Katran, GLB).
   - `dnat` (lab only): nat prerouting DNATs to the pod address by mark. Correct ONLY where the
     pod's replies are routed back through the director's namespace (conntrack must un-NAT
     them); the pods then see the CPE's real source address but not the VIP.

All functions here run commands (`nft`, `iptables`, `ip`) or write /proc/sys; they are called
at start and when the set of pods changes, never per packet.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "NFT_TABLE",
    "POD_RX_DEVICE",
    "director_ruleset",
    "install_director",
    "remove_director",
    "add_slot",
    "remove_slot",
    "slot_mark",
    "queue_marks",
    "setup_pod_receive",
    "teardown_pod_receive",
    "nft_counters",
    "write_sysctl",
    "run",
]

log = logging.getLogger("mcpool.affinity.kernel")

NFT_TABLE = "mcpool_director"
POD_RX_DEVICE = "mcpvx"  # the pod's VXLAN receive device (collect-metadata: any VNI)
SLOT_DEVICE_PREFIX = "mcpv"  # director side: mcpv1, mcpv2, ... one per pod slot
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
MARK_INITIAL = 0x1
MARK_JOIN = 0x2
MAX_SLOTS = 255


def run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command; on failure raise RuntimeError with its stderr (for a human)."""
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


def slot_mark(mark_base: int, slot: int) -> int:
    if not 1 <= slot <= MAX_SLOTS:
        raise ValueError(f"slot {slot} out of range 1..{MAX_SLOTS}")
    return mark_base | (slot << 8)


def queue_marks(mark_base: int) -> tuple[int, int]:
    """(initial, join) marks that send a SYN to the queue."""
    return mark_base | MARK_INITIAL, mark_base | MARK_JOIN


def _family(vip: str) -> tuple[str, str]:
    """(nft address family keyword, nft address type) for the VIP."""
    return ("ip", "ipv4_addr") if ipaddress.ip_address(vip).version == 4 else ("ip6", "ipv6_addr")


def director_ruleset(
    vip: str,
    ports: Sequence[int],
    mark_base: int,
    forward: str,
    flow_idle_timeout_s: int,
    max_flows: int = 1_048_576,
) -> str:
    """The director's nftables table (an `nft -f` script). Pure; re-applying it keeps the flows.

    The `flows` map is declared with `add` and never flushed, so restarting the director keeps
    every live subflow steered; only the chains are replaced.
    """
    fam, addr_type = _family(vip)
    initial, join = queue_marks(mark_base)
    match = f"{fam} daddr {vip} tcp dport {{ {', '.join(str(p) for p in sorted(set(ports)))} }}"
    owned = f"meta mark & 0xffff0000 == {mark_base:#010x}"
    lines = [
        f"add table inet {NFT_TABLE}",
        f"add map inet {NFT_TABLE} flows {{ type {addr_type} . inet_service . inet_service : mark; "
        f"flags dynamic,timeout; timeout {flow_idle_timeout_s}s; size {max_flows}; }}",
        f"add map inet {NFT_TABLE} pod_addrs {{ type mark : {addr_type}; }}",
        f"add counter inet {NFT_TABLE} restored",
        f"add counter inet {NFT_TABLE} queued_initial",
        f"add counter inet {NFT_TABLE} queued_join",
        f"add counter inet {NFT_TABLE} unknown_flow",
    ]
    # "add" then "delete" each chain: valid whether or not it exists, and the whole script is one
    # transaction, so packets never see a half-installed table.
    for chain in ("raw", "steer", "remember", "nat"):
        lines.append(f"add chain inet {NFT_TABLE} {chain}")
        lines.append(f"delete chain inet {NFT_TABLE} {chain}")
    lines += [
        f"table inet {NFT_TABLE} {{",
        "  chain steer {",
        "    type filter hook prerouting priority -200; policy accept;",
        # Every SYN is decided afresh, even one whose 4-tuple is still in `flows`: a CPE port
        # reused for a new subflow must not inherit the previous subflow's pod.
        f"    {match} tcp flags & (syn | ack) == syn tcp option mptcp subtype 1 meta mark set {join:#010x} counter name queued_join accept",
        f"    {match} tcp flags & (syn | ack) == syn meta mark set {initial:#010x} counter name queued_initial accept",
        f"    {match} meta mark set {fam} saddr . tcp sport . tcp dport map @flows counter name restored accept",
        f"    {match} counter name unknown_flow drop",
        "  }",
        "  chain remember {",
        "    type filter hook prerouting priority -140; policy accept;",
        f"    {owned} meta mark & 0x0000ff00 != 0 update @flows {{ {fam} saddr . tcp sport . tcp dport : meta mark }}",
        "  }",
    ]
    if forward == "vxlan":
        lines += [
            "  chain raw {",
            "    type filter hook prerouting priority -300; policy accept;",
            # Conntrack would see one direction only (DSR) and call the flow INVALID.
            f"    {fam} daddr {vip} tcp dport {{ {', '.join(str(p) for p in sorted(set(ports)))} }} notrack",
            "  }",
        ]
    else:
        lines += [
            "  chain nat {",
            "    type nat hook prerouting priority -100; policy accept;",
            f"    {owned} dnat {fam} to meta mark map @pod_addrs",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _xtables(vip: str) -> str:
    return "iptables" if ipaddress.ip_address(vip).version == 4 else "ip6tables"


def _queue_rule(mark_base: int, queue_num: int) -> list[str]:
    return [
        "-t", "mangle", "PREROUTING",
        "-m", "mark", "--mark", f"{mark_base:#x}/0xffffff00",
        "-j", "NFQUEUE", "--queue-num", str(queue_num), "--queue-bypass",
    ]  # fmt: skip


def install_director(
    vip: str,
    ports: Sequence[int],
    mark_base: int,
    queue_num: int,
    forward: str,
    flow_idle_timeout_s: int,
) -> None:
    """Install (idempotently) the nft table, the NFQUEUE rule and forwarding sysctls."""
    if mark_base & 0xFFFF:
        raise ValueError("mark_base must have its low 16 bits clear")
    v6 = ipaddress.ip_address(vip).version == 6
    write_sysctl("net.ipv6.conf.all.forwarding" if v6 else "net.ipv4.ip_forward", "1")
    run(["nft", "-f", "-"], stdin=director_ruleset(vip, ports, mark_base, forward, flow_idle_timeout_s))
    rule = _queue_rule(mark_base, queue_num)
    xt = _xtables(vip)
    if subprocess.run([xt, rule[0], rule[1], "-C", *rule[2:]], capture_output=True).returncode != 0:
        run([xt, rule[0], rule[1], "-A", *rule[2:]])


def remove_director(vip: str, mark_base: int, queue_num: int, route_table_base: int) -> None:
    """Remove everything install_director and add_slot created (ignores what is already gone)."""
    rule = _queue_rule(mark_base, queue_num)
    run([_xtables(vip), rule[0], rule[1], "-D", *rule[2:]], check=False)
    run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
    for dev in Path("/sys/class/net").iterdir():
        suffix = dev.name.removeprefix(SLOT_DEVICE_PREFIX)
        if dev.name.startswith(SLOT_DEVICE_PREFIX) and suffix.isdigit():
            remove_slot(int(suffix), vip=vip, mark_base=mark_base, forward="vxlan",
                        route_table_base=route_table_base)  # fmt: skip


def add_slot(
    slot: int,
    pod_addr: str,
    *,
    vip: str,
    mark_base: int,
    forward: str,
    route_table_base: int,
    vxlan_port: int,
    vxlan_vni_base: int,
    tunnel_mtu: int,
    pod_mac: str,
) -> None:
    """Make packets carrying this slot's mark reach `pod_addr` (idempotent)."""
    mark = slot_mark(mark_base, slot)
    if forward == "dnat":
        run(["nft", "add", "element", "inet", NFT_TABLE, "pod_addrs", f"{{ {mark:#x} : {pod_addr} }}"])
        return
    remove_slot(slot, vip=vip, mark_base=mark_base, forward=forward, route_table_base=route_table_base)
    dev = f"{SLOT_DEVICE_PREFIX}{slot}"
    table = str(route_table_base + slot)
    v6 = ["-6"] if ipaddress.ip_address(vip).version == 6 else []
    run(["ip", "link", "add", dev, "type", "vxlan", "id", str(vxlan_vni_base + slot),
         "remote", pod_addr, "dstport", str(vxlan_port), "nolearning"])  # fmt: skip
    run(["ip", "link", "set", dev, "mtu", str(tunnel_mtu), "up"])
    # The pod decapsulates with rp_filter off; here the route only carries the VIP, so the
    # tunnel's own outer packets (same skb mark) fall through to the main table.
    run(["ip", *v6, "route", "replace", vip, "dev", dev, "table", table])
    run(["ip", *v6, "neigh", "replace", vip, "lladdr", pod_mac, "dev", dev, "nud", "permanent"])
    run(["ip", *v6, "rule", "add", "fwmark", f"{mark:#x}", "lookup", table, "pref", table])


def remove_slot(slot: int, *, vip: str, mark_base: int, forward: str, route_table_base: int) -> None:
    mark = slot_mark(mark_base, slot)
    if forward == "dnat":
        run(["nft", "delete", "element", "inet", NFT_TABLE, "pod_addrs", f"{{ {mark:#x} }}"], check=False)
        return
    v6 = ["-6"] if ipaddress.ip_address(vip).version == 6 else []
    table = str(route_table_base + slot)
    for _ in range(MAX_SLOTS):  # a crashed run may have left duplicates
        rule = ["ip", *v6, "rule", "del", "fwmark", f"{mark:#x}", "lookup", table]
        if subprocess.run(rule, capture_output=True).returncode != 0:
            break
    run(["ip", *v6, "route", "flush", "table", table], check=False)
    run(["ip", "link", "del", f"{SLOT_DEVICE_PREFIX}{slot}"], check=False)


def setup_pod_receive(vip: str, vxlan_port: int, pod_mac: str, mtu: int = 1500) -> None:
    """In a pod's namespace: hold the VIP on lo and decapsulate the director's VXLAN (any VNI).

    The receive device's MAC is the fixed `pod_mac` every director neighbours the VIP to, so no
    ARP crosses the tunnel and the pod never sends anything back through it (DSR).
    """
    v6 = ipaddress.ip_address(vip).version == 6
    prefix = "128" if v6 else "32"
    run(["ip", "addr", "replace", f"{vip}/{prefix}", "dev", "lo"])
    run(["ip", "link", "set", "lo", "up"])
    if not Path(f"/sys/class/net/{POD_RX_DEVICE}").exists():
        run(["ip", "link", "add", POD_RX_DEVICE, "type", "vxlan", "external", "dstport", str(vxlan_port)])
    run(["ip", "link", "set", POD_RX_DEVICE, "address", pod_mac, "mtu", str(mtu), "up"])
    # Decapsulated packets come from the CPE's address, which routes out another interface.
    for scope in ("all", POD_RX_DEVICE):
        write_sysctl(f"net.ipv4.conf.{scope}.rp_filter", "0")


def teardown_pod_receive(vip: str) -> None:
    v6 = ipaddress.ip_address(vip).version == 6
    run(["ip", "addr", "del", f"{vip}/{'128' if v6 else '32'}", "dev", "lo"], check=False)
    run(["ip", "link", "del", POD_RX_DEVICE], check=False)


def nft_counters() -> dict[str, tuple[int, int]]:
    """The director table's named counters: name -> (packets, bytes)."""
    out = run(["nft", "list", "counters", "table", "inet", NFT_TABLE], check=False)
    counters: dict[str, tuple[int, int]] = {}
    name = ""
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["counter"] and len(words) >= 2:
            name = words[1]
        elif "packets" in words and "bytes" in words:
            counters[name] = (
                int(words[words.index("packets") + 1]),
                int(words[words.index("bytes") + 1]),
            )
    return counters
