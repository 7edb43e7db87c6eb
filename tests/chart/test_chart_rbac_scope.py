"""The chart's RBAC in both scopes against the calls the real operator makes: every call of an
operator watching one namespace stays inside that namespace and is allowed by the Role the chart
renders there (so "namespaced" needs nothing cluster-wide), and every call of an operator
watching all namespaces is allowed by the chart's ClusterRole. The same emulator and request log
as tests/operator/test_operator_rbac.py (which proves the role is also no larger than needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from chart_support import (
    REPO,
    emulated_cluster,
    one,
    operator_options,
    operator_tests,
    render,
    rules_of,
)

oc = operator_tests()
NS = oc.NAMESPACE
OTHER = "elsewhere"
DIRECTOR = {
    "replicas": 2,
    "affinity": {"mechanism": "director"},
    "redis": {"url": "redis://redis:6379/0"},
    "service": {"addresses": ["198.18.0.10"]},
}


@pytest_asyncio.fixture()
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    async with emulated_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


def verbs_of(method: str, name: str | None, params: dict[str, str], content_type: str) -> set[str]:
    if method == "GET":
        return {"watch" if params.get("watch") == "true" else ("get" if name else "list")}
    if method == "PATCH" and content_type.startswith("application/apply-patch"):
        return {"patch", "create"}  # an apply that creates is authorised as "create"
    return {{"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]}


def operator_calls(cluster: Any) -> list[tuple[str | None, str, str, str]]:
    """(namespace, verb, group, resource) of every API call the operator made."""
    calls = []
    for request in cluster.emulator.log:
        agent = request.headers.get("User-Agent", "")
        if not (agent.startswith("kopf/") or agent.startswith("mcpool-operator/")):
            continue
        if request.resource is None or request.resource.plural is None:
            continue  # discovery needs no RBAC
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        for verb in verbs_of(request.method, request.name, dict(request.params), request.headers.get("Content-Type", "")):
            calls.append((request.namespace, verb, request.resource.group, resource))
    return calls


async def exercise(cluster: Any, all_namespaces: bool) -> list[tuple[str | None, str, str, str]]:
    runner = oc.OperatorRunner(cluster, operator_options(oc, all_namespaces=all_namespaces))
    await runner.start()
    try:
        await cluster.create_pool("rbac", DIRECTOR)
        await oc.eventually(lambda: cluster.child("apps/v1/daemonsets", "rbac-director"), what="children")
        await cluster.patch(
            cluster.pool_path("rbac"),
            {"spec": {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1", "198.18.1.2"]}}},
        )
        await oc.eventually(lambda: cluster.child("apps/v1/daemonsets", "rbac-director") is None, what="prune")
        # The former director's nodes are cleaned by a DaemonSet the operator removes when done.
        await oc.eventually(lambda: cluster.child("apps/v1/daemonsets", "rbac-director-cleanup"), what="cleanup")
        await cluster.set_daemonset_ready("rbac-director-cleanup", 1, 1)
        await oc.eventually(lambda: cluster.child("v1/configmaps", "rbac-director") is None, what="cleanup done")
        await cluster.delete(cluster.pool_path("rbac"))
        await oc.eventually(lambda: cluster.pool("rbac") is None, what="deletion")
    finally:
        await runner.stop()
    return operator_calls(cluster)


async def test_namespaced_operator_needs_only_the_roles_the_chart_renders(cluster: Any) -> None:
    docs = render("helm4", "--set", "watch.scope=namespaced", "--set", f"watch.namespaces={{{NS},{OTHER}}}")
    roles = {d["metadata"]["namespace"]: rules_of(d) for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "mcpool-operator"}
    assert sorted(roles) == sorted([NS, OTHER])
    calls = await exercise(cluster, all_namespaces=False)
    assert calls
    outside = [c for c in calls if c[0] != NS]
    assert outside == [], "a namespaced operator made calls a Role in its namespace cannot allow"
    denied = {c[1:] for c in calls} - roles[NS]
    assert denied == set(), "the chart's Role does not allow these calls"


async def test_cluster_wide_operator_needs_only_the_cluster_role_the_chart_renders(cluster: Any) -> None:
    granted = rules_of(one(render("helm4"), "ClusterRole", "mcpool-operator"))
    calls = await exercise(cluster, all_namespaces=True)
    # kopf lists and watches the pools across all namespaces: a Role could not allow that.
    assert any(ns is None and verb == "watch" and resource == "mcppools" for ns, verb, _, resource in calls)
    denied = {c[1:] for c in calls} - granted
    assert denied == set(), "the chart's ClusterRole does not allow these calls"


def test_manifest_role_is_the_chart_role() -> None:
    docs = list(yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()))
    manifest = rules_of(next(d for d in docs if d["kind"] == "ClusterRole"))
    assert manifest == rules_of(one(render("helm4"), "ClusterRole", "mcpool-operator"))
