"""Initial SYNs decided by the director's kernel maps: the CPE map first, then the bucket map.

Same namespaces as test_director_netns.py (its `lab` fixture), the real director process and
echo pods. Once the director has written its maps, an initial SYN reaches its pod without the
queue (counters cpe_hit, bucket_hit; queued_initial unchanged), on the pod userspace would
have picked (`initial_pick`). With no ready pod the bucket map is empty and SYNs are queued and
dropped as before; a CPE with a live connection keeps its pod (CPE map) even where its bucket
belongs to another; a draining pod loses its buckets and its CPEs but keeps its tokens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from mcpool_proxy.cluster.hashing import BucketHash, bucket_owners, initial_pick, pool_seed
from support import requires_netns, wait_for
from test_director_netns import (  # noqa: F401 - `lab` is a fixture
    CLI,
    CPE_MAIN,
    CPE_SECOND,
    DIR,
    HERE,
    PORT,
    VIP,
    Lab,
    check_all_subflows_on_owner,
    lab,
    metrics,
    queue_packets_seen,
    run_client,
    sh,
    start_director,
    start_pods,
    wait_line,
    wait_metric,
)
from test_director_tokenmap import counters, kernel_map, token_map

pytestmark = [requires_netns, pytest.mark.netns]

BUCKETS = 4096
HASH = BucketHash(BUCKETS, pool_seed("mtf"))


def bucket_map() -> dict[int, int]:
    return {int(k): v for k, v in kernel_map("buckets").items()}


def cpe_map() -> dict[str, int]:
    return kernel_map("cpes")


def connect_fails(timeout_s: float = 1.0) -> bool:
    code = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262); s.settimeout({timeout_s}); "
            f"s.bind(('{CPE_MAIN}', 0))\ntry:\n    s.connect(('{VIP}', {PORT}))\nexcept OSError:\n    print('failed')")  # fmt: skip
    return sh(sys.executable, "-c", code, ns=CLI).strip() == "failed"


def test_initial_syns_are_decided_in_the_kernel(lab: Lab) -> None:  # noqa: F811
    director, mport = start_director(lab)
    # No pod yet: once the director has read the (empty) table, the bucket map is empty, and an
    # initial SYN is queued and dropped by userspace as before (the client retries).
    wait_for(lambda: metrics(mport).get("mcpool_director_resyncs_total", 0) >= 1, what="the first full read")
    assert bucket_map() == {}
    before = counters()
    assert connect_fails()
    after = counters()
    assert after["queued_initial"] > before["queued_initial"] and after["bucket_hit"] == before["bucket_hit"]
    assert metrics(mport).get('mcpool_director_dropped_syns_total{outcome="no_ready_pod"}', 0) >= 1

    start_pods(lab)
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_for(lambda: len(bucket_map()) == BUCKETS and len(set(bucket_map().values())) == 2, what="both pods' buckets")
    # The map is the pure function of the pod set: each mark stands for one pod, bucket by bucket.
    owners = bucket_owners(lab.pods, BUCKETS)
    pod_of_mark: dict[int, str | None] = {}
    for bucket, mark in bucket_map().items():
        assert pod_of_mark.setdefault(mark, owners[bucket]) == owners[bucket], (bucket, hex(mark))
    assert len(pod_of_mark) == 2 and all(m & 0xFFFF00FF == 0x4D430000 for m in pod_of_mark)
    owner = initial_pick(lab.pods, CPE_MAIN, "mtf")
    bucket = HASH.bucket(CPE_MAIN)
    assert bucket is not None and pod_of_mark[bucket_map()[bucket]] == owner

    before = counters()
    queued_before = queue_packets_seen(4343)
    userspace_initial = metrics(mport).get('mcpool_director_queued_packets_total{kind="initial"}', 0)
    count = 3
    results = run_client(lab, count, 256 * 1024)
    check_all_subflows_on_owner(lab, results, count)
    after = counters()
    # Not one initial SYN reached userspace: the kernel's maps decided them all.
    assert after["queued_initial"] == before["queued_initial"], (before, after)
    assert metrics(mport).get('mcpool_director_queued_packets_total{kind="initial"}', 0) == userspace_initial
    assert after["bucket_hit"] - before["bucket_hit"] >= 1, (before, after)
    kernel = after["bucket_hit"] + after["cpe_hit"] - before["bucket_hit"] - before["cpe_hit"]
    assert kernel >= count, (before, after)
    # Only joins that arrived before their token (the LAN's usual case) were queued.
    assert queue_packets_seen(4343) - queued_before == after["queued_join"] - before["queued_join"]
    # The kernel's decisions are on the director's /metrics too (read from the same counters).
    exported = metrics(mport)
    now = counters()
    for name in ("bucket_hit", "cpe_hit", "queued_initial"):
        assert exported[f'mcpool_director_kernel_packets_total{{counter="{name}"}}'] == now[name], name
    assert director.poll() is None


def test_cpe_map_keeps_a_cpe_on_its_pod_and_draining_moves_only_new_cpes(lab: Lab) -> None:  # noqa: F811
    sh("ip", "mptcp", "endpoint", "flush", ns=CLI)  # no joins until the test adds the endpoint
    director, mport = start_director(lab)
    owner = initial_pick(lab.pods, CPE_MAIN, "mtf")  # CPE_MAIN's bucket's pod once both are ready
    other_i = 1 - lab.pods.index(owner)  # type: ignore[arg-type]
    other = lab.pods[other_i]
    procs = start_pods(lab, join_wait_s=1.0, only=(other_i,))
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 1)
    wait_for(lambda: len(bucket_map()) == BUCKETS and len(set(bucket_map().values())) == 1, what="the one pod's buckets")
    [other_mark] = set(bucket_map().values())

    # A long-lived connection from CPE_MAIN lands on the only pod; the pod registers its CPE.
    client = subprocess.Popen(
        ["ip", "netns", "exec", CLI, sys.executable, str(HERE / "late_join_client.py"), "--vip", VIP,
         "--port", str(PORT), "--source", CPE_MAIN],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lab.procs.append(client)
    wait_line(client, "connected")
    wait_for(lambda: cpe_map().get(CPE_MAIN) == other_mark, what="the live CPE in the kernel CPE map")
    wait_for(lambda: len(token_map()) == 1, what="the live connection's token")

    # The CPE's bucket now belongs to the new pod, but the CPE keeps its pod (CPE map first).
    procs.update(start_pods(lab, join_wait_s=1.0, only=(1 - other_i,)))
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_for(lambda: len(set(bucket_map().values())) == 2, what="the second pod's buckets")
    bucket = HASH.bucket(CPE_MAIN)
    assert bucket is not None
    owner_mark = bucket_map()[bucket]
    assert owner_mark != other_mark
    before = counters()
    [result] = run_client(lab, 1, 64 * 1024)
    assert result["sha_ok"] is True and result["pod"] == other, result
    after = counters()
    assert after["cpe_hit"] - before["cpe_hit"] >= 1 and after["queued_initial"] == before["queued_initial"]

    # The CPE's pod starts draining: it loses its buckets and its CPEs at once, keeps its token.
    procs[other_i].send_signal(signal.SIGUSR1)
    wait_line(procs[other_i], "draining")
    wait_for(lambda: set(bucket_map().values()) == {owner_mark} and len(bucket_map()) == BUCKETS,
             what="every bucket on the ready pod")  # fmt: skip
    wait_for(lambda: CPE_MAIN not in cpe_map(), what="the draining pod's CPE to leave the CPE map")
    assert set(token_map().values()) == {other_mark}
    before = counters()
    [result] = run_client(lab, 1, 64 * 1024)
    assert result["sha_ok"] is True and result["pod"] == owner, result  # by bucket now
    after = counters()
    assert after["bucket_hit"] - before["bucket_hit"] >= 1 and after["queued_initial"] == before["queued_initial"]

    # The draining pod's live connection still gets its join (by the kernel's token map).
    sh("ip", "mptcp", "endpoint", "add", CPE_SECOND, "dev", "cpe0", "subflow", ns=CLI)
    wait_for(lambda: counters()["token_hit"] - before["token_hit"] >= 1, what="the join steered by token")
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    assert json.loads(client.stdout.readline()) == {"pod": other, "sha_ok": True}
    assert director.poll() is None
