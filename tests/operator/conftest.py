"""Fixtures for the operator tests: the Kubernetes API emulator and the real kopf operator.

`cluster` is an emulator (tests/operator/operator_emulator.py) serving real HTTP and watches on a
loopback port; `operator_runner` runs the real operator (`mcpool_operator.main.run`, the code path
of `mcpool operator`) in the test's event loop against it, logging in through a kubeconfig file the
way it would outside a cluster. Nothing here needs a cluster, root or the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from mcpool_operator.handlers import OperatorOptions  # noqa: E402
from mcpool_operator.kube import Connection  # noqa: E402
from mcpool_operator.main import parse_args, run  # noqa: E402
from mcpool_operator.reconcile import Reconciler  # noqa: E402
from operator_emulator import POOLS, ClusterEmulator  # noqa: E402

NAMESPACE = "mcp-test"
REPO = Path(__file__).resolve().parents[2]
TEST_USER_AGENT = "mcpool-tests"


class Cluster:
    """The emulator plus a client that acts as kubectl (distinct User-Agent, so the RBAC test can
    tell the operator's requests from the test's)."""

    def __init__(self, emulator: ClusterEmulator, url: str, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.session = session

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {data}")
            return data

    def pool_path(self, name: str | None = None, namespace: str = NAMESPACE, sub: str | None = None) -> str:
        path = f"/apis/mcp.mptcp.dev/v1alpha1/namespaces/{namespace}/mcppools"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    async def create_pool(self, name: str, spec: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
        body = {
            "apiVersion": "mcp.mptcp.dev/v1alpha1",
            "kind": "MCPPool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        result: dict[str, Any] = await self.request("POST", self.pool_path(namespace=namespace), body)
        return result

    async def patch(self, path: str, patch: dict[str, Any]) -> Any:
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    def pool(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.emulator.get(POOLS, namespace, name)

    def children(self, resource: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return self.emulator.live(resource, namespace)

    def child(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.emulator.get(resource, namespace, name)

    async def set_statefulset_ready(self, name: str, ready: int, namespace: str = NAMESPACE) -> None:
        """Act as the StatefulSet controller: report `ready` pods of the current revision."""
        sts = self.child("apps/v1/statefulsets", name, namespace)
        assert sts is not None
        gen = sts["metadata"]["generation"]
        await self.patch(
            f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}/status",
            {
                "status": {
                    "observedGeneration": gen,
                    "replicas": sts["spec"]["replicas"],
                    "updatedReplicas": sts["spec"]["replicas"],
                    "readyReplicas": ready,
                }
            },
        )


    async def set_daemonset_ready(self, name: str, desired: int, ready: int, namespace: str = NAMESPACE) -> None:
        """Act as the DaemonSet controller: `ready` of `desired` pods Ready on the current spec."""
        ds = self.child("apps/v1/daemonsets", name, namespace)
        assert ds is not None
        await self.patch(
            f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}/status",
            {
                "status": {
                    "observedGeneration": ds["metadata"]["generation"],
                    "desiredNumberScheduled": desired,
                    "updatedNumberScheduled": desired,
                    "numberReady": ready,
                }
            },
        )


async def eventually(
    condition: Callable[[], Any], limit_s: float = 10.0, what: str = "condition"
) -> Any:
    """Poll `condition` (sync or async) until truthy; the emulator offers no event to await."""
    deadline = time.monotonic() + limit_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {limit_s}s waiting for {what} (last: {last!r})")


def condition_of(pool: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((pool or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


@pytest_asyncio.fixture()
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "users": [{"name": "operator", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
            "current-context": "emulator",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        async with aiohttp.ClientSession(headers={"User-Agent": TEST_USER_AGENT}) as session:
            yield Cluster(emulator, url, session)


class OperatorRunner:
    """Runs the real operator in its own thread and event loop, as kopf recommends for embedding
    (kopf cancels tasks of its loop it did not start when it stops), and restarts it on demand."""

    def __init__(self, cluster: Cluster, options: OperatorOptions) -> None:
        self.cluster = cluster
        self.options = options
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        # The running operator's reconciler (a new one on every start).
        self.reconciler: Reconciler | None = None

    def _main(self, ready: threading.Event) -> None:
        def keep(reconciler: Reconciler) -> None:
            self.reconciler = reconciler

        try:
            asyncio.run(
                run(self.options, connection=Connection(server=self.cluster.url), stop_flag=self._stop,
                    ready_flag=ready, on_reconciler=keep)  # fmt: skip
            )
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def start(self) -> None:
        assert self._thread is None
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="operator", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, 20):
            await self.stop()
            raise AssertionError(f"the operator did not become ready within 20 s: {self.error!r}")

    def reconciles_started(self, name: str, namespace: str = NAMESPACE) -> int:
        """Reconcile passes of the pool begun by the running operator (0 before its first)."""
        assert self.reconciler is not None
        return self.reconciler.started.get((namespace, name), 0)

    async def reconciled_since(self, started: int, name: str, namespace: str = NAMESPACE) -> None:
        """Wait until a reconcile pass of the pool that began after `reconciles_started()`
        returned `started` has finished (the operator makes no request when nothing changed,
        so its own counters are the only signal)."""

        def finished() -> bool:
            assert self.reconciler is not None
            return self.reconciler.finished.get((namespace, name), 0) > started

        await eventually(finished, what=f"a reconcile of {name}")

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        alive = self._thread.is_alive()
        self._thread = None
        if alive:
            raise AssertionError("the operator did not stop within 30 s")
        if self.error is not None:
            raise AssertionError(f"the operator failed: {self.error!r}") from self.error


@pytest.fixture()
def operator_options() -> OperatorOptions:
    # The command line's own defaults (what a real deployment runs, watch timeouts included:
    # they reach the API as query parameters), made quicker where a test would only wait.
    return dataclasses.replace(
        parse_args(["--namespace", NAMESPACE, "--liveness", ""]),
        resync_interval_s=3600.0,
        request_timeout_s=10.0,
        worker_idle_timeout_s=0.3,
        # A fixed port (the default 8081) collides with any other operator test run on the
        # machine; the Prometheus test gives its own.
        metrics_listen=None,
    )


@pytest_asyncio.fixture()
async def operator_runner(cluster: Cluster, operator_options: OperatorOptions) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner(cluster, operator_options)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
