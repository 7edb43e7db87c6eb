"""Every kernel object the director and its pods need, named once: nftables, xtables, routes, tunnels.

Only SYNs to the VIP can reach userspace, and most do not. The packet path in the director's
namespace, in order: steps 0-5 are the rules of nft `steer` (prerouting, priority -200), the
first that matches decides; then the xtables queue rule, nft `remember`, and forwarding.

0. SYN admission: nft rate-limits SYNs to the VIP (the queue to userspace is the director's SYN
   queue, `queue_max_len` deep, decided by one Python thread): per source address (IPv6: per
   /64) and in total; a SYN over either limit is dropped in the kernel and counted
   (`syn_over_source`, `syn_over_total`), so one flooding source cannot fill the queue for all.
1. MP_JOIN SYN (`tcp option mptcp subtype 1`) whose token is in the `tokens` map: its pod's mark
   from there (counter `token_hit`; see kernel/tokenmap.py). Any other MP_JOIN SYN: mark JOIN
   (counter `queued_join`), for the queue: userspace holds it until its token is registered.
2. Initial SYN from a CPE in the `cpes` map (CPE address -> mark of the ready pod holding its live
   connections): that mark (counter `cpe_hit`).
3. Any other initial SYN: `jhash <saddr> mod B seed S` into one of B buckets, the bucket's pod
   mark from the `buckets` map (counter `bucket_hit`; kernel/bucketmap.py). The director fills
   that map from the ready pods by rendezvous hashing per bucket, so the decision is a pure
   function of (pool, ready pods, CPE address): another director of the pool decides the same.
   A bucket without an element (no ready pod; a pod without a tunnel yet; the map not written
   since the director started) falls through to
4. mark INITIAL (counter `queued_initial`), for the queue: userspace decides it by the same rules
   (cluster/table.py `decide`, which computes the same bucket: cluster/hashing.py reproduces the
   kernel's jhash).
5. Any other packet of a known flow gets its pod mark back from the `flows` map (keyed by CPE
   address, CPE port, VIP port; IPv6: the per-slot sets below; counter `restored`); anything else
   to the VIP is an unknown flow and dropped (counter `unknown_flow`).
6. xtables mangle (priority -150): marks JOIN/INITIAL go to NFQUEUE (`--queue-bypass`: with no
   director listening, SYNs pass unsteered and die, so clients retry). This kernel (6.18 as
   built here) has no `nft queue` (CONFIG_NFT_QUEUE off), hence the xtables target. Userspace
   sets a verdict carrying the pod's mark (`mark_base | slot << 8`).
7. nft `remember` (priority -140): a packet with a pod mark, whoever decided it (a map in steps
   1-3, or userspace), adds/refreshes its flow in `flows`, so every later packet of the subflow
   is steered in step 5 without userspace.
   IPv6 differs in how flows are kept (see `_flows6_script`): one dynamic set per pod slot
   (`flows6_<slot>`, no data) instead of one map, because nft 1.0.6 (Debian 12) cannot write a
   map element from the packet path whose key is longer than 16 bytes (an IPv6 address plus
   the ports is 20): the address first aborts nft, the address last silently stores a key
   with the mark written over 4 of its bytes, so no later packet matches. The CPE and bucket
   maps are not affected: their keys are 16 bytes at most (`ip6 saddr`) and only the director
   writes them, from the control plane.
8. forwarding by mark:
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

Why the flow map and not conntrack carries the decision (`ct mark`): in the vxlan mode the VIP's
traffic is `notrack` (raw chain, priority -300), because the director sees only the CPE -> pod
direction (direct server return) and conntrack would call such a one-directional subflow INVALID
after its SYN; with notrack there is no conntrack entry to hold a mark at all. The flow map is
stateless with respect to TCP and needs only what the director sees. (The dnat mode has
conntrack, which NAT needs; it keeps the same flow map so both modes steer alike.)

Per-node resources are named by the director's configuration (nft table, device prefix, NFQUEUE
number, mark base, route tables), so several pools' directors share a node; the operator derives
them from a hash of namespace/pool (docs/affinity.md). The table carries a comment naming its
owner, and `install_director` refuses a table another pool owns (a hash collision) rather than
rewrite it under that pool's feet.

All functions here run commands (`nft`, `iptables`, `ip`) or set sysctls (through
`sysctl.write_sysctl`, which reads first: /proc/sys is read-only in a non-privileged container);
they are called at start and when the set of pods changes, never per packet.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_POD_MAC, DEFAULT_VXLAN_PORT
from .bucketmap import BUCKET_MAP
from .sysctl import (
    SYSCTL_IPV4_FORWARD,
    SYSCTL_IPV6_FORWARDING,
    SYSCTL_RP_FILTER,
    read_sysctl,
    write_sysctl,
)
from .tokenmap import CPE_MAP, TOKEN_MAP

__all__ = [
    "DEFAULT_POD_MAC",
    "DEFAULT_VXLAN_PORT",
    "NFT_TABLE",
    "POD_RX_DEVICE",
    "RULE_PREF",
    "SLOT_DEVICE_PREFIX",
    "InitialHash",
    "SynLimits",
    "table_owner",
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
    "run",
]

log = logging.getLogger("mcpool.affinity.kernel")

NFT_TABLE = "mcpool_director"  # default; each pool's director gets its own (DirectorConfig.nft_table)
POD_RX_DEVICE = "mcpvx"  # the pod's VXLAN receive device (collect-metadata: any VNI)
SLOT_DEVICE_PREFIX = "mcpv"  # default director side: mcpv1, mcpv2, ... one per pod slot
# Priority of the fwmark rules: before the main table's rule (32766), which would otherwise route
# the VIP by the default route. Rules of several pools share it; their marks differ.
RULE_PREF = 4300
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
FLOWS6_RESTORE = "restore6"  # IPv6: per slot, "this subflow's key is in flows6_<slot>: set its mark"
FLOWS6_REMEMBER = "remember6"  # IPv6: per slot, "a packet with this slot's mark: refresh its key"
FLOWS6_KEY = "tcp sport . tcp dport . ip6 saddr"
MARK_INITIAL = 0x1
MARK_JOIN = 0x2
MAX_SLOTS = 255
BUCKET_MAP_SIZE = 65536  # most buckets a director may be configured with (hashing.MAX_BUCKETS)


def run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command; on failure raise RuntimeError with its stderr (for a human)."""
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


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
    table: str = NFT_TABLE,
    max_tokens: int = 1_048_576,
    owner: str = "",
    syn_limits: SynLimits | None = None,
    initial: InitialHash | None = None,
    max_cpes: int = 1_048_576,
) -> str:
    """The director's nftables table (an `nft -f` script). Pure; re-applying it keeps the flows.

    The `flows` map is declared with `add` and never flushed, so restarting the director keeps
    every live subflow steered; only the chains are replaced (the token, CPE and bucket maps keep
    their elements too). `initial` None: no initial SYN is decided in the kernel (all are queued).
    """
    fam, addr_type = _family(vip)
    v6 = fam == "ip6"
    limits = syn_limits if syn_limits is not None else SynLimits()
    initial_mark, join = queue_marks(mark_base)
    match = f"{fam} daddr {vip} tcp dport {{ {', '.join(str(p) for p in sorted(set(ports)))} }}"
    owned = f"meta mark & 0xffff0000 == {mark_base:#010x}"
    comment = owner.replace('"', "")
    lines = [
        f'add table inet {table} {{ comment "{comment}"; }}' if comment else f"add table inet {table}",
        f"add map inet {table} pod_addrs {{ type mark : {addr_type}; }}",
        # MP_JOIN receiver token -> pod mark, fed by the director (kernel/tokenmap.py); each
        # element carries its own timeout. The map needs a default timeout too: without one, nft
        # 1.0.6 reads every element back before adding one with a timeout (measured: 117 ms per
        # add at 100k elements, 0.2 ms with the default).
        f"add map inet {table} {TOKEN_MAP} {{ typeof tcp option @30,32,32 : meta mark; flags timeout; "
        f"timeout 1h; size {max_tokens}; }}",
        f"add counter inet {table} token_hit",
        f"add counter inet {table} cpe_hit",
        f"add counter inet {table} bucket_hit",
        # CPE address -> mark of the ready pod holding its live connections (kernel/tokenmap.py
        # CpeMap), and bucket -> pod mark (kernel/bucketmap.py). Both written by the director
        # only; the bucket map's elements have no timeout (it is rewritten as the pods change).
        f"add map inet {table} {CPE_MAP} {{ type {addr_type} : mark; flags timeout; timeout 1h; size {max_cpes}; }}",
        f"add map inet {table} {BUCKET_MAP} {{ type mark : mark; size {BUCKET_MAP_SIZE}; }}",
        f"add counter inet {table} restored",
        f"add counter inet {table} queued_initial",
        f"add counter inet {table} queued_join",
        f"add counter inet {table} unknown_flow",
        f"add counter inet {table} syn_over_source",
        f"add counter inet {table} syn_over_total",
        # One element per recent SYN source, each with its own token bucket; an idle source is
        # forgotten after a minute, and a full set admits new sources unlimited per source (the
        # total limit still holds).
        f"add set inet {table} syn_sources {{ {_syn_source_type(fam, addr_type)}; flags dynamic,timeout; "
        f"timeout 60s; size {limits.max_sources}; }}",
    ]
    if not v6:  # IPv6 keeps one set per slot instead (add_slot, _flows6_script)
        lines.insert(1, f"add map inet {table} flows {{ type {addr_type} . inet_service . inet_service : mark; "
                        f"flags dynamic,timeout; timeout {flow_idle_timeout_s}s; size {max_flows}; }}")
    # "add" then "delete" each chain: valid whether or not it exists, and the whole script is one
    # transaction, so packets never see a half-installed table.
    for chain in ("raw", "steer", "remember", "nat"):
        lines.append(f"add chain inet {table} {chain}")
        lines.append(f"delete chain inet {table} {chain}")
    if v6:
        # Regular chains holding one rule per pod slot (add_slot): kept, with their sets, when
        # the table is re-applied, so a restarted director keeps every live IPv6 subflow too.
        lines += [f"add chain inet {table} {FLOWS6_RESTORE}", f"add chain inet {table} {FLOWS6_REMEMBER}"]
    restore = (f"    {match} jump {FLOWS6_RESTORE}" if v6 else
               f"    {match} meta mark set {fam} saddr . tcp sport . tcp dport map @flows counter name restored accept")
    remember = (f"    {owned} meta mark & 0x0000ff00 != 0 jump {FLOWS6_REMEMBER}" if v6 else
                f"    {owned} meta mark & 0x0000ff00 != 0 update @flows {{ {fam} saddr . tcp sport . tcp dport : meta mark }}")
    lines += [
        f"table inet {table} {{",
        "  chain steer {",
        "    type filter hook prerouting priority -200; policy accept;",
        # Every SYN is decided afresh, even one whose 4-tuple is still in `flows`: a CPE port
        # reused for a new subflow must not inherit the previous subflow's pod.
        *_syn_limit_rules(match, fam, limits),
        # A join whose token is in the map is decided here; a miss (no element) ends this rule
        # and the next one queues the join to userspace, which waits for the token.
        f"    {match} tcp flags & (syn | ack) == syn tcp option mptcp subtype 1 "
        f"meta mark set tcp option @30,32,32 map @{TOKEN_MAP} counter name token_hit accept",
        f"    {match} tcp flags & (syn | ack) == syn tcp option mptcp subtype 1 meta mark set {join:#010x} counter name queued_join accept",
        *_initial_rules(match, fam, initial),
        f"    {match} tcp flags & (syn | ack) == syn meta mark set {initial_mark:#010x} counter name queued_initial accept",
        restore,
        f"    {match} counter name unknown_flow drop",
        "  }",
        "  chain remember {",
        "    type filter hook prerouting priority -140; policy accept;",
        remember,
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


@dataclass(frozen=True)
class InitialHash:
    """How the kernel hashes an initial SYN into a bucket: `jhash <saddr> mod buckets seed seed`
    (cluster/hashing.py BucketHash computes the same in userspace)."""

    buckets: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= BUCKET_MAP_SIZE:
            raise ValueError(f"buckets must be in 1..{BUCKET_MAP_SIZE}, not {self.buckets}")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise ValueError(f"bucket seed must be a 32-bit value, not {self.seed}")


def _initial_rules(match: str, fam: str, initial: InitialHash | None) -> list[str]:
    """An initial SYN decided in the kernel: its CPE's pod if the CPE map has it, else its bucket's.

    The bucket rule first writes the hash into the mark, then maps the mark: nft 1.0.6 refuses a
    `jhash ... map @named` whose map is not `typeof jhash`, and a `typeof jhash` map makes `nft
    list` crash (segfault, measured). A miss leaves the hash in the mark; the queue rule after it
    overwrites it, so a hash never reaches the queue or the `remember` chain as a pod mark.
    """
    if initial is None:
        return []
    syn = f"{match} tcp flags & (syn | ack) == syn"
    return [
        f"    {syn} meta mark set {fam} saddr map @{CPE_MAP} counter name cpe_hit accept",
        f"    {syn} meta mark set jhash {fam} saddr mod {initial.buckets} seed {initial.seed:#010x} "
        f"meta mark set meta mark map @{BUCKET_MAP} counter name bucket_hit accept",
    ]


@dataclass(frozen=True)
class SynLimits:
    """How many SYNs to the VIP may reach the queue per second: per source, and in total (0: no
    limit). Bursts absorb a CPE opening its subflows together, or a reconnect storm."""

    per_source: int = 200
    per_source_burst: int = 400
    total: int = 20_000
    total_burst: int = 4096
    max_sources: int = 65_536


def _syn_source_key(fam: str) -> str:
    # IPv6: a host owns its whole /64, so one address per SYN would escape a per-address limit.
    # The key is the /64 read from the header itself (source address at byte 8): nft 1.0.6
    # aborts on a masked `ip6 saddr & ffff:ffff:ffff:ffff::` as a dynamic set key.
    return "ip saddr" if fam == "ip" else "@nh,64,64"


def _syn_source_type(fam: str, addr_type: str) -> str:
    return f"type {addr_type}" if fam == "ip" else "typeof @nh,64,64"


def _syn_limit_rules(match: str, fam: str, limits: SynLimits) -> list[str]:
    syn = f"{match} tcp flags & (syn | ack) == syn"
    source = _syn_source_key(fam)
    rules = []
    if limits.per_source:
        rules.append(
            f"    {syn} add @syn_sources {{ {source} limit rate over {limits.per_source}/second "
            f"burst {limits.per_source_burst} packets }} counter name syn_over_source drop"
        )
    if limits.total:
        rules.append(
            f"    {syn} limit rate over {limits.total}/second burst {limits.total_burst} packets "
            "counter name syn_over_total drop"
        )
    return rules


def _xtables(vip: str) -> str:
    return "iptables" if ipaddress.ip_address(vip).version == 4 else "ip6tables"


def _queue_rule(mark_base: int, queue_num: int) -> list[str]:
    return [
        "-t", "mangle", "PREROUTING",
        "-m", "mark", "--mark", f"{mark_base:#x}/0xffffff00",
        "-j", "NFQUEUE", "--queue-num", str(queue_num), "--queue-bypass",
    ]  # fmt: skip


def table_owner(table: str = NFT_TABLE) -> str | None:
    """The owner comment of nft table `table`: None if the table does not exist, "" if unnamed."""
    proc = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    match = re.search(r'^\s*comment "(.*)"\s*$', proc.stdout, re.MULTILINE)
    return match.group(1) if match else ""


def install_director(
    vip: str,
    ports: Sequence[int],
    mark_base: int,
    queue_num: int,
    forward: str,
    flow_idle_timeout_s: int,
    table: str = NFT_TABLE,
    owner: str = "",
    syn_limits: SynLimits | None = None,
    initial: InitialHash | None = None,
) -> None:
    """Install (idempotently) the nft table, the NFQUEUE rule and forwarding sysctls.

    `owner` names the pool (it becomes the table's comment); a table that another owner already
    holds is left alone and RuntimeError is raised: two pools whose derived resources collide
    must fail loudly, not steer each other's SYNs.
    """
    if mark_base & 0xFFFF:
        raise ValueError("mark_base must have its low 16 bits clear")
    existing = table_owner(table)
    if existing and owner and existing != owner.replace('"', ""):
        raise RuntimeError(
            f"nft table inet {table} belongs to {existing!r}, not {owner!r}: two directors on this node "
            "derived the same resources (see docs/affinity.md, 'Per-node resources'); rename one pool "
            "or set nft_table/device_prefix/queue_num/mark_base/route_table_base explicitly"
        )
    v6 = ipaddress.ip_address(vip).version == 6
    forwarding = SYSCTL_IPV6_FORWARDING if v6 else SYSCTL_IPV4_FORWARD
    if not write_sysctl(forwarding, 1):
        # Fatal only because the value is still wrong (write_sysctl reads first).
        raise RuntimeError(f"{forwarding} is not 1 and cannot be set: the director cannot forward")
    run(["nft", "-f", "-"], stdin=director_ruleset(vip, ports, mark_base, forward, flow_idle_timeout_s,
                                                   table=table, owner=owner, syn_limits=syn_limits,
                                                   initial=initial))  # fmt: skip
    rule = _queue_rule(mark_base, queue_num)
    xt = _xtables(vip)
    if subprocess.run([xt, rule[0], rule[1], "-C", *rule[2:]], capture_output=True).returncode != 0:
        run([xt, rule[0], rule[1], "-A", *rule[2:]])


def remove_director(
    vip: str,
    mark_base: int,
    queue_num: int,
    route_table_base: int,
    table: str = NFT_TABLE,
    device_prefix: str = SLOT_DEVICE_PREFIX,
    owner: str = "",
) -> None:
    """Remove everything install_director and add_slot created (ignores what is already gone).

    Nothing is removed when the table belongs to another owner (a collision that made our
    install_director fail): those resources are the other pool's.
    """
    existing = table_owner(table)
    if existing and owner and existing != owner.replace('"', ""):
        log.error("not removing nft table %s and its tunnels: they belong to %r", table, existing)
        return
    rule = _queue_rule(mark_base, queue_num)
    run([_xtables(vip), rule[0], rule[1], "-D", *rule[2:]], check=False)
    run(["nft", "delete", "table", "inet", table], check=False)
    # The devices from netlink, not /sys/class/net: a sysfs mounted for another namespace (a
    # container, `unshare -n`) would list the wrong ones.
    for name in _link_names():
        suffix = name.removeprefix(device_prefix)
        if name.startswith(device_prefix) and suffix.isdigit():
            remove_slot(int(suffix), vip=vip, mark_base=mark_base, forward="vxlan",
                        route_table_base=route_table_base, device_prefix=device_prefix)  # fmt: skip
    _remove_leftover_routing(vip, mark_base, route_table_base)


def _link_names() -> list[str]:
    names = []
    for line in run(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _remove_leftover_routing(vip: str, mark_base: int, route_table_base: int) -> None:
    """fwmark rules and route tables of this director whose tunnel device is already gone (a
    crash between the steps of add_slot, or a device deleted by hand)."""
    v6 = ["-6"] if ipaddress.ip_address(vip).version == 6 else []
    ours = range(route_table_base + 1, route_table_base + MAX_SLOTS + 1)
    for line in run(["ip", *v6, "rule", "show", "pref", str(RULE_PREF)], check=False).splitlines():
        match = re.search(r"fwmark (0x[0-9a-f]+)(?:/0x[0-9a-f]+)? lookup (\d+)", line)
        if match and int(match.group(1), 16) & 0xFFFF0000 == mark_base and int(match.group(2)) in ours:
            run(["ip", *v6, "rule", "del", "pref", str(RULE_PREF), "fwmark", match.group(1),
                 "lookup", match.group(2)], check=False)  # fmt: skip
    tables = set()
    for line in run(["ip", *v6, "route", "show", "table", "all"], check=False).splitlines():
        match = re.search(r"\btable (\d+)\b", line)
        if match and int(match.group(1)) in ours:
            tables.add(match.group(1))
    for table in sorted(tables):
        run(["ip", *v6, "route", "flush", "table", table], check=False)


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
    table: str = NFT_TABLE,
    device_prefix: str = SLOT_DEVICE_PREFIX,
    flow_idle_timeout_s: int = 3600,
    max_flows: int = 1_048_576,
) -> None:
    """Make packets carrying this slot's mark reach `pod_addr` (idempotent)."""
    mark = slot_mark(mark_base, slot)
    v6_vip = ipaddress.ip_address(vip).version == 6
    if forward == "dnat":
        if ipaddress.ip_address(pod_addr).version != ipaddress.ip_address(vip).version:
            # NAT cannot change the address family; vxlan can carry either inside either.
            raise RuntimeError(f"forward dnat: pod address {pod_addr} is not of the VIP's family ({vip}); "
                               "advertise the pod's address of that family, or use forward vxlan")
        if v6_vip:
            run(["nft", "-f", "-"], stdin=_flows6_script(slot, mark, table, flow_idle_timeout_s, max_flows))
        run(["nft", "add", "element", "inet", table, "pod_addrs", f"{{ {mark:#x} : {pod_addr} }}"])
        return
    remove_slot(slot, vip=vip, mark_base=mark_base, forward=forward, route_table_base=route_table_base,
                table=table, device_prefix=device_prefix, keep_flows=True)  # fmt: skip
    if v6_vip:
        run(["nft", "-f", "-"], stdin=_flows6_script(slot, mark, table, flow_idle_timeout_s, max_flows))
    dev = f"{device_prefix}{slot}"
    route_table = str(route_table_base + slot)
    v6 = ["-6"] if ipaddress.ip_address(vip).version == 6 else []
    run(["ip", "link", "add", dev, "type", "vxlan", "id", str(vxlan_vni_base + slot),
         "remote", pod_addr, "dstport", str(vxlan_port), "nolearning"])  # fmt: skip
    run(["ip", "link", "set", dev, "mtu", str(tunnel_mtu), "up"])
    # The pod decapsulates with rp_filter off; here the route only carries the VIP, so the
    # tunnel's own outer packets (same skb mark) fall through to the main table.
    run(["ip", *v6, "route", "replace", vip, "dev", dev, "table", route_table])
    run(["ip", *v6, "neigh", "replace", vip, "lladdr", pod_mac, "dev", dev, "nud", "permanent"])
    run(["ip", *v6, "rule", "add", "fwmark", f"{mark:#x}", "lookup", route_table, "pref", str(RULE_PREF)])


def remove_slot(
    slot: int,
    *,
    vip: str,
    mark_base: int,
    forward: str,
    route_table_base: int,
    table: str = NFT_TABLE,
    device_prefix: str = SLOT_DEVICE_PREFIX,
    keep_flows: bool = False,
) -> None:
    """Undo add_slot (ignores what is already gone). `keep_flows`: keep an IPv6 slot's flow set
    and rules (add_slot re-plumbing the same slot keeps its live subflows steered)."""
    mark = slot_mark(mark_base, slot)
    if ipaddress.ip_address(vip).version == 6 and not keep_flows:
        script = _delete_flows6_rules(slot, table)
        run(["nft", "-f", "-"], stdin=script + f"delete set inet {table} flows6_{slot}\n", check=False)
    if forward == "dnat":
        run(["nft", "delete", "element", "inet", table, "pod_addrs", f"{{ {mark:#x} }}"], check=False)
        return
    v6 = ["-6"] if ipaddress.ip_address(vip).version == 6 else []
    route_table = str(route_table_base + slot)
    for _ in range(MAX_SLOTS):  # a crashed run may have left duplicates
        rule = ["ip", *v6, "rule", "del", "fwmark", f"{mark:#x}", "lookup", route_table]
        if subprocess.run(rule, capture_output=True).returncode != 0:
            break
    run(["ip", *v6, "route", "flush", "table", route_table], check=False)
    run(["ip", "link", "del", f"{device_prefix}{slot}"], check=False)


def _delete_flows6_rules(slot: int, table: str) -> str:
    """`nft -f` lines deleting slot `slot`'s rules from the IPv6 flow chains (by handle)."""
    lines = []
    for chain in (FLOWS6_RESTORE, FLOWS6_REMEMBER):
        out = run(["nft", "-a", "list", "chain", "inet", table, chain], check=False)
        for line in out.splitlines():
            found = re.search(rf"@flows6_{slot}\b.*# handle (\d+)", line)
            if found:
                lines.append(f"delete rule inet {table} {chain} handle {found.group(1)}\n")
    return "".join(lines)


def _flows6_script(slot: int, mark: int, table: str, flow_idle_timeout_s: int, max_flows: int) -> str:
    """An IPv6 slot's flow set and its two rules, replacing any it had (one transaction).

    The set has no data, so nft 1.0.6 writes its 20-byte key (`FLOWS6_KEY`) correctly from the
    packet path; the slot's mark is a constant of its rules instead. Cost: a packet of a known
    flow is looked up in up to one set per pod before it matches (a hash lookup each).
    """
    name = f"flows6_{slot}"
    return (
        f"add set inet {table} {name} {{ typeof {FLOWS6_KEY}; flags dynamic,timeout; "
        f"timeout {flow_idle_timeout_s}s; size {max_flows}; }}\n"
        + _delete_flows6_rules(slot, table)
        + f"add rule inet {table} {FLOWS6_RESTORE} {FLOWS6_KEY} @{name} meta mark set {mark:#010x} "
        "counter name restored accept\n"
        f"add rule inet {table} {FLOWS6_REMEMBER} meta mark {mark:#010x} update @{name} {{ {FLOWS6_KEY} }}\n"
    )


def setup_pod_receive(
    vip: str, vxlan_port: int = DEFAULT_VXLAN_PORT, pod_mac: str = DEFAULT_POD_MAC, mtu: int = 1500
) -> None:
    """In a pod's namespace: hold the VIP on lo and decapsulate the director's VXLAN (any VNI).

    The receive device's MAC is the fixed `pod_mac` every director neighbours the VIP to, so no
    ARP crosses the tunnel and the pod never sends anything back through it (DSR). Needs
    CAP_NET_ADMIN; raises RuntimeError when something is missing (the caller reports it).
    """
    v6 = ipaddress.ip_address(vip).version == 6
    prefix = "128" if v6 else "32"
    run(["ip", "addr", "replace", f"{vip}/{prefix}", "dev", "lo"])
    run(["ip", "link", "set", "lo", "up"])
    if not Path(f"/sys/class/net/{POD_RX_DEVICE}").exists():
        run(["ip", "link", "add", POD_RX_DEVICE, "type", "vxlan", "external", "dstport", str(vxlan_port)])
    run(["ip", "link", "set", POD_RX_DEVICE, "address", pod_mac, "mtu", str(mtu), "up"])
    # Decapsulated packets come from the CPE's address, which routes out another interface: a
    # strict reverse-path filter (1) drops them, loose (2) or off (0) lets them in. The effective
    # value is max(all, device); /proc/sys may be read-only (then the pod's sysctls must say 0).
    effective = 0
    for scope in ("all", POD_RX_DEVICE):
        name = SYSCTL_RP_FILTER.format(scope=scope)
        if not write_sysctl(name, 0):
            effective = max(effective, int(read_sysctl(name) or 0))
    if effective == 1:
        raise RuntimeError(
            "strict rp_filter drops the director's decapsulated packets and /proc/sys is read-only: "
            "set net.ipv4.conf.all.rp_filter=0 and net.ipv4.conf.default.rp_filter=0 in the pod's sysctls"
        )


def teardown_pod_receive(vip: str) -> None:
    v6 = ipaddress.ip_address(vip).version == 6
    run(["ip", "addr", "del", f"{vip}/{'128' if v6 else '32'}", "dev", "lo"], check=False)
    run(["ip", "link", "del", POD_RX_DEVICE], check=False)


def nft_counters(table: str = NFT_TABLE) -> dict[str, tuple[int, int]]:
    """The director table's named counters: name -> (packets, bytes)."""
    out = run(["nft", "list", "counters", "table", "inet", table], check=False)
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
