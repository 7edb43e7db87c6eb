"""The proxy's admission filter: SYNs from clients outside `policy.allowed_cpes` are dropped in
the kernel of the pod's network namespace, so a stranger costs no descriptor, no accept and no
`policy.max_handshakes` slot (measured before this filter: about 4,000 strangers a second, each
holding a slot for the 1-3 s of its refusal, locked out every allowed CPE).

One nftables table (family `inet`, default name `mcpool_admission`) with:

- sets `cpes4` / `cpes6` of the allowed prefixes (interval sets, overlapping prefixes merged;
  an IPv4-mapped IPv6 prefix is also entered as the IPv4 prefix it maps, since dual-stack
  listeners receive IPv4 clients as IPv4 packets);
- set `ports` of the listeners' ports;
- chain `input` (hook input, priority filter - 10): anything but TCP passes first (the address
  rules below would otherwise drop a stranger's ICMPv6 neighbour discovery, or the director's
  VXLAN packets); then a SYN (SYN set, ACK/FIN/RST clear) to a
  listener port from outside the sets is counted (counter `strangers`) and dropped. Everything
  else passes: established traffic, the admin port, and MP_JOIN SYNs (`tcp option mptcp subtype
  1`): a join may come from a CPE's other link, whose address is rightly not in `allowed_cpes`,
  and the kernel itself checks its token and HMAC without waking the proxy.

- with a rate (the proxy passes twice `limits.new_connections_per_cpe_per_s` and twice its
  burst), dynamic sets `rate4` / `rate6` drop an allowed address's SYNs beyond that rate
  (counter `cpe_flood`): one allowed CPE flooding SYNs then costs the proxy no accept either,
  while the userspace token bucket (`limits.py`) stays the precise limit below it.

A dropped SYN gets no answer (no RST): the stranger's stack retransmits into the void, which is
the cheapest thing for both sides. The userspace check in `policy.check_client` stays in force
behind it: the filter may be missing (no nft, no CAP_NET_ADMIN: `install_admission` logs that
and returns False) and it must never be the only guard.

`admission_ruleset` is pure (tested without a kernel); `install_admission` / `remove_admission`
run `nft -f -` / `nft delete table`, at the proxy's start and exit.

Installed before the proxy: in a pod the filter is installed by an init container running
`mcpool admission install --config FILE` (`admission_cli.py`), the only container of the pod with
CAP_NET_ADMIN in pools whose proxy needs none. It then writes a status file
(`kernel.admission_status_file`, on a volume both containers mount) naming the table and the
sha256 of the ruleset it installed. The proxy, finding that file with the digest of the ruleset
it would install itself (`preinstalled`), reports the filter as active and never removes it: it
did not install it, and could not (no CAP_NET_ADMIN). Nothing is left behind: the table lives in
the pod's network namespace, which the kernel frees with the pod.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ProxyConfig

__all__ = [
    "ADMISSION_TABLE",
    "admission_ruleset",
    "config_ports",
    "install_admission",
    "install_script",
    "preinstalled",
    "remove_admission",
    "ruleset_for",
    "strangers_dropped",
    "table_present",
    "write_status",
]

log = logging.getLogger("mcpool.proxy")

ADMISSION_TABLE = "mcpool_admission"
_OWNER = "mcpool proxy admission filter"
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _split(prefixes: Iterable[str]) -> tuple[list[str], list[str]]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in prefixes:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
            continue
        v6.append(net)
        if net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            v4.append(ipaddress.IPv4Network(f"{mapped}/{max(net.prefixlen - 96, 0)}"))
        elif net.supernet_of(_MAPPED):
            v4.append(ipaddress.IPv4Network("0.0.0.0/0"))
    # collapse_addresses merges overlaps, which an nft interval set would otherwise reject.
    return (
        [str(n) for n in ipaddress.collapse_addresses(v4)],
        [str(n) for n in ipaddress.collapse_addresses(v6)],
    )


def admission_ruleset(
    allowed_cpes: Iterable[str],
    ports: Sequence[int],
    table: str = ADMISSION_TABLE,
    *,
    syn_rate_per_cpe: float | None = None,
    syn_burst_per_cpe: int = 0,
) -> str:
    """The `nft -f` script that (re)creates the filter atomically: allowed prefixes, listener ports,
    and, with `syn_rate_per_cpe`, a per-address SYN rate limit for allowed CPEs too.

    With no allowed prefix at all every SYN to the ports is dropped, as `policy.allowed_cpes`
    empty means nobody."""
    if not ports:
        raise ValueError("admission_ruleset: no listener ports")
    v4, v6 = _split(allowed_cpes)
    rate_sets = rate_rules = ""
    if syn_rate_per_cpe is not None:
        rate = max(1, math.ceil(syn_rate_per_cpe))
        burst = max(1, syn_burst_per_cpe)
        rate_sets = (
            "  set rate4 { type ipv4_addr; size 65536; flags dynamic, timeout; timeout 60s; }\n"
            "  set rate6 { type ipv6_addr; size 65536; flags dynamic, timeout; timeout 60s; }\n"
        )
        rate_rules = (
            f"    meta nfproto ipv4 update @rate4 {{ ip saddr limit rate over {rate}/second burst {burst} packets }} "
            "counter name cpe_flood drop\n"
            f"    meta nfproto ipv6 update @rate6 {{ ip6 saddr limit rate over {rate}/second burst {burst} packets }} "
            "counter name cpe_flood drop\n"
        )

    def elements(items: Sequence[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    port_list = ", ".join(str(p) for p in sorted(set(ports)))
    return f"""table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  comment "{_OWNER}"
  counter strangers {{}}
  counter cpe_flood {{}}
{rate_sets}  set cpes4 {{ type ipv4_addr; flags interval; auto-merge;{elements(v4)} }}
  set cpes6 {{ type ipv6_addr; flags interval; auto-merge;{elements(v6)} }}
  set ports {{ type inet_service;{elements([port_list])} }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    meta l4proto != tcp accept
    tcp flags & (fin | syn | rst | ack) != syn accept
    tcp dport != @ports accept
    tcp option mptcp subtype 1 accept
    meta nfproto ipv4 ip saddr != @cpes4 counter name strangers drop
    meta nfproto ipv6 ip6 saddr != @cpes6 counter name strangers drop
{rate_rules}  }}
}}
"""


def _nft(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, check=False, timeout=10)


def install_admission(
    allowed_cpes: Iterable[str],
    ports: Sequence[int],
    table: str = ADMISSION_TABLE,
    *,
    syn_rate_per_cpe: float | None = None,
    syn_burst_per_cpe: int = 0,
) -> bool:
    """Install (or replace) the filter in this network namespace; False, with one clear log line,
    if the kernel or the `nft` command refuses (the proxy then relies on its userspace check)."""
    script = admission_ruleset(list(allowed_cpes), ports, table, syn_rate_per_cpe=syn_rate_per_cpe,
                               syn_burst_per_cpe=syn_burst_per_cpe)  # fmt: skip
    return install_script(script)


def remove_admission(table: str = ADMISSION_TABLE) -> None:
    """Delete the filter's table (nothing if it is not there); never raises."""
    try:
        listed = _nft(["list", "table", "inet", table])
        if listed.returncode != 0:
            return
        if _OWNER not in listed.stdout:
            log.error("not removing nft table inet %s: it is not the proxy's admission filter", table)
            return
        proc = _nft(["delete", "table", "inet", table])
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot remove the admission filter table %s: %s", table, exc)
        return
    if proc.returncode != 0:
        log.warning("cannot remove the admission filter table %s: %s", table, proc.stderr.strip())


