"""kopf wiring: which events call the one reconcile, and the operator's settings.

Handlers are registered into a fresh `kopf.OperatorRegistry` per run (`build_registry`), not into
kopf's global registry at import time, so tests can start, stop and restart the operator in one
process and the timer interval can come from the command line.

- MCPPool create / update / resume, and a slow timer: reconcile.
- Events of the pool's children (label `app.kubernetes.io/managed-by=mcpool-operator`): a child
  deleted or edited away from the spec, or a StatefulSet whose pods changed, reconciles its pool
  at once instead of waiting for the timer.
- Events of the pool's pods: a pod the kubelet rejected with `SysctlForbidden`, one being
  deleted (its drain goes into `status.draining`) or one gone reconciles the pool, which surfaces it as `Degraded=True`; while the pool says so, a pod
  becoming Ready reconciles it too (that is what clears the condition).
- A pool gone for good: the reconciler forgets its per-pool state.

Every reconcile reads through kopf indexes (`@kopf.index`) instead of the API: one per child
kind and one of the pods, keyed by (namespace, pool label), plus the pools themselves. kopf
fills them from the same watches that deliver the events above, and holds every handler until
they are complete at start-up. Reconciles triggered by child and pod events are coalesced per
pool (see Reconciler.reconcile).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from . import builders
from .drain import DRAIN_POLL_S
from .kube import load_connection
from .reconcile import Reconciler, is_subset
from .spec import GROUP, PLURAL, VERSION, SpecError

__all__ = ["ANNOTATION_PREFIX", "FINALIZER", "OperatorOptions", "build_registry", "configure_settings"]

ANNOTATION_PREFIX = "mcp.mptcp.dev"
FINALIZER = f"{ANNOTATION_PREFIX}/finalizer"

# (group, version, plural) of every child kind the operator watches.
CHILD_RESOURCES: tuple[tuple[str, str, str], ...] = (
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "daemonsets"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("policy", "v1", "poddisruptionbudgets"),
)
KIND_OF_PLURAL = {
    "statefulsets": "StatefulSet",
    "daemonsets": "DaemonSet",
    "services": "Service",
    "configmaps": "ConfigMap",
    "serviceaccounts": "ServiceAccount",
    "poddisruptionbudgets": "PodDisruptionBudget",
}


@dataclass(frozen=True)
class OperatorOptions:
    """Everything `mcpool operator` can be told (see main.py for the flags)."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    resync_interval_s: float = 300.0
    # Kubernetes silently stalls long watches; ask the server to end them and reconnect.
    # Whole seconds: sent as ?timeoutSeconds=, which the API server parses as an integer.
    watch_server_timeout_s: int = 300
    watch_client_timeout_s: float = 360.0
    watch_connect_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    # How long kopf keeps an idle per-object worker (and so how long a stop may wait for it).
    worker_idle_timeout_s: float = 5.0
    log_format: str = "json"
    verbose: bool = False
    # Image of every director DaemonSet, overriding spec.image (None: spec.image).
    director_image: str | None = None
    # `--allowed-images`: repositories spec.image may name (empty: any).
    allowed_images: tuple[str, ...] = ()
    # HOST:PORT of the Prometheus metrics endpoint (None: not served).
    metrics_listen: str | None = None
    # Pools reconciled at once (0: no limit).
    max_concurrent_reconciles: int = 8
    # While a pod of a pool drains, how often its progress is read into the pool's status.
    drain_poll_s: float = DRAIN_POLL_S


