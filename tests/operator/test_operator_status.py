"""Pure parts of the reconcile: the status builder's SysctlForbidden rule, the current-revision
check, and the hand-over of field ownership from POST-created children to server-side apply."""

from __future__ import annotations

from typing import Any

from mcpool_operator.main import parse_args
from mcpool_operator.reconcile import FIELD_MANAGER, upgrade_managed_fields
from mcpool_operator.status import Observation, build_status, find_condition, revision_ready

SELECTOR = "app.kubernetes.io/instance=edge"
STS = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 1, "updateRevision": "edge-new"}}


def pod(revision: str, ready: bool = False, rejected: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if rejected:
        status.update(phase="Failed", reason="SysctlForbidden")
    return {"metadata": {"name": "edge-0", "labels": {"controller-revision-hash": revision}}, "status": status}


def test_revision_ready() -> None:
    assert revision_ready([pod("edge-new", ready=True)], STS)
    assert not revision_ready([pod("edge-old", ready=True)], STS)
    assert not revision_ready([pod("edge-new")], STS)
    # The controller has not reported a revision yet: any Ready pod counts.
    assert revision_ready([pod("whatever", ready=True)], {"status": {}})
    assert not revision_ready([], STS)


def test_sysctl_failure_holds_until_a_current_pod_is_ready() -> None:
    failing = Observation(1, 1, SELECTOR, statefulset=STS, sysctl_error="pod edge-0 was rejected")
    first = build_status(None, failing, now="2030-01-01T00:00:00Z")
    degraded = find_condition(first["conditions"], "Degraded")
    assert degraded is not None and degraded["reason"] == "SysctlForbidden"

    # The rejected pod was deleted (or an old-revision pod is Ready): nothing changes at all.
    gap = Observation(1, 1, SELECTOR, statefulset=STS, revision_ready=False)
    assert build_status(first, gap, now="2030-01-01T00:01:00Z") == first

    healed = Observation(1, 1, SELECTOR, statefulset=STS, revision_ready=True)
    cleared = build_status(first, healed, now="2030-01-01T00:02:00Z")
    after = find_condition(cleared["conditions"], "Degraded")
    assert after is not None and after["status"] == "False" and after["lastTransitionTime"] == "2030-01-01T00:02:00Z"


def test_other_degraded_reasons_are_not_held() -> None:
    failed = build_status(None, Observation(1, 1, SELECTOR, statefulset=STS, apply_error="boom"))
    recovered = build_status(failed, Observation(1, 1, SELECTOR, statefulset=STS))
    assert find_condition(recovered["conditions"], "Degraded")["status"] == "False"


def test_update_ownership_moves_to_apply() -> None:
    entries = [
        {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
        {
            "manager": FIELD_MANAGER,
            "operation": "Update",
            "apiVersion": "apps/v1",
            "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:nodeSelector": {}}}}},
        },
        {"manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": "apps/v1", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": FIELD_MANAGER, "operation": "Update", "subresource": "status", "fieldsV1": {"f:status": {}}},
    ]
    upgraded = upgrade_managed_fields(entries, FIELD_MANAGER)
    assert upgraded is not None
    ours = [e for e in upgraded if e["manager"] == FIELD_MANAGER and not e.get("subresource")]
    assert ours == [
        {
            "manager": FIELD_MANAGER,
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:nodeSelector": {}}}}},
        }
    ]
    # Other managers and subresource entries are kept as they were.
    assert entries[0] in upgraded and entries[3] in upgraded and len(upgraded) == 3
    # Already upgraded (or created by apply): nothing to do.
    assert upgrade_managed_fields(upgraded, FIELD_MANAGER) is None
    assert upgrade_managed_fields([], FIELD_MANAGER) is None


def test_director_image_flag() -> None:
    assert parse_args(["-A"]).director_image is None
    assert parse_args(["-A", "--director-image", "registry.example/mcpool@sha256:ab"]).director_image == (
        "registry.example/mcpool@sha256:ab"
    )
