"""IPv6 behind the VIP (issue 13, point 3): an IPv6 VIP and the CPE's IPv6 addresses through the
real director, with each `forward` mode the director offers, and the same checks as the IPv4
cluster tests: every subflow of a bonded connection on the pod its first subflow hashed to (the
pods' `/connections` and their kernels' `ss`), byte-exact echo, DSL cut, the rest over LTE.

One lab (`mtk6`, VIP 2001:db8:255::1) for the module; each case starts its own director and pods:
- `vxlan` over IPv6: the pods advertise their IPv6 addresses, the tunnels run over IPv6;
- `vxlan` over IPv4: the same IPv6 VIP, tunnels over the pods' IPv4 addresses (a dual-stack
  cluster whose pod IPs are IPv4 first);
- `dnat`: NAT to the pods' IPv6 addresses, with the pods' replies routed back through the
  director (`Lab.route_replies_via_director`), which that mode requires.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_lab import Cluster, director_lab, kernel_view, open_conn, parallel, wait_bucket_map
from failover import dsl_cut_mid_download
from mcpool_tools.lab import Lab
from support import requires_netns
from test_cluster import KB, check_on_one_pod, decisions, delta, wait_ready_pods

pytestmark = [requires_netns, pytest.mark.netns, pytest.mark.timeout(180)]

VIP6 = "2001:db8:255::1"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with director_lab("mtk6", vip=VIP6) as built:
        yield built


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    handle = Cluster(lab)
    try:
        yield handle
    finally:
        handle.stop()
        lab.route_replies_via_director(False)


def start(lab: Lab, cluster: Cluster, forward: str, underlay: int) -> None:
    lab.start_director(forward=forward, snapshot_grace_s=3.0)
    for i, name in enumerate(cluster.names):
        advertise = lab.pods[i].ip6 if underlay == 6 else lab.pods[i].ip
        # With vxlan the pod holds the VIP and decapsulates itself; with dnat it needs neither.
        extra = {"vip": lab.vip} if forward == "vxlan" else {}
        config = lab.cluster_proxy_config(i, name, advertise=advertise, **extra)
        cluster.proxies[name] = lab.start_proxy(config, pod=i, name=name)
    wait_ready_pods(lab, 2)


@pytest.mark.parametrize(("forward", "underlay"), [("vxlan", 6), ("vxlan", 4), ("dnat", 6)],
                         ids=["vxlan-over-ipv6", "vxlan-over-ipv4", "dnat"])  # fmt: skip
def test_ipv6_connections_all_subflows_on_one_pod_then_dsl_cut(lab: Lab, cluster: Cluster, forward: str,
                                                               underlay: int) -> None:
    if forward == "dnat":
        lab.route_replies_via_director()
    start(lab, cluster, forward, underlay)
    dsl, lte = lab.cpe_addrs
    assert ":" in dsl and ":" in lte
    wait_bucket_map(lab, 2)
    before = decisions(lab)
    counters_before = lab.director_counters()
    base = kernel_view(lab, cluster.names)
    conns = parallel(lambda src: open_conn(lab, src), [dsl, lte] * 5, workers=10)
    by_pod = check_on_one_pod(lab, cluster, conns, {dsl, lte}, base)
    assert all(len(v) == 5 for v in by_pod.values()), {k: len(v) for k, v in by_pod.items()}
    after = decisions(lab)
    # A join is decided in userspace (held for its token, or found) or, when its token reached
    # the director's kernel map first, by nftables alone (counter token_hit).
    kernel_hits = lab.director_counters()["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0]
    assert delta(after, before, "token_hit", "token_hit_after_wait") + kernel_hits >= 10, (after, kernel_hits)
    assert delta(after, before, "token_miss_after_wait", "collision") == 0, after
    # Every initial SYN was decided by the kernel's maps (key: the 16-byte `ip6 saddr`), none
    # in userspace.
    counters = lab.director_counters()
    kernel_initial = sum(counters[n][0] - counters_before.get(n, (0, 0))[0] for n in ("bucket_hit", "cpe_hit"))
    assert kernel_initial >= len(conns), counters
    assert counters["queued_initial"][0] == counters_before.get("queued_initial", (0, 0))[0], counters
    assert delta(after, before, "hashed", "cpe_hit") == 0, after
    if forward == "dnat":
        # The pods saw the CPE's real address but their own as the local one (no VIP on them).
        for name, pod in zip(cluster.names, lab.pods, strict=True):
            for entry in cluster.proxies[name].connections():
                assert all(s["local"].startswith(f"[{pod.ip6}]") for s in entry["subflows"]), entry

    parallel(lambda c: c.echo(128 * KB), conns)
    lab.cut_link("dsl")
    parallel(lambda c: c.echo(128 * KB), conns)
    parallel(lambda c: c.finish(), conns)
    counters = lab.director_counters()
    queued = sum(counters[n][0] - counters_before.get(n, (0, 0))[0] for n in ("queued_initial", "queued_join"))
    assert queued <= 4 * len(conns), counters
    assert counters["restored"][1] - counters_before.get("restored", (0, 0))[1] > len(conns) * 256 * KB


def test_ipv6_dsl_cut_mid_download_finishes_on_lte_through_the_same_pod(lab: Lab, cluster: Cluster) -> None:
    start(lab, cluster, "vxlan", 6)
    result = dsl_cut_mid_download(lab, cluster, size=32_000_000)
    assert result.lte_after_cut >= result.remaining_at_cut > 0
