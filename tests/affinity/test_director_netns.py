"""The director in real network namespaces, against the real kernel and a real redis-server.

Topology (all `mtk-*`, removed at teardown):

    mtk-cli (198.18.1.2 + 198.18.1.3, MPTCP subflow endpoint on .3)
       |  198.18.1.0/24
    mtk-dir (director: VIP 198.19.255.1 is routed here; redis-server; NFQUEUE; VXLAN per pod)
       |  198.18.10.0/24 (MTU 1600)    198.18.11.0/24 (MTU 1600)
    mtk-pod0                         mtk-pod1      (VIP on lo, VXLAN receive, echo server)

The pods' replies are routed back through mtk-dir as plain IP forwarding; nothing in the
director depends on seeing them (flow map, notrack). Each test shows initial SYNs hashed by the
CPE address and MP_JOIN SYNs steered by token, both subflows on one pod, byte-exact transfers,
and that only SYNs reached userspace.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import RedisServer, free_port
from mcpool_proxy.cluster.hashing import initial_pick
from support import requires_netns

pytestmark = [requires_netns, pytest.mark.netns]

HERE = Path(__file__).parent
VIP = "198.19.255.1"
PORT = 5124
CPE_MAIN, CPE_SECOND = "198.18.1.2", "198.18.1.3"
CLI, DIR = "mtk-cli", "mtk-dir"


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {proc.stderr.strip()}")
    return proc.stdout


def pod_names() -> tuple[str, str]:
    """Two pod names for which the CPE's two addresses hash to different pods, so a join that
    reached its pod by hashing could not pass for one steered by token."""
    for i in range(100):
        names = (f"pod-{i}a", f"pod-{i}b")
        if initial_pick(names, CPE_MAIN, "mtf") != initial_pick(names, CPE_SECOND, "mtf"):
            return names
    raise AssertionError("no pod names split the two CPE addresses")


@dataclass
class Lab:
    tmp: Path
    redis: RedisServer
    pods: tuple[str, str]
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns_add(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)  # a stale one from a crashed run of ours
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        for key, value in (("net.mptcp.checksum_enabled", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                           ("net.ipv4.conf.default.rp_filter", "0")):  # fmt: skip
            sh("sysctl", "-qw", f"{key}={value}", ns=name)

    def link(self, a: str, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str, mtu: int = 1500) -> None:
        sh("ip", "link", "add", a_if, "netns", a, "mtu", str(mtu), "type", "veth", "peer", b_if, "netns", b, "mtu", str(mtu))
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            sh("ip", "addr", "add", addr, "dev", ifname, ns=ns)
            sh("ip", "link", "set", ifname, "up", ns=ns)

    def spawn(self, ns: str, *cmd: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.kill()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


def wait_line(proc: subprocess.Popen[str], expected: str, timeout_s: float = 15) -> None:
    """Block until the process prints `expected` (its own readiness signal)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process exited before {expected!r}: {err[-3000:]}")
        if line.strip() == expected:
            return
    raise AssertionError(f"no {expected!r} within {timeout_s}s")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    pods = pod_names()
    redis = RedisServer(tmp_path, free_port(), netns=DIR, bind="0.0.0.0")
    lab = Lab(tmp_path, redis, pods)
    try:
        for ns in (CLI, DIR, "mtk-pod0", "mtk-pod1"):
            lab.ns_add(ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=DIR)
        lab.link(CLI, "cpe0", f"{CPE_MAIN}/24", DIR, "dcli", "198.18.1.1/24")
        sh("ip", "addr", "add", f"{CPE_SECOND}/24", "dev", "cpe0", ns=CLI)
        sh("ip", "route", "add", "default", "via", "198.18.1.1", ns=CLI)
        # The CPE opens its second subflow from .3: the MP_JOIN whose token the director reads.
        sh("ip", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2", ns=CLI)
        sh("ip", "mptcp", "endpoint", "add", CPE_SECOND, "dev", "cpe0", "subflow", ns=CLI)
        for i in range(2):
            pod = f"mtk-pod{i}"
            lab.link(DIR, f"dp{i}", f"198.18.{10 + i}.1/24", pod, "eth0", f"198.18.{10 + i}.2/24", mtu=1600)
            sh("ip", "route", "add", "default", "via", f"198.18.{10 + i}.1", ns=pod)
            sh("ip", "mptcp", "limits", "set", "subflows", "4", ns=pod)
        redis.start()
        yield lab
    finally:
        lab.close()


def start_director(lab: Lab, join_wait_ms: int = 200, **overrides: object) -> tuple[subprocess.Popen[str], int]:
    metrics_port = free_port()
    config = {
        "vip": VIP, "ports": [PORT], "redis_url": f"redis://127.0.0.1:{lab.redis.port}/0",
        "pool": "mtf", "queue_num": 4343, "join_wait_ms": join_wait_ms, "forward": "vxlan",
        "tunnel_mtu": 1500, "metrics_listen": f"127.0.0.1:{metrics_port}", "resync_interval_s": 1.0,
        "log_level": "debug", **overrides,
    }  # fmt: skip
    path = lab.tmp / "director.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = lab.spawn(DIR, sys.executable, "-m", "mcpool_proxy.cli", "director", "--config", str(path), "--cleanup")
    wait_line(proc, "director ready")
    return proc, metrics_port


def start_pods(lab: Lab, register_delay_ms: int = 0, join_wait_s: float = 5.0,
               only: tuple[int, ...] = (0, 1)) -> dict[int, subprocess.Popen[str]]:
    procs = {}
    for i, name in enumerate(lab.pods):
        if i not in only:
            continue
        proc = lab.spawn(
            f"mtk-pod{i}", sys.executable, str(HERE / "echo_pod.py"), "--name", name,
            "--advertise", f"198.18.{10 + i}.2", "--vip", VIP, "--port", str(PORT),
            "--redis", f"redis://198.18.{10 + i}.1:{lab.redis.port}/0", "--pool", "mtf",
            "--record", str(lab.tmp / f"{name}.jsonl"), "--register-delay-ms", str(register_delay_ms),
            "--join-wait-s", str(join_wait_s),
        )  # fmt: skip
        wait_line(proc, "ready")
        procs[i] = proc
    return procs


def metrics(metrics_port: int) -> dict[str, float]:
    text = sh("curl", "-sf", f"http://127.0.0.1:{metrics_port}/metrics", ns=DIR)
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_metric(metrics_port: int, name: str, value: float, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics(metrics_port).get(name) == value:
            return
        time.sleep(0.05)  # polling the director's own state: no event reaches the test
    raise AssertionError(f"{name} never became {value}: {metrics(metrics_port)}")


def wait_buckets(pods: int, timeout_s: float = 10) -> None:
    """Until the director's kernel bucket map gives every bucket to one of `pods` pods: it follows
    the table within milliseconds, and an initial SYN in between goes by the previous map."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = json.loads(sh("nft", "-j", "list", "map", "inet", "mcpool_director", "buckets", ns=DIR))
        marks = [mark for item in out["nftables"] for _, mark in item.get("map", {}).get("elem", [])]
        if len(set(marks)) == pods and len(marks) == (4096 if pods else 0):
            return
        time.sleep(0.02)  # the kernel map signals nothing
    raise AssertionError(f"the bucket map never covered {pods} pods")


def queue_packets_seen(queue_num: int) -> int:
    """Packets the kernel ever queued to userspace on this queue (id_sequence)."""
    for line in sh("cat", "/proc/net/netfilter/nfnetlink_queue", ns=DIR).splitlines():
        fields = line.split()
        if fields and int(fields[0]) == queue_num:
            return int(fields[7])
    return 0


def run_client(lab: Lab, count: int, nbytes: int) -> list[dict[str, object]]:
    out = sh(sys.executable, str(HERE / "mptcp_client.py"), "--vip", VIP, "--port", str(PORT),
             "--source", CPE_MAIN, "--count", str(count), "--bytes", str(nbytes), ns=CLI)  # fmt: skip
    return [json.loads(line) for line in out.splitlines()]


def records(lab: Lab) -> list[dict[str, object]]:
    out = []
    for name in lab.pods:
        path = lab.tmp / f"{name}.jsonl"
        if path.exists():
            out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def check_all_subflows_on_owner(lab: Lab, results: list[dict[str, object]], count: int) -> None:
    owner = initial_pick(lab.pods, CPE_MAIN, "mtf")
    assert len(results) == count
    for r in results:
        assert r["sha_ok"] is True, r
        assert r["pod"] == owner, r  # initial subflow: hashed by the CPE's address
    # The pods' kernel view: each connection had its extra subflow on the pod that served it,
    # and the other pod (where hashing .3 would have sent the join) saw nothing.
    recs = records(lab)
    assert len(recs) == count
    assert all(rec["pod"] == owner and rec["subflows"] == 1 for rec in recs), recs


def test_initial_hashed_and_join_steered_by_token(lab: Lab) -> None:
    director, mport = start_director(lab)
    start_pods(lab)
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_buckets(2)
    wait_metric(mport, 'mcpool_director_table_entries{kind="pods"}', 2)

    count, nbytes = 4, 1 << 20
    results = run_client(lab, count, nbytes)
    check_all_subflows_on_owner(lab, results, count)

    m = metrics(mport)
    initial = m.get('mcpool_director_decisions_total{outcome="hashed"}', 0) + m.get(
        'mcpool_director_decisions_total{outcome="cpe_hit"}', 0
    )
    joins = m.get('mcpool_director_decisions_total{outcome="token_hit"}', 0) + m.get(
        'mcpool_director_decisions_total{outcome="token_hit_after_wait"}', 0
    )
    assert m.get('mcpool_director_decisions_total{outcome="token_miss_after_wait"}', 0) == 0

    # Bulk bytes never reached userspace: the queue saw only the SYNs, while the kernel's flow
    # map steered every other packet (2 x 1 MiB each way per connection).
    out = sh("nft", "list", "counters", "table", "inet", "mcpool_director", ns=DIR)
    counters = {
        name: (int(p), int(b))
        for name, p, b in re.findall(r"counter (\w+) \{\s*packets (\d+) bytes (\d+)", out)
    }
    # A join usually arrives before its token is registered (userspace holds it); one that comes
    # after is decided by the kernel's token map and never queued. Initial SYNs are decided by
    # the kernel's CPE and bucket maps once the director wrote them, by userspace before.
    kernel_initial = counters["bucket_hit"][0] + counters["cpe_hit"][0]
    assert initial + kernel_initial >= count and joins + counters["token_hit"][0] >= count, (m, counters)
    queued = counters["queued_initial"][0] + counters["queued_join"][0]
    assert queue_packets_seen(4343) == queued
    assert queued == initial + joins  # every queued SYN got exactly one decision
    assert queued <= 4 * count  # SYNs (and the odd retransmission), nothing else
    assert counters["restored"][1] > count * nbytes  # the data went through the kernel path
    assert counters["unknown_flow"][0] == 0
    assert director.poll() is None


def test_join_before_registration_waits_for_the_token(lab: Lab) -> None:
    # The pods publish each token 150 ms late: the join reaches the director first, is held,
    # and is released to the owner as soon as the token is published.
    director, mport = start_director(lab, join_wait_ms=1000)
    start_pods(lab, register_delay_ms=150)
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_buckets(2)
    results = run_client(lab, 2, 64 * 1024)
    check_all_subflows_on_owner(lab, results, 2)
    m = metrics(mport)
    assert m.get('mcpool_director_decisions_total{outcome="token_hit_after_wait"}', 0) >= 2, m
    assert m.get('mcpool_director_decisions_total{outcome="token_miss_after_wait"}', 0) == 0


def test_redis_down_keeps_the_last_table(lab: Lab) -> None:
    director, mport = start_director(lab)
    start_pods(lab, join_wait_s=1.5)
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_buckets(2)
    lab.redis.kill()
    wait_metric(mport, "mcpool_director_redis_up", 0)
    # New connections still hash to a pod; their joins cannot be learned (the pods cannot
    # publish) and are dropped after the wait, so each connection stays on its first subflow.
    results = run_client(lab, 1, 64 * 1024)
    assert results[0]["sha_ok"] is True and results[0]["pod"] == initial_pick(lab.pods, CPE_MAIN, "mtf")
    assert records(lab)[-1]["subflows"] == 0
    assert director.poll() is None
    lab.redis.start()
    wait_metric(mport, "mcpool_director_redis_up", 1)
    # The pods re-register by themselves (heartbeat) and the table is whole again.
    wait_metric(mport, 'mcpool_director_table_entries{kind="ready_pods"}', 2)
    wait_buckets(2)
    results = run_client(lab, 1, 64 * 1024)
    assert results[0]["sha_ok"] is True
    last = records(lab)[-1]
    assert last["subflows"] == 1 and last["pod"] == initial_pick(lab.pods, CPE_MAIN, "mtf")
