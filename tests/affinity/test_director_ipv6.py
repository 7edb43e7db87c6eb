"""The director's IPv6 ruleset on the nftables this project runs on (Debian 12: nft 1.0.6).

The IPv6 flow key (CPE port, VIP port, CPE address: 20 bytes) cannot be written into a map from
the packet path by nft 1.0.6 (it aborts, or stores corrupted keys), so an IPv6 VIP keeps one
data-less set per pod slot (kernel/steering.py). These tests load the real rulesets into nft and
plumb IPv6 slots in an anonymous network namespace (`unshare -n`); the end-to-end proof with
traffic is tests/cluster/test_cluster_ipv6.py.
"""

from __future__ import annotations

import logging
import subprocess
import textwrap

import pytest
from conftest import run_unshared
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.kernel import steering
from support import require_command, requires_netns

VIP6 = "2001:db8:255::1"


@requires_netns
@pytest.mark.parametrize("vip", ["198.19.255.1", VIP6])
@pytest.mark.parametrize("forward", ["vxlan", "dnat"])
def test_the_ruleset_loads_in_nft(vip: str, forward: str) -> None:
    require_command("nft", "nftables")
    require_command("unshare", "util-linux")
    script = steering.director_ruleset(vip, [5124, 1080], 0x4D430000, forward, 60, owner="mcpool director pool=t")
    proc = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=script, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if ":" in vip:
        # Nothing writes a >16-byte key with data from the packet path.
        assert "@flows" not in script and "jump restore6" in script and "jump remember6" in script


_PLUMB = textwrap.dedent(
    f"""
    import subprocess
    from mcpool_proxy.kernel import steering

    def rules(slot):
        out = subprocess.run(["nft", "list", "table", "inet", "t6"], capture_output=True, text=True).stdout
        return out.count(f"@flows6_{{slot}} ")

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    steering.install_director("{VIP6}", [5124], 0x4D430000, 4242, "dnat", 60, table="t6", owner="o")
    kw = dict(vip="{VIP6}", mark_base=0x4D430000, forward="dnat", route_table_base=4300, vxlan_port=4789,
              vxlan_vni_base=7700, tunnel_mtu=1450, pod_mac="02:4d:43:50:00:01", table="t6")
    steering.add_slot(1, "2001:db8:100::2", **kw)
    # A flow the kernel learnt for slot 1 (as remember6 would), then slot 1 plumbed again.
    subprocess.run(["nft", "add", "element", "inet", "t6", "flows6_1", "{{ 40000 . 5124 . 2001:db8:1::2 }}"], check=True)
    steering.add_slot(1, "2001:db8:100::2", **kw)
    steering.add_slot(2, "2001:db8:101::2", **kw)
    kept = "2001:db8:1::2" in subprocess.run(["nft", "list", "set", "inet", "t6", "flows6_1"],
                                             capture_output=True, text=True).stdout
    # Re-applying the table (a restarted director) keeps the slots' sets and rules.
    steering.install_director("{VIP6}", [5124], 0x4D430000, 4242, "dnat", 60, table="t6", owner="o")
    after_reinstall = (rules(1), rules(2))
    steering.remove_slot(1, vip="{VIP6}", mark_base=0x4D430000, forward="dnat", route_table_base=4300, table="t6")
    gone = subprocess.run(["nft", "list", "set", "inet", "t6", "flows6_1"], capture_output=True).returncode != 0
    print(kept, after_reinstall, rules(1), rules(2), gone)
    """
)


@requires_netns
def test_ipv6_slots_keep_their_flows_when_replumbed_and_go_when_removed() -> None:
    require_command("nft", "nftables")
    require_command("ip6tables", "iptables")
    proc = run_unshared("-c", _PLUMB)
    # Each slot has exactly its two rules (restore6, remember6) however often it was plumbed.
    assert proc.stdout.split() == ["True", "(2,", "2)", "0", "2", "True"], proc.stdout


def test_dnat_refuses_a_pod_of_the_other_family(caplog: pytest.LogCaptureFixture) -> None:
    director = Director(DirectorConfig(vip=VIP6, ports=[5124], redis_url="redis://r:6379/0", forward="dnat"))
    with caplog.at_level(logging.ERROR, "mcpool.director"):
        # No kernel call happens for it: nothing else to set up.
        director._reconcile_slots({"pod-a": "198.18.100.2"})
    assert director.slots == {}
    assert "not of the VIP's family" in caplog.text and "pod-a" in caplog.text
