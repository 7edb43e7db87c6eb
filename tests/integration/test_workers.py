"""`workers: 2` on the real kernel: two worker processes on one SO_REUSEPORT MPTCP listener group.

Every connection's second subflow (the CPE's LTE link, an MP_JOIN the kernel matches by token)
must join the MPTCP connection of the worker that accepted the first one; the kernel must spread
new connections over both workers; the supervisor's admin port shows the pod (every worker's
connections, the summed counters); a worker that dies makes the pod unready until it is back;
and nothing is left behind at exit.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from e2e import (
    CONVERT_PORT,
    SERVER_PORT,
    cpe_convert,
    download,
    host_of,
    kernel_subflows,
    proxy_config,
    wait_for,
    wait_two_subflows,
)
from mcpool_proxy.kernel.mptcp import get_mptcp_info
from mcpool_tools.lab import Lab, ProxyProcess
from support import requires_netns

pytestmark = [requires_netns, pytest.mark.netns]

CONNECTIONS = 20


@pytest.fixture(scope="module")
def pod(lab: Lab) -> Iterator[ProxyProcess]:
    handle = lab.start_proxy(proxy_config(lab, workers=2, log_level="info"), name="workers", ready_timeout_s=60)
    yield handle
    handle.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _pids_of(ppid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid:
                children.add(int(entry))
    return children


def test_joins_reach_the_owning_worker(lab: Lab, pod: ProxyProcess) -> None:
    socks: list[tuple[socket.socket, bytes]] = []
    try:
        for _ in range(CONNECTIONS):
            sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT))
            socks.append((sock, early))
        entries = [wait_two_subflows(lab, pod, sock) for sock, _ in socks]
        # Byte-exact through both subflows, all at once (each worker relays its own).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(download, sock, 2_000_000, 40 + i, early)
                           for i, (sock, early) in enumerate(socks)]:
                future.result()

        by_worker: dict[int, int] = {}
        tokens = set()
        for entry in entries:
            by_worker[entry["worker"]] = by_worker.get(entry["worker"], 0) + 1
            tokens.add(int(entry["token"], 16))
            # Both CPE links on the one connection of the worker that owns it.
            assert sorted(host_of(s["remote"]) for s in entry["subflows"]) == sorted([lab.cpe_dsl_ip, lab.cpe_lte_ip])
        assert len(tokens) == CONNECTIONS
        # SO_REUSEPORT spread the connections: both workers accepted some.
        assert set(by_worker) == {0, 1} and all(by_worker.values()), by_worker

        # The kernel's view: each token has exactly two subflows, one per CPE link; and each
        # client saw its join accepted (MPTCP_INFO: one additional subflow).
        per_token: dict[int, list[str]] = {}
        for sf in kernel_subflows(lab, "mcp", CONVERT_PORT):
            per_token.setdefault(sf.token, []).append(host_of(sf.remote))
        for token in tokens:
            assert sorted(per_token.get(token, [])) == sorted([lab.cpe_dsl_ip, lab.cpe_lte_ip]), hex(token)
        for sock, _ in socks:
            info = get_mptcp_info(sock)
            assert info is not None and info.subflows == 1

        # The pod's totals on the supervisor's /metrics: both workers' connections.
        metrics = pod.admin_get("/metrics")
        assert _metric(metrics, "mcpool_connections_active") == CONNECTIONS
        assert _metric(metrics, "mcpool_workers_ready") == 2
        assert pod.admin_get("/readyz")["connections"] == CONNECTIONS
    finally:
        for sock, _ in socks:
            sock.close()


def test_a_dead_worker_is_restarted_and_the_pod_unready_meanwhile(lab: Lab, pod: ProxyProcess) -> None:
    body = pod.admin_get("/readyz")
    victim = body["workers"][1]["pid"]
    os.kill(victim, 9)
    status, _ = wait_for(lambda: (s := pod.admin_request("GET", "/readyz"))[0] == 503 and s, 10,
                         "/readyz 503 after a worker died")
    assert status == 503

    def restarted() -> dict[str, Any] | None:
        status, raw = pod.admin_request("GET", "/readyz")
        return json.loads(raw) if status == 200 else None

    ready = wait_for(restarted, 60, "the worker restarted and the pod ready again")
    workers = ready["workers"]
    assert workers[1]["restarts"] == 1 and workers[1]["pid"] != victim and workers[1]["last_exit"] == -9
    assert _metric(pod.admin_get("/metrics"), "mcpool_worker_restarts_total") == 1
    # Served again by both workers: new connections reach the restarted one too.
    served = set()
    for i in range(12):
        sock, _, early = cpe_convert(lab, (lab.srv_ip, SERVER_PORT))
        with sock:
            served.add(wait_two_subflows(lab, pod, sock)["worker"])
            download(sock, 100_000, 70 + i, early)
        if served == {0, 1}:
            break
    assert served == {0, 1}


def test_sigterm_leaves_nothing_behind(lab: Lab, pod: ProxyProcess) -> None:
    workers = _pids_of(pod.proc.pid)
    assert len(workers) == 2
    sockets = set()
    for pid in workers:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        sockets.add(argv[argv.index("--admin-socket") + 1])
    assert all(os.path.exists(path) for path in sockets)
    assert pod.stop() == 0
    # No worker left (reaped by the supervisor), nor its private directory of admin sockets.
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert not any(os.path.exists(os.path.dirname(path)) for path in sockets)
    # No listener left on the port (the supervisor's copies closed too): a new listener without
    # SO_REUSEPORT binds it (SO_REUSEADDR for the relayed connections' TIME_WAIT entries).
    assert lab.exec("mcp", ["ss", "-ltnH", f"( sport = :{CONVERT_PORT} )"]).stdout.strip() == ""
    with lab.in_netns("mcp"):
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("::", CONVERT_PORT))
        probe.listen()
        probe.close()
