"""Cluster affinity end to end: real `mcpool proxy` pods behind the real director, real Redis.

Topology (`Lab(Topology(prefix="mtkc", pods=2, director=True))`): the CPE (DSL + LTE) reaches the
VIP through the router, which routes the VIP to `mtkc-dir` (director, redis-server); the director
sends each SYN's subflow by VXLAN to a pod, and the pod answers the CPE directly (DSR). Pod names
are chosen so the CPE's two addresses hash to different pods: only token steering (or the join
address) can put a join on its connection's pod. Every transfer is checked by content.
"""

from __future__ import annotations

import time

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
from e2e import host_of
from mcpool_proxy.cluster.hashing import initial_pick
from mcpool_tools.lab import Lab
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns, pytest.mark.timeout(240)]

KB = 1024


def decisions(lab: Lab) -> dict[str, float]:
    prefix = 'mcpool_director_decisions_total{outcome="'
    return {k[len(prefix):-2]: v for k, v in lab.director_metrics().items() if k.startswith(prefix)}


def delta(after: dict[str, float], before: dict[str, float], *outcomes: str) -> float:
    return sum(after.get(o, 0) - before.get(o, 0) for o in outcomes)


def table_entries(lab: Lab, kind: str) -> float:
    return lab.director_metrics().get(f'mcpool_director_table_entries{{kind="{kind}"}}', -1)


def wait_ready_pods(lab: Lab, n: int, timeout_s: float = 15.0) -> None:
    """Until the director's table has `n` ready pods and its kernel bucket map says so too (the
    map follows the table within milliseconds; a SYN in between goes by the previous map)."""
    wait_for(lambda: table_entries(lab, "ready_pods") == n, timeout_s, f"{n} ready pods in the director's table")
    wait_bucket_map(lab, n, timeout_s=timeout_s)


def open_many(lab: Lab, sources: list[str]) -> list[CpeConn]:
    return parallel(lambda src: open_conn(lab, src), sources, workers=10)


def new_in_kernel(lab: Lab, cluster: Cluster, baseline: dict[str, dict[int, list[str]]]) -> dict[str, dict[int, list[str]]]:
    """The pods' kernel view minus connections that were there at `baseline`."""
    now = kernel_view(lab, cluster.names)
    return {pod: {t: v for t, v in per.items() if t not in baseline.get(pod, {})} for pod, per in now.items()}


def check_on_one_pod(lab: Lab, cluster: Cluster, conns: list[CpeConn], want: set[str],
                     baseline: dict[str, dict[int, list[str]]]) -> dict[str, list[CpeConn]]:
    """Every connection's subflows (from `want` CPE addresses) on the pod its first subflow
    hashed to, in the pods' /connections and in the kernels' own view; returns pod -> conns."""
    found = wait_all_subflows(lab, cluster.proxies, conns, want)
    kernel = new_in_kernel(lab, cluster, baseline)
    by_pod: dict[str, list[CpeConn]] = {name: [] for name in cluster.names}
    for c in conns:
        pod, entry = found[(c.source, c.port)]
        assert pod == initial_pick(cluster.names, c.source, "lab"), (c.source, pod)
        by_pod[pod].append(c)
        token = int(entry["token"], 16)
        assert set(kernel[pod].get(token, [])) == want, (pod, entry, kernel[pod].get(token))
    # No subflow of these connections anywhere else: the kernels gained exactly what the pods list.
    listed = sum(len(found[(c.source, c.port)][1]["subflows"]) for c in conns)
    assert sum(len(v) for per_pod in kernel.values() for v in per_pod.values()) == listed
    return by_pod


