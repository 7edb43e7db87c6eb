"""The chart's pre-delete hook script (charts/mcpool/files/cleanup.py), run for real against the
Kubernetes API emulator of the operator tests: with the real operator running it deletes every
pool and returns once the operator has released them; with no operator to release the
finalizer it fails after its timeout, naming the pools left."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from chart_support import CHART, REPO, emulated_cluster, operator_options, operator_tests
from mcpool_operator.handlers import FINALIZER

oc = operator_tests()
SCRIPT = CHART / "files" / "cleanup.py"



@pytest_asyncio.fixture()
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    async with emulated_cluster(tmp_path, monkeypatch) as cluster:
        yield cluster


async def run_cleanup(namespaces: str, timeout_s: float) -> tuple[int, str, str]:
    env = {**os.environ, "WATCH_NAMESPACES": namespaces, "TIMEOUT_SECONDS": str(timeout_s), "POLL_SECONDS": "0.1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT.read_text(), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s + 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("namespaces", ["", oc.NAMESPACE], ids=["all-namespaces", "namespaced"])
async def test_cleanup_deletes_every_pool_while_the_operator_runs(cluster: Any, namespaces: str) -> None:
    runner = oc.OperatorRunner(cluster, operator_options(oc, all_namespaces=False))
    await runner.start()
    try:
        for name in ("first", "second"):
            await cluster.create_pool(name, {"replicas": 1})
            # The operator has taken the pool: its finalizer is on it (what makes deletion wait).
            await oc.eventually(
                lambda n=name: FINALIZER in ((cluster.pool(n) or {}).get("metadata", {}).get("finalizers") or []),
                what=f"the finalizer on {name}",
            )
        code, out, err = await run_cleanup(namespaces, 60)
        assert code == 0, err
        assert f"deleting MCPPool {oc.NAMESPACE}/first" in out and "every MCPPool is gone" in out
        assert cluster.pool("first") is None and cluster.pool("second") is None
    finally:
        await runner.stop()


async def test_cleanup_fails_naming_the_pools_no_operator_releases(cluster: Any) -> None:
    await cluster.request(
        "POST",
        cluster.pool_path(),
        {
            "apiVersion": "mcp.mptcp.dev/v1alpha1",
            "kind": "MCPPool",
            "metadata": {"name": "stuck", "namespace": oc.NAMESPACE, "finalizers": [FINALIZER]},
            "spec": {},
        },
    )
    code, _, err = await run_cleanup(oc.NAMESPACE, 1)
    assert code == 1
    assert f"MCPPools still present after 1s: {oc.NAMESPACE}/stuck" in err and "Is the operator running?" in err
    # Deleted (marked) but still there, held by the finalizer.
    assert (cluster.pool("stuck") or {}).get("metadata", {}).get("deletionTimestamp")


async def test_cleanup_with_no_pools_returns_at_once(cluster: Any) -> None:
    code, out, err = await run_cleanup("", 5)
    assert code == 0 and "every MCPPool is gone" in out, err


def test_the_operator_image_has_what_the_script_imports() -> None:
    # The hook runs in the operator image, which installs mcpool[operator] only.
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["operator"]
    installed = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in extra}
    assert imported - sys.stdlib_module_names == {"kubernetes"} and "kubernetes" in installed
