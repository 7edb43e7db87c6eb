"""RBAC: the ClusterRole in manifests/rbac.yaml grants exactly what the operator's API calls need.

A scenario that makes the operator use every code path (create, drift repair, recreation,
pruning, status, events, deletion with the finalizer) runs against the emulator; every request
the operator made (kopf's and its own client's, told apart from the test's by User-Agent) is
turned into an RBAC (verb, apiGroup, resource) and compared with the role, both ways.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import NAMESPACE, Cluster, OperatorRunner, eventually

REPO = Path(__file__).resolve().parents[2]
# Permissions checked by admission plugins rather than used as API calls.
ADMISSION_ONLY = {("update", "mcp.mptcp.dev", "mcppools/finalizers")}

DIRECTOR = {
    "replicas": 2,
    "affinity": {"mechanism": "director"},
    "redis": {"url": "redis://redis:6379/0"},
    "service": {"addresses": ["198.18.0.10"]},
}


def role_permissions() -> set[tuple[str, str, str]]:
    docs = list(yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def verbs_of(method: str, name: str | None, params: dict[str, str], content_type: str) -> set[str]:
    if method == "GET":
        return {"watch" if params.get("watch") == "true" else ("get" if name else "list")}
    if method == "PATCH" and content_type.startswith("application/apply-patch"):
        # A server-side apply of a missing object creates it, and the API server authorises
        # that as "create" (Kubernetes API concepts, "Patch and apply").
        return {"patch", "create"}
    return {{"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]}


async def test_role_matches_the_calls_the_operator_makes(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("rbac", DIRECTOR)
    await eventually(lambda: cluster.child("policy/v1/poddisruptionbudgets", "rbac"), what="children")
    # Drift on every kind that can drift -> get + patch.
    await cluster.patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/rbac", {"spec": {"replicas": 9}})
    await cluster.patch(f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets/rbac", {"spec": {"maxUnavailable": 3}})
    await cluster.patch(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/rbac-mcp", {"automountServiceAccountToken": True})
    await eventually(lambda: cluster.child("apps/v1/statefulsets", "rbac")["spec"]["replicas"] == 2, what="sts")  # type: ignore[index]
    await eventually(lambda: cluster.child("policy/v1/poddisruptionbudgets", "rbac")["spec"]["maxUnavailable"] == 1, what="pdb")  # type: ignore[index]
    await eventually(lambda: cluster.child("v1/serviceaccounts", "rbac-mcp")["automountServiceAccountToken"] is False, what="sa")  # type: ignore[index]
    # A status somebody else wrote -> the operator reads the pool from the API (its index may lag
    # behind that write) and writes its own again; each drift of the StatefulSet is a reconcile.
    await cluster.patch(cluster.pool_path("rbac", sub="status"), {"status": {"replicas": 7}})
    sts_path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/rbac"

    async def status_rewritten() -> bool:
        await cluster.patch(sts_path, {"spec": {"replicas": 9}})
        return bool(cluster.pool("rbac")["status"].get("replicas") != 7)  # type: ignore[index]

    await eventually(status_rewritten, what="status rewritten")
    await cluster.patch(f"/api/v1/namespaces/{NAMESPACE}/services/rbac", {"spec": {"type": "ClusterIP"}})
    await cluster.patch(
        f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/rbac-director", {"spec": {"template": {"spec": {"hostNetwork": False}}}}
    )
    await eventually(lambda: cluster.child("v1/services", "rbac")["spec"]["type"] == "LoadBalancer", what="svc")  # type: ignore[index]
    await eventually(
        lambda: cluster.child("apps/v1/daemonsets", "rbac-director")["spec"]["template"]["spec"]["hostNetwork"] is True,  # type: ignore[index]
        what="ds",
    )
    # Mechanism switch and scale-down -> prune (list + delete) of DaemonSet, ConfigMap, Service.
    await cluster.patch(
        cluster.pool_path("rbac"),
        {"spec": {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1", "198.18.1.2"]}}},
    )
    await eventually(lambda: cluster.child("apps/v1/daemonsets", "rbac-director") is None, what="prune")
    # ... and the node cleanup of the former director (a DaemonSet that the operator deletes when
    # every node has run it, then the director's ConfigMap).
    await eventually(lambda: cluster.child("apps/v1/daemonsets", "rbac-director-cleanup"), what="cleanup")
    await cluster.set_daemonset_ready("rbac-director-cleanup", 1, 1)
    await eventually(lambda: cluster.child("v1/configmaps", "rbac-director") is None, what="cleanup done")
    await eventually(lambda: cluster.child("v1/services", "rbac-join-1"), what="join services")
    await cluster.patch(cluster.pool_path("rbac"), {"spec": {"replicas": 1}})
    await eventually(lambda: cluster.child("v1/services", "rbac-join-1") is None, what="join service pruned")
    # Deletion -> kopf releases its finalizer.
    await cluster.delete(cluster.pool_path("rbac"))
    await eventually(lambda: cluster.pool("rbac") is None, what="deletion")

    used = set()
    for request in cluster.emulator.log:
        agent = request.headers.get("User-Agent", "")
        if not (agent.startswith("kopf/") or agent.startswith("mcpool-operator/")):
            continue
        if request.resource is None or request.resource.plural is None:
            continue  # discovery (/api, /apis/...) needs no RBAC
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        content_type = request.headers.get("Content-Type", "")
        for verb in verbs_of(request.method, request.name, dict(request.params), content_type):
            used.add((verb, request.resource.group, resource))

    granted = role_permissions()
    assert used - granted == set(), "the operator makes calls its role does not allow"
    assert granted - ADMISSION_ONLY - used == set(), "the role grants more than the operator uses"
