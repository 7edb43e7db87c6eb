"""The one idempotent reconcile of an MCPPool: make the cluster match the builders' output.

Called from kopf's create/update/resume handlers, a slow timer, and the watches on the pool's
children and pods. Each call: builds the desired children (pure, memoised per pool spec),
server-side applies those that drifted (field manager `mcpool-operator`, forced), deletes
children the spec no longer asks for, and writes `.status` only when it differs from the live
one. An invalid spec becomes a `Degraded=True` condition and an Event, never an exception loop.

Reads come from a `ClusterCache` (kopf indexes fed by the operator's watches, see handlers.py),
not from the API: a reconcile of a pool whose children are as applied makes no request at all,
so a StatefulSet status change costs a comparison, not seven reads and six applies. Reconciles
triggered by watch events are coalesced: while one waits for the pool's lock, later events of
the same pool join it instead of queueing another (it reads the cache when it starts, so it sees
them). Without a cache (`cache=None`) every read goes to the API, as before.

Why apply, and never POST: an apply is the only write whose field ownership lets the API server
*remove* what the operator stopped setting (a dropped nodeSelector, the director's capabilities
after a mechanism switch); fields of an object created by POST belong to an "Update" manager and
an apply never prunes them. When to skip it: a child is applied again unless this process
applied the same body before *and* the cached object is unchanged since (same generation and
metadata for kinds whose status a controller writes, same resourceVersion otherwise) or still
holds every value the operator sets. A change of the desired body always applies (that is what
prunes dropped fields); the first reconcile after a start applies everything once. Only the API
server can tell whether its normalised form ("1" vs 1, 1Gi vs 1024Mi) differs from ours, so a
child that fails the client-side check is applied; a no-op apply does not change
`resourceVersion`, which is what decides whether an "Updated" Event is posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import kopf
from opentelemetry import trace

from . import builders
from .drain import DRAIN_POLL_S, drain_progress
from .kube import PLURALS, ApiError, KubeClient, ObjectRef, ref_of
from .metrics import OperatorMetrics
from .spec import GROUP, KIND, VERSION, MCPPoolSpec, Pool, SpecError
from .status import Observation, build_status, find_condition, revision_ready, sysctl_failure

__all__ = [
    "FIELD_MANAGER",
    "ClusterCache",
    "EventPoster",
    "Outcome",
    "Reconciler",
    "as_body",
    "is_subset",
    "kopf_event",
    "upgrade_managed_fields",
]

FIELD_MANAGER = "mcpool-operator"
POOL_API_VERSION = f"{GROUP}/{VERSION}"
# Kinds whose set of objects varies with the spec (join Services, director objects): the only
# ones that may need pruning.
PRUNABLE = (("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "DaemonSet"))

# Kinds whose status a controller writes (bumping resourceVersion, not generation): their
# "unchanged since our apply" test uses generation and metadata instead of resourceVersion.
STATUS_WRITTEN_KINDS = frozenset({"StatefulSet", "DaemonSet", "PodDisruptionBudget"})
# How many memoised desired-children lists are kept (one per pool spec in use).
DESIRED_MEMO_SIZE = 4096
# The pool's host-network DaemonSets that leave kernel objects on their nodes.
NodeKind = Literal["director", "onpath"]
NODE_KINDS: tuple[NodeKind, ...] = ("director", "onpath")

# (body, event type "Normal"/"Warning", reason, message)
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]

_tracer = trace.get_tracer("mcpool_operator")


def as_body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's read-only view of a plain dict (what kopf.adopt and kopf.event expect)."""
    return kopf.Body(cast(kopf.RawBody, dict(obj)))


def kopf_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event about the pool through kopf's event queue."""
    kopf.event(as_body(body), type=type_, reason=reason, message=message)


