"""A Kubernetes API emulator for the operator's tests and benchmark: kmock's, plus the API
server behaviours the operator depends on.

kmock's `KubernetesEmulator` speaks the real HTTP and watch protocol and keeps objects in memory,
but (by design) treats them as plain JSON. The operator relies on a few server-side semantics,
added here and nothing more:

- `metadata.uid`, `creationTimestamp`, `resourceVersion` on every write, `generation` bumped
  when `spec` changes (observedGeneration is meaningless without it);
- the `status` subresource: writes to the object ignore `.status`, writes to `/status` change
  only `.status`;
- the `scale` subresource of MCPPool (`kubectl scale` / HPA): GET and PATCH an autoscaling/v1
  Scale mapped onto `.spec.replicas` and `.status.replicas`/`.status.selector`;
- the garbage collector: objects whose every owner reference points to a deleted owner are
  deleted (what makes "delete the MCPPool, nothing is orphaned" testable);
- server-side apply (`PATCH` with `application/apply-patch+yaml`, `fieldManager` required):
  creates a missing object; on an existing one the applied object *replaces* everything but the
  server's metadata (uid, resourceVersion, generation, finalizers, ...) and `.status` — labels,
  annotations, owner references and every other top-level field (spec, data, ...) become exactly
  what was applied. That is the real server's behaviour for a sole, forcing field manager that
  owns every field it sets (fields it stopped setting are removed); it does not model several
  managers sharing an object. An apply that changes nothing keeps `resourceVersion` and sends no
  watch event, as on a real server;
- a `labelSelector` on lists and watches (equality terms only);
- lists answer the current `resourceVersion`, and a watch from a `resourceVersion` sends every
  change after it, then live ones (what an informer's list-then-watch relies on: nothing is lost
  between the two); a watch without one starts with an ADDED event per existing object. A
  watch ends after its `timeoutSeconds`, as the real server ends it;
- a merge patch naming `metadata.resourceVersion` is refused with 409 Conflict unless it is the
  object's current one (optimistic concurrency);
- every write request counted by kind of write (`writes()`), for tests that assert none;
- integer query parameters (`timeoutSeconds`, `limit`, `gracePeriodSeconds`) parsed as the real
  server parses them (Go's `strconv.ParseInt`): `timeoutSeconds=300.0` is a 400 with the real
  server's words, as kube-apiserver answers it;
- a named object that does not exist is a 404 `NotFound` in the real server's words
  (`statefulsets.apps "x" not found`), and a create answers 201 Created;
- a request log (`log`) that stays cheap for thousands of requests, and object requests served
  without kmock's matching of every reaction while no test added one (`_DirectFallbacks`), so that
  in the operator's benchmark the emulator costs well under the operator it serves.

Anything the emulator does not model (controllers, defaulting, admission) the tests do
explicitly, e.g. acting as the StatefulSet controller by writing its status.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import datetime
import functools
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aiohttp.web
import attrs
import kmock
from kmock._internal import apps, enums, rendering
from kmock._internal import dicts as kmock_dicts
from kmock._internal.k8s import KubernetesObjectNotFoundError

POOLS = "mcp.mptcp.dev/v1alpha1/mcppools"

# The resources the operator (and the tests acting as controllers) use, as discovery shows them.
RESOURCES: dict[str, dict[str, Any]] = {
    POOLS: {
        "kind": "MCPPool",
        "singular": "mcppool",
        "shortnames": {"mcpp"},
        "categories": {"mcp"},
        "subresources": {"status", "scale"},
    },
    "apps/v1/statefulsets": {"kind": "StatefulSet", "singular": "statefulset", "subresources": {"status", "scale"}},
    "apps/v1/daemonsets": {"kind": "DaemonSet", "singular": "daemonset", "subresources": {"status"}},
    "v1/services": {"kind": "Service", "singular": "service", "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap"},
    "v1/serviceaccounts": {"kind": "ServiceAccount", "singular": "serviceaccount"},
    "v1/pods": {"kind": "Pod", "singular": "pod", "subresources": {"status"}},
    "v1/events": {"kind": "Event", "singular": "event"},
    "policy/v1/poddisruptionbudgets": {
        "kind": "PodDisruptionBudget",
        "singular": "poddisruptionbudget",
        "subresources": {"status"},
    },
}
# Cluster-scoped resources every real API server has (kopf's discovery expects them).
CLUSTER_RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace"},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "singular": "customresourcedefinition",
    },
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
# Query parameters that the API server decodes into int64 fields (ListOptions, DeleteOptions).
INTEGER_PARAMS = ("timeoutSeconds", "limit", "gracePeriodSeconds")


def status_response(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> aiohttp.web.StreamResponse:
    """A metav1.Status failure, as the API server sends it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = dict(details)
    return aiohttp.web.json_response(body, status=code)


