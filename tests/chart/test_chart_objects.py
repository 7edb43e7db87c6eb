"""What the chart renders, object by object: the CRD (equal to the operator's model, behind
crds.enabled/crds.keep, accepted by the API-server rules), least-privilege RBAC in both scopes,
hardened pods, the hooks, Redis, the NetworkPolicies and monitors matching the labels the
operator really puts on pool pods, dashboards and rules from files, the example pool, NOTES."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from apiserver_rules import crd_problems
from chart_support import (
    CHART,
    HELMS,
    NAMESPACE,
    SCENARIOS,
    Doc,
    fails,
    of_kind,
    one,
    pod_templates,
    render,
    rules_of,
    run_helm,
    scenario,
    template,
)
from mcpool_operator import builders
from mcpool_operator.crd import build_crd
from mcpool_operator.spec import Pool, parse_spec

KEEP = "helm.sh/resource-policy"
FINALIZER_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")


# --- the CRD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_rendered_crd_is_build_crd(helm: str) -> None:
    crd = copy.deepcopy(one(render(helm), "CustomResourceDefinition"))
    assert crd["metadata"].pop("annotations") == {KEEP: "keep"}  # crds.keep defaults to true
    assert crd == build_crd()


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_rendered_crd_passes_the_apiserver_rules(helm: str) -> None:
    assert crd_problems(one(render(helm), "CustomResourceDefinition")) == []


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_crds_enabled_false_renders_no_crd(helm: str) -> None:
    assert of_kind(render(helm, "--set", "crds.enabled=false"), "CustomResourceDefinition") == []


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_crds_keep_false_drops_the_annotation(helm: str) -> None:
    crd = one(render(helm, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"] and crd == build_crd()


# --- RBAC ------------------------------------------------------------------------------------


def manifests_role() -> set[tuple[str, str, str]]:
    docs = list(yaml.safe_load_all((CHART.parents[1] / "manifests" / "rbac.yaml").read_text()))
    return rules_of(next(d for d in docs if d["kind"] == "ClusterRole"))


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_cluster_scope_grants_the_checked_role(helm: str) -> None:
    # tests/operator/test_operator_rbac.py proves manifests/rbac.yaml's ClusterRole is exactly what
    # the operator calls; the chart must grant that same set.
    docs = render(helm)
    role = one(docs, "ClusterRole", "mcpool-operator")
    assert rules_of(role) == manifests_role()
    binding = one(docs, "ClusterRoleBinding", "mcpool-operator")
    assert binding["roleRef"]["name"] == "mcpool-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mcpool-operator", "namespace": NAMESPACE}]
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []
    assert "--all-namespaces" in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_namespaced_scope_has_a_role_per_namespace_and_nothing_cluster_wide(helm: str) -> None:
    docs = scenario(helm, "namespaced")
    watched = ["mcpool-system", "mcp", "edge"]
    assert of_kind(docs, "ClusterRole") == [] and of_kind(docs, "ClusterRoleBinding") == []
    roles = {d["metadata"]["namespace"]: d for d in of_kind(docs, "Role") if d["metadata"]["name"] == "mcpool-operator"}
    bindings = {d["metadata"]["namespace"]: d for d in of_kind(docs, "RoleBinding") if d["metadata"]["name"] == "mcpool-operator"}
    assert sorted(roles) == sorted(bindings) == sorted(watched)
    for ns in watched:
        assert rules_of(roles[ns]) == manifests_role()
        assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mcpool-operator"}
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": "mcpool-operator", "namespace": NAMESPACE}]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={ns}" for ns in watched]
    assert "--all-namespaces" not in args


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_namespaced_scope_defaults_to_the_release_namespace(helm: str) -> None:
    docs = render(helm, "--set", "watch.scope=namespaced")
    assert [d["metadata"]["namespace"] for d in of_kind(docs, "Role")] == [NAMESPACE, NAMESPACE]  # operator, cleanup
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={NAMESPACE}" in args


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render("helm4", "--set", "rbac.create=false", "--set", "cleanup.enabled=false")
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


def test_existing_service_account() -> None:
    docs = render("helm4", "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=mine")
    assert of_kind(docs, "ServiceAccount") == [one(docs, "ServiceAccount", "mcpool-cleanup")]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    assert one(docs, "ClusterRoleBinding", "mcpool-operator")["subjects"][0]["name"] == "mine"


# --- pods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS)
def test_every_pod_is_hardened(values: str) -> None:
    pods = pod_templates(scenario("helm4", values))
    assert pods
    for where, pod in pods:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            assert container["resources"]["limits"]["memory"] and container["resources"]["requests"], where


def test_operator_deployment() -> None:
    docs = scenario("helm4", "full")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    digest = "sha256:" + "0" * 64
    assert container["image"] == f"ghcr.io/mptcp-dev/mcpool-operator:0.1.0@{digest}"
    assert "--director-image=ghcr.io/mptcp-dev/mcpool:0.1.0" in container["args"]
    assert "--allowed-images=ghcr.io/mptcp-dev/mcpool" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability.svc:4318"} in container["env"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # The selector must stay fixed across upgrades: only the name/instance/component labels.
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "mcpool-operator",
        "app.kubernetes.io/instance": "mcpool",
        "app.kubernetes.io/component": "operator",
    }


def test_image_tag_override() -> None:
    docs = render("helm4", "--set", "operator.image.tag=9.9.9", "--set", "director.image.repository=example.com/d")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/mptcp-dev/mcpool-operator:9.9.9"
    assert "--director-image=example.com/d:0.1.0" in args


def test_allowed_images_reach_the_operator_and_can_be_opened() -> None:
    docs = render("helm4", "--set", "operator.allowedImages={registry.example/mcp/,ghcr.io/mptcp-dev/mcpool}")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--allowed-images=registry.example/mcp/,ghcr.io/mptcp-dev/mcpool" in args
    from mcpool_operator.main import parse_args

    options = parse_args([a for a in args if a.startswith(("--allowed-images", "--namespace", "--all-namespaces"))])
    assert options.allowed_images == ("registry.example/mcp/", "ghcr.io/mptcp-dev/mcpool")
    docs = render("helm4", "--set", "operator.allowedImages=null")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--allowed-images")]


def test_chart_selectors_never_match_pool_pods() -> None:
    # Pools' pods are labelled app.kubernetes.io/name=mcpool by the operator: no workload or
    # Service of the chart may select them (a Service would send traffic to the wrong pods).
    pool = Pool(name="mcpool", namespace=NAMESPACE, spec=parse_spec({}))
    pool_labels = [builders.labels(pool, c) for c in ("proxy", "director")]
    for doc in scenario("helm4", "full"):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector: dict[str, str] = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        else:
            continue
        for labels in pool_labels:
            assert not selector.items() <= labels.items(), f"{doc['kind']}/{doc['metadata']['name']} selects pool pods"


# --- hooks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_cleanup_hook(helm: str) -> None:
    docs = render(helm)
    job = one(docs, "Job", "mcpool-cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    hooked = [d for d in docs if d["metadata"]["name"] == "mcpool-cleanup"]
    assert {d["kind"] for d in hooked} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job"}
    for doc in hooked:
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete", doc["kind"]
        weight = int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert weight < 0 if doc["kind"] != "Job" else weight == 0, doc["kind"]  # RBAC before the Job
    assert rules_of(one(docs, "ClusterRole", "mcpool-cleanup")) == {
        ("list", "mcp.mptcp.dev", "mcppools"),
        ("delete", "mcp.mptcp.dev", "mcppools"),
    }
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "mcpool-cleanup" and job["spec"]["backoffLimit"] == 0
    assert container["command"] == ["python3", "-c"]
    assert container["args"] == [(CHART / "files" / "cleanup.py").read_text()]
    assert {"name": "WATCH_NAMESPACES", "value": ""} in container["env"]
    assert container["image"] == one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]


def test_cleanup_hook_namespaced() -> None:
    docs = scenario("helm4", "namespaced")
    roles = [d for d in of_kind(docs, "Role") if d["metadata"]["name"] == "mcpool-cleanup"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["edge", "mcp", "mcpool-system"]
    env = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "WATCH_NAMESPACES", "value": "mcpool-system mcp edge"} in env


def test_cleanup_disabled_renders_no_hook() -> None:
    docs = scenario("helm4", "external-redis")
    assert not [d for d in docs if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_helm_test_pod_checks_the_liveness_endpoint_through_the_service(helm: str) -> None:
    docs = render(helm)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = one(docs, "Service", "mcpool-operator")
    deployment = one(docs, "Deployment")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["ports"][0] == {"name": "health", "port": 8080, "targetPort": "health", "protocol": "TCP"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    script = pod["spec"]["containers"][0]["args"][0]
    assert f'"http://mcpool-operator.{NAMESPACE}.svc:8080/healthz"' in script
    compile(script, "helm-test", "exec")  # valid Python
    assert pod["spec"]["containers"][0]["image"] == container["image"]


# --- Redis -----------------------------------------------------------------------------------


def test_bundled_redis() -> None:
    docs = scenario("helm4", "full")
    secret = one(docs, "Secret", "mcpool-redis")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    sts = one(docs, "StatefulSet", "mcpool-redis")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "docker.io/library/redis:7.4.2-alpine"
    assert container["env"] == [
        {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mcpool-redis", "key": "password"}}}
    ]
    assert "$(REDIS_PASSWORD)" in container["args"]
    service = one(docs, "Service", "mcpool-redis")
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # The example director pool is wired to it.
    pool = one(docs, "MCPPool")
    assert pool["spec"]["redis"] == {
        "url": f"redis://mcpool-redis.{NAMESPACE}.svc:6379/0",
        "passwordSecretRef": {"name": "mcpool-redis", "key": "password"},
    }


def test_bundled_redis_with_existing_secret() -> None:
    docs = render("helm4", "--set", "redis.bundled.enabled=true", "--set", "redis.bundled.existingSecret=mine",
                  "--set", "redis.bundled.existingSecretKey=pw")
    assert of_kind(docs, "Secret") == []
    env = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "pw"}


def test_no_redis_by_default() -> None:
    assert not [d for d in render("helm4") if "redis" in d["metadata"]["name"]]


# --- NetworkPolicies and monitors match what the operator builds -----------------------------


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def pool_objects(namespace: str = "mcp") -> list[Doc]:
    spec = {
        "replicas": 2,
        "affinity": {"mechanism": "director"},
        "redis": {"url": "redis://r:6379"},
        "director": {"vip": "198.18.0.10"},
        "service": {"addresses": ["198.18.0.10"]},
    }
    objects: list[Doc] = builders.build_children(Pool(name="edge", namespace=namespace, spec=parse_spec(spec)))
    return objects


def pod_labels_of(objects: list[Doc], kind: str) -> dict[str, str]:
    labels: dict[str, str] = one(objects, kind)["spec"]["template"]["metadata"]["labels"]
    return labels


def test_redis_policy_admits_pool_pods_and_directors_only() -> None:
    docs = scenario("helm4", "full")
    policy = one(docs, "NetworkPolicy", "mcpool-redis")
    redis_pod = one(docs, "StatefulSet", "mcpool-redis")["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["spec"]["podSelector"], redis_pod)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    peers = [p for p in rule["from"] if "podSelector" in p]
    assert len(peers) == 1 and peers[0]["namespaceSelector"] == {}
    objects = pool_objects()
    assert matches(peers[0]["podSelector"], pod_labels_of(objects, "StatefulSet"))
    assert matches(peers[0]["podSelector"], pod_labels_of(objects, "DaemonSet"))
    assert not matches(peers[0]["podSelector"], one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"])
    # Directors are on the host network: admitted by node address.
    assert [p["ipBlock"]["cidr"] for p in rule["from"] if "ipBlock" in p] == ["10.0.0.0/16", "fd00::/64"]


def test_pools_policy_lets_cpe_traffic_in() -> None:
    docs = scenario("helm4", "full")
    policy = one(docs, "NetworkPolicy", "mcpool-pools")
    assert policy["metadata"]["namespace"] == "mcp"
    objects = pool_objects()
    assert matches(policy["spec"]["podSelector"], pod_labels_of(objects, "StatefulSet"))
    assert not matches(policy["spec"]["podSelector"], pod_labels_of(objects, "DaemonSet"))
    cpe, admin, nodes, operator = policy["spec"]["ingress"]
    assert [p["ipBlock"]["cidr"] for p in cpe["from"]] == ["0.0.0.0/0", "::/0"]
    assert cpe["ports"] == [{"port": 5124, "protocol": "TCP"}, {"port": 1080, "protocol": "TCP"}]
    container = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "admin", "containerPort": builders.ADMIN_PORT, "protocol": "TCP"} in container["ports"]
    assert admin["ports"] == [{"port": "admin", "protocol": "TCP"}]
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {"port": 4789, "protocol": "UDP"} in nodes["ports"]
    # The operator reads draining pods' /readyz (status.draining): its pods, in its namespace.
    assert operator["ports"] == [{"port": "admin", "protocol": "TCP"}]
    (peer,) = operator["from"]
    operator_pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert matches(peer["podSelector"], operator_pod)
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": one(docs, "Deployment")["metadata"]["namespace"]}}


def test_namespaced_policies_follow_the_watched_namespaces() -> None:
    docs = scenario("helm4", "namespaced")
    pools = [d for d in of_kind(docs, "NetworkPolicy") if d["metadata"]["name"] == "mcpool-pools"]
    assert sorted(p["metadata"]["namespace"] for p in pools) == ["edge", "mcp", "mcpool-system"]
    operator = one(docs, "NetworkPolicy", "mcpool-operator")
    assert operator["spec"]["ingress"][0] == {
        "from": [{"podSelector": {}}],
        "ports": [{"port": "health", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}],
    }


def test_service_monitor_selects_the_pools_admin_service() -> None:
    monitor = one(scenario("helm4", "full"), "ServiceMonitor", "mcpool-pools")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    services = [o for o in pool_objects() if o["kind"] == "Service"]
    selected = [s for s in services if matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
    with_admin = [s for s in selected if any(p["name"] == "admin" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in with_admin] == ["edge-pods"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_operator_metrics_are_served_and_scraped() -> None:
    docs = scenario("helm4", "full")
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-listen=0.0.0.0:8081" in container["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    service = one(docs, "Service", "mcpool-operator")
    assert {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    monitor = one(docs, "ServiceMonitor", "mcpool-operator")
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # Off: the operator serves nothing and nothing scrapes it.
    off = render("helm4", "-f", str(CHART / "ci" / "full-values.yaml"), "--set", "operator.metricsPort=0")
    container = one(off, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-listen=" in container["args"] and all(p["name"] != "metrics" for p in container["ports"])
    assert [m["metadata"]["name"] for m in of_kind(off, "ServiceMonitor")] == ["mcpool-pools"]


def test_pod_monitor_selects_the_pools_pods() -> None:
    monitor = one(scenario("helm4", "external-redis"), "PodMonitor")
    objects = pool_objects()
    assert matches(monitor["spec"]["selector"], pod_labels_of(objects, "StatefulSet"))
    assert not matches(monitor["spec"]["selector"], pod_labels_of(objects, "DaemonSet"))
    monitor_ns = one(render("helm4", "--set", "monitoring.podMonitor.enabled=true", "--set", "watch.scope=namespaced",
                            "--set", "watch.namespaces={mcp,edge}"), "PodMonitor")
    assert monitor_ns["spec"]["namespaceSelector"] == {"matchNames": ["mcp", "edge"]}


# --- dashboards and rules from files ---------------------------------------------------------


def test_dashboards_and_rules_follow_the_shipped_files() -> None:
    # Enabling them renders one object per file shipped, and no empty object without files.
    docs = scenario("helm4", "full")  # dashboards and the PrometheusRule are enabled there
    shipped_dashboards = sorted((CHART / "dashboards").glob("*.json"))
    shipped_rules = sorted((CHART / "rules").glob("*.yaml"))
    assert len(of_kind(docs, "ConfigMap")) == len(shipped_dashboards)
    assert len(of_kind(docs, "PrometheusRule")) == (1 if shipped_rules else 0)


@pytest.fixture(scope="module")
def chart_with_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chart = tmp_path_factory.mktemp("chart") / "mcpool"
    shutil.copytree(CHART, chart)
    (chart / "dashboards").mkdir(exist_ok=True)
    (chart / "rules").mkdir(exist_ok=True)
    # Only this test's files: the shipped dashboards and rules are checked above.
    for shipped in [*(chart / "dashboards").glob("*.json"), *(chart / "rules").glob("*.yaml")]:
        shipped.unlink()
    (chart / "dashboards" / "MCP_Overview.json").write_text(json.dumps({"title": "MCP overview", "panels": []}, indent=2))
    (chart / "rules" / "mcpool.yaml").write_text(yaml.safe_dump(RULES))
    (chart / "rules" / "more.yaml").write_text(yaml.safe_dump(MORE_RULES))
    return chart


RULES = {
    "groups": [
        {
            "name": "mcpool",
            "rules": [
                {"alert": "MCPPoolDown", "expr": 'up{job="mcp"} == 0', "for": "5m", "labels": {"severity": "critical"},
                 "annotations": {"summary": "An MCP pod is down: {{ $labels.pod }}"}},
                {"record": "mcpool:connections:sum", "expr": "sum(mcp_connections)"},
            ],
        }
    ]
}
MORE_RULES = {"groups": [{"name": "more", "rules": [{"record": "x:y", "expr": "vector(1)"}]}]}


@pytest.mark.parametrize("helm", sorted(HELMS))
def test_dashboards_and_rules_render_from_files(helm: str, chart_with_files: Path) -> None:
    docs = template(helm, "--set", "dashboards.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
                    "--set", "dashboards.labels.team=net", chart=chart_with_files)
    configmap = one(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == "mcpool-dashboard-mcp-overview"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["team"] == "net"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "mcpool"}
    assert json.loads(configmap["data"]["MCP_Overview.json"]) == {"title": "MCP overview", "panels": []}
    rule = one(docs, "PrometheusRule")
    # Both files' groups, in file-name order; Prometheus templates ({{ $labels }}) pass through untouched.
    assert rule["spec"]["groups"] == RULES["groups"] + MORE_RULES["groups"]
    # Off: nothing, even with files present.
    assert not of_kind(template(helm, chart=chart_with_files), "ConfigMap")


def test_a_rules_file_without_groups_fails(tmp_path: Path) -> None:
    chart = tmp_path / "mcpool"
    shutil.copytree(CHART, chart)
    (chart / "rules").mkdir(exist_ok=True)
    (chart / "rules" / "bad.yaml").write_text(yaml.safe_dump({"rules": []}))
    result = run_helm("helm4", "template", "x", "CHART", "--set", "monitoring.prometheusRule.enabled=true", chart=chart)
    assert result.returncode != 0 and "rules/bad.yaml must be a Prometheus rules file" in result.stderr


# --- the example pool ------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "extra"), [("full", ()), ("external-redis", ()), ("default", ("--set", "examples.pool.enabled=true"))])
def test_example_pool_is_valid_for_the_operator(values: str, extra: tuple[str, ...]) -> None:
    pool = one(scenario("helm4", values, *extra), "MCPPool")
    assert pool["metadata"]["namespace"] == NAMESPACE
    parse_spec(pool["spec"])  # the operator's own model accepts it (the CRD check is in test_chart_render)


def test_example_pool_external_redis() -> None:
    pool = one(scenario("helm4", "external-redis"), "MCPPool")
    assert pool["spec"]["redis"] == {"url": "rediss://redis.cache.svc:6380/2"}


EXT = "redis.external"
SENTINEL_VALUES = ("--set", "redis.external.url=", "--set", f"{EXT}.sentinel.addresses={{s-0.redis:26379,[2001:db8::5]:26379}}",
                   "--set", f"{EXT}.sentinel.masterName=mcpool", "--set", f"{EXT}.sentinel.existingSecret=sentinel-auth",
                   "--set", f"{EXT}.existingSecret=redis-auth", "--set", f"{EXT}.existingSecretKey=pw")  # fmt: skip
CLUSTER_VALUES = ("--set", "redis.external.url=", "--set", f"{EXT}.cluster.addresses={{redis-0.redis:6379,redis-1.redis:6379}}",
                  "--set", f"{EXT}.tls=true")  # fmt: skip


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_example_pool_on_sentinel_and_cluster(helm: str) -> None:
    pool = one(scenario(helm, "external-redis", *SENTINEL_VALUES), "MCPPool")
    assert pool["spec"]["redis"] == {
        "sentinel": {"addresses": ["s-0.redis:26379", "[2001:db8::5]:26379"], "masterName": "mcpool",
                     "passwordSecretRef": {"name": "sentinel-auth", "key": "password"}},
        "passwordSecretRef": {"name": "redis-auth", "key": "pw"},
    }  # fmt: skip
    parse_spec(pool["spec"])
    pool = one(scenario(helm, "external-redis", *CLUSTER_VALUES), "MCPPool")
    assert pool["spec"]["redis"] == {"cluster": {"addresses": ["redis-0.redis:6379", "redis-1.redis:6379"], "tls": True}}
    parse_spec(pool["spec"])


def test_redis_modes_are_exclusive_and_complete() -> None:
    assert "set only one of url, sentinel.addresses and cluster.addresses" in fails(
        "helm4", "-f", str(CHART / "ci" / "external-redis-values.yaml"), "--set", f"{EXT}.cluster.addresses={{r:6379}}")
    assert "mutually exclusive" in fails("helm4", "--set", "redis.bundled.enabled=true",
                                         "--set", f"{EXT}.cluster.addresses={{r:6379}}")  # fmt: skip
    assert "needs redis.external.sentinel.masterName" in fails("helm4", "--set", f"{EXT}.sentinel.addresses={{s:26379}}")


def test_no_example_pool_by_default() -> None:
    assert of_kind(render("helm4"), "MCPPool") == []


# --- NOTES -----------------------------------------------------------------------------------


def notes(*args: str) -> str:
    # Helm 4 renders NOTES in a client-only dry run; Helm 3.17 insists on reaching a cluster.
    result = run_helm("helm4", "install", "mcpool", "CHART", "--namespace", NAMESPACE, "--dry-run=client", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_say_how_to_create_and_watch_a_pool_and_how_to_uninstall() -> None:
    text = notes()
    assert "kind: MCPPool" in text and "kubectl get mcppools -A -w" in text
    assert "pre-delete hook" in text and "kubectl delete crd mcppools.mcp.mptcp.dev" in text
    manual = notes("--set", "cleanup.enabled=false", "--set", "watch.scope=namespaced", "--set", "crds.keep=false")
    assert "kubectl delete mcppools --all -n <each watched namespace> --wait" in manual
    assert "delete crd" not in manual and f"namespace: {NAMESPACE}" in manual
    redis = notes("--set", "redis.bundled.enabled=true")
    assert f"redis://mcpool-redis.{NAMESPACE}.svc:6379/0" in redis and "passwordSecretRef" in redis
