"""A small asyncio Kubernetes API client for the objects the operator owns.

kopf has its own API client for the MCPPool objects it watches, but no public one for arbitrary
objects; the official `kubernetes` package is synchronous. This module reuses the official
package only to *find* the credentials (in-cluster service account or kubeconfig, the same way
kopf's default login does) and talks JSON over aiohttp, so reconciles never block the event loop.

Only the verbs the operator needs exist (get, list, server-side apply, merge-patch, delete); the
RBAC in `manifests/rbac.yaml` lists exactly those (an apply that creates is authorised as
"create"), and `tests/operator/test_operator_rbac.py` checks the two agree. There is no POST on
purpose: an object created by POST is owned by an "Update" manager, whose fields an apply never
prunes.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

__all__ = [
    "ApiError",
    "Connection",
    "KubeClient",
    "ObjectRef",
    "load_connection",
    "ref_of",
    "PLURALS",
]

USER_AGENT = "mcpool-operator/0.1"

# kind -> plural, for every kind the operator creates or reads.
PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "DaemonSet": "daemonsets",
    "Event": "events",
    "MCPPool": "mcppools",
    "Pod": "pods",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "StatefulSet": "statefulsets",
}


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ObjectRef:
    """Where one object lives in the API."""

    api_version: str
    kind: str
    namespace: str | None
    name: str | None = None

    @property
    def plural(self) -> str:
        return PLURALS[self.kind]

    def path(self, subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespace:
            parts.append(f"namespaces/{self.namespace}")
        parts.append(self.plural)
        if self.name:
            parts.append(self.name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def ref_of(obj: Mapping[str, Any]) -> ObjectRef:
    meta = obj.get("metadata", {})
    return ObjectRef(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta.get("name"))


@dataclass(frozen=True)
class Connection:
    """How to reach and authenticate to the API server."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    verify: bool = True

    def to_kopf(self) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own API client."""
        return kopf.ConnectionInfo(
            server=self.server,
            ca_path=self.ca_path,
            insecure=not self.verify,
            scheme="Bearer" if self.token else None,
            token=self.token,
            certificate_path=self.cert_path,
            private_key_path=self.key_path,
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if not self.verify:
            return False
        context = ssl.create_default_context(cafile=self.ca_path)
        if self.cert_path and self.key_path:
            context.load_cert_chain(self.cert_path, self.key_path)
        return context


def load_connection() -> Connection:
    """In-cluster service account first, then the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    import kubernetes.client
    import kubernetes.config

    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        # $KUBECONFIG is read now, not when the kubernetes package was imported.
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)  # type: ignore[no-untyped-call]
    # Bound service-account tokens rotate; this calls the loader's refresh hook when needed.
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    token = header.split(" ", 1)[-1] if header else None
    return Connection(
        server=config.host.rstrip("/"),
        token=token,
        ca_path=config.ssl_ca_cert,
        cert_path=config.cert_file,
        key_path=config.key_file,
        verify=bool(config.verify_ssl),
    )


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None  # ssl_context() names the missing file


class KubeClient:
    """get/list/create/patch/delete of plain-dict objects; one aiohttp session per client."""

    def __init__(self, connection: Connection | None = None, *, request_timeout_s: float = 30.0) -> None:
        self._connection = connection
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        # The TLS context of `_connection`, made once: aiohttp pools connections by TLS context,
        # so a new one per request would cost a TLS handshake (and a read of the CA) per request.
        self._ssl: tuple[tuple[Any, ...], ssl.SSLContext | bool] | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"User-Agent": USER_AGENT}
            )
        return self._session

    def _conn(self) -> Connection:
        if self._connection is None:
            self._connection = load_connection()
        return self._connection

    def _ssl_of(self, conn: Connection) -> ssl.SSLContext | bool:
        # Made again when a TLS file changes (a rotated client certificate or cluster CA).
        key = (conn.server.startswith("https"), conn.verify,
               *((path, _mtime(path)) for path in (conn.ca_path, conn.cert_path, conn.key_path)))  # fmt: skip
        if self._ssl is None or self._ssl[0] != key:
            self._ssl = (key, conn.ssl_context())
        return self._ssl[1]

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        _, body = await self._request_with_status(method, path, json=json, params=params, content_type=content_type)
        return body

    async def _request_with_status(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        for attempt in (1, 2):
            conn = self._conn()
            headers = {"Accept": "application/json"}
            if json is not None:
                headers["Content-Type"] = content_type
            if conn.token:
                headers["Authorization"] = f"Bearer {conn.token}"
            async with self._session_for().request(
                method, conn.server + path, json=json, params=params, headers=headers, ssl=self._ssl_of(conn)
            ) as response:
                if response.status == 401 and attempt == 1:
                    self._connection = None  # the token rotated: load it again, once
                    continue
                try:
                    body = await response.json(content_type=None)
                except (aiohttp.ContentTypeError, ValueError):
                    body = None
                if response.status >= 400:
                    status = body if isinstance(body, dict) else {}
                    raise ApiError(
                        response.status,
                        str(status.get("reason") or response.reason),
                        str(status.get("message") or ""),
                    )
                return response.status, body
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, ref: ObjectRef, subresource: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            result: dict[str, Any] = await self._request("GET", ref.path(subresource))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", ObjectRef(api_version, kind, namespace).path(), params=params)
        items: list[dict[str, Any]] = result.get("items", []) if isinstance(result, dict) else []
        return items

    async def patch(
        self, ref: ObjectRef, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): lists are replaced whole, `None` deletes a key."""
        result: dict[str, Any] = await self._request(
            "PATCH", ref.path(subresource), json=patch, content_type="application/merge-patch+json"
        )
        return result

    async def apply(self, ref: ObjectRef, obj: Mapping[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply, forcing ownership: creates the object if it is missing; otherwise the
        fields the operator manages end up as applied and those it stopped setting are removed.
        An apply that changes nothing leaves `resourceVersion` as it was."""
        result, _ = await self.apply_created(ref, obj, field_manager)
        return result

    async def apply_created(
        self, ref: ObjectRef, obj: Mapping[str, Any], field_manager: str
    ) -> tuple[dict[str, Any], bool]:
        """`apply`, and whether it created the object (the API server answers 201 Created)."""
        status, result = await self._request_with_status(
            "PATCH",
            ref.path(),
            json=obj,
            params={"fieldManager": field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        return result, status == 201

    async def delete(self, ref: ObjectRef) -> bool:
        """Delete in the background (dependents are garbage-collected); False if already gone."""
        try:
            await self._request("DELETE", ref.path(), json={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
