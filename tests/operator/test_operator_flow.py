"""Flow tests: the real kopf operator (`mcpool_operator.main.run`) against the API emulator.

Each test drives the cluster the way a user or a controller would (HTTP to the emulator) and
waits for the operator to converge: create, spec update (pods roll), child deleted or edited
(restored), scale subresource, invalid spec (Degraded, no crash loop), SysctlForbidden pods,
mechanism switch (pruning), delete (nothing orphaned) and operator restart (no duplicates).
"""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import NAMESPACE, Cluster, OperatorRunner, condition_of, eventually
from mcpool_proxy.config import parse_config

STS = "apps/v1/statefulsets"
DS = "apps/v1/daemonsets"
SVC = "v1/services"
CM = "v1/configmaps"
SA = "v1/serviceaccounts"
PDB = "policy/v1/poddisruptionbudgets"
PODS = "v1/pods"
EVENTS = "v1/events"

BASIC = {"replicas": 2, "policy": {"allowedCpes": ["198.18.0.0/15"]}}
DIRECTOR = {
    "replicas": 2,
    "affinity": {"mechanism": "director"},
    "redis": {"url": "redis://redis.mcp-test:6379/0", "passwordSecretRef": {"name": "redis"}},
    "service": {"addresses": ["198.18.0.10"]},
    "policy": {"allowedCpes": ["198.18.0.0/15"]},
}


def names(cluster: Cluster, resource: str) -> set[str]:
    return {obj["metadata"]["name"] for obj in cluster.children(resource)}


def config_hash(sts: dict[str, Any] | None) -> str | None:
    if sts is None:
        return None
    value: str = sts["spec"]["template"]["metadata"]["annotations"]["mcp.mptcp.dev/config-hash"]
    return value


async def wait_ready_pool(cluster: Cluster, name: str) -> dict[str, Any]:
    await eventually(lambda: cluster.child(STS, name), what=f"StatefulSet {name}")
    return await eventually(lambda: condition_of(cluster.pool(name), "Progressing") and cluster.pool(name), what="status")


