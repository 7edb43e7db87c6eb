"""Director-steered pods with `workers: 2`: the supervisor's affinity publishes the tokens of
every worker's connections (from the namespace-wide MPTCP events), so the director steers each
join to the pod, where the kernel attaches it to the connection of the worker that owns it.

Same lab as test_cluster.py (`mtkc`): pod names are chosen so the CPE's two addresses hash to
different pods, so only token steering can put a join on its connection's pod.
"""

from __future__ import annotations

import pytest
from cluster_lab import (
    Cluster,
    kernel_view,
    open_conn,
    parallel,
    wait_all_subflows,
    wait_bucket_map,
)
from mcpool_proxy.cluster.hashing import initial_pick
from mcpool_tools.lab import Lab
from support import requires_netns, wait_for
from test_cluster import KB, decisions

pytestmark = [requires_netns, pytest.mark.netns, pytest.mark.timeout(240)]


def test_two_workers_per_pod_behind_the_director(lab: Lab, cluster: Cluster) -> None:
    lab.start_director(snapshot_grace_s=3.0)
    for i, name in enumerate(cluster.names):
        config = lab.cluster_proxy_config(i, name, "director", vip=lab.vip)
        config["workers"] = 2
        cluster.proxies[name] = lab.start_proxy(config, pod=i, name=name, ready_timeout_s=60)
    wait_for(lambda: lab.director_metrics().get('mcpool_director_table_entries{kind="ready_pods"}') == 2, 15,
             "2 ready pods in the director's table")
    wait_bucket_map(lab, 2)  # initial SYNs are decided by the kernel's bucket map from then on
    for name, proxy in cluster.proxies.items():
        # The supervisor set up the tunnel's receive side (affinity.vip) for its workers.
        assert "mcpool_affinity_pod_receive_ready 1.0" in proxy.admin_get("/metrics"), name
    before = decisions(lab)
    counters_before = lab.director_counters()
    base = kernel_view(lab, cluster.names)

    conns = parallel(lambda src: open_conn(lab, src), [lab.cpe_dsl_ip, lab.cpe_lte_ip] * 10, workers=10)
    want = {lab.cpe_dsl_ip, lab.cpe_lte_ip}
    found = wait_all_subflows(lab, cluster.proxies, conns, want)
    kernel = kernel_view(lab, cluster.names)
    workers_seen: set[tuple[str, int]] = set()
    for c in conns:
        pod, entry = found[(c.source, c.port)]
        assert pod == initial_pick(cluster.names, c.source, "lab"), (c.source, pod)
        workers_seen.add((pod, entry["worker"]))
        token = int(entry["token"], 16)
        assert token not in base[pod]
        # Both subflows on that pod's one connection: the worker's, which /connections lists.
        assert sorted(kernel[pod].get(token, [])) == sorted(want), (pod, entry, kernel[pod].get(token))
    assert {worker for _, worker in workers_seen} == {0, 1}, workers_seen

    after = decisions(lab)
    kernel_hits = lab.director_counters()["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0]
    steered = sum(after.get(o, 0) - before.get(o, 0) for o in ("token_hit", "token_hit_after_wait"))
    assert steered + kernel_hits >= len(conns), (after, kernel_hits)
    assert sum(after.get(o, 0) - before.get(o, 0) for o in ("token_miss_after_wait", "collision")) == 0, after

    parallel(lambda c: c.echo(128 * KB), conns)
    parallel(lambda c: c.finish(), conns)
