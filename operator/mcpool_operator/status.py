"""The MCPPool status: pure functions from what was observed to `.status`.

Conditions follow the Kubernetes API conventions (metav1.Condition): `Ready`, `Progressing` and
`Degraded`, each with `observedGeneration`, `ClusterRanges` (False while spec.cluster leaves
the cluster's pod or Service ranges to their defaults, which may not be this cluster's) and
`Draining` (True while a deleted pod still carries connections: a rolling update or a scale-in
waiting for them; `status.draining` lists each such pod, see drain.py); `lastTransitionTime` moves only when a condition's
status flips, so it tells when the pool last became (un)ready, not when it was last checked.
No `phase` field: the conventions deprecate it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .drain import drain_summary

__all__ = [
    "CONDITION_TYPES",
    "Observation",
    "build_status",
    "find_condition",
    "revision_ready",
    "set_condition",
    "sysctl_failure",
]

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ClusterRanges", "Draining")
KUBELET_SYSCTL_HINT = (
    "start the kubelet with --allowed-unsafe-sysctls='net.mptcp.*,net.ipv4.tcp_fastopen' on the "
    "nodes that run MCP pods (see docs/operator.md)"
)


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    for condition in conditions:
        if condition.get("type") == type_:
            return condition
    return None


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Return `conditions` with `type_` set; lastTransitionTime kept unless the status flips."""
    text = "True" if status else "False"
    previous = find_condition(conditions, type_)
    transition = now
    if previous is not None and previous.get("status") == text and previous.get("lastTransitionTime"):
        transition = str(previous["lastTransitionTime"])
    updated = {
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }
    others = [dict(c) for c in conditions if c.get("type") != type_]
    result = others + [updated]
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda c: order.get(str(c.get("type")), len(order)))


def sysctl_failure(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """A message if any pod was rejected by its kubelet for the sysctls, else None."""
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("reason") == "SysctlForbidden":
            name = (pod.get("metadata") or {}).get("name", "?")
            detail = status.get("message") or "forbidden sysctl"
            return f"pod {name} was rejected by its kubelet: {detail}; {KUBELET_SYSCTL_HINT}"
    return None


REVISION_LABEL = "controller-revision-hash"


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def revision_ready(pods: Sequence[Mapping[str, Any]], statefulset: Mapping[str, Any] | None) -> bool:
    """True if a pod of the StatefulSet's current revision (its `status.updateRevision`; any
    revision while the controller has not reported one) is Ready."""
    revision = ((statefulset or {}).get("status") or {}).get("updateRevision")
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if _pod_ready(pod) and (revision is None or labels.get(REVISION_LABEL) == revision):
            return True
    return False


@dataclass(frozen=True)
class Observation:
    """What one reconcile saw."""

    generation: int
    desired_replicas: int
    selector: str
    statefulset: Mapping[str, Any] | None = None
    spec_error: str | None = None
    sysctl_error: str | None = None
    apply_error: str | None = None
    # A pod of the current revision is Ready (what ends a SysctlForbidden failure).
    revision_ready: bool = False
    # spec.cluster fields left to their defaults (camelCase paths); empty: all set.
    cluster_defaulted: tuple[str, ...] = ()
    # The Degraded reason of `spec_error` (an image outside --allowed-images is refused this way).
    spec_error_reason: str = "InvalidSpec"
    # `status.draining`: the terminating pods and the connections each still carries.
    draining: tuple[Mapping[str, Any], ...] = ()


def build_status(previous: Mapping[str, Any] | None, seen: Observation, now: str | None = None) -> dict[str, Any]:
    """The whole new `.status` from the previous one and an observation."""
    now = now or now_iso()
    previous = previous or {}
    conditions: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]
    sts = seen.statefulset or {}
    sts_status = sts.get("status") or {}
    replicas = int(sts_status.get("replicas") or 0)
    ready = int(sts_status.get("readyReplicas") or 0)
    updated = int(sts_status.get("updatedReplicas") or 0)
    sts_generation = int((sts.get("metadata") or {}).get("generation") or 0)
    sts_observed = int(sts_status.get("observedGeneration") or 0)
    gen = seen.generation

    def put(type_: str, status: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, gen, now)

    if seen.spec_error is not None:
        why = seen.spec_error_reason
        put("Degraded", True, why, f"the spec cannot be used: {seen.spec_error}")
        put("Progressing", False, why, "waiting for a corrected spec")
        put("Ready", False, why, "the spec is invalid; pods keep their last good configuration")
        return {
            **{k: v for k, v in previous.items() if k in ("replicas", "readyReplicas", "selector", "draining")},
            "observedGeneration": gen,
            "conditions": conditions,
        }

    rolled_out = (
        seen.statefulset is not None
        and sts_observed >= sts_generation
        and updated >= seen.desired_replicas
        and replicas == seen.desired_replicas
    )
    all_ready = ready >= seen.desired_replicas and rolled_out
    sysctl_error = seen.sysctl_error
    before = find_condition(conditions, "Degraded")
    if (
        sysctl_error is None
        and not seen.revision_ready
        and before is not None
        and before.get("status") == "True"
        and before.get("reason") == "SysctlForbidden"
    ):
        # The StatefulSet controller deletes a rejected pod and creates it again, which the
        # kubelet rejects again: between the two no rejected pod exists. Only a Ready pod of
        # the current revision proves the nodes were fixed; until then the failure stands
        # (otherwise Degraded flaps, with a Warning Event and a new lastTransitionTime each time).
        sysctl_error = str(before.get("message") or "")
    if sysctl_error is not None:
        put("Degraded", True, "SysctlForbidden", sysctl_error)
    elif seen.apply_error is not None:
        put("Degraded", True, "ApplyFailed", seen.apply_error)
    else:
        put("Degraded", False, "AsExpected", "all objects of the pool match the spec")
    if rolled_out and all_ready:
        put("Progressing", False, "RolloutComplete", f"{seen.desired_replicas} pods run the current spec")
    else:
        put(
            "Progressing",
            True,
            "RollingOut",
            f"{updated} of {seen.desired_replicas} pods updated, {ready} ready",
        )
    degraded = sysctl_error is not None or seen.apply_error is not None
    if all_ready and not degraded:
        put("Ready", True, "PodsReady", f"{ready} of {seen.desired_replicas} pods ready")
    else:
        reason = "SysctlForbidden" if sysctl_error is not None else "PodsNotReady"
        put("Ready", False, reason, f"{ready} of {seen.desired_replicas} pods ready")
    if seen.cluster_defaulted:
        put(
            "ClusterRanges",
            False,
            "Defaulted",
            f"{' and '.join(seen.cluster_defaulted)} unset: the pods refuse the common defaults "
            "instead, which may not be this cluster's ranges; set spec.cluster to the cluster's pod "
            "and Service CIDRs",
        )
    else:
        put("ClusterRanges", True, "FromSpec", "the cluster's pod and Service ranges come from spec.cluster")
    if seen.draining:
        put("Draining", True, "PodsDraining", drain_summary(seen.draining))
    else:
        put("Draining", False, "NoPodDraining", "no deleted pod is waiting for its connections")
    return {
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": seen.selector,
        "draining": [dict(entry) for entry in seen.draining],
        "observedGeneration": gen,
        "conditions": conditions,
    }
