"""Shared helpers of the chart tests: the two real Helm binaries and a per-session cache of
`helm template` renderings (each scenario is rendered once per Helm version)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mcpool"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
# Installed by scripts/install-helm.sh (from scripts/install-deps.sh).
HELMS = {"helm4": REPO / ".tools" / "helm4" / "helm", "helm3": REPO / ".tools" / "helm3" / "helm"}
RELEASE, NAMESPACE = "mcpool", "mcpool-system"
Doc = dict[str, Any]


def helm_binary(name: str) -> Path:
    path = HELMS[name]
    if not path.is_file():
        # A failure, not a skip: CI installs both, and a silent skip would hide a broken setup.
        pytest.fail(f"{path} ({name}) is missing: run scripts/install-helm.sh")
    return path


def run_helm(name: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    argv = [str(helm_binary(name)), *[str(chart) if a == "CHART" else a for a in args]]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def template_text(name: str, *args: str, chart: Path = CHART) -> str:
    result = run_helm(name, "template", RELEASE, "CHART", "--namespace", NAMESPACE, *args, chart=chart)
    if result.returncode != 0:
        pytest.fail(f"{name} template {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def template(name: str, *args: str, chart: Path = CHART) -> list[Doc]:
    return [d for d in yaml.safe_load_all(template_text(name, *args, chart=chart)) if d]


@functools.cache
def _cached(name: str, args: tuple[str, ...]) -> tuple[Doc, ...]:
    return tuple(template(name, *args))


def render(name: str, *args: str) -> list[Doc]:
    """`helm template` of the chart, cached for the session (callers must not mutate the docs)."""
    return list(_cached(name, tuple(args)))


def scenario(name: str, scenario_name: str, *extra: str) -> list[Doc]:
    return render(name, "-f", str(CHART / "ci" / f"{scenario_name}-values.yaml"), *extra)


def fails(name: str, *args: str) -> str:
    """Render expecting failure; the error output."""
    result = run_helm(name, "template", RELEASE, "CHART", "--namespace", NAMESPACE, *args)
    assert result.returncode != 0, f"{name} template {' '.join(args)} succeeded"
    return result.stderr


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file under a unique module name (scripts/, other test folders' helpers)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gen_manifests() -> ModuleType:
    return load_module(REPO / "scripts" / "gen_manifests.py", "mcpool_gen_manifests")


def rules_of(role: Doc) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def pod_templates(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(where, pod spec) of every pod the chart creates."""
    found = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            found.append((where, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            found.append((where, doc["spec"]))
    return found


def operator_tests() -> ModuleType:
    """The operator tests' emulator, Cluster client and OperatorRunner (their conftest, loaded
    under its own module name so that pytest's own import of it is untouched)."""
    return load_module(REPO / "tests" / "operator" / "conftest.py", "mcpool_operator_test_conftest")


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The API emulator on a loopback port, with a kubeconfig in KUBECONFIG for the operator and
    for subprocesses (as outside a cluster); yields the operator tests' `Cluster` client."""
    oc = operator_tests()
    async with oc.ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "users": [{"name": "user", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "user"}}],
            "current-context": "emulator",
        }
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
        async with aiohttp.ClientSession(headers={"User-Agent": oc.TEST_USER_AGENT}) as session:
            yield oc.Cluster(emulator, url, session)


def operator_options(oc: ModuleType, *, all_namespaces: bool) -> Any:
    return oc.OperatorOptions(
        namespaces=() if all_namespaces else (oc.NAMESPACE,),
        all_namespaces=all_namespaces,
        liveness_endpoint=None,
        resync_interval_s=3600.0,
        watch_server_timeout_s=60,
        watch_client_timeout_s=90.0,
        request_timeout_s=10.0,
        worker_idle_timeout_s=0.3,
    )
