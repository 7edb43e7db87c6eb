"""Helpers of the cluster tests: a lab with a director namespace, real pods and the CPE's view.

`Lab(Topology(director=True))` (mcpool_tools.lab) builds the topology; this module adds what only tests need:
clients that hold many Convert connections open from the CPE, and the checks that every subflow
of each connection is on one pod, in the pods' `/connections` and in their kernels' view.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from e2e import host_of, kernel_subflows, port_of
from mcpool_proxy.cluster.podside import REGISTER_DELAY_ENV
from mcpool_proxy.cpe.convert_client import convert_connect
from mcpool_tools.lab import Lab, ProxyProcess, Topology
from support import wait_for

T = TypeVar("T")

CONVERT_PORT = 5124
SERVER_PORT = 8000


@contextmanager
def director_lab(prefix: str, **topology: Any) -> Iterator[Lab]:
    """A lab with two pods behind a director, the test server and Redis (for a module fixture).

    The lab prepares each pod to receive the director's tunnel; that is undone here, so the pods'
    own proxies must do it (affinity.vip), as in a cluster where nobody else would.
    """
    with Lab(Topology(prefix=prefix, pods=2, director=True, **topology)) as built:
        for pod in built.pods:
            built.exec(pod.ns, [sys.executable, "-c", "import sys; from mcpool_proxy.kernel import steering; "
                                "steering.teardown_pod_receive(sys.argv[1])", built.vip])  # fmt: skip
        built.start_testserver(f"[::]:{SERVER_PORT}")
        built.start_redis()
        yield built


@dataclass
class CpeConn:
    """One Convert connection from the CPE to the VIP, in ECHO mode against the test server."""

    sock: socket.socket
    source: str  # CPE address of the initial subflow
    port: int  # its local port
    sent: int = 0
    digest_sent: Any = field(default_factory=hashlib.sha256)
    digest_received: Any = field(default_factory=hashlib.sha256)
    received: int = 0

    def echo(self, nbytes: int) -> None:
        """Send `nbytes` random bytes and read the same bytes back, checking content."""
        payload = os.urandom(nbytes)
        self.sock.sendall(payload)
        got = bytearray()
        while len(got) < nbytes:
            data = self.sock.recv(min(262_144, nbytes - len(got)))
            assert data, f"connection from {self.source}:{self.port} closed mid-echo"
            got += data
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), "echo differs"
        self.sent += nbytes
        self.received += nbytes

    def finish(self) -> None:
        """Half-close and expect a clean EOF (the server echoed everything already)."""
        self.sock.shutdown(socket.SHUT_WR)
        assert self.sock.recv(1) == b""
        self.sock.close()


# Every connection a test opened; Cluster.stop() closes what a failed test left open, so no
# MPTCP connection (and its subflows in the pods' kernels) outlives its test.
OPENED: list[CpeConn] = []


def open_conn(lab: Lab, source: str, timeout_s: float = 20.0) -> CpeConn:
    with lab.in_netns("cpe"):
        sock, _, early = convert_connect(
            (lab.vip, CONVERT_PORT), (lab.srv_addr, SERVER_PORT), source=source, timeout_s=timeout_s
        )
    assert early == b""
    sock.settimeout(60)
    sock.sendall(b"ECHO\n")
    conn = CpeConn(sock, source, sock.getsockname()[1])
    OPENED.append(conn)
    return conn


def parallel(fn: Callable[[T], Any], items: Iterable[T], workers: int = 25) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def where_is(proxies: dict[str, ProxyProcess], conns: list[CpeConn]) -> dict[tuple[str, int], tuple[str, dict[str, Any]]]:
    """(CPE address, port) of each connection's initial subflow -> (pod, its /connections entry)."""
    found: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
    for pod, proxy in proxies.items():
        for entry in proxy.connections():
            key = (host_of(entry["client"]), port_of(entry["client"]))
            assert key not in found, f"{key} listed by two pods"
            found[key] = (pod, entry)
    return found