def strangers_dropped(table: str = ADMISSION_TABLE) -> int | None:
    """Packets the filter dropped so far (None if the table or nft is not there)."""
    try:
        proc = _nft(["list", "counter", "inet", table, "strangers"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    words = proc.stdout.split()
    try:
        return int(words[words.index("packets") + 1])
    except (ValueError, IndexError):
        return None


def config_ports(config: ProxyConfig) -> list[int]:
    """The explicit listener ports of a configuration (convert, socks5). Transparent listeners are
    left out: their SYNs carry the original destination's port, and implicit mode's own table
    refuses strangers."""
    from ..config import split_hostport

    addresses = [a for a in (config.listen.convert, config.listen.socks5) if a is not None]
    return sorted({split_hostport(a)[1] for a in addresses})


def ruleset_for(config: ProxyConfig, ports: Sequence[int]) -> str:
    """The ruleset the proxy and `mcpool admission install` install for `config`: the kernel's
    per-CPE SYN limit is twice the userspace bucket, a coarse guard against one CPE's flood, never
    stricter than limits.new_connections_per_cpe_*."""
    limits = config.limits
    return admission_ruleset(
        config.policy.allowed_cpes, ports, config.kernel.admission_table,
        syn_rate_per_cpe=2 * limits.new_connections_per_cpe_per_s,
        syn_burst_per_cpe=2 * limits.new_connections_burst_per_cpe,
    )  # fmt: skip


def _digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()


def install_script(script: str) -> bool:
    """`install_admission` for a ruleset already built (`ruleset_for`)."""
    try:
        proc = _nft(["-f", "-"], script)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning(
            "admission filter not installed (cannot run nft: %s): strangers are refused in userspace only, "
            "each costing an accept and a handshake slot; install nftables or set kernel.admission_filter=false",
            exc,
        )
        return False
    if proc.returncode != 0:
        log.warning(
            "admission filter not installed (nft: %s): strangers are refused in userspace only, each costing "
            "an accept and a handshake slot; the proxy needs CAP_NET_ADMIN, or set kernel.admission_filter=false",
            proc.stderr.strip() or f"exit status {proc.returncode}",
        )
        return False
    return True


def write_status(path: str | Path, table: str, script: str) -> None:
    """Record that `script` is installed as `table` (written whole, then renamed into place, so a
    reader never sees half a file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"table": table, "ruleset_sha256": _digest(script),
                               "installed_by": "mcpool admission install"}) + "\n")  # fmt: skip
    tmp.chmod(0o644)  # the proxy runs as another user
    os.replace(tmp, target)


def table_present(table: str) -> bool | None:
    """Whether the table exists in this namespace; None if nft cannot tell (listing it needs
    CAP_NET_ADMIN too, which a proxy of a `mechanism: none` pool does not have)."""
    try:
        proc = _nft(["list", "table", "inet", table])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode == 0:
        return _OWNER in proc.stdout
    if "No such file or directory" in proc.stderr:
        return False
    return None


def preinstalled(status_file: str | Path | None, table: str, script: str) -> bool:
    """Whether `mcpool admission install` installed exactly `script` as `table` before the proxy
    started (its status file says so and, where nft can tell, the table is there); False, with a
    warning when the file is there but does not match, so the caller installs the filter itself."""
    if status_file is None:
        return False
    try:
        status: Any = json.loads(Path(status_file).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        log.warning("admission filter status file %s unreadable (%s): ignored", status_file, exc)
        return False
    if not isinstance(status, dict) or status.get("table") != table or status.get("ruleset_sha256") != _digest(script):
        log.warning(
            "the admission filter installed before the proxy (status file %s) is for another configuration "
            "(table, policy.allowed_cpes, listener ports or limits differ): the proxy installs its own, which needs "
            "CAP_NET_ADMIN; otherwise the old filter stays in force until the pod is recreated",
            status_file,
        )
        return False
    if table_present(table) is False:
        log.warning("admission filter status file %s names table inet %s, which is not there", status_file, table)
        return False
    return True