async def test_create_makes_children_and_status(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    pool = await wait_ready_pool(cluster, "edge")
    uid = pool["metadata"]["uid"]

    assert names(cluster, STS) == {"edge"}
    assert names(cluster, SVC) == {"edge", "edge-pods"}
    assert names(cluster, CM) == {"edge-config"}
    assert names(cluster, SA) == {"edge-mcp"}
    assert names(cluster, PDB) == {"edge"}
    assert names(cluster, DS) == set()
    for resource in (STS, SVC, CM, SA, PDB):
        for child in cluster.children(resource):
            refs = child["metadata"]["ownerReferences"]
            assert refs == [
                {
                    "apiVersion": "mcp.mptcp.dev/v1alpha1",
                    "kind": "MCPPool",
                    "name": "edge",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
    # The ConfigMap is a configuration the proxy itself accepts.
    config = parse_config(__import__("yaml").safe_load(cluster.child(CM, "edge-config")["data"]["config.yaml"]))  # type: ignore[index]
    assert [str(c) for c in config.policy.allowed_cpes] == ["198.18.0.0/15"]
    assert config.kernel.apply_sysctls is False

    status = pool["status"]
    assert status["selector"] == "app.kubernetes.io/name=mcpool,app.kubernetes.io/instance=edge,app.kubernetes.io/component=proxy"
    assert status["observedGeneration"] == 1
    assert condition_of(pool, "Ready")["status"] == "False"  # type: ignore[index]
    assert condition_of(pool, "Progressing")["status"] == "True"  # type: ignore[index]
    degraded_before = condition_of(pool, "Degraded")
    assert degraded_before is not None and degraded_before["status"] == "False"
    ready_before = condition_of(pool, "Ready")

    # Act as the StatefulSet controller: both pods ready.
    await asyncio.sleep(1.1)  # so a rewritten lastTransitionTime would differ (1 s resolution)
    await cluster.set_statefulset_ready("edge", 2)
    pool = await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Ready") or {}).get("status") == "True" and cluster.pool("edge"),
        what="Ready=True",
    )
    assert pool["status"]["readyReplicas"] == 2
    assert condition_of(pool, "Progressing")["status"] == "False"  # type: ignore[index]
    # Flipped: new transition time; unchanged: transition time kept.
    assert condition_of(pool, "Ready")["lastTransitionTime"] != ready_before["lastTransitionTime"]  # type: ignore[index]
    assert condition_of(pool, "Degraded")["lastTransitionTime"] == degraded_before["lastTransitionTime"]  # type: ignore[index]
    reasons = {e.get("reason") for e in cluster.children(EVENTS)}
    assert "Created" in reasons


async def test_spec_update_patches_children_and_rolls_pods(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    hash_before = config_hash(cluster.child(STS, "edge"))
    await cluster.patch(cluster.pool_path("edge"), {"spec": {"policy": {"allowedCpes": ["198.18.0.0/15", "2001:db8::/32"]}}})

    await eventually(lambda: config_hash(cluster.child(STS, "edge")) != hash_before, what="config hash change")
    text = cluster.child(CM, "edge-config")["data"]["config.yaml"]  # type: ignore[index]
    assert "2001:db8::/32" in text
    pool = await eventually(
        lambda: (cluster.pool("edge") or {}).get("status", {}).get("observedGeneration") == 2 and cluster.pool("edge"),
        what="observedGeneration 2",
    )
    assert all(c["observedGeneration"] == 2 for c in pool["status"]["conditions"])
    assert cluster.child(STS, "edge")["metadata"]["generation"] == 2  # type: ignore[index]


async def test_deleted_child_is_recreated(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    old_uid = cluster.child(CM, "edge-config")["metadata"]["uid"]  # type: ignore[index]
    await cluster.delete(f"/api/v1/namespaces/{NAMESPACE}/configmaps/edge-config")
    await cluster.delete(f"/api/v1/namespaces/{NAMESPACE}/services/edge")
    cm = await eventually(
        lambda: (c := cluster.child(CM, "edge-config")) and c["metadata"]["uid"] != old_uid and c, what="ConfigMap back"
    )
    assert "config.yaml" in cm["data"]
    await eventually(lambda: cluster.child(SVC, "edge"), what="Service back")


async def test_edited_child_is_restored(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    good = cluster.child(STS, "edge")
    assert good is not None
    await cluster.patch(
        f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/edge", {"spec": {"replicas": 7, "serviceName": "edge-pods"}}
    )
    await cluster.patch(f"/api/v1/namespaces/{NAMESPACE}/configmaps/edge-config", {"data": {"config.yaml": "listen: {}\n"}})
    await eventually(lambda: cluster.child(STS, "edge")["spec"]["replicas"] == 2, what="replicas restored")  # type: ignore[index]
    await eventually(
        lambda: "198.18.0.0/15" in cluster.child(CM, "edge-config")["data"]["config.yaml"],  # type: ignore[index]
        what="ConfigMap restored",
    )


async def test_scale_subresource_scales_the_statefulset(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    await cluster.patch(cluster.pool_path("edge", sub="scale"), {"spec": {"replicas": 3}})
    await eventually(lambda: cluster.child(STS, "edge")["spec"]["replicas"] == 3, what="StatefulSet scaled")  # type: ignore[index]
    await cluster.set_statefulset_ready("edge", 3)
    scale = await eventually(
        lambda: cluster.request("GET", cluster.pool_path("edge", sub="scale")), what="scale read"
    )
    await eventually(lambda: (cluster.pool("edge") or {}).get("status", {}).get("replicas") == 3, what="status.replicas")
    scale = await cluster.request("GET", cluster.pool_path("edge", sub="scale"))
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["replicas"] == 3
    assert "app.kubernetes.io/instance=edge" in scale["status"]["selector"]


async def test_invalid_spec_is_degraded_without_crash_loop(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("broken", {"policy": {"allowedCpes": ["198.18.0.0/33"]}})
    pool = await eventually(
        lambda: (condition_of(cluster.pool("broken"), "Degraded") or {}).get("status") == "True" and cluster.pool("broken"),
        what="Degraded=True",
    )
    degraded = condition_of(pool, "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.policy.allowedCpes.0" in degraded["message"] and "CIDR" in degraded["message"]
    assert condition_of(pool, "Ready")["status"] == "False"  # type: ignore[index]
    assert names(cluster, STS) == set()
    await eventually(
        lambda: any(e.get("reason") == "InvalidSpec" and e.get("type") == "Warning" for e in cluster.children(EVENTS)),
        what="Warning event",
    )
    # No retry loop: nothing more is written while the spec stays the same.
    writes = len([r for r in cluster.emulator.log if r.method == "PATCH" and r.subresource == "status"])
    await asyncio.sleep(1.5)
    assert len([r for r in cluster.emulator.log if r.method == "PATCH" and r.subresource == "status"]) == writes

    await cluster.patch(cluster.pool_path("broken"), {"spec": {"policy": {"allowedCpes": ["198.18.0.0/15"]}}})
    await eventually(lambda: cluster.child(STS, "broken"), what="children after the fix")
    await eventually(
        lambda: (condition_of(cluster.pool("broken"), "Degraded") or {}).get("status") == "False", what="Degraded=False"
    )


async def test_sysctl_forbidden_pods_surface_as_degraded(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    sts = await eventually(lambda: cluster.child(STS, "edge"), what="StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "edge-0", "namespace": NAMESPACE, "labels": labels},
        "spec": {"containers": [{"name": "proxy", "image": "x"}]},
    }
    await cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    # What the kubelet writes when --allowed-unsafe-sysctls does not cover net.mptcp.*.
    await cluster.patch(
        f"/api/v1/namespaces/{NAMESPACE}/pods/edge-0/status",
        {
            "status": {
                "phase": "Failed",
                "reason": "SysctlForbidden",
                "message": "Pod forbidden sysctl: \"net.mptcp.enabled\" not allowlisted",
            }
        },
    )
    pool = await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Degraded") or {}).get("reason") == "SysctlForbidden"
        and cluster.pool("edge"),
        what="Degraded=SysctlForbidden",
    )
    degraded = condition_of(pool, "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert "--allowed-unsafe-sysctls" in degraded["message"] and "edge-0" in degraded["message"]
    # The kubelet was fixed and the pod replaced: the condition clears.
    await cluster.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/edge-0")
    await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Degraded") or {}).get("status") == "False", what="Degraded cleared"
    )


async def test_mechanism_switch_prunes_children(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("steer", DIRECTOR)
    await eventually(lambda: cluster.child(DS, "steer-director"), what="director DaemonSet")
    assert names(cluster, CM) == {"steer-config", "steer-director"}
    await cluster.patch(
        cluster.pool_path("steer"),
        {"spec": {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.10", "198.18.1.11"]}}},
    )
    await eventually(lambda: names(cluster, DS) == set(), what="director removed")
    await eventually(lambda: names(cluster, CM) == {"steer-config"}, what="director config removed")
    await eventually(lambda: {"steer-join-0", "steer-join-1"} <= names(cluster, SVC), what="join Services")
    await cluster.patch(cluster.pool_path("steer", sub="scale"), {"spec": {"replicas": 1}})
    await eventually(lambda: names(cluster, SVC) == {"steer", "steer-pods", "steer-join-0"}, what="join-1 pruned")


async def test_delete_leaves_no_orphans(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("steer", DIRECTOR)
    await eventually(lambda: cluster.child(DS, "steer-director"), what="children")
    pool = cluster.pool("steer")
    assert pool is not None and "mcp.mptcp.dev/finalizer" in pool["metadata"]["finalizers"]
    await cluster.delete(cluster.pool_path("steer"))
    await eventually(lambda: cluster.pool("steer") is None, what="pool deleted (finalizer released)")
    for resource in (STS, DS, SVC, CM, SA, PDB):
        assert cluster.children(resource) == [], resource


async def test_restart_creates_no_duplicates(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    await cluster.set_statefulset_ready("edge", 2)
    await eventually(lambda: (condition_of(cluster.pool("edge"), "Ready") or {}).get("status") == "True", what="Ready")
    before = {res: [c["metadata"]["uid"] for c in cluster.children(res)] for res in (STS, SVC, CM, SA, PDB)}
    posts_before = len([r for r in cluster.emulator.log if r.method == "POST" and r.resource and r.resource.plural != "events"])

    await operator_runner.stop()
    await operator_runner.start()
    # The resumed operator reconciles every pool once: wait until it has read the StatefulSet.
    gets = len([r for r in cluster.emulator.log if r.method == "GET" and r.name == "edge"])
    await eventually(
        lambda: len([r for r in cluster.emulator.log if r.method == "GET" and r.name == "edge"]) > gets, what="resume reconcile"
    )
    await asyncio.sleep(0.5)
    after = {res: [c["metadata"]["uid"] for c in cluster.children(res)] for res in (STS, SVC, CM, SA, PDB)}
    assert after == before
    posts_after = len([r for r in cluster.emulator.log if r.method == "POST" and r.resource and r.resource.plural != "events"])
    assert posts_after == posts_before
    assert condition_of(cluster.pool("edge"), "Ready")["status"] == "True"  # type: ignore[index]
