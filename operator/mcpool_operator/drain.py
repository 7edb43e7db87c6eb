"""How far the pool's terminating pods are with their drain, for `status.draining`.

A rolling update or a scale-in deletes MCP pods; each one drains on SIGTERM: it takes no new
connection, keeps its live ones (and their subflows) for up to `drainTimeoutSeconds`, and exits
as soon as the last one ends. While that lasts, the pool's status lists each such pod with the
connections it still carries (`status.draining: [{pod, connections, since}]`, condition
`Draining`).

Where the count comes from: the pod's own `GET /readyz` on its admin port (the one the kubelet
probes; open to every client, and it reports `draining`, `drain_started` and `connections`). Not
from the affinity registry in Redis, which has the same count for director pools: the operator
would then need the Redis address, its password Secret and a network path to Redis, for every
pool and mechanism, where the admin port is already reachable the way the kubelet and Prometheus
reach it, and exists for pools without Redis too. Nor from an annotation the pod writes on
itself: the proxy runs without a service account token (it never talks to the API server), and
giving every data-plane pod the right to patch pods is a worse trade than one HTTP GET.

A pod the operator cannot reach is still listed (its `since` from `deletionTimestamp`), with a
`message` instead of a count. Nothing here raises.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

__all__ = ["DRAIN_POLL_S", "admin_url", "drain_progress", "drain_summary", "terminating"]

# While a pod drains, the pool is reconciled again this often so the status follows its count.
DRAIN_POLL_S = 5.0
# One GET per draining pod per reconcile: a pod that does not answer in this time is listed
# without a count rather than holding up the reconcile.
READ_TIMEOUT_S = 2.0
DEFAULT_ADMIN_PORT = 9090


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def terminating(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods being deleted (a rolling update or a scale-in), by name."""
    found = [p for p in pods if (p.get("metadata") or {}).get("deletionTimestamp")]
    return sorted(found, key=lambda p: str((p.get("metadata") or {}).get("name", "")))


def admin_url(pod: Mapping[str, Any]) -> str | None:
    """`http://POD_IP:ADMIN_PORT/readyz` of an MCP pod (its container port named `admin`), or
    None while the pod has no IP."""
    ip = str((pod.get("status") or {}).get("podIP") or "")
    if not ip:
        return None
    port = DEFAULT_ADMIN_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for item in container.get("ports") or []:
            if item.get("name") == "admin" and item.get("containerPort"):
                port = int(item["containerPort"])
    try:
        host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:
        return None
    return f"http://{host}:{port}/readyz"


async def _read_one(session: aiohttp.ClientSession, pod: Mapping[str, Any]) -> dict[str, Any]:
    meta = pod.get("metadata") or {}
    entry: dict[str, Any] = {
        "pod": str(meta.get("name", "")),
        "since": str(meta.get("deletionTimestamp")),
    }
    url = admin_url(pod)
    if url is None:
        entry["message"] = "the pod has no IP"
        return entry
    try:
        # /readyz answers 503 while draining: the body is what counts, not the status code.
        async with session.get(url) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        entry["message"] = f"GET {url}: {type(exc).__name__}: {exc}".rstrip(": ")
        return entry
    if not isinstance(body, dict) or not isinstance(body.get("connections"), int):
        entry["message"] = f"GET {url}: no connection count in the answer"
        return entry
    entry["connections"] = int(body["connections"])
    started = body.get("drain_started")
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        entry["since"] = _iso(float(started))
    elif not body.get("draining"):
        # Deleted, but SIGTERM has not reached the proxy yet (e.g. a preStop hook runs).
        entry["message"] = "not draining yet"
    return entry


async def drain_progress(
    pods: Sequence[Mapping[str, Any]], timeout_s: float = READ_TIMEOUT_S
) -> list[dict[str, Any]]:
    """`status.draining`: one entry per terminating pod, read from the pods concurrently."""
    gone = terminating(pods)
    if not gone:
        return []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_read_one(session, p) for p in gone)))


def drain_summary(draining: Sequence[Mapping[str, Any]]) -> str:
    """The `Draining` condition's message, e.g. `edge-1: 7 connections since 2026-...Z`."""
    parts = []
    for entry in draining:
        count = entry.get("connections")
        what = (
            f"{count} connection{'s' if count != 1 else ''}"
            if count is not None
            else "connections unknown"
        )
        parts.append(f"{entry['pod']}: {what} since {entry['since']}")
    return "; ".join(parts)
