"""Proof against the real thing: Debian's Prometheus scrapes the lab's two proxies and its director
(every second, OpenMetrics, exemplar storage on) while the test drives MPTCP and plain TCP
clients, a refused CPE, a DSL cut and a Redis restart; then every panel query of the Pool overview
and Director dashboards is evaluated through Prometheus's HTTP API and must return data, the
latency exemplars must carry the trace ids of real spans, and the alert rules load and go pending
when Redis is down. `mcpool top` is checked against the same proxies.

Own lab prefix `mtd` (director namespace, two MCP pods). Set MCPOOL_DASHBOARD_PNG_DIR=docs/img to
also render each dashboard's panels from the query results (what docs/img/ holds).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcpool_proxy.cluster.podside import REGISTER_DELAY_ENV
from mcpool_proxy.cpe.convert_client import ConvertRefused, convert_connect
from mcpool_tools.lab import Lab, ProxyProcess, Topology
from mcpool_tools.testserver import pattern_sha256, recv_all_sha256
from promlab import (
    DASHBOARD_DIR,
    RULES_DIR,
    PanelResult,
    Prometheus,
    evaluate_dashboard,
    exemplar_trace_ids,
    target,
)
from support import requires_netns

pytestmark = [requires_netns, pytest.mark.netns]

SERVER_PORT = 8000
CONVERT_PORT = 5124
ADMIN_PORT = 9090
DIRECTOR_METRICS = 9091
PROMETHEUS_PORT = 9099
NAMESPACE = "edge"
KB = 1000
MB = 1_000_000


class Pool:
    """The lab, its director and proxies, and the Prometheus scraping them (module scope)."""

    def __init__(self, lab: Lab, prometheus: Prometheus, proxies: dict[str, ProxyProcess], started: float) -> None:
        self.lab = lab
        self.prometheus = prometheus
        self.proxies = proxies
        self.started = started


def _proxy_config(lab: Lab, pod: int, name: str) -> dict[str, Any]:
    config = lab.cluster_proxy_config(pod, name, "director", vip=lab.vip)
    config["admin"] = f"0.0.0.0:{ADMIN_PORT}"  # Prometheus scrapes the pod's address
    # IPv4 CPE addresses only: the CPE's IPv6 address is the "refused CPE" of the test.
    config["policy"]["allowed_cpes"] = [p for p in lab.cpe_prefixes if ":" not in p]
    # The refused CPE must reach the userspace check, where its refusal is answered and counted
    # by reason (the "refusals by reason" panel); with the kernel's admission filter (the
    # default) its SYNs would be dropped before TCP and only the filter's counters see them.
    config.setdefault("kernel", {})["admission_filter"] = False
    config["access_paths"] = {
        name: [p for p in lab.cpe_prefixes if p.startswith(link.cpe_ip.rsplit(".", 1)[0] + ".")
               or p.startswith(link.cpe_ip6.rsplit("::", 1)[0] + "::")]
        for name, link in lab.links.items()
    }
    return config


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("prometheus")
    with Lab(Topology(prefix="mtd", pods=2, director=True)) as lab:
        lab.start_testserver(f"[::]:{SERVER_PORT}")
        lab.start_redis()
        lab.start_director(snapshot_grace_s=3.0, metrics_listen=f"0.0.0.0:{DIRECTOR_METRICS}")
        names = lab.cluster_pod_names()
        # Tracing to the console (the proxies' stdout): every connection gets a real trace id,
        # which the latency exemplars must carry. Registration delayed so joins wait for tokens.
        env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100", REGISTER_DELAY_ENV: "30"}
        saved = {k: os.environ.get(k) for k in (*env, "POD_NAME", "POD_NAMESPACE")}
        proxies: dict[str, ProxyProcess] = {}
        try:
            os.environ.update(env, POD_NAMESPACE=NAMESPACE)
            for i, name in enumerate(names):
                os.environ["POD_NAME"] = name
                proxies[name] = lab.start_proxy(_proxy_config(lab, i, name), pod=i, name=name)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        jobs = {
            "mcpool-proxy": [target(f"{p.ip}:{ADMIN_PORT}", namespace=NAMESPACE, pod=name)
                             for p, name in zip(lab.pods, names, strict=True)],
            "mcpool-director": [target(f"{lab.dir_ip}:{DIRECTOR_METRICS}", namespace=NAMESPACE,
                                       pod="mcpool-director-node1")],
        }
        prometheus = Prometheus(workdir, jobs, port=PROMETHEUS_PORT, rule_files=sorted(RULES_DIR.glob("*.yaml")),
                                connect_context=lambda: lab.in_netns("rtr"))
        prometheus.start(lambda argv, **kw: lab.popen("rtr", argv, **kw))
        try:
            prometheus.wait_targets_up(3)
            yield Pool(lab, prometheus, proxies, time.time())
        finally:
            prometheus.stop()


# -- clients -----------------------------------------------------------------------------------------
def _connect(lab: Lab, source: str, *, mptcp: bool = True, via: str | None = None,
             echo: bool = True) -> socket.socket:
    """A Convert connection through the VIP (or `via`) to the test server, in ECHO mode unless
    `echo` is False (the caller sends its own command)."""
    with lab.in_netns("cpe"):
        sock, _, early = convert_connect((via or lab.vip, CONVERT_PORT), (lab.srv_ip, SERVER_PORT),
                                         source=source, mptcp=mptcp, timeout_s=20)
    assert early == b""
    sock.settimeout(60)
    if echo:
        sock.sendall(b"ECHO\n")
    return sock


def _echo(sock: socket.socket, nbytes: int) -> None:
    payload = os.urandom(nbytes)
    sock.sendall(payload)
    got = bytearray()
    while len(got) < nbytes:
        chunk = sock.recv(min(262_144, nbytes - len(got)))
        assert chunk, "connection closed mid-echo"
        got += chunk
    assert bytes(got) == payload


def _subflow_remotes(pool: Pool, sock: socket.socket) -> set[str]:
    port = sock.getsockname()[1]
    for proxy in pool.proxies.values():
        for entry in proxy.connections():
            if int(entry["client"].rsplit(":", 1)[1]) == port:
                return {s["remote"].rsplit(":", 1)[0].strip("[]") for s in entry["subflows"]}
    return set()


def _wait_two_subflows(pool: Pool, sock: socket.socket) -> None:
    want = {pool.lab.cpe_dsl_ip, pool.lab.cpe_lte_ip}
    pool.prometheus.wait(lambda: _subflow_remotes(pool, sock) == want, 20, "both links carry a subflow")


# -- the scenario ------------------------------------------------------------------------------------
def test_every_panel_of_pool_and_director_dashboards_has_data(pool: Pool) -> None:
    lab, prom = pool.lab, pool.prometheus

    # MPTCP customers on both links: every connection's joins wait briefly for their token.
    conns = [_connect(lab, src) for src in (lab.cpe_dsl_ip, lab.cpe_lte_ip) * 2]
    for sock in conns:
        _wait_two_subflows(pool, sock)
        _echo(sock, 256 * KB)
    # A customer without MPTCP (falls back to TCP: one path).
    with _connect(lab, lab.cpe_lte_ip, mptcp=False) as sock:
        _echo(sock, 64 * KB)
    # A refused CPE: its IPv6 address is not in policy.allowed_cpes.
    with pytest.raises(ConvertRefused):
        _connect(lab, lab.cpe_dsl_ip6, mptcp=False, via=lab.pods[0].ip6, echo=False)
    prom.wait_value('sum(mcpool_policy_refusals_total{reason="client_not_allowed"})', lambda v: v >= 1, 10,
                    "the refusal scraped")
    prom.wait_value("sum(mcpool_mptcp_fallbacks_total)", lambda v: v >= 1, 10, "the fallback scraped")

    # The DSL line loses sync mid-download: the data moves to LTE, the proxies' kernels declare
    # the DSL subflow stale (a failover); the download completes intact.
    sock = _connect(lab, lab.cpe_dsl_ip, echo=False)
    _wait_two_subflows(pool, sock)
    size, seed = 20 * MB, 7
    sock.sendall(f"SEND {size} {seed}\n".encode())
    head = bytearray()
    while len(head) < 3 * MB:
        chunk = sock.recv(262_144)
        assert chunk
        head += chunk
    lab.cut_link("dsl")
    try:
        digest, count = recv_all_sha256(sock, initial=bytes(head))
        assert count == size and digest == pattern_sha256(seed, size)
        prom.wait_value("sum(mcpool_mptcp_failovers_total)", lambda v: v >= 1, 30, "a failover counted")
    finally:
        sock.close()
        lab.restore_link("dsl")

    # Redis restarts: the director and the pods notice, the alert goes pending, all recover.
    resyncs = prom.value("sum(mcpool_director_resyncs_total)") or 0
    lab.kill_redis()
    prom.wait_value("min(mcpool_director_redis_up)", lambda v: v == 0, 20, "the director reports Redis down")
    prom.wait_value('count(ALERTS{alertname="McpoolDirectorRedisDown", alertstate="pending"})',
                    lambda v: v == 1, 20, "McpoolDirectorRedisDown pending")
    lab.start_redis()
    prom.wait_value("min(mcpool_director_redis_up)", lambda v: v == 1, 30, "the director back on Redis")
    prom.wait_value("min(mcpool_affinity_redis_up)", lambda v: v == 1, 30, "the pods back on Redis")
    prom.wait_value("sum(mcpool_director_resyncs_total)", lambda v: v > resyncs, 30, "a resync after the restart")
    # New connections after the restart are steered again (their joins find their tokens).
    after = _connect(lab, lab.cpe_lte_ip)
    _wait_two_subflows(pool, after)
    _echo(after, 128 * KB)
    for sock in [*conns, after]:
        sock.close()
    prom.wait_value("sum(mcpool_connections_active)", lambda v: v == 0, 20, "every connection closed")
    prom.wait_scrapes(3)
    end = time.time()

    # What the scenario did, as Prometheus saw it.
    paths = {r["metric"]["path"]: float(r["value"][1])
             for r in prom.query("sum by (path) (mcpool_access_path_bytes_total)")}
    # Both links carried bytes (after the cut, what the CPE had not buffered yet came over LTE).
    assert paths.get("dsl", 0) > 100 * KB and paths.get("lte", 0) > 1 * MB, paths
    outcomes = {r["metric"]["outcome"]: float(r["value"][1])
                for r in prom.query("sum by (outcome) (mcpool_director_decisions_total)")}
    assert outcomes.get("token_hit_after_wait", 0) >= 1, outcomes
    assert (prom.value("sum(mcpool_director_join_wait_seconds_count)") or 0) >= 1

    # Every panel query of both dashboards returns data.
    results: list[PanelResult] = []
    for name in ("mcpool-pool.json", "mcpool-director.json"):
        results += evaluate_dashboard(prom, DASHBOARD_DIR / name, pool.started, end)
    problems = [p for r in results for p in r.problems()]
    assert not problems, "\n".join(problems)

    # The latency histograms' exemplars carry trace ids of real spans (the console exporter's).
    spans = "\n".join("\n".join(p.stdout_lines) for p in pool.proxies.values())
    span_ids = set(re.findall(r'"trace_id": "0x([0-9a-f]{32})"', spans))
    assert span_ids, "no spans on the proxies' stdout"
    for metric in ("mcpool_handshake_duration_seconds_bucket", "mcpool_upstream_connect_duration_seconds_bucket"):
        ids = exemplar_trace_ids(prom, metric, pool.started, end)
        assert ids, f"no exemplars for {metric}"
        assert ids <= span_ids, f"{metric} exemplars without a span: {sorted(ids - span_ids)[:3]}"

    out = os.environ.get("MCPOOL_DASHBOARD_PNG_DIR")
    if out:
        from render import render_dashboards

        render_dashboards(results, Path(out))


def test_mcpool_top_shows_live_subflows_and_rates(pool: Pool) -> None:
    lab = pool.lab
    sock = _connect(lab, lab.cpe_dsl_ip)
    stop = threading.Event()
    try:
        _wait_two_subflows(pool, sock)

        def keep_busy() -> None:
            while not stop.is_set():
                _echo(sock, 64 * KB)

        busy = threading.Thread(target=keep_busy, daemon=True)
        busy.start()
        pod = next(i for i, p in enumerate(pool.proxies.values()) if p.connections())
        result = lab.exec(lab.pods[pod].ns, [sys.executable, "-m", "mcpool_proxy.cli", "top", "--once",
                                             "--interval", "0.5", "--admin", f"127.0.0.1:{ADMIN_PORT}"])
        stop.set()
        busy.join(10)
    finally:
        stop.set()
        sock.close()
    view = result.stdout
    assert view.startswith("mcpool top: 1 connections, 2 subflows, ready"), view
    assert f"{lab.cpe_dsl_ip}:" in view and f"{lab.cpe_lte_ip}:" in view, view
    subflow_lines = [line for line in view.splitlines() if line.lstrip().startswith("subflow ")]
    assert len(subflow_lines) == 2, view
    # Bytes moved during the sample: some subflow shows a non-zero rate in each direction.
    rates = re.findall(r"(up|down)\s+([0-9.]+) (bit|kbit|Mbit|Gbit)/s", "\n".join(subflow_lines))
    assert any(d == "up" and float(v) > 0 for d, v, _ in rates), view
    assert any(d == "down" and float(v) > 0 for d, v, _ in rates), view


def test_mcpool_top_reports_an_unreachable_admin_api(pool: Pool) -> None:
    result = pool.lab.exec("cpe", [sys.executable, "-m", "mcpool_proxy.cli", "top", "--once", "--interval", "0.1",
                                   "--admin", "127.0.0.1:1"], check=False)
    assert result.returncode == 1
    assert "cannot reach the admin API at 127.0.0.1:1" in result.stderr
