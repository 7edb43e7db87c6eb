"""Failover behind the director (issue 13, point 4): a CPE with two links, its download started
on DSL and joined on LTE, both subflows steered to one pod; DSL is cut mid-transfer and the rest
arrives over LTE through the same pod, every byte verified (real kernel, real redis-server, the
real director and real `mcpool proxy` pods; the lab of conftest.py)."""

from __future__ import annotations

import pytest
from cluster_lab import Cluster
from failover import dsl_cut_mid_download
from mcpool_tools.lab import Lab
from support import requires_netns
from test_cluster import decisions, delta, wait_ready_pods

pytestmark = [requires_netns, pytest.mark.netns, pytest.mark.timeout(120)]


def test_dsl_cut_mid_download_finishes_on_lte_through_the_same_pod(lab: Lab, cluster: Cluster) -> None:
    cluster.start()
    wait_ready_pods(lab, 2)
    before = decisions(lab)
    counters_before = lab.director_counters()
    result = dsl_cut_mid_download(lab, cluster)
    after = decisions(lab)
    # The initial subflow was hashed, the join steered by its token (never by luck: LTE alone
    # hashes to the other pod); each in userspace or by nftables alone (the initial SYN by the
    # bucket or CPE map, the join when its token reached the kernel map first).
    counters = lab.director_counters()
    kernel_initial = sum(counters[n][0] - counters_before.get(n, (0, 0))[0] for n in ("bucket_hit", "cpe_hit"))
    assert delta(after, before, "hashed", "cpe_hit") + kernel_initial >= 1, (after, counters)
    kernel_hits = counters["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0]
    assert delta(after, before, "token_hit", "token_hit_after_wait") + kernel_hits >= 1, (after, kernel_hits)
    assert delta(after, before, "token_miss_after_wait", "collision") == 0, after
    # Only SYNs reached userspace; the bytes from the CPE (its ACKs) were steered in the kernel.
    queued = sum(counters[n][0] - counters_before.get(n, (0, 0))[0] for n in ("queued_initial", "queued_join"))
    assert queued <= 6, counters
    assert counters["restored"][0] - counters_before.get("restored", (0, 0))[0] > 100, counters
    assert result.lte_after_cut >= result.remaining_at_cut > 0