def configure_settings(settings: kopf.OperatorSettings, options: OperatorOptions) -> None:
    """kopf settings: own finalizer and annotation prefix, timeouts, quiet event posting."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.watching.server_timeout = int(options.watch_server_timeout_s)
    settings.watching.client_timeout = options.watch_client_timeout_s
    settings.watching.connect_timeout = options.watch_connect_timeout_s
    settings.networking.request_timeout = options.request_timeout_s
    settings.queueing.idle_timeout = options.worker_idle_timeout_s
    # The resync timer holds no state: on exit or deletion let it go at once.
    settings.background.instant_exit_timeout = 0.1
    settings.networking.connect_timeout = options.watch_connect_timeout_s
    # The CRD is installed before the operator and namespaces are given by exact name: no need
    # to watch CRDs and namespaces (and no RBAC to read them).
    settings.scanning.disabled = True
    # One replica with strategy Recreate: no peering objects (and no RBAC for them).
    settings.peering.standalone = True
    # Only warnings become Events automatically; the reconciler posts its own Normal events.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "mcpool-operator"
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    # kopf retries a failing handler with these delays (seconds) until it succeeds.
    settings.execution.max_workers = 4


# Index ids (kwargs of every handler): children by plural, pods, pools.
CHILD_INDEX = {plural: f"children_{plural}" for _, _, plural in CHILD_RESOURCES}
POD_INDEX = "pod_index"
POOL_INDEX = "pool_index"


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec", "status", "data") if key in body}


class IndexCache:
    """The reconciler's view (`ClusterCache`) of kopf's indexes, as handlers receive them."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self._children = [kwargs[index] for index in CHILD_INDEX.values()]
        self._pods = kwargs[POD_INDEX]
        self._pools = kwargs[POOL_INDEX]

    def children(self, namespace: str, pool: str) -> Sequence[Mapping[str, Any]]:
        key = (namespace, pool)
        return [obj for index in self._children for obj in index.get(key, ())]

    def pods(self, namespace: str, pool: str) -> Sequence[Mapping[str, Any]]:
        return list(self._pods.get((namespace, pool), ()))

    def pool(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        for body in self._pools.get((namespace, name), ()):
            result: Mapping[str, Any] = body
            return result
        return None


def _desired_child(reconciler: Reconciler, pool_body: Mapping[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    try:
        children = reconciler.adopted_children(pool_body)
    except (SpecError, ValueError):
        return None
    for child, _ in children:
        if child["kind"] == kind and child["metadata"]["name"] == name:
            return child
    return None


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _sysctl_degraded(pool_body: Mapping[str, Any]) -> bool:
    for condition in (pool_body.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Degraded":
            return bool(condition.get("status") == "True" and condition.get("reason") == "SysctlForbidden")
    return False


def build_registry(options: OperatorOptions, reconciler: Reconciler) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    pools = (GROUP, VERSION, PLURAL)
    managed = {builders.MANAGED_BY_LABEL: builders.MANAGED_BY}

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        # The same credentials as the operator's own client: in-cluster service account, else
        # the kubeconfig (what kopf's default login does, but reading $KUBECONFIG at call time).
        return load_connection().to_kopf()

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings, options)

    @kopf.index(*pools, registry=registry, id=POOL_INDEX)
    async def pool_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        return {(str(namespace), name): _snapshot(body)}

    # Coroutines, not functions: kopf runs a sync handler in a thread pool, a cost per event.
    async def child_index(
        namespace: str | None, labels: Mapping[str, str], body: kopf.Body, resource: kopf.Resource, **_: Any
    ) -> dict[tuple[str, str], Any] | None:
        pool = labels.get(builders.POOL_LABEL)
        if not pool or namespace is None:
            return None
        if resource.plural == "pods":
            # What the status reads of a pod (sysctl rejection, readiness, revision) and what the
            # drain reader (drain.py) needs (the deletion mark, the admin port); the rest of a
            # pod's spec would only cost memory, one copy per pod.
            meta = body.get("metadata") or {}
            spec = {"containers": [{"ports": c.get("ports") or []} for c in (body.get("spec") or {}).get("containers") or []]}
            pod = {"metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels", "deletionTimestamp") if k in meta},
                   "spec": spec, "status": body.get("status") or {}}  # fmt: skip
            return {(namespace, pool): {"apiVersion": "v1", "kind": "Pod", **pod}}
        snapshot = _snapshot(body)
        # Watch events carry them, but an index entry must never lack them.
        snapshot["apiVersion"] = f"{resource.group}/{resource.version}" if resource.group else resource.version
        snapshot["kind"] = KIND_OF_PLURAL[resource.plural]
        return {(namespace, pool): snapshot}

    for group, version, plural in CHILD_RESOURCES:
        kopf.index(group, version, plural, labels=managed, registry=registry, id=CHILD_INDEX[plural])(child_index)
    kopf.index("", "v1", "pods", labels=managed, registry=registry, id=POD_INDEX)(child_index)

    async def reconcile_or_fail(body: kopf.Body, logger: kopf.Logger, kwargs: Mapping[str, Any]) -> None:
        outcome = await reconciler.reconcile(body, logger, cache=IndexCache(kwargs))
        if outcome.spec_error is not None:
            # Degraded=True and an Event are written; retrying cannot help until the spec changes.
            raise kopf.PermanentError(outcome.spec_error)

    @kopf.on.create(*pools, registry=registry, id="reconcile")
    async def pool_created(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        await reconcile_or_fail(body, logger, kwargs)

    @kopf.on.update(*pools, registry=registry, id="reconcile")
    async def pool_updated(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        await reconcile_or_fail(body, logger, kwargs)

    @kopf.on.resume(*pools, registry=registry, id="reconcile")
    async def pool_resumed(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        await reconcile_or_fail(body, logger, kwargs)

    @kopf.on.delete(*pools, registry=registry, id="node-cleanup")
    async def pool_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # The pool's finalizer holds the deletion until its directors' and on-path MCPs' nodes
        # are clean (the garbage collector would delete the DaemonSets and leave the nodes'
        # kernel objects).
        pending = await reconciler.node_cleanup(body, logger)
        if pending is not None:
            raise kopf.TemporaryError(pending, delay=2)

    @kopf.timer(
        *pools,
        interval=options.resync_interval_s,
        initial_delay=options.resync_interval_s,
        registry=registry,
        id="resync",
    )
    async def pool_resync(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        # Never raises for a bad spec: the status already says so, and a timer must keep going.
        await reconciler.reconcile(body, logger, cache=IndexCache(kwargs))

    def pool_of(pool_index: kopf.Index[Any, Any], namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any] | None:
        name = labels.get(builders.POOL_LABEL)
        if not name or namespace is None:
            return None
        store = pool_index.get((namespace, name))
        for pool_body in store or ():
            if not (pool_body.get("metadata") or {}).get("deletionTimestamp"):
                result: dict[str, Any] = pool_body
                return result
        return None

    async def child_changed(
        type: str,
        body: kopf.Body,
        namespace: str | None,
        name: str,
        labels: Mapping[str, str],
        resource: kopf.Resource,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        pool_body = pool_of(kwargs[POOL_INDEX], namespace, labels)
        if pool_body is None:
            return
        kind = KIND_OF_PLURAL[resource.plural]
        deleted = type == "DELETED"
        desired = _desired_child(reconciler, pool_body, kind, name)
        drifted = desired is None or not is_subset(desired, dict(body))
        # A StatefulSet's status carries the ready count the pool's status reports; a
        # reconcile that finds the children as applied writes at most the status.
        if deleted or drifted or kind == "StatefulSet":
            await reconciler.reconcile(pool_body, logger, cache=IndexCache(kwargs), coalesce=True)

    for group, version, plural in CHILD_RESOURCES:
        kopf.on.event(group, version, plural, labels=managed, registry=registry, id=f"child-{plural}")(
            child_changed
        )

    @kopf.on.event("", "v1", "pods", labels=managed, registry=registry, id="pods")
    async def pod_changed(
        type: str,
        body: kopf.Body,
        namespace: str | None,
        labels: Mapping[str, str],
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        rejected = (body.get("status") or {}).get("reason") == "SysctlForbidden"
        ready = _is_ready(body)
        # A deleted pod drains first: its progress goes into status.draining (the reconcile
        # then re-reads it every few seconds until the pod is gone).
        terminating = bool((body.get("metadata") or {}).get("deletionTimestamp"))
        if not (rejected or ready or terminating or type == "DELETED"):
            return
        pool_body = pool_of(kwargs[POOL_INDEX], namespace, labels)
        if pool_body is None:
            return
        # A Ready pod matters only to a pool degraded by rejected pods (the StatefulSet's own
        # status change reconciles the rest); skipping the others keeps pod churn cheap.
        if ready and not (rejected or terminating or type == "DELETED") and not _sysctl_degraded(pool_body):
            return
        await reconciler.reconcile(pool_body, logger, cache=IndexCache(kwargs), coalesce=True)

    def deleted(type: str, **_: Any) -> bool:
        return type == "DELETED"

    # `when`: kopf tests a filter for a fraction of what invoking a handler costs, and a pool has
    # several events (creation, finalizer, status, kopf's annotations) before its deletion.
    @kopf.on.event(*pools, registry=registry, id="forget", when=deleted)
    async def pool_gone(namespace: str | None, name: str, **_: Any) -> None:
        reconciler.forget(str(namespace), name)

    return registry