def is_subset(desired: Any, live: Any) -> bool:
    """True if every value the operator sets is in the live object (the server may add more).

    Only a cheap filter for child watch events (is this event worth a reconcile?): never a
    reason to skip an apply, since it cannot see fields the operator stopped setting nor
    values the server normalised."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(key in live and is_subset(value, live[key]) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, v) for d, v in zip(desired, live, strict=True))
    return bool(desired == live)


class ClusterCache(Protocol):
    """What a reconcile reads instead of the API: objects as the operator's watches last saw them."""

    def children(self, namespace: str, pool: str) -> Sequence[Mapping[str, Any]]:
        """Every managed child labelled for the pool (any kind; `apiVersion` and `kind` set)."""
        ...

    def pods(self, namespace: str, pool: str) -> Sequence[Mapping[str, Any]]:
        """The managed pods labelled for the pool."""
        ...

    def pool(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The MCPPool as last seen (None if not seen)."""
        ...


@dataclass
class _Applied:
    """What this process last applied for one child and how the object looked afterwards."""

    digest: str
    fingerprint: tuple[Any, ...]
    resource_version: str | None


@dataclass
class Outcome:
    """What one reconcile did (for logs, tests and the benchmark)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    spec_error: str | None = None
    apply_error: str | None = None  # a child object the API refused (the first such error)
    status_written: bool = False
    # Why the node cleanup of a pool that left mechanism 'director' or turned onPath off is not
    # finished (None: done).
    cleanup_pending: str | None = None
    # Children left alone because they are as last applied (no request made for them).
    unchanged: list[str] = field(default_factory=list)
    # This call joined a reconcile of the same pool already waiting to start (nothing done here).
    coalesced: bool = False
    # The terminating pods and their live connections (what `status.draining` says).
    draining: list[dict[str, Any]] = field(default_factory=list)


class Reconciler:
    """Holds the API client, the operator-wide build options and one lock per pool (reconciles
    of a pool never overlap)."""

    def __init__(
        self,
        client: KubeClient,
        post_event: EventPoster = kopf_event,
        *,
        director_image: str | None = None,
        allowed_images: Sequence[str] = (),
        metrics: OperatorMetrics | None = None,
        max_concurrent: int = 0,
        drain_poll_s: float = DRAIN_POLL_S,
    ) -> None:
        self.client = client
        # While a pod of a pool drains, the pool is reconciled again this often (nothing else
        # changes on the API server while a pod's connections end, so no watch event would come).
        self.drain_poll_s = drain_poll_s
        self._rechecks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # `--allowed-images`: repositories spec.image may name (empty: any). The pods run with
        # NET_ADMIN, so whoever may create a pool must not be able to pick their code.
        self.allowed_images = tuple(allowed_images)
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self.post_event = post_event
        # `--director-image`: the image the director DaemonSet runs whatever spec.image says
        # (the director runs as uid 0 with NET_ADMIN on the host network; see docs/operator.md).
        self.director_image = director_image
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # At most this many pools reconcile at once; the others wait their turn in arrival order.
        # In a burst, all pools interleaved finish together at the end; taken a few at a time, the
        # first ones are done early and the median halves, for the same total work.
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent > 0 else None
        # Pools with a coalesced reconcile waiting for the lock -> the newest body it was given.
        self._queued: dict[tuple[str, str], Mapping[str, Any]] = {}
        # Per child: what was last applied and the object that came back.
        self._applied: dict[ObjectRef, _Applied] = {}
        # Per pool: the status this process last wrote, and the resourceVersion of the pool that
        # write was built on (the pool as it was just before the write).
        self._written_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._status_base: dict[tuple[str, str], str | None] = {}
        # Memo of adopted desired children per (pool identity, spec, labels).
        self._desired: dict[str, list[tuple[dict[str, Any], str]]] = {}
        # Reconcile passes per pool: started and finished (tests wait on these).
        self.started: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str], int] = {}

    def desired_children(self, pool: Pool) -> list[dict[str, Any]]:
        """Every child object of the pool as the operator wants it (before adoption)."""
        return builders.build_children(pool, director_image=self.director_image)

    def adopted_children(self, body: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
        """The pool's desired children adopted by `body`, each with the digest of its apply body.

        Memoised on what the result depends on (identity, generation, spec, labels): watch
        events of children ask for it on every event. Raises SpecError/ValueError like
        Pool.from_body. The objects are shared: callers must not modify them."""
        meta = body.get("metadata") or {}
        memo_key = json.dumps(
            [meta.get("namespace"), meta.get("name"), meta.get("uid"), meta.get("generation"),
             meta.get("labels"), body.get("spec")],
            sort_keys=True, default=str,
        )  # fmt: skip
        cached = self._desired.get(memo_key)
        if cached is not None:
            return cached
        pool = Pool.from_body(body)
        result = []
        for obj in self.desired_children(pool):
            kopf.adopt(obj, owner=as_body(body))
            result.append((obj, _digest(_apply_body(obj))))
        if len(self._desired) >= DESIRED_MEMO_SIZE:
            self._desired.pop(next(iter(self._desired)))
        self._desired[memo_key] = result
        return result

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept per pool; called when the pool is gone."""
        key = (namespace, name)
        self._locks.pop(key, None)
        self._written_status.pop(key, None)
        self._status_base.pop(key, None)
        self.started.pop(key, None)
        self.finished.pop(key, None)
        for ref in [r for r in self._applied if r.namespace == namespace]:
            # Children are named after the pool; a name prefix is enough to find them.
            if ref.name is not None and (ref.name == name or ref.name.startswith(f"{name}-")):
                del self._applied[ref]
        self.metrics.forget(key)
        recheck = self._rechecks.pop(key, None)
        if recheck is not None:
            recheck.cancel()

    async def close(self) -> None:
        """Cancel the pending drain rechecks (at operator exit)."""
        tasks = list(self._rechecks.values())
        self._rechecks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _recheck_later(self, key: tuple[str, str], logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        pending = self._rechecks.get(key)
        if pending is not None and not pending.done():
            return
        self._rechecks[key] = asyncio.get_running_loop().create_task(self._recheck(key, logger))

    async def _recheck(self, key: tuple[str, str], logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        await asyncio.sleep(self.drain_poll_s)
        if self._rechecks.get(key) is asyncio.current_task():
            del self._rechecks[key]  # the reconcile below may schedule the next one
        try:
            # The pool as it is now: a body kept from before the sleep may carry an old spec.
            body = await self.client.get(ObjectRef(POOL_API_VERSION, KIND, key[0], key[1]))
            if body is not None and not (body.get("metadata") or {}).get("deletionTimestamp"):
                await self.reconcile(body, logger)
        except Exception as exc:  # noqa: BLE001 - the timer or the next pod event retries
            logger.warning("drain progress recheck of %s/%s failed: %s", key[0], key[1], exc)

    async def reconcile(
        self,
        body: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
        *,
        cache: ClusterCache | None = None,
        coalesce: bool = False,
    ) -> Outcome:
        """Reconcile the pool of `body`. With `coalesce` (watch events of children and pods), a
        call made while another coalesced one waits for the pool's lock returns at once: the
        waiting one reads the cache (and the newest pool body) when it starts."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        lock = self._locks.setdefault(key, asyncio.Lock())
        if coalesce:
            if key in self._queued:
                self._queued[key] = body
                return Outcome(coalesced=True)
            self._queued[key] = body
        async with lock, (self._slots or contextlib.nullcontext()):
            if coalesce:
                body = self._queued.pop(key, body)
                fresher = cache.pool(*key) if cache is not None else None
                if fresher is not None and not (fresher.get("metadata") or {}).get("deletionTimestamp"):
                    body = fresher
                meta = body.get("metadata") or {}
            self.started[key] = self.started.get(key, 0) + 1
            started = time.monotonic()
            result = "exception"
            try:
                outcome = await self._traced_reconcile(key, meta, body, logger, cache)
                result = "invalid_spec" if outcome.spec_error else "apply_error" if outcome.apply_error else "ok"
                return outcome
            finally:
                self.finished[key] = self.finished.get(key, 0) + 1
                self.metrics.duration.observe(time.monotonic() - started)
                self.metrics.reconciles.labels(result).inc()
                if result != "ok":
                    self.metrics.errors.labels(result).inc()

    async def _traced_reconcile(
        self,
        key: tuple[str, str],
        meta: Mapping[str, Any],
        body: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cache: ClusterCache | None,
    ) -> Outcome:
        with _tracer.start_as_current_span(
            "mcpool.reconcile",
            attributes={
                "k8s.namespace.name": key[0],
                "mcpool.pool": key[1],
                "mcpool.generation": int(meta.get("generation") or 0),
            },
        ) as span:
            outcome = Outcome()
            try:
                await self._reconcile(body, logger, cache, outcome)
            finally:
                # Also when a later apply or the status write failed: those objects exist.
                self._report_created(body, outcome, logger)
            span.set_attribute("mcpool.created", len(outcome.created))
            span.set_attribute("mcpool.updated", len(outcome.updated))
            span.set_attribute("mcpool.deleted", len(outcome.deleted))
            if outcome.spec_error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.spec_error))
            return outcome

    def _report_created(
        self, body: Mapping[str, Any], outcome: Outcome, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        """One log line and one `Created` Event for every child this reconcile created: a new pool
        creates six or more at once, and an Event is an API request like the applies."""
        if not outcome.created:
            return
        logger.info("created %s", ", ".join(outcome.created))
        # "Kind ns/name" -> "Kind name": the Event is about the pool, in the same namespace.
        names = [f"{kind} {name.rpartition('/')[2]}" for kind, _, name in (c.partition(" ") for c in outcome.created)]
        self.post_event(body, "Normal", "Created", f"created {', '.join(names)}")

    async def _reconcile(
        self,
        body: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cache: ClusterCache | None,
        outcome: Outcome,
    ) -> Outcome:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return outcome  # owner references let the garbage collector remove the children
        generation = int(meta.get("generation") or 0)
        try:
            pool = Pool.from_body(body)
            desired = self.adopted_children(body)
        except (SpecError, ValueError) as exc:
            outcome.spec_error = str(exc)
            await self._write_invalid(body, generation, outcome, logger, cache=cache)
            return outcome
        refused_image = image_refusal(pool.spec.image, self.allowed_images)
        if refused_image is not None:
            # Nothing is created or updated: the children keep their last allowed image.
            outcome.spec_error = refused_image
            await self._write_invalid(body, generation, outcome, logger, reason=IMAGE_NOT_ALLOWED, cache=cache)
            return outcome

        cached = None if cache is None else _by_ref(cache.children(pool.namespace, pool.name))
        apply_error: str | None = None
        statefulset: Mapping[str, Any] | None = None
        for obj, digest in desired:
            try:
                live = await self._apply(obj, digest, body, outcome, logger, cached)
            except ApiError as exc:
                apply_error = f"{ref_of(obj)}: {exc}"
                logger.error("cannot apply %s: %s", ref_of(obj), exc)
                outcome.apply_error = outcome.apply_error or apply_error
                continue
            if obj["kind"] == "StatefulSet":
                statefulset = live
        wanted = {ref_of(obj) for obj, _ in desired}
        unwanted = self._unwanted_node_kinds(pool)
        if unwanted:
            # A node component's ConfigMap and its cleanup DaemonSet belong to the node cleanup
            # until it has finished (the cleanup pods mount that ConfigMap).
            outcome.cleanup_pending = await self._node_cleanup(body, logger, kinds=unwanted, pool=pool, cached=cached)
            for kind in unwanted:
                config_ref, _, cleanup_ref = self._node_refs(pool, kind)
                wanted |= {config_ref, cleanup_ref}
        await self._prune(pool, wanted, body, outcome, logger, cached)

        selector = builders.status_selector(pool)
        if cache is None:
            pods: Sequence[Mapping[str, Any]] = await self.client.list("v1", "Pod", pool.namespace, selector)
        else:
            pods = [p for p in cache.pods(pool.namespace, pool.name) if _matches_selector(p, selector)]
        outcome.draining = await drain_progress(pods)
        seen = Observation(
            generation=generation,
            desired_replicas=pool.spec.replicas,
            selector=selector,
            statefulset=statefulset,
            sysctl_error=sysctl_failure(pods),
            apply_error=apply_error,
            revision_ready=revision_ready(pods, statefulset),
            cluster_defaulted=tuple(pool.spec.cluster.defaulted()),
            draining=tuple(outcome.draining),
        )
        await self._write_status(body, seen, outcome, logger, cache=cache)
        if outcome.draining:
            self._recheck_later((pool.namespace, pool.name), logger)
        return outcome

    # -- node cleanup: nothing of a pool left on the director or on-path nodes ---------------------
    # The director (issue 10) and the on-path MCPs (issue 9) run with host networking and leave
    # kernel objects on their nodes when they are killed; each has its own cleanup DaemonSet.

    @staticmethod
    def _node_refs(pool: Pool, kind: NodeKind) -> tuple[ObjectRef, ObjectRef, ObjectRef]:
        """(its ConfigMap, its DaemonSet, its cleanup DaemonSet) of node component `kind`."""
        if kind == "director":
            name, cleanup = builders.director_name(pool), builders.director_cleanup_name(pool)
        else:
            name, cleanup = builders.onpath_name(pool), builders.onpath_cleanup_name(pool)
        return (ObjectRef("v1", "ConfigMap", pool.namespace, name), ObjectRef("apps/v1", "DaemonSet", pool.namespace, name),
                ObjectRef("apps/v1", "DaemonSet", pool.namespace, cleanup))  # fmt: skip

    def _cleanup_daemonset(self, pool: Pool, kind: NodeKind) -> dict[str, Any]:
        if kind == "director":
            return builders.build_director_cleanup_daemonset(pool, image=self.director_image)
        return builders.build_onpath_cleanup_daemonset(pool)

    @staticmethod
    def _unwanted_node_kinds(pool: Pool) -> tuple[NodeKind, ...]:
        kinds: list[NodeKind] = []
        if pool.spec.affinity.mechanism != "director":
            kinds.append("director")
        if not pool.spec.on_path.enabled:
            kinds.append("onpath")
        return tuple(kinds)

    async def node_cleanup(
        self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> str | None:
        """`_node_cleanup` of every node component, for a deleted pool, under the pool's lock (no
        reconcile in between). Reads the API (a deletion is rare, and must not act on a lagging
        cache)."""
        meta = body.get("metadata") or {}
        lock = self._locks.setdefault((str(meta.get("namespace")), str(meta.get("name"))), asyncio.Lock())
        async with lock:
            return await self._node_cleanup(body, logger, kinds=NODE_KINDS)

    async def _node_cleanup(
        self,
        body: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
        *,
        kinds: Sequence[NodeKind],
        pool: Pool | None = None,
        cached: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
    ) -> str | None:
        """Remove what the pool's directors or on-path MCPs left on their nodes (nft tables, ip
        rules and routes, tunnels, path-manager endpoints) after the pool was deleted or stopped
        using them: stop the DaemonSet, run its component's `--cleanup-only` on the same nodes
        (a cleanup DaemonSet with the component's own ConfigMap), and when every node has run it,
        delete both. Returns why it is not finished, or None (done, or nothing to clean)."""
        if pool is None:
            meta = body.get("metadata") or {}
            try:
                pool = Pool.from_body(body)
            except (SpecError, ValueError):
                # Placement and image of a spec that no longer parses: the defaults.
                pool = Pool(name=str(meta.get("name")), namespace=str(meta.get("namespace")),
                            spec=MCPPoolSpec(), uid=str(meta.get("uid") or ""))  # fmt: skip
        pending = [why for kind in kinds if (why := await self._clean_nodes(body, logger, pool, kind, cached)) is not None]
        return "; ".join(pending) or None

    async def _clean_nodes(
        self,
        body: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
        pool: Pool,
        kind: NodeKind,
        cached: Mapping[ObjectRef, Mapping[str, Any]] | None,
    ) -> str | None:
        config_ref, workload_ref, cleanup_ref = self._node_refs(pool, kind)
        what = "directors'" if kind == "director" else "on-path MCPs'"
        if cached is not None and config_ref not in cached:
            # The common case (a pool that never had this component) costs no request. A cached
            # cleanup DaemonSet without its ConfigMap is a leftover: delete it.
            if cleanup_ref in cached and await self.client.delete(cleanup_ref):
                logger.info("deleted %s", cleanup_ref)
            return None
        # A node cleanup is under way (rare): it reads the API, not the cache.
        if await self.client.get(config_ref) is None:
            # Nothing to clean, or cleaned already (a leftover cleanup DaemonSet cannot work).
            if await self.client.delete(cleanup_ref):
                logger.info("deleted %s", cleanup_ref)
            return None
        if await self.client.delete(workload_ref):
            logger.info("deleted %s: its nodes are cleaned up next", workload_ref)
        cleanup = self._cleanup_daemonset(pool, kind)
        kopf.adopt(cleanup, owner=as_body(body))
        live = await self.client.get(cleanup_ref)
        if live is None:
            live = await self.client.apply(cleanup_ref, _apply_body(cleanup), FIELD_MANAGER)
            logger.info("created %s", cleanup_ref)
            self.post_event(body, "Normal", "NodeCleanup",
                            f"removing the {what} kernel objects from their nodes ({cleanup_ref.name})")  # fmt: skip
        status = live.get("status") or {}
        generation = int((live.get("metadata") or {}).get("generation") or 0)
        desired = status.get("desiredNumberScheduled")
        ready = int(status.get("numberReady") or 0)
        if desired is None or int(status.get("observedGeneration") or 0) < generation or ready < int(desired):
            nodes = "director" if kind == "director" else "on-path"
            return f"node cleanup: {ready} of {desired if desired is not None else '?'} {nodes} nodes clean"
        for ref in (cleanup_ref, config_ref):
            await self.client.delete(ref)
        logger.info("node cleanup done on %s nodes (%s)", desired, kind)
        self.post_event(body, "Normal", "NodeCleanupDone", f"the {what} nodes are clean ({desired} nodes)")
        return None

    async def _apply(
        self,
        obj: dict[str, Any],
        digest: str,
        owner: Mapping[str, Any],
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cached: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        ref = ref_of(obj)
        remembered = self._applied.get(ref)
        live: dict[str, Any] | None
        if cached is None:
            live = await self.client.get(ref)
        else:
            hit = cached.get(ref)
            live = None if hit is None else dict(hit)
            if live is not None and remembered is not None and remembered.digest == digest:
                fingerprint = _fingerprint(live)
                if fingerprint == remembered.fingerprint or is_subset(obj, live):
                    # As last applied: no request. (A lagging cache shows an older version
                    # that still holds our values; the next event brings the newer one.)
                    remembered.fingerprint = fingerprint
                    outcome.unchanged.append(str(ref))
                    return live
            if live is None and remembered is None:
                # Never applied by this process and not in the cache (not created yet, or not
                # labelled as ours): ask the API, so that an object of somebody else's is never
                # taken over by a forced apply.
                live = await self.client.get(ref)
        if live is not None:
            owner_uid = (owner.get("metadata") or {}).get("uid")
            for reference in (live.get("metadata") or {}).get("ownerReferences") or []:
                if reference.get("controller") and reference.get("uid") != owner_uid:
                    raise ApiError(
                        409, "Conflict", f"{ref} is controlled by {reference.get('kind')} {reference.get('name')}"
                    )
            live = await self._upgrade_ownership(ref, live, logger)
        # Creates a missing object too (the API server authorises that as "create").
        applied, created = await self.client.apply_created(ref, _apply_body(obj), FIELD_MANAGER)
        applied_version = _resource_version(applied)
        known = {_resource_version(live) if live is not None else None,
                 remembered.resource_version if remembered is not None else None}  # fmt: skip
        self._applied[ref] = _Applied(digest, _fingerprint(applied), applied_version)
        if created:
            # Logged and posted as one line and one Event per reconcile (see _report_created).
            outcome.created.append(str(ref))
        elif applied_version not in known:
            outcome.updated.append(str(ref))
            logger.info("restored %s to the spec", ref)
            self.post_event(owner, "Normal", "Updated", f"updated {ref.kind} {ref.name} to match the spec")
        return applied

    async def _upgrade_ownership(
        self, ref: ObjectRef, live: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> dict[str, Any]:
        """Hand fields the operator once set by POST/merge-patch to its apply identity, so that
        applies can prune them (children created by operator versions before 0.2)."""
        meta = live.get("metadata") or {}
        upgraded = upgrade_managed_fields(meta.get("managedFields") or [], FIELD_MANAGER)
        if upgraded is None:
            return live
        # resourceVersion makes the merge patch conditional: a concurrent writer wins, and the
        # next reconcile tries again.
        patch = {"metadata": {"managedFields": upgraded, "resourceVersion": meta.get("resourceVersion")}}
        try:
            result = await self.client.patch(ref, patch)
        except ApiError as exc:
            if exc.status != 409:
                raise
            logger.info("%s changed while taking over its fields; retrying on the next reconcile", ref)
            return live
        logger.info("took over the fields of %s for server-side apply", ref)
        return result

    async def _prune(
        self,
        pool: Pool,
        wanted: set[ObjectRef],
        owner: Mapping[str, Any],
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cached: Mapping[ObjectRef, Mapping[str, Any]] | None = None,
    ) -> None:
        selector = f"{builders.POOL_LABEL}={pool.name},{builders.MANAGED_BY_LABEL}={builders.MANAGED_BY}"
        candidates: list[tuple[ObjectRef, Mapping[str, Any]]] = []
        for api_version, kind in PRUNABLE:
            if cached is not None:
                candidates += [(r, o) for r, o in cached.items() if (r.api_version, r.kind) == (api_version, kind)]
                continue
            for listed in await self.client.list(api_version, kind, pool.namespace, selector):
                candidates.append((ref_of({**listed, "apiVersion": api_version, "kind": kind}), listed))
        for ref, child in candidates:
            if ref in wanted or not _owned_by(child, pool.uid):
                continue
            self._applied.pop(ref, None)
            if await self.client.delete(ref):
                outcome.deleted.append(str(ref))
                logger.info("deleted %s (no longer in the spec)", ref)
                self.post_event(owner, "Normal", "Deleted", f"deleted {ref.kind} {ref.name} (no longer in the spec)")

    async def _write_invalid(
        self,
        body: Mapping[str, Any],
        generation: int,
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        reason: str = "InvalidSpec",
        cache: ClusterCache | None = None,
    ) -> None:
        assert outcome.spec_error is not None
        meta = body.get("metadata") or {}
        selector = builders.status_selector(
            Pool(name=str(meta.get("name")), namespace=str(meta.get("namespace")), spec=MCPPoolSpec())
        )
        seen = Observation(generation=generation, desired_replicas=0, selector=selector,
                           spec_error=outcome.spec_error, spec_error_reason=reason)  # fmt: skip
        logger.error("invalid spec: %s", outcome.spec_error)
        previous = await self._write_status(body, seen, outcome, logger, cache=cache)
        if previous is None:
            return  # the pool is gone
        before = find_condition(previous.get("conditions") or [], "Degraded")
        already_reported = (
            before is not None
            and before.get("reason") == reason
            and before.get("observedGeneration") == generation
        )
        if not already_reported:
            self.post_event(body, "Warning", reason, outcome.spec_error)

    async def _write_status(
        self,
        body: Mapping[str, Any],
        seen: Observation,
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cache: ClusterCache | None = None,
    ) -> dict[str, Any] | None:
        """Write the status built from `seen` if it differs from the live one; return the live
        status it was compared with (None if the pool no longer exists)."""
        ref = ref_of({**body, "apiVersion": POOL_API_VERSION, "kind": KIND})
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        # The live object, not `body`: a watch event may lag behind the last write, and a status
        # cleared or edited by somebody else must be rewritten. The cached pool is live enough
        # when its status is the one this process last wrote (or it wrote none yet); otherwise
        # the cache lags behind a write, or somebody else wrote: ask the API. A cached pool still
        # at the version the last write was built on only lags behind that write: its status is
        # the one written (what a read would answer, unless somebody wrote since; their write's
        # watch event is on its way).
        live: Mapping[str, Any] | None = None
        if cache is not None:
            seen_pool = cache.pool(*key)
            written = self._written_status.get(key)
            if seen_pool is not None and (written is None or _same_status(seen_pool.get("status") or {}, written)):
                live = seen_pool
            elif (
                seen_pool is not None
                and written is not None
                and self._status_base.get(key) is not None
                and _resource_version(seen_pool) == self._status_base.get(key)
            ):
                live = {**seen_pool, "status": written}
        if live is None:
            live = await self.client.get(ref)
        if live is None:
            return None
        previous: dict[str, Any] = dict(live.get("status") or {})
        new = build_status(previous, seen)
        self.metrics.pool_conditions(key, new["conditions"])
        if _same_status(previous, new):
            # (The base stays: a pool at that version is still older than the status known now.)
            self._written_status[key] = previous
            return previous
        result = await self.client.patch(ref, {"status": new}, subresource="status")
        self._written_status[key] = dict(result.get("status") or new)
        self._status_base[key] = _resource_version(live)
        outcome.status_written = True
        for type_ in ("Ready", "Degraded"):
            old_c = find_condition(previous.get("conditions") or [], type_)
            new_c = find_condition(new["conditions"], type_)
            if new_c is not None and (old_c is None or old_c.get("status") != new_c.get("status")):
                logger.info("condition %s=%s (%s): %s", type_, new_c["status"], new_c["reason"], new_c["message"])
                if type_ == "Degraded" and new_c["status"] == "True" and new_c["reason"] != seen.spec_error_reason:
                    self.post_event(body, "Warning", str(new_c["reason"]), str(new_c["message"]))
        old_r = find_condition(previous.get("conditions") or [], "ClusterRanges")
        new_r = find_condition(new["conditions"], "ClusterRanges")
        if new_r is not None and new_r["status"] == "False" and (old_r is None or old_r.get("status") != "False"):
            self.post_event(body, "Warning", "ClusterRangesDefaulted", str(new_r["message"]))
        return previous


IMAGE_NOT_ALLOWED = "ImageNotAllowed"


def image_repository(image: str) -> str:
    """The repository of an image reference: without its digest ('@sha256:...') and its tag (a
    ':' after the last '/'; a ':' before it is a registry port)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_refusal(image: str, allowed: Sequence[str]) -> str | None:
    """Why `image` is outside `allowed` (`--allowed-images`), or None if it may run.

    An entry names a repository exactly ('ghcr.io/mptcp-dev/mcpool'), or, ending in '/', every
    repository under that prefix ('registry.example.net/mcpool/'). No entries: any image.
    """
    if not allowed:
        return None
    repository = image_repository(image)
    for entry in allowed:
        if repository == entry or (entry.endswith("/") and repository.startswith(entry)):
            return None
    return (
        f"spec.image {image!r}: repository {repository!r} is not in the operator's --allowed-images "
        f"({', '.join(allowed)}); no child object is created or updated until it is"
    )


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs: Sequence[Mapping[str, Any]] = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _apply_body(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator sets on an object: everything it built, nothing the server added.

    Shares everything below the top level with `obj` (no deep copy: this is on every apply and
    digest): the result is only serialised, never modified."""
    body = dict(obj)
    meta = body.get("metadata", {})
    body["metadata"] = {
        k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations", "ownerReferences")
    }
    return body


def _digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What changes when anybody but a controller's status write changes the object."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") in STATUS_WRITTEN_KINDS and meta.get("generation") is not None:
        # The API server bumps generation on every spec change; metadata edits do not bump it.
        shown = {k: meta.get(k) for k in ("labels", "annotations", "ownerReferences")}
        return ("generation", meta.get("generation"), json.dumps(shown, sort_keys=True, default=str))
    return ("resourceVersion", meta.get("resourceVersion"))


def _by_ref(objects: Sequence[Mapping[str, Any]]) -> dict[ObjectRef, Mapping[str, Any]]:
    result: dict[ObjectRef, Mapping[str, Any]] = {}
    for obj in objects:
        if obj.get("apiVersion") and obj.get("kind") and obj["kind"] in PLURALS:
            result[ref_of(obj)] = obj
    return result


def _matches_selector(obj: Mapping[str, Any], selector: str) -> bool:
    """Equality-based label selector ("a=b,c=d"), what status_selector() writes."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return None if value is None else str(value)


def _merge_fieldsets(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Union of two managedFields `fieldsV1` tries."""
    merged = dict(a)
    for key, value in b.items():
        if isinstance(merged.get(key), Mapping) and isinstance(value, Mapping):
            merged[key] = _merge_fieldsets(merged[key], value)
        else:
            merged[key] = value
    return merged


def upgrade_managed_fields(entries: Sequence[Mapping[str, Any]], manager: str) -> list[dict[str, Any]] | None:
    """`entries` with `manager`'s "Update" ownership of the main resource merged into its
    "Apply" entry (what client-go's csaupgrade does), or None if it owns nothing by Update.

    The API server names the manager of a POST or PATCH without `fieldManager` after the
    User-Agent ("mcpool-operator/0.1" -> "mcpool-operator"), so children created by older
    versions of the operator are owned by ("mcpool-operator", "Update"); without this upgrade an
    apply would never remove the fields that ownership covers.
    """
    def is_ours(entry: Mapping[str, Any], operation: str) -> bool:
        return entry.get("manager") == manager and entry.get("operation") == operation and not entry.get("subresource")

    updates = [e for e in entries if is_ours(e, "Update")]
    if not updates:
        return None
    applies = [e for e in entries if is_ours(e, "Apply")]
    fields: dict[str, Any] = {}
    for entry in applies + updates:
        fields = _merge_fieldsets(fields, entry.get("fieldsV1") or {})
    template = dict(applies[0] if applies else updates[0])
    template.update(operation="Apply", fieldsType="FieldsV1", fieldsV1=fields)
    others = [dict(e) for e in entries if not (is_ours(e, "Update") or is_ours(e, "Apply"))]
    return others + [template]


def _same_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("replicas", "readyReplicas", "selector", "observedGeneration", "draining")
    if any(old.get(k) != new.get(k) for k in keys):
        return False
    return _conditions_key(old.get("conditions") or []) == _conditions_key(new.get("conditions") or [])


def _conditions_key(conditions: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("lastTransitionTime"), c.get("observedGeneration"))
        for c in conditions
    )
