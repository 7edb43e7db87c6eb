"""`mcpool director --cleanup-only` leaves a node's network namespace as it found it (issue 10).

In an anonymous namespace (`unshare -n`: no fixed name), the real kernel objects of a director are
installed — nft table (with its VIP drop rule), NFQUEUE rule, two pod slots (VXLAN devices,
fwmark rules, route tables, neighbour entries) — plus a leftover fwmark rule and route table
whose device was already deleted (a crash between steps). Then the real CLI runs with
`--cleanup-only`, and the namespace's nft ruleset, xtables mangle table, ip rules, routes and
links must equal what they were before the director came.
"""

from __future__ import annotations

import textwrap

from conftest import run_unshared
from support import require_command, requires_netns

_PROBE = textwrap.dedent(
    """
    import json, subprocess, sys
    from mcpool_proxy.cluster import director as d
    from mcpool_proxy.kernel import steering

    def sh(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p")
    sh("ip", "addr", "add", "198.18.100.1/24", "dev", "eth9")
    sh("ip", "link", "set", "eth9", "up")
    # A node has xtables' mangle table already (kube-proxy, the CNI); iptables-nft creates it with
    # its built-in chains on first use and leaves it: make it part of "before".
    for op in ("-A", "-D"):
        sh("iptables", "-t", "mangle", op, "PREROUTING", "-p", "tcp", "--dport", "1", "-j", "RETURN")

    def state():
        return {
            "nft": sh("nft", "list", "ruleset"),
            "mangle": sh("iptables-save", "-t", "mangle"),
            "rules": sh("ip", "rule", "show"),
            "routes": sh("ip", "route", "show", "table", "all"),
            "links": sorted(l.split(":")[1].strip().split("@")[0] for l in sh("ip", "-o", "link", "show").splitlines()),
        }

    # iptables-save prints a header with a date: compare the rules only.
    def rules_only(s):
        s["mangle"] = "\\n".join(l for l in s["mangle"].splitlines() if not l.startswith("#"))
        return s

    before = rules_only(state())
    path = sys.argv[1]
    with open(path, "w") as f:
        f.write("vip: 198.19.255.1\\nports: [5124]\\nredis_url: redis://127.0.0.1:1/0\\npool: p\\n"
                "nft_table: mcpool_0ab\\ndevice_prefix: mcp0abv\\nqueue_num: 8363\\nmark_base: 0x40ab0000\\n"
                "route_table_base: 1092352\\nvxlan_vni_base: 68352\\nmetrics_listen: null\\n")
    director = d.Director(d.load_director_config(path))
    director.install()
    director._reconcile_slots({"pod-a": "198.18.100.2", "pod-b": "198.18.100.3"})
    # A crash between add_slot's steps: the rule and route of slot 9 without their device.
    sh("ip", "route", "replace", "198.19.255.1", "dev", "eth9", "table", str(1092352 + 9))
    sh("ip", "rule", "add", "fwmark", hex(0x40ab0000 | 9 << 8), "lookup", str(1092352 + 9), "pref", "4300")
    during = rules_only(state())
    assert "mcpool_0ab" in during["nft"] and "NFQUEUE" in during["mangle"], during
    assert {"mcp0abv1", "mcp0abv2"} <= set(during["links"]), during["links"]
    assert during["rules"].count("lookup 10923") == 3, during["rules"]
    status = d.main(["--config", path, "--cleanup-only"])
    after = rules_only(state())
    print(json.dumps({"status": status, "before": before, "after": after}))
    """
)


@requires_netns
def test_cleanup_only_leaves_the_namespace_as_it_was(tmp_path: object) -> None:
    import json
    from pathlib import Path

    for command, package in (("nft", "nftables"), ("iptables-save", "iptables")):
        require_command(command, package)
    proc = run_unshared("-c", _PROBE, str(Path(str(tmp_path)) / "d.yaml"), timeout_s=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == 0
    for key in ("nft", "mangle", "rules", "routes", "links"):
        assert result["after"][key] == result["before"][key], (key, result["before"][key], result["after"][key])
