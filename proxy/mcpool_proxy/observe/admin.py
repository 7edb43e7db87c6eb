"""The proxy's admin HTTP server (aiohttp): health, readiness, connection listing, metrics, drain.

- `GET /healthz`: 200 `{"status": "ok"}` while the event loop answers at all.
- `GET /readyz`: 200 when listening and not draining, else 503; the body says why and whether
  MPTCP checksums and the TFO server bit are in force in the proxy's network namespace. While
  draining it carries `drain_started` (Unix time) and `connections` (still live): the operator
  reads both from a terminating pod into the pool's `status.draining`.
- `GET /connections`: JSON list of live connections (`Connection.describe()`).
- `GET /metrics`: Prometheus text from the proxy's own registry; OpenMetrics (which carries the
  latency histograms' trace-id exemplars) when the `Accept` header asks for
  `application/openmetrics-text`, as Prometheus does.
- `POST /drain`: start draining, as SIGTERM does (for operators; returns 202).

`/connections` (customer addresses) and `/drain` answer only clients in `trusted` (by default
loopback: `kubectl exec`, a preStop hook); anyone else gets 403. Probes and metrics stay open.

It reads the proxy through the small `AdminTarget` protocol and holds no state of its own; a
target may answer with an awaitable (the supervisor of worker processes, `workers.py`, which
asks each worker's own admin server, on a Unix socket, and merges the answers).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from collections.abc import Awaitable, Iterable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from .metrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE

__all__ = ["AdminServer", "AdminTarget"]


T = TypeVar("T")


async def _value(result: T | Awaitable[T]) -> T:
    """A target's answer: a value (a proxy's own), or an awaitable (a supervisor's, which asks
    its workers)."""
    if inspect.isawaitable(result):
        return await result
    return result


class AdminTarget(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    def readiness(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...

    def connection_list(self) -> list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]: ...

    def render_metrics(self, openmetrics: bool = False) -> bytes | Awaitable[bytes]: ...

    def request_drain(self) -> None: ...


class AdminServer:
    def __init__(
        self,
        target: AdminTarget,
        host: str,
        port: int,
        trusted: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        *,
        path: str | None = None,
    ) -> None:
        self.target = target
        self.host = host
        self.port = port
        # A Unix socket instead of host:port: a worker process's admin server, which only its
        # supervisor reads (it has no peer address, so it is trusted).
        self.path = path
        self.trusted = [ipaddress.ip_network(net) for net in trusted]
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/connections", self._connections)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/drain", self._drain)
        self.app = app

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site: web.BaseSite
        if self.path is not None:
            site = web.UnixSite(runner, self.path)
        else:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        # Reaching this handler proves the loop runs; the sleep(0) proves it still schedules.
        await asyncio.sleep(0)
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        body = await _value(self.target.readiness())
        return web.json_response(body, status=200 if body.get("ready", self.target.ready) else 503)

    def _is_trusted(self, request: web.Request) -> bool:
        if self.path is not None:
            return True
        try:
            addr = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)

    @staticmethod
    def _forbidden(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"{request.path} is only served to admin_trusted_clients (default: loopback)"},
            status=403,
        )

    async def _connections(self, request: web.Request) -> web.Response:
        if not self._is_trusted(request):
            return self._forbidden(request)
        return web.json_response(await _value(self.target.connection_list()))

    async def _metrics(self, request: web.Request) -> web.Response:
        # OpenMetrics (with exemplars) when the scraper asks for it, as Prometheus does.
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            return web.Response(body=await _value(self.target.render_metrics(openmetrics=True)),
                                headers={"Content-Type": OPENMETRICS_CONTENT_TYPE})
        return web.Response(body=await _value(self.target.render_metrics()), headers={"Content-Type": CONTENT_TYPE})

    async def _drain(self, request: web.Request) -> web.Response:
        if not self._is_trusted(request):
            return self._forbidden(request)
        self.target.request_drain()
        return web.json_response({"draining": True}, status=202)