def test_50_connections_all_subflows_on_one_pod_then_dsl_cut(lab: Lab, cluster: Cluster) -> None:
    cluster.start()
    wait_ready_pods(lab, 2)
    # Nothing but the proxies (affinity.vip) made the pods able to receive the tunnel.
    for name, proxy in cluster.proxies.items():
        assert "mcpool_affinity_pod_receive_ready 1.0" in proxy.admin_get("/metrics"), name
    before = decisions(lab)
    counters_before = lab.director_counters()

    sources = [lab.cpe_dsl_ip, lab.cpe_lte_ip] * 25
    base = kernel_view(lab, cluster.names)
    conns = open_many(lab, sources)
    by_pod = check_on_one_pod(lab, cluster, conns, {lab.cpe_dsl_ip, lab.cpe_lte_ip}, base)
    assert all(len(v) == 25 for v in by_pod.values()), {k: len(v) for k, v in by_pod.items()}

    after = decisions(lab)
    # A join is decided in userspace (held for its token, or found) or, when its token reached
    # the director's kernel map first, by nftables alone (counter token_hit).
    counters = lab.director_counters()
    kernel_hits = counters["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0]
    assert delta(after, before, "token_hit", "token_hit_after_wait") + kernel_hits >= 50, (after, kernel_hits)
    assert delta(after, before, "token_miss_after_wait", "collision") == 0, after

    parallel(lambda c: c.echo(256 * KB), conns)
    lab.cut_link("dsl")
    # Every connection finishes over LTE, whether it started on DSL or on LTE.
    parallel(lambda c: c.echo(256 * KB), conns)
    parallel(lambda c: c.finish(), conns)

    # Only SYNs went through userspace; everything else followed the kernel's flow map.
    counters = lab.director_counters()
    queued = sum(counters[n][0] - counters_before.get(n, (0, 0))[0] for n in ("queued_initial", "queued_join"))
    assert queued <= 4 * len(conns), counters
    assert counters["restored"][1] - counters_before.get("restored", (0, 0))[1] > len(conns) * 512 * KB


def test_join_address_with_a_director_that_only_hashes(lab: Lab, cluster: Cluster) -> None:
    # CPE requirement of the C flag mechanism (docs/affinity.md): fullmesh endpoints, so the
    # client joins the announced pod address from each of its links.
    lab.set_cpe_endpoints(["subflow", "fullmesh"])
    cluster.start(mechanism="join-address")
    wait_ready_pods(lab, 2)
    counters_before = lab.director_counters()
    before = decisions(lab)

    base = kernel_view(lab, cluster.names)
    conns = open_many(lab, [lab.cpe_dsl_ip, lab.cpe_lte_ip] * 5)
    by_pod = check_on_one_pod(lab, cluster, conns, {lab.cpe_dsl_ip, lab.cpe_lte_ip}, base)
    assert all(by_pod.values())
    # Every extra subflow went to the pod's own announced address, never to the VIP, so the
    # director saw no join at all and decided only initial SYNs (by hashing).
    found = where_is(cluster.proxies, conns)
    for name, pod in zip(cluster.names, lab.pods, strict=True):
        for c in by_pod[name]:
            subflows = found[(c.source, c.port)][1]["subflows"]
            locals_ = sorted(host_of(s["local"]) for s in subflows)
            assert locals_.count(lab.vip) == 1 and locals_.count(pod.ip) == len(subflows) - 1, subflows
    counters = lab.director_counters()
    assert counters["queued_join"][0] - counters_before.get("queued_join", (0, 0))[0] == 0
    assert counters["token_hit"][0] - counters_before.get("token_hit", (0, 0))[0] == 0  # nor the kernel map
    after = decisions(lab)
    assert delta(after, before, "token_hit", "token_hit_after_wait", "token_miss_after_wait") == 0

    parallel(lambda c: c.echo(128 * KB), conns)
    lab.cut_link("dsl")
    parallel(lambda c: c.echo(128 * KB), conns)
    parallel(lambda c: c.finish(), conns)


def test_redis_killed_then_back(lab: Lab, cluster: Cluster) -> None:
    cluster.start()
    wait_ready_pods(lab, 2)
    both = {lab.cpe_dsl_ip, lab.cpe_lte_ip}
    base = kernel_view(lab, cluster.names)
    live = open_many(lab, [lab.cpe_dsl_ip, lab.cpe_lte_ip] * 2)
    check_on_one_pod(lab, cluster, live, both, base)

    lab.kill_redis()
    wait_for(lambda: lab.director_metrics().get("mcpool_director_redis_up") == 0, 10, "director sees Redis down")
    # Live connections keep flowing, both subflows in place.
    parallel(lambda c: c.echo(256 * KB), live)
    check_on_one_pod(lab, cluster, live, both, base)
    # New connections still succeed (hashed from the last table); their joins cannot be learned
    # while the pods cannot publish, so they may stay on one subflow (docs/affinity.md).
    fresh = [open_conn(lab, lab.cpe_dsl_ip), open_conn(lab, lab.cpe_lte_ip)]
    for c in fresh:
        c.echo(128 * KB)
    found = where_is(cluster.proxies, fresh)
    for c in fresh:
        assert found[(c.source, c.port)][0] == initial_pick(cluster.names, c.source, "lab")
    assert all(p.proc.poll() is None for p in cluster.proxies.values())
    assert lab.director is not None and lab.director.poll() is None

    lab.start_redis()
    # The pods re-register by themselves (no restart): pods, tokens, CPEs are back in Redis.
    live_tokens = {e["token"] for p in cluster.proxies.values() for e in p.connections()}

    def rebuilt() -> bool:
        keys = lab.redis_cli("--scan", "--pattern", "mcpool:{lab}:token:*").split()
        return {k.rsplit(":", 1)[1] for k in keys} == live_tokens and table_entries(lab, "ready_pods") == 2

    wait_for(rebuilt, 15, "the affinity table rebuilt from the pods' re-registration")
    wait_for(lambda: lab.director_metrics().get("mcpool_director_redis_up") == 1, 10, "director back on Redis")
    base_late = kernel_view(lab, cluster.names)
    late = [open_conn(lab, lab.cpe_dsl_ip), open_conn(lab, lab.cpe_lte_ip)]
    check_on_one_pod(lab, cluster, late, both, base_late)
    for c in live + fresh + late:
        c.echo(64 * KB)
        c.finish()


def test_pod_killed_new_connections_go_to_the_others(lab: Lab, cluster: Cluster) -> None:
    cluster.start()
    wait_ready_pods(lab, 2)
    both = {lab.cpe_dsl_ip, lab.cpe_lte_ip}
    victim = initial_pick(cluster.names, lab.cpe_dsl_ip, "lab")
    survivor = initial_pick(cluster.names, lab.cpe_lte_ip, "lab")
    assert victim is not None and survivor is not None and victim != survivor
    base = kernel_view(lab, cluster.names)
    survivors_conns = open_many(lab, [lab.cpe_lte_ip] * 3)
    check_on_one_pod(lab, cluster, survivors_conns, both, base)

    killed_at = time.monotonic()
    cluster.proxies[victim].proc.kill()
    ttl = lab.affinity_config(0, victim)["heartbeat_ttl_s"]
    resync = lab.director_config()["resync_interval_s"]
    wait_for(lambda: table_entries(lab, "pods") == 1, ttl + resync + 2, "the dead pod leaves the table")
    left_after = time.monotonic() - killed_at
    assert left_after <= ttl + resync + 1, left_after
    wait_bucket_map(lab, 1)  # and the kernel's bucket map, a moment later

    # A CPE whose pod died is hashed to a live pod, with both subflows there.
    moved = open_conn(lab, lab.cpe_dsl_ip)
    del cluster.proxies[victim]
    found = wait_all_subflows(lab, cluster.proxies, [moved], both)
    assert found[(moved.source, moved.port)][0] == survivor
    # The survivor's live connections were untouched.
    for c in survivors_conns:
        c.echo(256 * KB)
    wait_all_subflows(lab, cluster.proxies, survivors_conns, both)
    for c in [*survivors_conns, moved]:
        c.echo(64 * KB)
        c.finish()


def test_join_before_registration_is_held_until_the_token_arrives(lab: Lab, cluster: Cluster) -> None:
    # Test hook: each pod publishes tokens 150 ms late; the director holds the join (up to 1 s)
    # and releases it to the owner as soon as the token arrives.
    cluster.start(register_delay_ms=150, director={"join_wait_ms": 1000})
    wait_ready_pods(lab, 2)
    before = decisions(lab)
    base = kernel_view(lab, cluster.names)
    conns = [open_conn(lab, lab.cpe_dsl_ip), open_conn(lab, lab.cpe_lte_ip)]
    check_on_one_pod(lab, cluster, conns, {lab.cpe_dsl_ip, lab.cpe_lte_ip}, base)
    after = decisions(lab)
    assert delta(after, before, "token_hit_after_wait") >= 2, after
    assert delta(after, before, "token_miss_after_wait") == 0, after
    for c in conns:
        c.echo(128 * KB)
        c.finish()


def test_forced_token_collision_keeps_the_first_owner(lab: Lab, cluster: Cluster) -> None:
    # Test hook: the pods register tokens 500 ms late; meanwhile the test claims the new
    # connection's token for the other pod, as a colliding connection there would have. The
    # documented outcome: the first owner keeps the token, the late pod counts a collision, the
    # director steers the join to the first owner (whose kernel resets it), and the connection
    # carries on, byte-exact, on its first subflow.
    cluster.start(register_delay_ms=500, director={"join_wait_ms": 2000, "resync_interval_s": 60})
    wait_ready_pods(lab, 2)
    before = decisions(lab)
    owner = initial_pick(cluster.names, lab.cpe_dsl_ip, "lab")
    other = next(n for n in cluster.names if n != owner)
    base = kernel_view(lab, cluster.names)
    conn = open_conn(lab, lab.cpe_dsl_ip)
    entry = wait_for(lambda: where_is(cluster.proxies, [conn]).get((conn.source, conn.port)), 5, "the connection")
    assert entry[0] == owner
    token = entry[1]["token"]
    lab.redis_cli("set", f"mcpool:{{lab}}:token:{token}", other, "px", "60000")

    def collided() -> bool:
        text = cluster.proxies[owner].admin_get("/metrics")
        return "mcpool_affinity_token_collisions_total 1.0" in text

    wait_for(collided, 10, "the owner pod counts the collision")
    wait_for(lambda: delta(decisions(lab), before, "collision") >= 1, 5, "the director's collision decision")
    assert lab.redis_cli("get", f"mcpool:{{lab}}:token:{token}").strip() == other
    conn.echo(256 * KB)
    listed = where_is(cluster.proxies, [conn])[(conn.source, conn.port)]
    assert [host_of(s["remote"]) for s in listed[1]["subflows"]] == [lab.cpe_dsl_ip]
    assert not new_in_kernel(lab, cluster, base)[other], "the first owner must hold no subflow of it"
    conn.finish()
