"""Operator bursts (issue 12.5): the real kopf operator reads its kopf indexes, not the API, and
applies only children that drifted, against the API emulator.

- a StatefulSet status change the pool does not report causes no request of the operator at all;
- a child edited by hand is restored, a child deleted by hand is created again;
- 20 pools created at once all get their children and status, each child applied about once,
  one Created Event per pool, no pool read back from the API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from conftest import NAMESPACE, TEST_USER_AGENT, Cluster, OperatorRunner, condition_of, eventually

STS = "apps/v1/statefulsets"
SVC = "v1/services"
CM = "v1/configmaps"
SA = "v1/serviceaccounts"
PDB = "policy/v1/poddisruptionbudgets"
BASIC = {"replicas": 2, "policy": {"allowedCpes": ["198.18.0.0/15"]}, "service": {"addresses": ["198.18.0.10"]}}
# What build_children makes for BASIC.
CHILDREN = ((SA, "{}-mcp"), (CM, "{}-config"), (SVC, "{}-pods"), (SVC, "{}"), (STS, "{}"), (PDB, "{}"))
OPERATOR = "mcpool-operator/"


def operator_requests(cluster: Cluster, start: int) -> list[Any]:
    return [r for r in cluster.emulator.log[start:] if r.headers.get("User-Agent", "").startswith(OPERATOR)]


def foreign_writes(cluster: Cluster, start: int) -> list[Any]:
    """Writes since `start` by anybody but the test itself (the operator, kopf's own client)."""
    return [r for r in cluster.emulator.writes(start) if r.headers.get("User-Agent") != TEST_USER_AGENT]


def all_children(cluster: Cluster, name: str) -> bool:
    return all(cluster.child(res, pattern.format(name)) is not None for res, pattern in CHILDREN)


async def settled_pool(cluster: Cluster, runner: OperatorRunner, name: str) -> None:
    """Create the pool, report its pods ready, and wait until the operator is idle on it."""
    await cluster.create_pool(name, BASIC)
    await eventually(lambda: all_children(cluster, name), what=f"children of {name}")
    await cluster.set_statefulset_ready(name, 2)
    await eventually(lambda: (condition_of(cluster.pool(name), "Ready") or {}).get("status") == "True", what="Ready")

    def idle() -> bool:
        assert runner.reconciler is not None
        key = (NAMESPACE, name)
        return runner.reconciler.started.get(key) == runner.reconciler.finished.get(key)

    await eventually(idle, what="no reconcile in flight")

    # kopf posts Events from a background queue: the ClusterRangesDefaulted warning of the
    # first reconcile (BASIC sets no spec.cluster) may otherwise land inside a later window.
    def warned() -> bool:
        return any(e.get("reason") == "ClusterRangesDefaulted" and (e.get("involvedObject") or {}).get("name") == name
                   for e in cluster.children("v1/events"))  # fmt: skip

    await eventually(warned, what="the ClusterRangesDefaulted event posted")


async def test_statefulset_status_change_that_changes_nothing_causes_no_write(
    cluster: Cluster, operator_runner: OperatorRunner
) -> None:
    await settled_pool(cluster, operator_runner, "quiet")
    mark = len(cluster.emulator.log)
    for revision in ("quiet-aaa", "quiet-bbb", "quiet-ccc"):
        passes = operator_runner.reconciles_started("quiet")
        # What the StatefulSet controller writes as pods roll; nothing the pool reports.
        await cluster.patch(
            f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/quiet/status",
            {"status": {"currentRevision": revision, "collisionCount": 0}},
        )
        await operator_runner.reconciled_since(passes, "quiet")
    # Each change was reconciled, from the indexes: no read and no write reached the API.
    assert operator_requests(cluster, mark) == []
    assert foreign_writes(cluster, mark) == []

    # A status change the pool does report is written, once.
    passes = operator_runner.reconciles_started("quiet")
    await cluster.set_statefulset_ready("quiet", 1)
    await operator_runner.reconciled_since(passes, "quiet")
    await eventually(lambda: (cluster.pool("quiet") or {}).get("status", {}).get("readyReplicas") == 1, what="readyReplicas 1")
    status_writes = [r for r in foreign_writes(cluster, mark) if r.subresource == "status"]
    assert len(status_writes) == 1
    assert [r for r in foreign_writes(cluster, mark) if r.subresource != "status" and r.resource.plural != "events"] == []


async def test_child_edited_by_hand_is_restored(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await settled_pool(cluster, operator_runner, "drift")
    config = cluster.child(CM, "drift-config")
    assert config is not None
    data = dict(config["data"])
    (key,) = list(data)[:1]
    await cluster.patch(f"/api/v1/namespaces/{NAMESPACE}/configmaps/drift-config", {"data": {key: "edited: by hand\n"}})
    await eventually(lambda: (cluster.child(CM, "drift-config") or {}).get("data") == data, what="ConfigMap restored")
    await cluster.patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/drift", {"spec": {"replicas": 5}})
    await eventually(
        lambda: (cluster.child(STS, "drift") or {}).get("spec", {}).get("replicas") == 2, what="StatefulSet restored"
    )

    def updated() -> set[str]:
        return {" ".join(e["message"].split()[1:3]) for e in cluster.children("v1/events") if e.get("reason") == "Updated"}

    # Events are posted through kopf's queue, a moment after the apply.
    await eventually(lambda: {"ConfigMap drift-config", "StatefulSet drift"} <= updated(), what="Updated events")


async def test_child_deleted_by_hand_is_recreated(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await settled_pool(cluster, operator_runner, "gone")
    for resource, path, name in (
        (SVC, f"/api/v1/namespaces/{NAMESPACE}/services/gone-pods", "gone-pods"),
        (STS, f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/gone", "gone"),
        (PDB, f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/gone", "gone"),
    ):
        old = cluster.child(resource, name)
        assert old is not None
        await cluster.delete(path)
        new = await eventually(
            lambda r=resource, n=name, u=old["metadata"]["uid"]: (c := cluster.child(r, n)) is not None
            and c["metadata"]["uid"] != u
            and c,
            what=f"{resource} {name} recreated",
        )
        assert new["spec"] == old["spec"]


async def test_a_burst_of_pools_all_reach_their_children(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    pools = [f"burst-{i}" for i in range(20)]
    mark = len(cluster.emulator.log)
    started = time.monotonic()
    await asyncio.gather(*(cluster.create_pool(name, BASIC) for name in pools))
    await eventually(lambda: all(all_children(cluster, name) for name in pools), limit_s=60, what="every pool's children")
    elapsed = time.monotonic() - started
    await eventually(
        lambda: all(condition_of(cluster.pool(name), "Progressing") for name in pools), limit_s=30, what="every status"
    )
    for name in pools:
        sts = cluster.child(STS, name)
        assert sts is not None and sts["metadata"]["ownerReferences"][0]["name"] == name
    # Each child is applied about once (again only when the index lags behind the apply), not
    # on every event of every child as when each reconcile applied everything.
    applies = [
        r for r in operator_requests(cluster, mark) if r.headers.get("Content-Type", "").startswith("application/apply")
    ]
    print(f"{len(pools)} pools: all children after {elapsed:.2f} s, {len(applies)} applies")
    assert len(applies) <= 2 * len(CHILDREN) * len(pools), (len(applies), elapsed)
    # One Created Event per pool names all its children (an Event is a request like an apply),
    # and no pool's status is read back from the API: the index that lags behind the operator's
    # own status write is known to lag.
    def created_events() -> dict[str, list[str]]:
        messages: dict[str, list[str]] = {}
        for event in cluster.children("v1/events"):
            if event.get("reason") == "Created":
                messages.setdefault(event["involvedObject"]["name"], []).append(event["message"])
        return messages

    await eventually(lambda: set(created_events()) == set(pools), what="a Created Event of every pool")
    for name, messages in created_events().items():
        assert messages == [
            f"created ServiceAccount {name}-mcp, ConfigMap {name}-config, Service {name}-pods, Service {name}, "
            f"StatefulSet {name}, PodDisruptionBudget {name}"
        ]
    pool_reads = [
        r for r in operator_requests(cluster, mark) if r.method.name == "GET" and r.resource and r.resource.plural == "mcppools"
    ]
    assert not pool_reads
