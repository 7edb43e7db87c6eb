"""The drain progress of a rolling update or scale-in in the pool's status (`status.draining`).

The real operator against the API emulator; the deleted pod's admin port is the proxy's real
admin HTTP server (`AdminServer`) on loopback, its counts set by the test the way a draining
proxy's connections end. The count must follow without any pod event (the operator re-reads a
draining pod by itself), and the entry must go when the pod is gone.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import time
from typing import Any

import pytest
from conftest import NAMESPACE, Cluster, OperatorRunner, condition_of, eventually
from mcpool_operator.drain import admin_url, drain_progress, drain_summary
from mcpool_operator.handlers import OperatorOptions
from mcpool_operator.status import Observation, build_status, find_condition
from mcpool_proxy.observe.admin import AdminServer

PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
BASIC = {"replicas": 2, "policy": {"allowedCpes": ["198.18.0.0/15"]}}


class DrainingProxy:
    """What the admin server reads of a draining proxy (the `AdminTarget` protocol)."""

    def __init__(self, connections: int, started: float) -> None:
        self.connections = connections
        self.started = started
        self.draining = True

    @property
    def ready(self) -> bool:
        return False

    def readiness(self) -> dict[str, Any]:
        return {
            "ready": False,
            "draining": True,
            "drain_started": self.started,
            "connections": self.connections,
        }

    def connection_list(self) -> list[dict[str, Any]]:
        return []

    def render_metrics(self, openmetrics: bool = False) -> bytes:
        return b""

    def request_drain(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    name: str, port: int, ip: str = "127.0.0.1", deleted: str | None = "2026-12-01T10:00:00Z"
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if deleted:
        meta["deletionTimestamp"] = deleted
    return {
        "metadata": meta,
        "spec": {
            "containers": [{"name": "proxy", "ports": [{"name": "admin", "containerPort": port}]}]
        },
        "status": {"podIP": ip},
    }


def test_admin_url_follows_the_pods_admin_port_and_address_family() -> None:
    assert admin_url(pod("a", 9090)) == "http://127.0.0.1:9090/readyz"
    assert admin_url(pod("a", 9191, ip="fd00::5")) == "http://[fd00::5]:9191/readyz"
    assert admin_url(pod("a", 9090, ip="")) is None


async def test_unreachable_pod_is_listed_without_a_count() -> None:
    # Nothing listens on this port: the pod is still listed, since its deletionTimestamp.
    (entry,) = await drain_progress(
        [pod("edge-1", free_port()), pod("edge-0", 1, deleted=None)], timeout_s=1.0
    )
    assert entry["pod"] == "edge-1" and entry["since"] == "2026-12-01T10:00:00Z"
    assert "connections" not in entry and "GET http://127.0.0.1:" in entry["message"]


def test_draining_condition_and_list_in_status() -> None:
    seen = Observation(generation=1, desired_replicas=2, selector="x",
                       draining=({"pod": "edge-1", "connections": 7, "since": "2026-12-01T10:00:00Z"},))  # fmt: skip
    status = build_status(None, seen, now="2026-12-01T10:00:01Z")
    assert status["draining"] == [
        {"pod": "edge-1", "connections": 7, "since": "2026-12-01T10:00:00Z"}
    ]
    draining = find_condition(status["conditions"], "Draining")
    assert (
        draining is not None
        and draining["status"] == "True"
        and draining["reason"] == "PodsDraining"
    )
    assert draining["message"] == "edge-1: 7 connections since 2026-12-01T10:00:00Z"
    done = build_status(
        status,
        Observation(generation=1, desired_replicas=2, selector="x"),
        now="2026-12-01T10:00:09Z",
    )
    assert done["draining"] == []  # written, not omitted: a merge patch would keep the old list
    after = find_condition(done["conditions"], "Draining")
    assert (
        after is not None
        and after["status"] == "False"
        and after["lastTransitionTime"] == "2026-12-01T10:00:09Z"
    )
    assert drain_summary(
        [{"pod": "p", "connections": 1, "since": "t"}, {"pod": "q", "since": "t"}]
    ) == ("p: 1 connection since t; q: connections unknown since t")


@pytest.fixture()
def operator_options(operator_options: OperatorOptions) -> OperatorOptions:
    # No metrics server: its fixed port may be taken by another run of the operator tests.
    return dataclasses.replace(operator_options, drain_poll_s=0.2, metrics_listen=None)


async def test_status_follows_a_draining_pod_until_it_is_gone(
    cluster: Cluster, operator_runner: OperatorRunner
) -> None:
    await cluster.create_pool("edge", BASIC)
    sts = await eventually(
        lambda: cluster.child("apps/v1/statefulsets", "edge"), what="StatefulSet"
    )
    labels = sts["spec"]["template"]["metadata"]["labels"]
    started = time.time() - 3
    proxy = DrainingProxy(connections=3, started=started)
    port = free_port()
    admin = AdminServer(proxy, "127.0.0.1", port)
    await admin.start()
    try:
        # The finalizer stands for the kubelet: a deleted pod stays, terminating, until its
        # process has exited (here: until the test releases it).
        body = pod("edge-1", port, deleted=None)
        body["metadata"].update(labels=labels, finalizers=["mcpool.test/kubelet"])
        await cluster.request("POST", PODS, {"apiVersion": "v1", "kind": "Pod", **body})
        await cluster.patch(f"{PODS}/edge-1/status", {"status": body["status"]})
        await cluster.delete(f"{PODS}/edge-1")  # the StatefulSet controller, rolling or scaling in

        def draining(count: int) -> Any:
            pool = cluster.pool("edge") or {}
            want = [{"pod": "edge-1", "connections": count, "since": iso(started)}]
            return (pool.get("status") or {}).get("draining") == want and pool

        pool = await eventually(lambda: draining(3), what="status.draining with 3 connections")
        condition = condition_of(pool, "Draining")
        assert condition is not None and condition["status"] == "True"
        assert condition["message"] == f"edge-1: 3 connections since {iso(started)}"
        # Connections end; nothing changes on the API server, yet the status follows.
        proxy.connections = 1
        await eventually(lambda: draining(1), what="status.draining with 1 connection")

        await cluster.patch(
            f"{PODS}/edge-1", {"metadata": {"finalizers": []}}
        )  # the process exited
        pool = await eventually(
            lambda: (
                (cluster.pool("edge") or {}).get("status", {}).get("draining") == []
                and cluster.pool("edge")
            ),
            what="an empty status.draining once the pod is gone",
        )
        condition = condition_of(pool, "Draining")
        assert condition is not None and condition["status"] == "False"
    finally:
        await admin.stop()
