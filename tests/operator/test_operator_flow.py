"""Flow tests: the real kopf operator (`mcpool_operator.main.run`) against the API emulator.

Each test drives the cluster the way a user or a controller would (HTTP to the emulator) and
waits for the operator to converge: create, spec update (pods roll), child deleted or edited
(restored), scale subresource, invalid spec (Degraded, no crash loop), SysctlForbidden pods
(Degraded without flapping), fields dropped from the spec (removed from the children), an
unchanged pool (no writes, no Events), `--director-image`, mechanism switch (pruning), delete
(nothing orphaned) and operator restart (no duplicates).
"""

from __future__ import annotations

import asyncio
import dataclasses
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


def operator_requests(cluster: Cluster, start: int = 0) -> list[Any]:
    return [r for r in cluster.emulator.log[start:] if r.headers.get("User-Agent", "").startswith("mcpool-operator/")]


def status_writes(cluster: Cluster, start: int = 0) -> int:
    return len([r for r in operator_requests(cluster, start) if r.method == "PATCH" and r.subresource == "status"])


def warnings(cluster: Cluster, reason: str) -> int:
    return len([e for e in cluster.children(EVENTS) if e.get("reason") == reason and e.get("type") == "Warning"])


async def test_sysctl_forbidden_pods_surface_as_degraded(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    sts = await eventually(lambda: cluster.child(STS, "edge"), what="StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    pods = f"/api/v1/namespaces/{NAMESPACE}/pods"

    async def make_pod(revision: str, status: dict[str, Any]) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "edge-0", "namespace": NAMESPACE, "labels": {**labels, "controller-revision-hash": revision}},
            "spec": {"containers": [{"name": "proxy", "image": "x"}]},
        }
        await cluster.request("POST", pods, pod)
        await cluster.patch(f"{pods}/edge-0/status", {"status": status})

    # What the kubelet writes when --allowed-unsafe-sysctls does not cover net.mptcp.*.
    rejected = {
        "phase": "Failed",
        "reason": "SysctlForbidden",
        "message": "Pod forbidden sysctl: \"net.mptcp.enabled\" not allowlisted",
    }
    # The StatefulSet controller's current revision.
    await cluster.patch(
        f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/edge/status", {"status": {"updateRevision": "edge-new"}}
    )
    await make_pod("edge-new", rejected)
    pool = await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Degraded") or {}).get("reason") == "SysctlForbidden"
        and cluster.pool("edge"),
        what="Degraded=SysctlForbidden",
    )
    degraded = condition_of(pool, "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert "--allowed-unsafe-sysctls" in degraded["message"] and "edge-0" in degraded["message"]
    await eventually(lambda: warnings(cluster, "SysctlForbidden") == 1, what="one Warning event")

    # The StatefulSet controller deletes the rejected pod and creates it again, twice: between
    # deletion and rejection no rejected pod exists, yet the failure must not flap.
    for _ in range(2):
        mark = len(cluster.emulator.log)
        passes = operator_runner.reconciles_started("edge")
        await cluster.delete(f"{pods}/edge-0")
        await operator_runner.reconciled_since(passes, "edge")
        passes = operator_runner.reconciles_started("edge")
        await make_pod("edge-new", rejected)
        await operator_runner.reconciled_since(passes, "edge")
        assert status_writes(cluster, mark) == 0
        assert condition_of(cluster.pool("edge"), "Degraded") == degraded
    assert warnings(cluster, "SysctlForbidden") == 1

    # A Ready pod of an older revision proves nothing about the current one.
    await cluster.delete(f"{pods}/edge-0")
    passes = operator_runner.reconciles_started("edge")
    await make_pod("edge-old", {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    await operator_runner.reconciled_since(passes, "edge")
    assert condition_of(cluster.pool("edge"), "Degraded") == degraded
    # The kubelet was fixed: a pod of the current revision runs and is Ready; the condition clears.
    await cluster.delete(f"{pods}/edge-0")
    await make_pod("edge-new", {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
    await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Degraded") or {}).get("status") == "False", what="Degraded cleared"
    )
    assert warnings(cluster, "SysctlForbidden") == 1


async def test_fields_removed_from_the_spec_leave_the_children(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool(
        "steer",
        {
            **DIRECTOR,
            "nodeSelector": {"mcp.mptcp.dev/edge": "true"},
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
            "service": {"addresses": ["198.18.0.10"], "annotations": {"lb.example/pool": "edge"}},
            "opentelemetry": {"endpoint": "http://otel:4318"},
        },
    )
    sts = await eventually(lambda: cluster.child(STS, "steer"), what="StatefulSet")
    pod_spec = sts["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"mcp.mptcp.dev/edge": "true"} and pod_spec["tolerations"]
    (container,) = pod_spec["containers"]
    assert container["securityContext"]["runAsUser"] == 0
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in {e["name"] for e in container["env"]}
    assert "REDIS_PASSWORD" in {e["name"] for e in container["env"]}
    assert cluster.child(SVC, "steer")["metadata"]["annotations"] == {"lb.example/pool": "edge"}  # type: ignore[index]
    # Every child of the director pool exists (its ConfigMap too) before the switch below, so
    # the switch always takes the node-cleanup path.
    await eventually(lambda: names(cluster, DS) == {"steer-director"}, what="director DaemonSet")

    # Drop every optional field and switch the director off (a merge patch's null deletes).
    await cluster.patch(
        cluster.pool_path("steer"),
        {
            "spec": {
                "affinity": {"mechanism": "none"},
                "redis": None,
                "nodeSelector": None,
                "tolerations": None,
                "resources": None,
                "service": {"annotations": None},
                "opentelemetry": None,
            }
        },
    )
    await eventually(lambda: "nodeSelector" not in cluster.child(STS, "steer")["spec"]["template"]["spec"], what="nodeSelector gone")  # type: ignore[index]
    # The director is replaced by its node cleanup; acting as the DaemonSet controller, report
    # every node clean, and both go.
    await eventually(lambda: names(cluster, DS) == {"steer-director-cleanup"}, what="director replaced by its cleanup")
    await cluster.set_daemonset_ready("steer-director-cleanup", 1, 1)
    await eventually(lambda: names(cluster, DS) == set(), what="director pruned")
    pod_spec = cluster.child(STS, "steer")["spec"]["template"]["spec"]  # type: ignore[index]
    assert "tolerations" not in pod_spec
    (container,) = pod_spec["containers"]
    assert not container.get("resources")
    security = container["securityContext"]
    assert "runAsUser" not in security or security["runAsUser"] != 0
    assert "add" not in security["capabilities"]
    env = {e["name"] for e in container["env"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env and "REDIS_PASSWORD" not in env
    assert not (cluster.child(SVC, "steer")["metadata"].get("annotations"))  # type: ignore[index]
    updated = [e for e in cluster.children(EVENTS) if e.get("reason") == "Updated"]
    assert any("StatefulSet steer" in e.get("message", "") for e in updated)


async def test_unchanged_pool_is_left_alone(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("steer", DIRECTOR)
    await wait_ready_pool(cluster, "steer")
    kinds = (STS, DS, SVC, CM, SA, PDB)

    def versions() -> dict[str, str]:
        return {
            f"{res}/{c['metadata']['name']}": c["metadata"]["resourceVersion"] for res in kinds for c in cluster.children(res)
        }

    # Reconciles of an unchanged pool: a StatefulSet status change and an operator restart.
    await cluster.set_statefulset_ready("steer", 2)
    await eventually(lambda: (condition_of(cluster.pool("steer"), "Ready") or {}).get("status") == "True", what="Ready")
    before = versions()
    mark = len(cluster.emulator.log)
    await operator_runner.stop()
    await operator_runner.start()
    await operator_runner.reconciled_since(0, "steer")
    applies = [r for r in operator_requests(cluster, mark) if r.headers.get("Content-Type", "").startswith("application/apply")]
    # Everything was applied again (the resume reconcile, and more) ...
    applied = {f"{r.resource.group + '/' if r.resource.group else ''}{r.resource.version}/{r.resource.plural}/{r.name}" for r in applies}
    assert applied == set(before)
    assert versions() == before  # ... and nothing changed
    assert status_writes(cluster, mark) == 0
    assert not [e for e in cluster.children(EVENTS) if e.get("reason") == "Updated"]


async def test_director_image_flag_overrides_the_spec(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await operator_runner.stop()
    operator_runner.options = dataclasses.replace(operator_runner.options, director_image="registry.example/mcpool:pinned")
    await operator_runner.start()
    await cluster.create_pool("steer", {**DIRECTOR, "image": "attacker.example/anything:latest"})
    ds = await eventually(lambda: cluster.child(DS, "steer-director"), what="director DaemonSet")
    assert [c["image"] for c in ds["spec"]["template"]["spec"]["containers"]] == ["registry.example/mcpool:pinned"]
    sts = await eventually(lambda: cluster.child(STS, "steer"), what="StatefulSet")
    assert [c["image"] for c in sts["spec"]["template"]["spec"]["containers"]] == ["attacker.example/anything:latest"]


async def test_mechanism_switch_prunes_children(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("steer", DIRECTOR)
    await eventually(lambda: cluster.child(DS, "steer-director"), what="director DaemonSet")
    assert names(cluster, CM) == {"steer-config", "steer-director"}
    await cluster.patch(
        cluster.pool_path("steer"),
        {"spec": {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.10", "198.18.1.11"]}}},
    )
    # The director goes at once; its nodes are cleaned by a DaemonSet using its ConfigMap.
    await eventually(lambda: names(cluster, DS) == {"steer-director-cleanup"}, what="director replaced by its cleanup")
    assert names(cluster, CM) == {"steer-config", "steer-director"}
    await cluster.set_daemonset_ready("steer-director-cleanup", 3, 3)
    await eventually(lambda: names(cluster, DS) == set(), what="cleanup finished")
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
    # The finalizer holds the pool until the directors' nodes are clean (issue 10).
    cleanup = await eventually(lambda: cluster.child(DS, "steer-director-cleanup"), what="node cleanup DaemonSet")
    # Retried every 2 s: also removes a director a reconcile still in flight applied again.
    await eventually(lambda: cluster.child(DS, "steer-director") is None, what="director stopped")
    pod_spec = cleanup["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is True
    assert pod_spec["initContainers"][0]["args"] == [
        "director", "--config", "/etc/mcpool-director/director.yaml", "--cleanup-only"
    ]
    assert pod_spec["initContainers"][0]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert pod_spec["containers"][0]["args"][-1] == "--idle"
    assert {"name": "config", "configMap": {"name": "steer-director"}} in pod_spec["volumes"]
    await cluster.set_daemonset_ready("steer-director-cleanup", 2, 1)
    await asyncio.sleep(2.5)  # a kopf retry (delay 2 s) sees one node still to clean
    assert cluster.pool("steer") is not None
    await cluster.set_daemonset_ready("steer-director-cleanup", 2, 2)
    await eventually(lambda: cluster.pool("steer") is None, limit_s=15, what="pool deleted (finalizer released)")
    for resource in (STS, DS, SVC, CM, SA, PDB):
        assert cluster.children(resource) == [], resource
    # The pool's DELETED event makes the operator forget what it kept for the pool.
    reconciler = operator_runner.reconciler
    assert reconciler is not None
    await eventually(lambda: (NAMESPACE, "steer") not in reconciler.started, what="the pool forgotten")
    assert (NAMESPACE, "steer") not in reconciler.finished


async def test_restart_creates_no_duplicates(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("edge", BASIC)
    await wait_ready_pool(cluster, "edge")
    await cluster.set_statefulset_ready("edge", 2)
    await eventually(lambda: (condition_of(cluster.pool("edge"), "Ready") or {}).get("status") == "True", what="Ready")
    before = {res: [c["metadata"]["uid"] for c in cluster.children(res)] for res in (STS, SVC, CM, SA, PDB)}
    posts_before = len([r for r in cluster.emulator.log if r.method == "POST" and r.resource and r.resource.plural != "events"])

    await operator_runner.stop()
    await operator_runner.start()
    # The resumed operator reconciles every pool once.
    await operator_runner.reconciled_since(0, "edge")
    after = {res: [c["metadata"]["uid"] for c in cluster.children(res)] for res in (STS, SVC, CM, SA, PDB)}
    assert after == before
    posts_after = len([r for r in cluster.emulator.log if r.method == "POST" and r.resource and r.resource.plural != "events"])
    assert posts_after == posts_before
    assert condition_of(cluster.pool("edge"), "Ready")["status"] == "True"  # type: ignore[index]


# --- inside a cluster, not an open relay (issue 10) ----------------------------------------------


async def test_allowed_images_refuse_a_pool_with_degraded_and_no_children(
    cluster: Cluster, operator_runner: OperatorRunner
) -> None:
    await operator_runner.stop()
    operator_runner.options = dataclasses.replace(
        operator_runner.options, allowed_images=("ghcr.io/mptcp-dev/mcpool", "registry.example:5000/mcp/")
    )
    await operator_runner.start()
    await cluster.create_pool("edge", {**BASIC, "image": "registry.example:5000/mcp/mcpool:1.2@sha256:" + "a" * 64})
    sts = await eventually(lambda: cluster.child(STS, "edge"), what="StatefulSet of an allowed image")
    # A pool whose image is outside the list: refused, nothing created.
    await cluster.create_pool("evil", {**BASIC, "image": "attacker.example/mcpool:latest"})
    pool = await eventually(
        lambda: (condition_of(cluster.pool("evil"), "Degraded") or {}).get("reason") == "ImageNotAllowed"
        and cluster.pool("evil"),
        what="Degraded=True ImageNotAllowed",
    )
    degraded = condition_of(pool, "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    assert "attacker.example/mcpool" in degraded["message"] and "--allowed-images" in degraded["message"]
    assert condition_of(pool, "Ready")["status"] == "False"  # type: ignore[index]
    assert not [c for res in (STS, SVC, CM, SA, PDB) for c in cluster.children(res) if c["metadata"]["name"].startswith("evil")]
    await eventually(lambda: warnings(cluster, "ImageNotAllowed") >= 1, what="Warning event")
    # An existing pool switched to a disallowed image: its children are not updated.
    version = sts["metadata"]["resourceVersion"]
    await cluster.patch(cluster.pool_path("edge"), {"spec": {"image": "ghcr.io/mptcp-dev/mcpool-evil:1", "replicas": 3}})
    await eventually(
        lambda: (condition_of(cluster.pool("edge"), "Degraded") or {}).get("reason") == "ImageNotAllowed", what="Degraded"
    )
    live = cluster.child(STS, "edge")
    assert live is not None and live["metadata"]["resourceVersion"] == version
    assert live["spec"]["replicas"] == 2
    # Back to an allowed image: reconciled again.
    await cluster.patch(cluster.pool_path("edge"), {"spec": {"image": "ghcr.io/mptcp-dev/mcpool:0.2.0"}})
    await eventually(lambda: (cluster.child(STS, "edge") or {}).get("spec", {}).get("replicas") == 3, what="updated")


async def test_cluster_ranges_are_refused_and_a_warning_says_when_defaulted(
    cluster: Cluster, operator_runner: OperatorRunner
) -> None:
    import yaml

    await cluster.create_pool("edge", {**BASIC, "policy": {**BASIC["policy"], "allowedDestinations": ["10.0.0.0/8"]}})  # type: ignore[dict-item]
    pool = await eventually(
        lambda: (condition_of(cluster.pool("edge"), "ClusterRanges") or {}).get("status") == "False" and cluster.pool("edge"),
        what="ClusterRanges=False",
    )
    message = condition_of(pool, "ClusterRanges")["message"]  # type: ignore[index]
    assert "cluster.podCIDRs" in message and "cluster.serviceCIDRs" in message
    await eventually(lambda: warnings(cluster, "ClusterRangesDefaulted") == 1, what="Warning event")

    def policy() -> Any:
        cm = cluster.child(CM, "edge-config")
        return parse_config(yaml.safe_load(cm["data"]["config.yaml"])).policy if cm else None  # type: ignore[index]

    rendered = policy()
    assert {"10.96.0.0/12", "10.244.0.0/16"} <= set(rendered.denied_destinations)
    assert rendered.allowed_destinations == ["10.0.0.0/8"]
    await cluster.patch(
        cluster.pool_path("edge"),
        {"spec": {"cluster": {"podCIDRs": ["10.50.0.0/16", "fd00:50::/56"], "serviceCIDRs": ["10.60.0.0/16"]}}},
    )
    await eventually(
        lambda: (condition_of(cluster.pool("edge"), "ClusterRanges") or {}).get("status") == "True", what="ClusterRanges=True"
    )
    await eventually(lambda: "10.60.0.0/16" in policy().denied_destinations, what="rendered ranges")
    assert {"10.50.0.0/16", "fd00:50::/56"} <= set(policy().denied_destinations)
    assert "10.96.0.0/12" not in policy().denied_destinations
    assert warnings(cluster, "ClusterRangesDefaulted") == 1


ON_PATH = {**BASIC, "onPath": {"enabled": True, "nodeSelector": {"mcp.mptcp.dev/gateway": "true"},
                               "cpeInterfaces": ["eth1"]}}


async def test_delete_of_an_on_path_pool_cleans_its_nodes_first(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("gw", ON_PATH)
    await eventually(lambda: cluster.child(DS, "gw-onpath"), what="on-path DaemonSet")
    await cluster.delete(cluster.pool_path("gw"))
    # The finalizer holds the pool until every on-path node ran `mcpool proxy --cleanup-only`
    # (an on-path MCP that was killed left its nft table and ip rules on the host).
    cleanup = await eventually(lambda: cluster.child(DS, "gw-onpath-cleanup"), what="on-path node cleanup")
    await eventually(lambda: cluster.child(DS, "gw-onpath") is None, what="on-path MCPs stopped")
    pod_spec = cleanup["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is True and pod_spec["nodeSelector"] == {"mcp.mptcp.dev/gateway": "true"}
    (init,) = pod_spec["initContainers"]
    assert init["args"] == ["proxy", "--config", "/etc/mcpool-onpath/onpath.yaml",
                            "--transparent-address", "$(NODE_IP)", "--cleanup-only"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert pod_spec["containers"][0]["args"][-1] == "--idle"
    assert "add" not in pod_spec["containers"][0]["securityContext"]["capabilities"]
    assert {"name": "config", "configMap": {"name": "gw-onpath"}} in pod_spec["volumes"]
    await cluster.set_daemonset_ready("gw-onpath-cleanup", 2, 1)
    await asyncio.sleep(2.5)  # a kopf retry (delay 2 s) sees one node still to clean
    assert cluster.pool("gw") is not None
    await cluster.set_daemonset_ready("gw-onpath-cleanup", 2, 2)
    await eventually(lambda: cluster.pool("gw") is None, limit_s=15, what="pool deleted (finalizer released)")
    for resource in (STS, DS, SVC, CM, SA, PDB):
        assert cluster.children(resource) == [], resource


async def test_turning_on_path_off_cleans_its_nodes(cluster: Cluster, operator_runner: OperatorRunner) -> None:
    await cluster.create_pool("gw", ON_PATH)
    await eventually(lambda: names(cluster, DS) == {"gw-onpath"}, what="on-path DaemonSet")
    await cluster.patch(cluster.pool_path("gw"), {"spec": {"onPath": {"enabled": False}}})
    await eventually(lambda: names(cluster, DS) == {"gw-onpath-cleanup"}, what="on-path replaced by its cleanup")
    assert "gw-onpath" in names(cluster, CM)  # the cleanup pods mount it
    await cluster.set_daemonset_ready("gw-onpath-cleanup", 1, 1)
    await eventually(lambda: names(cluster, DS) == set(), what="cleanup finished")
    await eventually(lambda: "gw-onpath" not in names(cluster, CM), what="on-path config removed")
