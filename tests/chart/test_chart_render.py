"""The chart as Helm sees it, with the real Helm 4 and Helm 3 binaries: `helm lint --strict`,
every ci/*-values.yaml scenario rendered and every object validated strictly against the oldest
and newest supported Kubernetes, the strict values schema, and the values the chart refuses."""

from __future__ import annotations

import tarfile
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from apiserver_rules import apply_defaults, cel_failures, to_json_schema
from chart_support import CHART, HELMS, SCENARIOS, Doc, fails, helm_binary, run_helm, scenario
from kubernetes_validate.utils import latest_version
from mcpool_operator.crd import build_crd

OLDEST = "1.29"
K8S_VERSIONS = [OLDEST, latest_version()]
# Kinds of CRDs kubernetes-validate has no schema for: checked by CUSTOM_CHECKS instead.
NOT_CORE = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "MCPPool"}
ROOT_SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_both_helm_binaries_are_the_expected_major_versions() -> None:
    for name, major in (("helm4", "v4."), ("helm3", "v3.")):
        result = run_helm(name, "version", "--template", "{{.Version}}")
        assert result.returncode == 0 and result.stdout.startswith(major), (name, result.stdout, result.stderr)


@pytest.mark.parametrize("helm", sorted(HELMS))
@pytest.mark.parametrize("values", SCENARIOS)
def test_lint_strict(helm: str, values: str) -> None:
    result = run_helm(helm, "lint", "--strict", "CHART", "--namespace", "mcpool-system", "-f", str(CHART / "ci" / f"{values}-values.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kube_version_floor_is_the_oldest_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={OLDEST}.0-0"
    for helm in HELMS:
        assert "kubeVersion" in fails(helm, "--kube-version", "1.28.0")
        assert run_helm(helm, "template", "x", "CHART", "--kube-version", f"{OLDEST}.0").returncode == 0
        assert run_helm(helm, "template", "x", "CHART", "--kube-version", latest_version()).returncode == 0


def admit_pool(doc: Doc) -> list[str]:
    """What the API server says about an MCPPool (the CRD's schema, then its CEL rules)."""
    validator = jsonschema.Draft202012Validator(to_json_schema(ROOT_SCHEMA))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors or cel_failures(ROOT_SCHEMA, apply_defaults(ROOT_SCHEMA, doc))


def check_monitor(doc: Doc) -> None:
    spec = doc["spec"]
    assert set(spec) <= {"namespaceSelector", "selector", "endpoints", "podMetricsEndpoints"}
    assert spec["selector"]["matchLabels"]
    ns = spec["namespaceSelector"]
    assert ns == {"any": True} or (set(ns) == {"matchNames"} and all(isinstance(n, str) for n in ns["matchNames"]))
    endpoints = spec["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    # The pools' MCP pods serve /metrics on "admin", the operator on "metrics".
    port = "metrics" if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "operator" else "admin"
    assert endpoints and all(set(e) <= {"port", "path", "interval"} and e["port"] == port for e in endpoints)


def check_rule(doc: Doc) -> None:
    groups = doc["spec"]["groups"]
    assert set(doc["spec"]) == {"groups"} and groups
    for group in groups:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str), rule


def check_pool(doc: Doc) -> None:
    assert admit_pool(doc) == [], doc


CUSTOM_CHECKS: dict[str, Any] = {"ServiceMonitor": check_monitor, "PodMonitor": check_monitor, "PrometheusRule": check_rule, "MCPPool": check_pool}


@pytest.mark.parametrize("helm", sorted(HELMS))
@pytest.mark.parametrize("values", SCENARIOS)
def test_scenario_renders_valid_objects(helm: str, values: str) -> None:
    docs = scenario(helm, values)
    assert docs, f"{values} renders nothing"
    for doc in docs:
        where = f"{values}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in NOT_CORE:
            assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "mcp.mptcp.dev/v1alpha1"), where
            CUSTOM_CHECKS[doc["kind"]](doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} invalid for Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_both_helms_render_the_same_objects() -> None:
    for values in SCENARIOS:
        four, three = scenario("helm4", values), scenario("helm3", values)
        # The random Redis password differs between two renderings, and nothing else may.
        strip = [d for d in four if d["kind"] != "Secret"], [d for d in three if d["kind"] != "Secret"]
        assert strip[0] == strip[1], values


def test_the_not_core_checks_catch_a_bad_object() -> None:
    # The custom checks must be able to fail (a ServiceMonitor on the wrong port, a bad pool).
    monitor = next(d for d in scenario("helm4", "full") if d["kind"] == "ServiceMonitor")
    bad = yaml.safe_load(yaml.safe_dump(monitor))
    bad["spec"]["endpoints"][0]["port"] = "metrics"
    with pytest.raises(AssertionError):
        check_monitor(bad)
    pool = next(d for d in scenario("helm4", "full") if d["kind"] == "MCPPool")
    assert admit_pool({**pool, "spec": {**pool["spec"], "replicas": "three"}})
    # A director pool without its Redis: refused by a CEL rule.
    assert admit_pool({**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "redis"}})


