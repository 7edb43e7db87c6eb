"""A rolling update and a scale-in behind the real director cut no connection (real processes).

The lab of test_cluster.py (`mtkc`: CPE with DSL and LTE, router, director with redis-server,
two MCP pods). 20 long echo transfers run over both pods, each with one subflow; then one pod is
sent SIGTERM, as the StatefulSet controller does to roll it (or to scale the pool in), and while
it drains the CPE gains a second link for every connection. Proven from the outside:

- the director stops hashing initial subflows to the draining pod within one pub/sub delivery
  (measured from the signal), and a new connection of a CPE that hashed there lands elsewhere;
- every join of the old pod's connections, all added after the roll started, reaches the old
  pod: in its kernel's own view (`ss`) each of its connections goes from one subflow to two;
- the old pod reports its drain as the operator reads it (`drain_progress`: connections, since);
- every transfer finishes byte-exact, and the old pod exits by itself, drained in time, as soon
  as its last connection ended (not at the drain deadline);
- roll: a new process with the same pod identity and a new configuration takes its CPEs back;
  scale-in: the pod leaves the director's table and its CPEs stay on the survivor.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
from typing import Any

import pytest
from cluster_lab import (
    Cluster,
    CpeConn,
    kernel_view,
    open_conn,
    parallel,
    wait_all_subflows,
    wait_bucket_map,
    where_is,
)
from mcpool_operator.drain import drain_progress
from mcpool_proxy.cluster.hashing import initial_pick
from mcpool_tools.lab import Lab, ProxyProcess, in_netns
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns, pytest.mark.timeout(180)]

KB = 1024
PER_POD = 10
CHUNK = 32 * KB
# Long enough that no connection could be closed at the deadline during this test: the pod
# must exit because its connections ended, well before this.
DRAIN_TIMEOUT_S = 60.0


def table_entries(lab: Lab, kind: str) -> float:
    return lab.director_metrics().get(f'mcpool_director_table_entries{{kind="{kind}"}}', -1)


def start_pod(lab: Lab, cluster: Cluster, name: str, log_level: str = "debug") -> ProxyProcess:
    i = cluster.names.index(name)
    config = lab.cluster_proxy_config(i, name, "director", vip=lab.vip)
    config.update(drain_timeout_s=DRAIN_TIMEOUT_S, log_level=log_level)
    proxy = lab.start_proxy(config, pod=i, name=name)
    cluster.proxies[name] = proxy
    return proxy


class Transfer(threading.Thread):
    """One connection echoing chunks (each checked by content) until told to finish."""

    def __init__(self, conn: CpeConn, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.stop = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.conn.echo(CHUNK)
                time.sleep(0.02)  # pacing: 20 transfers must not starve the lab's 2 cores
            self.conn.finish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def read_drain(ns: str, admin_port: int) -> dict[str, Any]:
    """What the operator would put in status.draining for this pod, read from inside its netns."""
    pod = {"metadata": {"name": "old", "deletionTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"containers": [{"ports": [{"name": "admin", "containerPort": admin_port}]}]},
           "status": {"podIP": "127.0.0.1"}}  # fmt: skip
    with in_netns(ns):
        (entry,) = asyncio.run(drain_progress([pod]))
    return entry


def add_cpe_subflow_endpoints(lab: Lab) -> None:
    # Added, not flushed and re-added: removing an endpoint closes subflows that use it.
    for link in lab.links.values():
        lab.exec(
            "cpe", ["ip", "mptcp", "endpoint", "add", link.cpe_ip, "dev", link.name, "subflow"]
        )


@pytest.mark.parametrize("event", ["rolling-update", "scale-in"])
def test_drain_behind_the_director_cuts_nothing(lab: Lab, cluster: Cluster, event: str) -> None:
    # No endpoint on the CPE: each connection starts with its initial subflow only, so every
    # join in this test happens after the roll started.
    lab.exec("cpe", ["ip", "mptcp", "endpoint", "flush"])
    # A resync far away: only the registry's pub/sub event can tell the director of the drain.
    lab.start_director(snapshot_grace_s=3.0, resync_interval_s=30.0)
    for name in cluster.names:
        start_pod(lab, cluster, name)
    wait_for(
        lambda: table_entries(lab, "ready_pods") == 2, 15, "2 ready pods in the director's table"
    )
    wait_bucket_map(lab, 2)  # initial SYNs are decided by the kernel's map, which follows the table
    old = initial_pick(cluster.names, lab.cpe_dsl_ip, "lab")
    other = initial_pick(cluster.names, lab.cpe_lte_ip, "lab")
    assert old is not None and other is not None and old != other
    old_ns = cluster.pod_ns(old)

    base = kernel_view(lab, cluster.names)
    conns = parallel(
        lambda src: open_conn(lab, src), [lab.cpe_dsl_ip, lab.cpe_lte_ip] * PER_POD, workers=10
    )
    on_old = [c for c in conns if c.source == lab.cpe_dsl_ip]
    placed = wait_for(lambda: (lambda f: f if len(f) == len(conns) else None)(where_is(cluster.proxies, conns)),
                      20, "every connection listed by a pod")  # fmt: skip
    assert {placed[(c.source, c.port)][0] for c in on_old} == {old}
    before = {t: v for t, v in kernel_view(lab, cluster.names)[old].items() if t not in base[old]}
    assert len(before) == PER_POD and all(len(v) == 1 for v in before.values()), before

    stop = threading.Event()
    transfers = [Transfer(c, stop) for c in conns]
    for t in transfers:
        t.start()
    old_proxy = cluster.proxies[old]
    decisions_before = lab.director_metrics()
    counters_before = lab.director_counters()

    # The StatefulSet controller deletes the old pod: SIGTERM.
    signalled = time.monotonic()
    old_proxy.proc.terminate()
    learned_s = None
    while learned_s is None:
        if table_entries(lab, "ready_pods") == 1:
            learned_s = time.monotonic() - signalled
        assert time.monotonic() - signalled < 5, "the director did not learn of the drain"
    # One pub/sub delivery after the pod's re-registration, measured through HTTP polls.
    assert learned_s < 0.5, learned_s
    assert table_entries(lab, "pods") == 2  # still in the table: its joins must find it

    progress = read_drain(old_ns, 9090)
    assert progress["connections"] == PER_POD, progress
    since = datetime.datetime.strptime(progress["since"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC
    )
    assert abs(since.timestamp() - time.time()) < 10, progress

    # Every connection gains its second link now, during the drain.
    add_cpe_subflow_endpoints(lab)
    both = {lab.cpe_dsl_ip, lab.cpe_lte_ip}

    def old_pod_has_two_subflows_each() -> dict[int, list[str]] | None:
        now = kernel_view(lab, cluster.names)[old]
        mine = {t: now.get(t, []) for t in before}
        return mine if all(set(v) == both and len(v) == 2 for v in mine.values()) else None

    after = wait_for(
        old_pod_has_two_subflows_each, 20, "a second subflow on every connection of the old pod"
    )
    assert set(after) == set(before)  # the same connections, in the old pod's kernel
    # The drain goes on while every connection carries more over both links.
    mark = {t: t.conn.sent for t in transfers}
    wait_for(lambda: all(t.conn.sent - mark[t] >= 16 * CHUNK or t.error for t in transfers), 30,
             "every transfer carrying on during the drain")  # fmt: skip
    # The other pod's connections gained theirs too, and nothing of the old pod's went there.
    wait_all_subflows(lab, {n: p for n, p in cluster.proxies.items() if n != old},
                      [c for c in conns if c.source == lab.cpe_lte_ip], both)  # fmt: skip
    assert not set(before) & set(kernel_view(lab, cluster.names)[other])
    metrics = lab.director_metrics()
    hits = sum(metrics.get(f'mcpool_director_decisions_total{{outcome="{o}"}}', 0)
               - decisions_before.get(f'mcpool_director_decisions_total{{outcome="{o}"}}', 0)
               for o in ("token_hit", "token_hit_after_wait"))  # fmt: skip
    # Joins whose token reached the director's kernel map first are decided by nftables alone.
    hits += lab.director_counters()["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0]
    assert hits >= 2 * PER_POD, hits

    # A new connection of the CPE address that hashed to the old pod goes to the other one.
    wait_bucket_map(lab, 1)
    moved = open_conn(lab, lab.cpe_dsl_ip)
    placed = wait_all_subflows(
        lab, {n: p for n, p in cluster.proxies.items() if n != old}, [moved], both
    )
    assert placed[(moved.source, moved.port)][0] == other
    moved.echo(64 * KB)
    moved.finish()

    # The transfers end on their own; the old pod exits as soon as its last one did.
    stop.set()
    for t in transfers:
        t.join(30)
    errors = [
        (t.conn.source, t.conn.port, repr(t.error))
        for t in transfers
        if t.error is not None or t.is_alive()
    ]
    assert not errors, errors
    assert all(t.conn.sent == t.conn.received > 0 for t in transfers)
    assert old_proxy.proc.wait(15) == 0
    drained_after_s = time.monotonic() - signalled
    assert drained_after_s < DRAIN_TIMEOUT_S / 2, drained_after_s
    summary = next(
        json.loads(line) for line in old_proxy.stderr_text().splitlines() if '"stopped"' in line
    )
    assert summary["drained_in_time"] is True and summary["closed_at_deadline"] == 0, summary
    assert summary["connections_at_signal"] == PER_POD, summary
    wait_for(
        lambda: table_entries(lab, "pods") == 1, 5, "the drained pod leaves the director's table"
    )

    if event == "rolling-update":
        # The StatefulSet controller creates the pod again: same identity, new configuration.
        new_proxy = start_pod(lab, cluster, old, log_level="info")
        assert new_proxy.config != old_proxy.config
        wait_for(
            lambda: table_entries(lab, "ready_pods") == 2,
            15,
            "the new pod ready in the director's table",
        )
        wait_bucket_map(lab, 2)
        back = open_conn(lab, lab.cpe_dsl_ip)
        placed = wait_all_subflows(lab, cluster.proxies, [back], both)
        assert placed[(back.source, back.port)][0] == old
    else:
        # Scale-in: nothing comes back; the CPE stays on the survivor.
        del cluster.proxies[old]
        assert table_entries(lab, "ready_pods") == 1
        back = open_conn(lab, lab.cpe_dsl_ip)
        placed = wait_all_subflows(lab, cluster.proxies, [back], both)
        assert placed[(back.source, back.port)][0] == other
    back.echo(128 * KB)
    back.finish()