def not_found_response(resource: kmock.resource, name: str) -> aiohttp.web.StreamResponse:
    """The API server's 404 for a named object that does not exist."""
    details = {"name": name, "kind": resource.plural}
    qualified = str(resource.plural)
    if resource.group:
        details["group"] = resource.group
        qualified += f".{resource.group}"  # as kubectl shows it: statefulsets.apps "x" not found
    return status_response(404, "NotFound", f'{qualified} "{name}" not found', details)


@functools.cache
def parse_resource(name: str) -> kmock.resource:
    """kmock's resource of 'group/version/plural' (parsed once: kmock's parser is slow)."""
    return kmock.resource(name)


def integer_param_error(params: Mapping[str, str]) -> str | None:
    """The API server's words for the first integer parameter Go's ParseInt refuses, or None."""
    for name in INTEGER_PARAMS:
        value = params.get(name)
        if value is None:
            continue
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if not digits.isascii() or not digits.isdigit():
            return f'strconv.ParseInt: parsing "{value}": invalid syntax'
        if not -(2**63) <= int(text) < 2**63:
            return f'strconv.ParseInt: parsing "{value}": value out of range'
    return None


class _Versions:
    """The cluster-wide resourceVersion counter; `last` is the newest one handed out."""

    def __init__(self) -> None:
        self.last = 0

    def __iter__(self) -> _Versions:
        return self

    def __next__(self) -> int:
        self.last += 1
        return self.last