def wait_all_subflows(
    lab: Lab, proxies: dict[str, ProxyProcess], conns: list[CpeConn], want: set[str], timeout_s: float = 30.0
) -> dict[tuple[str, int], tuple[str, dict[str, Any]]]:
    """Wait until every connection is listed on some pod with subflows from exactly `want`."""

    def check() -> dict[tuple[str, int], tuple[str, dict[str, Any]]] | None:
        found = where_is(proxies, conns)
        for c in conns:
            hit = found.get((c.source, c.port))
            if hit is None or {host_of(s["remote"]) for s in hit[1]["subflows"]} != want:
                return None
        return found

    return wait_for(check, timeout_s, f"every connection with subflows from {sorted(want)} on one pod")


def kernel_view(lab: Lab, names: tuple[str, ...]) -> dict[str, dict[int, list[str]]]:
    """Per pod name: MPTCP token -> remote addresses of its established subflows (from `ss`)."""
    view: dict[str, dict[int, list[str]]] = {}
    for name, pod in zip(names, lab.pods, strict=True):
        per_token: dict[int, list[str]] = {}
        for sf in kernel_subflows(lab, pod.ns, CONVERT_PORT):
            per_token.setdefault(sf.token, []).append(host_of(sf.remote))
        view[name] = per_token
    return view


def elapsed_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    wait_for(lambda: condition() or None, timeout_s, what)
    return time.monotonic() - start


class Cluster:
    """The director and the pods' proxies of one test."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.names = lab.cluster_pod_names()
        self.proxies: dict[str, ProxyProcess] = {}

    def start(self, mechanism: str = "director", register_delay_ms: int = 0,
              director: dict[str, Any] | None = None, **affinity: Any) -> None:
        # A restarted Redis is refilled by the pods within their heartbeat TTL (3 s in the lab).
        self.lab.start_director(**{"snapshot_grace_s": 3.0, **(director or {})})
        old = os.environ.get(REGISTER_DELAY_ENV)
        if register_delay_ms:
            os.environ[REGISTER_DELAY_ENV] = str(register_delay_ms)
        try:
            for i, name in enumerate(self.names):
                # Each pod's proxy holds the VIP and decapsulates the director's tunnel itself.
                config = self.lab.cluster_proxy_config(i, name, mechanism, **{"vip": self.lab.vip, **affinity})
                config["log_level"] = "debug"
                self.proxies[name] = self.lab.start_proxy(config, pod=i, name=name)
        finally:
            if old is None:
                os.environ.pop(REGISTER_DELAY_ENV, None)
            else:
                os.environ[REGISTER_DELAY_ENV] = old

    def pod_ns(self, name: str) -> str:
        return self.lab.pods[self.names.index(name)].ns

    def stop(self) -> None:
        while OPENED:
            OPENED.pop().sock.close()
        for proxy in self.proxies.values():
            proxy.stop(5)
        director = self.lab.director
        if director is not None and director.poll() is None:
            director.terminate()
            try:
                director.wait(15)
            except subprocess.TimeoutExpired:
                # A stuck director must not take the following tests down with it (it would keep
                # its queue number): kill it, then fail this test's teardown loudly.
                director.kill()
                director.wait(10)
                raise
        if self.lab.redis is None or self.lab.redis.poll() is not None:
            self.lab.start_redis()
        self.lab.redis_cli("flushall")
        for link in self.lab.links:
            self.lab.restore_link(link)
        self.lab.set_cpe_endpoints(["subflow"])


def bucket_map_marks(lab: Lab) -> list[int]:
    """The marks of the director's kernel bucket map, one per filled bucket."""
    out = json.loads(lab.exec("dir", ["nft", "-j", "list", "map", "inet", "mcpool_director", "buckets"]).stdout)
    return [int(mark) for item in out["nftables"] for _, mark in item.get("map", {}).get("elem", [])]


def wait_bucket_map(lab: Lab, pods: int, buckets: int = 4096, timeout_s: float = 15.0) -> None:
    """Until every bucket of the director's kernel map is given to one of `pods` pods (from then on
    initial SYNs are decided by nftables alone)."""
    def filled() -> bool:
        marks = bucket_map_marks(lab)
        return len(set(marks)) == pods and len(marks) == (buckets if pods else 0)

    wait_for(filled, timeout_s, f"the director's bucket map over {pods} pods")
