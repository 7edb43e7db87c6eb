"""The one idempotent reconcile of an MCPPool: make the cluster match the builders' output.

Called from kopf's create/update/resume handlers, a slow timer, and the watches on the pool's
children and pods. Each call: builds the desired children (pure), creates what is missing
(a 409 means somebody was faster: read it and compare), patches what drifted (server-side apply,
so fields the operator stopped setting are removed), leaves equal objects alone, deletes
children the spec no longer asks for, and writes `.status` only when it changed. An invalid spec
becomes a `Degraded=True` condition and an Event, never an exception loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from opentelemetry import trace

from . import builders
from .kube import ApiError, KubeClient, ObjectRef, ref_of
from .spec import GROUP, KIND, VERSION, MCPPoolSpec, Pool, SpecError
from .status import Observation, build_status, find_condition, sysctl_failure

__all__ = ["EventPoster", "Outcome", "Reconciler", "as_body", "is_subset", "kopf_event"]

FIELD_MANAGER = "mcpool-operator"
POOL_API_VERSION = f"{GROUP}/{VERSION}"
# Kinds whose set of objects varies with the spec (join Services, director objects): the only
# ones that may need pruning.
PRUNABLE = (("v1", "Service"), ("v1", "ConfigMap"), ("apps/v1", "DaemonSet"))

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
    """True if every value the operator sets is in the live object (the server may add more)."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(key in live and is_subset(value, live[key]) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, v) for d, v in zip(desired, live, strict=True))
    return bool(desired == live)