# --- the values schema -----------------------------------------------------------------------

TYPOS = {
    "operator.imagee.tag=x": "imagee",
    "redis.bundled.enabeld=true": "enabeld",
    "crds.keeep=false": "keeep",
    "monitoring.serviceMonitor.intervall=1m": "intervall",
    "topLevelTypo=1": "topLevelTypo",
}


@pytest.mark.parametrize("helm", sorted(HELMS))
@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_a_typo_fails_naming_the_key(helm: str, typo: str) -> None:
    error = fails(helm, "--set", typo)
    assert TYPOS[typo] in error and "not allowed" in error, error


@pytest.mark.parametrize("helm", sorted(HELMS))
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("crds.enabled=maybe", "enabled"),
        ("watch.scope=everywhere", "scope"),
        ("operator.healthPort=70000", "healthPort"),
        ("operator.logFormat=xml", "logFormat"),
        ("redis.external.url=redis://:pw@redis:6379", "url"),
        ("operator.image.digest=latest", "digest"),
    ],
)
def test_a_wrong_value_fails_naming_the_key(helm: str, setting: str, key: str) -> None:
    assert key in fails(helm, "--set", setting)


CONFLICTS = {
    "bundled and external redis": (
        ["--set", "redis.bundled.enabled=true", "--set", "redis.external.url=redis://r:6379"],
        "redis.bundled.enabled and redis.external (url, sentinel or cluster) are mutually exclusive",
    ),
    "two monitors": (
        ["--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true"],
        "enable one",
    ),
    "director example without redis": (
        ["--set", "examples.pool.enabled=true", "--set", "examples.pool.spec.affinity.mechanism=director"],
        "examples.pool uses affinity.mechanism director, which needs a Redis",
    ),
    "namespaces with cluster scope": (
        ["--set", "watch.namespaces={mcp}"],
        "watch.namespaces is only used with watch.scope=namespaced",
    ),
    "example outside the watched namespaces": (
        ["--set", "watch.scope=namespaced", "--set", "watch.namespaces={mcp}", "--set", "examples.pool.enabled=true"],
        "which watch.namespaces does not include",
    ),
    "cleanup without rbac": (["--set", "rbac.create=false"], "cleanup.enabled needs rbac.create"),
    "existing secret without bundled redis": (
        ["--set", "redis.bundled.existingSecret=mine"],
        "redis.bundled.existingSecret is set but redis.bundled.enabled is false",
    ),
    "no service account name": (
        ["--set", "serviceAccount.create=false"],
        "serviceAccount.name is required when serviceAccount.create is false",
    ),
}


@pytest.mark.parametrize("helm", sorted(HELMS))
@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_conflicting_values_fail_with_a_message(helm: str, case: str) -> None:
    args, message = CONFLICTS[case]
    error = fails(helm, *args)
    assert message in error, error


def test_helm_binaries_fail_loudly_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import chart_support

    monkeypatch.setitem(chart_support.HELMS, "helm4", tmp_path / "nowhere" / "helm")
    with pytest.raises(pytest.fail.Exception, match="missing: run scripts/install-helm.sh"):
        helm_binary("helm4")


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_package_holds_what_the_templates_read(helm: str, tmp_path: Path) -> None:
    result = run_helm(helm, "package", "CHART", "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("mcpool-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"mcpool/Chart.yaml", "mcpool/values.schema.json", "mcpool/files/cleanup.py", "mcpool/templates/crds/mcppools.yaml"} <= names
    assert not [n for n in names if n.endswith("README.md") and n != "mcpool/README.md"]
    # The packaged chart renders like the source tree.
    assert run_helm(helm, "template", "mcpool", str(archive)).returncode == 0


def test_app_version_is_the_project_version() -> None:
    # The image tags default to appVersion; the images are built with the project's version.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