class _EventFeed:
    """Every watch event of one resource, numbered from the resourceVersion counter, so that a
    watch can start from any resourceVersion (kmock's bus only has what comes after a reader
    joined). Takes the place of kmock's bus: `put` is what kmock's writes call."""

    def __init__(self, versions: _Versions) -> None:
        self._versions = versions
        self.numbers: list[int] = []
        self.events: list[dict[str, Any]] = []
        self._wake = asyncio.Event()

    async def put(self, event: dict[str, Any]) -> None:
        number = next(self._versions)
        obj = copy.deepcopy(event["object"])
        if event["type"] == "DELETED":
            # The real server gives a deletion its own resourceVersion.
            obj.setdefault("metadata", {})["resourceVersion"] = str(number)
        self.numbers.append(number)
        self.events.append({"type": event["type"], "object": obj})
        self._wake.set()
        self._wake = asyncio.Event()

    def position_after(self, version: int) -> int:
        return bisect.bisect_right(self.numbers, version)

    async def wait(self, position: int) -> None:
        """Until an event exists at `position`."""
        if position < len(self.events):
            return
        await self._wake.wait()


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches_selector(obj: Mapping[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


# The emulator's own answers to object requests (kmock's fallback reactions), by action.
_SERVED = {
    enums.action.FETCH: "_serve_fetch",
    enums.action.LIST: "_serve_list",
    enums.action.CREATE: "_serve_create",
    enums.action.UPDATE: "_serve_update",
    enums.action.DELETE: "_serve_delete",
}


class _DirectFallbacks(apps.RawHandler):
    """kmock's request dispatch, short-cut for the emulator's own object requests.

    kmock sorts every reaction by priority and runs each one's filters against every request
    until one matches (a third of the emulator's CPU in a burst). While nobody added a reaction
    to the emulator's own (a test injecting a failure, say), a get, list, create, update or
    delete of an object can only reach the emulator's `_serve_*` method for it: call that
    directly. Placed between kmock's KubernetesEmulator and RawHandler in the MRO, so that the
    emulator's writes to its objects and its watch events happen exactly as before."""

    __slots__ = ()
    # len(_payloads) once the emulator's own reactions are registered (None: not yet); a field
    # of the emulator class.
    _builtin_reactions: int | None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        served = _SERVED.get(request.action) if request.resource is not None else None
        if served is not None and request.resource.plural and len(self._payloads) == self._builtin_reactions:
            payload = await getattr(self, served)(request)
            # The API server answers a create 201 Created (kmock: 200).
            return aiohttp.web.json_response(payload, status=201 if request.action == enums.action.CREATE else 200)
        return await super()._handle(request)


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator, _DirectFallbacks):
    """kmock's emulator with uid/resourceVersion/generation, status and scale subresources, GC."""

    _versions: _Versions = attrs.field(factory=_Versions, init=False)
    _builtin_reactions: int | None = attrs.field(default=None, init=False)
    # Every request served, oldest first (kmock's own log is trimmed, see _handle).
    log: list[rendering.Request] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        feeds: collections.defaultdict[Any, _EventFeed] = collections.defaultdict(lambda: _EventFeed(self._versions))
        self._buses = feeds  # type: ignore[assignment]
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(namespaced=True, verbs=VERBS, **info)
        for key, info in CLUSTER_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(namespaced=False, verbs=VERBS, **info)
        self._builtin_reactions = len(self._payloads)

    # --- request rewriting ---------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock matches each request against its whole request history (quadratic in the number
        # of requests); keep the history here instead and give kmock only the current request.
        self.log.append(request)
        del self._requests[:-1]
        bad_integer = integer_param_error(request.params)
        if bad_integer is not None:
            return status_response(400, "BadRequest", bad_integer)
        applying = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        if (
            request.resource is not None
            and request.name
            and request.subresource != "scale"
            and not (applying and request.subresource is None)  # an apply creates a missing object
            and request.action in (enums.action.FETCH, enums.action.UPDATE, enums.action.DELETE)
            and not self._exists((request.resource, request.namespace, request.name))
        ):
            # What the real server answers; kmock would answer the same code, after matching the
            # request against all its reactions and rendering a traceback into the body.
            return not_found_response(request.resource, request.name)
        conflict = self._stale_version(request)
        if conflict is not None:
            return status_response(409, "Conflict", conflict)
        if request.resource is not None and request.subresource == "scale":
            return await self._serve_scale(request)
        if (
            request.resource is not None
            and request.method == enums.method.PATCH
            and request.subresource is None
            and applying
        ):
            return await self._serve_apply(request)
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == enums.action.CREATE:
                self._on_create(request)
            elif request.action == enums.action.UPDATE:
                self._on_update(request)
        response = await super()._handle(request)
        # Only a deletion (or a released finalizer completing one) can orphan anything, or a
        # dependent created after its owner is gone (the real collector deletes those too).
        meta = (request.data.get("metadata") or {}) if isinstance(request.data, dict) else {}
        # kopf releases its finalizer with a JSON patch (a list), others with a merge patch.
        releasing = "finalizers" in meta or isinstance(request.data, list)
        late_child = request.action == enums.action.CREATE and bool(meta.get("ownerReferences"))
        if request.resource is None:
            return response
        key = (request.resource, request.namespace, request.name)
        if request.action == enums.action.DELETE or (
            releasing and (key not in self._objects or self._objects[key].deleted)
        ):
            await self._collect_garbage()
        elif late_child:
            await self._collect_if_orphaned(request.resource, request.namespace, meta.get("name"))
        return response

    def _exists(self, key: tuple[Any, str | None, str | None]) -> bool:
        return key in self._objects and not self._objects[key].deleted

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        # kmock scans every object for a GET; a lookup by key answers the same.
        if not request.name:
            return await super()._serve_fetch(request)
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise KubernetesObjectNotFoundError()
        return self._objects[key].raw

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        # kmock scans every object to find the one just written; a lookup by key answers the same
        # (kmock's _handle has applied the patch; a released finalizer may have deleted it since:
        # then the last version, as kmock answers).
        return self._objects[(request.resource, request.namespace, request.name)].last.raw

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._objects[(request.resource, request.namespace, request.name)].last.raw

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        # kmock's _handle stored the object under this key; kmock scans every object to find it.
        meta = request.data.get("metadata") or {} if isinstance(request.data, dict) else {}
        key = (request.resource, request.namespace or meta.get("namespace"), request.name or meta.get("name"))
        if key not in self._objects:
            return await super()._serve_create(request)
        return self._objects[key].raw

    def _stale_version(self, request: rendering.Request) -> str | None:
        """The API server's words if a patch names a resourceVersion that is not the current one."""
        if request.resource is None or request.action != enums.action.UPDATE or not isinstance(request.data, dict):
            return None
        wanted = (request.data.get("metadata") or {}).get("resourceVersion")
        current = self.get(str(request.resource), str(request.namespace), str(request.name)) if request.name else None
        if wanted is None or current is None or str(wanted) == str(current["metadata"].get("resourceVersion")):
            return None
        return (
            f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": the object has been '
            "modified; please apply your changes to the latest version and try again"
        )

    def _on_create(self, request: rendering.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1

    def _on_update(self, request: rendering.Request) -> None:
        data = request.data
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return  # the base class answers 404
        current = self._objects[key].raw
        if request.subresource == "status":
            for field in [k for k in data if k not in ("status", "metadata")]:
                del data[field]
            data["metadata"] = {}
        else:
            data.pop("status", None)
            data.pop("apiVersion", None)
            data.pop("kind", None)
            merged = kmock_dicts.patch_dict(copy.deepcopy(current), dict(data))
            if merged.get("spec") != current.get("spec"):
                data.setdefault("metadata", {})["generation"] = int(current["metadata"].get("generation", 1)) + 1
        data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        # Read before the objects: a change in between is sent again by a watch from here
        # (harmless), never lost.
        version = self._versions.last
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if isinstance(result, dict):
            if selector:
                result["items"] = [o for o in result["items"] if _matches_selector(o, selector)]
            result["metadata"] = {"resourceVersion": str(version)}
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # the headers, at once
        assert request.resource is not None
        feed = cast(_EventFeed, self._buses[request.resource])
        selector = request.params.get("labelSelector") or ""
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else time.monotonic() + timeout

        def wanted(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            return (
                (request.namespace is None or meta.get("namespace") == request.namespace)
                and (request.name is None or meta.get("name") == request.name)
                and _matches_selector(obj, selector)
            )

        since = request.params.get("resourceVersion")
        async with self._lock:
            # Every version this emulator hands out is a number; "0" means "any", like no version.
            if since and since.isdigit() and since != "0":
                position = feed.position_after(int(since))
                initial: list[dict[str, Any]] = []
            else:
                position = len(feed.events)
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (res, _, _), obj in self._objects.items()
                    if res == request.resource and not obj.deleted
                ]
        for event in initial:
            if wanted(event["object"]):
                yield event
        while True:
            while position < len(feed.events):
                event = feed.events[position]
                position += 1
                if wanted(event["object"]):
                    yield event
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return  # the server ends the watch; the client lists or watches again
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await feed.wait(position)

    # --- server-side apply ---------------------------------------------------------------------

    async def _serve_apply(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        status = status_response
        applied = request.data
        if not request.params.get("fieldManager"):
            return status(400, "BadRequest", "PATCH with apply-patch requires fieldManager")
        if not isinstance(applied, dict) or (applied.get("metadata") or {}).get("name") != request.name:
            return status(400, "BadRequest", "the applied object's metadata.name must match the URL")
        assert request.resource is not None
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            exists = key in self._objects and not self._objects[key].deleted
            if not exists:
                new = copy.deepcopy(applied)
                new.pop("status", None)
                meta = new.setdefault("metadata", {})
                meta["namespace"] = request.namespace
                meta.update(
                    uid=str(uuid.uuid4()),
                    creationTimestamp=_now(),
                    resourceVersion=str(next(self._versions)),
                    generation=1,
                )
                if key in self._objects:
                    self._objects[key].create(new)
                else:
                    self._objects[key] = new
                raw = self._objects[key].raw
                await self._buses[request.resource].put({"type": "ADDED", "object": raw})
            else:
                obj = self._objects[key]
                current = copy.deepcopy(obj.raw)
                new = {k: copy.deepcopy(v) for k, v in applied.items() if k not in ("metadata", "status")}
                meta = {
                    k: v for k, v in current["metadata"].items() if k not in ("labels", "annotations", "ownerReferences")
                }
                for k in ("labels", "annotations", "ownerReferences"):
                    if k in (applied.get("metadata") or {}):
                        meta[k] = copy.deepcopy(applied["metadata"][k])
                new["metadata"] = meta
                if "status" in current:
                    new["status"] = current["status"]
                if new != current:
                    if new.get("spec") != current.get("spec"):
                        meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
                    meta["resourceVersion"] = str(next(self._versions))
                    # kmock merges on patch(); an apply replaces: a new version of the object.
                    obj.create(new)
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
                raw = obj.raw
        if not exists and (raw.get("metadata") or {}).get("ownerReferences"):
            await self._collect_if_orphaned(request.resource, request.namespace, request.name)
        return aiohttp.web.json_response(raw, status=200 if exists else 201)

    # --- scale subresource ---------------------------------------------------------------------

    async def _serve_scale(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return aiohttp.web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            obj = self._objects[key]
            if request.method == enums.method.PATCH:
                replicas = int(request.data["spec"]["replicas"])
                meta = obj.raw["metadata"]
                changed = obj.raw.get("spec", {}).get("replicas") != replicas
                obj.patch(
                    {
                        "spec": {"replicas": replicas},
                        "metadata": {
                            "resourceVersion": str(next(self._versions)),
                            "generation": int(meta.get("generation", 1)) + (1 if changed else 0),
                        },
                    }
                )
                assert request.resource is not None
                await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            raw = obj.raw
        status = raw.get("status") or {}
        return aiohttp.web.json_response(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {k: raw["metadata"].get(k) for k in ("name", "namespace", "uid", "resourceVersion")},
                "spec": {"replicas": raw.get("spec", {}).get("replicas", 0)},
                "status": {"replicas": status.get("replicas", 0), "selector": status.get("selector", "")},
            }
        )

    # --- garbage collector ---------------------------------------------------------------------

    def _owner_alive(self, namespace: str | None, reference: Mapping[str, Any]) -> bool:
        for resource, info in RESOURCES.items():
            if info["kind"] == reference.get("kind"):
                owner = self.get(resource, str(namespace), str(reference.get("name")))
                return owner is not None and owner["metadata"].get("uid") == reference.get("uid")
        return any(obj.raw["metadata"].get("uid") == reference.get("uid") for obj in self._objects.values() if not obj.deleted)

    async def _collect_if_orphaned(self, resource: Any, namespace: str | None, name: str | None) -> None:
        """The collector for one object just created: O(1), not a scan of every object."""
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return
        obj = self._objects[key]
        refs = obj.raw["metadata"].get("ownerReferences") or []
        if refs and not any(self._owner_alive(namespace, ref) for ref in refs):
            await self._collect_garbage()

    async def _collect_garbage(self) -> None:
        async with self._lock:
            while True:
                live_uids = {
                    obj.raw["metadata"].get("uid") for obj in self._objects.values() if not obj.deleted
                }
                orphans = [
                    (key, obj)
                    for key, obj in self._objects.items()
                    if not obj.deleted
                    and (refs := obj.raw["metadata"].get("ownerReferences"))
                    and all(ref.get("uid") not in live_uids for ref in refs)
                ]
                if not orphans:
                    return
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    # --- helpers for tests ---------------------------------------------------------------------

    def writes(self, start: int = 0, user_agent_prefix: str = "") -> list[rendering.Request]:
        """Write requests (POST, PUT, PATCH, DELETE) served since log entry `start`, optionally
        only those from clients whose User-Agent starts with `user_agent_prefix`."""
        return [
            r
            for r in self.log[start:]
            if r.method in (enums.method.POST, enums.method.PUT, enums.method.PATCH, enums.method.DELETE)
            and r.headers.get("User-Agent", "").startswith(user_agent_prefix)
        ]

    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Current (not deleted) objects of a resource, e.g. live('apps/v1/statefulsets', 'ns')."""
        wanted = parse_resource(resource)
        return [
            obj.raw
            for (res, ns, _), obj in self._objects.items()
            if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (parse_resource(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].raw