@dataclass
class Outcome:
    """What one reconcile did (for logs, tests and the benchmark)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    spec_error: str | None = None
    status_written: bool = False


class Reconciler:
    """Holds the API client and one lock per pool (reconciles of a pool never overlap)."""

    def __init__(self, client: KubeClient, post_event: EventPoster = kopf_event) -> None:
        self.client = client
        self.post_event = post_event
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # The operator is the only writer of .status: what it wrote last is fresher than a
        # body from a watch event or an index that has not caught up yet.
        self._written: dict[tuple[str, str, str], dict[str, Any]] = {}

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        for key in [k for k in self._written if k[:2] == (namespace, name)]:
            del self._written[key]

    async def reconcile(self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]) -> Outcome:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            with _tracer.start_as_current_span(
                "mcpool.reconcile",
                attributes={
                    "k8s.namespace.name": key[0],
                    "mcpool.pool": key[1],
                    "mcpool.generation": int(meta.get("generation") or 0),
                },
            ) as span:
                outcome = await self._reconcile(body, logger)
                span.set_attribute("mcpool.created", len(outcome.created))
                span.set_attribute("mcpool.updated", len(outcome.updated))
                span.set_attribute("mcpool.deleted", len(outcome.deleted))
                if outcome.spec_error:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.spec_error))
                return outcome

    async def _reconcile(self, body: Mapping[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]) -> Outcome:
        outcome = Outcome()
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return outcome  # owner references let the garbage collector remove the children
        generation = int(meta.get("generation") or 0)
        try:
            pool = Pool.from_body(body)
            desired = builders.build_children(pool)
        except (SpecError, ValueError) as exc:
            outcome.spec_error = str(exc)
            await self._write_invalid(body, generation, outcome, logger)
            return outcome

        apply_error: str | None = None
        statefulset: Mapping[str, Any] | None = None
        for obj in desired:
            kopf.adopt(obj, owner=as_body(body))
            try:
                live = await self._apply(obj, body, outcome, logger)
            except ApiError as exc:
                apply_error = f"{ref_of(obj)}: {exc}"
                logger.error("cannot apply %s: %s", ref_of(obj), exc)
                continue
            if obj["kind"] == "StatefulSet":
                statefulset = live
        await self._prune(pool, {ref_of(obj) for obj in desired}, body, outcome, logger)

        pods = await self.client.list("v1", "Pod", pool.namespace, builders.status_selector(pool))
        seen = Observation(
            generation=generation,
            desired_replicas=pool.spec.replicas,
            selector=builders.status_selector(pool),
            statefulset=statefulset,
            sysctl_error=sysctl_failure(pods),
            apply_error=apply_error,
        )
        await self._write_status(body, seen, outcome, logger)
        return outcome

    async def _apply(
        self,
        obj: dict[str, Any],
        owner: Mapping[str, Any],
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> dict[str, Any]:
        ref = ref_of(obj)
        live = await self.client.get(ref)
        if live is None:
            try:
                created = await self.client.create(obj)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                # Created meanwhile (another reconcile, a restart): read it and compare below.
                live = await self.client.get(ref)
                if live is None:
                    raise
            else:
                outcome.created.append(str(ref))
                logger.info("created %s", ref)
                self.post_event(owner, "Normal", "Created", f"created {ref.kind} {ref.name}")
                return created
        if is_subset(obj, live):
            return live
        owner_uid = (owner.get("metadata") or {}).get("uid")
        for reference in (live.get("metadata") or {}).get("ownerReferences") or []:
            if reference.get("controller") and reference.get("uid") != owner_uid:
                raise ApiError(409, "Conflict", f"{ref} is controlled by {reference.get('kind')} {reference.get('name')}")
        patched = await self.client.apply(ref, _apply_body(obj), FIELD_MANAGER)
        outcome.updated.append(str(ref))
        logger.info("restored %s to the spec", ref)
        self.post_event(owner, "Normal", "Updated", f"updated {ref.kind} {ref.name} to match the spec")
        return patched

    async def _prune(
        self,
        pool: Pool,
        wanted: set[ObjectRef],
        owner: Mapping[str, Any],
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        selector = f"{builders.POOL_LABEL}={pool.name},{builders.MANAGED_BY_LABEL}={builders.MANAGED_BY}"
        for api_version, kind in PRUNABLE:
            for live in await self.client.list(api_version, kind, pool.namespace, selector):
                ref = ref_of({**live, "apiVersion": api_version, "kind": kind})
                if ref in wanted or not _owned_by(live, pool.uid):
                    continue
                if await self.client.delete(ref):
                    outcome.deleted.append(str(ref))
                    logger.info("deleted %s (no longer in the spec)", ref)
                    self.post_event(owner, "Normal", "Deleted", f"deleted {kind} {ref.name} (no longer in the spec)")

    async def _write_invalid(
        self,
        body: Mapping[str, Any],
        generation: int,
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        assert outcome.spec_error is not None
        meta = body.get("metadata") or {}
        selector = builders.status_selector(
            Pool(name=str(meta.get("name")), namespace=str(meta.get("namespace")), spec=MCPPoolSpec())
        )
        seen = Observation(generation=generation, desired_replicas=0, selector=selector, spec_error=outcome.spec_error)
        key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")))
        previous = self._written.get(key) or body.get("status") or {}
        before = find_condition(previous.get("conditions") or [], "Degraded")
        logger.error("invalid spec: %s", outcome.spec_error)
        await self._write_status(body, seen, outcome, logger)
        already_reported = (
            before is not None
            and before.get("reason") == "InvalidSpec"
            and before.get("observedGeneration") == generation
        )
        if not already_reported:
            self.post_event(body, "Warning", "InvalidSpec", outcome.spec_error)

    async def _write_status(
        self,
        body: Mapping[str, Any],
        seen: Observation,
        outcome: Outcome,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")))
        previous = self._written.get(key) or dict(body.get("status") or {})
        new = build_status(previous, seen)
        if _same_status(previous, new):
            return
        ref = ref_of({**body, "apiVersion": POOL_API_VERSION, "kind": KIND})
        await self.client.patch(ref, {"status": new}, subresource="status")
        self._written[key] = new
        outcome.status_written = True
        for type_ in ("Ready", "Degraded"):
            old_c = find_condition(previous.get("conditions") or [], type_)
            new_c = find_condition(new["conditions"], type_)
            if new_c is not None and (old_c is None or old_c.get("status") != new_c.get("status")):
                logger.info("condition %s=%s (%s): %s", type_, new_c["status"], new_c["reason"], new_c["message"])
                if type_ == "Degraded" and new_c["status"] == "True" and new_c["reason"] != "InvalidSpec":
                    self.post_event(body, "Warning", str(new_c["reason"]), str(new_c["message"]))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs: Sequence[Mapping[str, Any]] = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _apply_body(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator sets on an object: everything it built, nothing the server added."""
    body = copy.deepcopy(dict(obj))
    meta = body.get("metadata", {})
    body["metadata"] = {
        k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations", "ownerReferences")
    }
    return body


def _same_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("replicas", "readyReplicas", "selector", "observedGeneration")
    if any(old.get(k) != new.get(k) for k in keys):
        return False
    return _conditions_key(old.get("conditions") or []) == _conditions_key(new.get("conditions") or [])


def _conditions_key(conditions: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("lastTransitionTime"), c.get("observedGeneration"))
        for c in conditions
    )
