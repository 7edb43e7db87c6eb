"""Builders: every object produced for the samples and edge cases is valid Kubernetes (strict
schemas of the oldest and newest supported versions), and the important fields are as designed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from mcpool_operator import builders
from mcpool_operator.spec import MCPPoolSpec, Pool, SpecError, parse_spec
from mcpool_proxy.config import parse_config

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "manifests" / "samples"
# CRD validation rules (CEL) are GA from 1.29; older servers would skip the cross-field checks.
OLDEST_SUPPORTED = "1.29"
K8S_VERSIONS = [OLDEST_SUPPORTED, latest_version()]


def sample_pools() -> dict[str, dict[str, Any]]:
    pools = {}
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "MCPPool":
                pools[path.stem] = doc
    return pools


def pool_of(body: dict[str, Any]) -> Pool:
    body = {**body, "metadata": {**body["metadata"], "uid": "0b7f5b1e-0000-4000-8000-000000000001", "generation": 1}}
    return Pool.from_body(body)


EDGE_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "scaled-to-zero": {"replicas": 0},
    "socks5-only-low-port": {
        "listeners": {"convert": {"enabled": False}, "socks5": {"enabled": True, "port": 443}, "fastOpen": False},
        "service": {"type": "ClusterIP", "addresses": ["198.18.0.5", "2001:db8::5"]},
    },
    "join-address-v6-custom-port": {
        "replicas": 3,
        "affinity": {
            "mechanism": "join-address",
            "joinAddresses": ["2001:db8::10", "2001:db8::11", "2001:db8::12", "2001:db8::13"],
            "joinPort": 5200,
        },
        "kernel": {"mptcpChecksum": False},
    },
    "director-everything": {
        "replicas": 5,
        "affinity": {"mechanism": "director"},
        "redis": {"url": "rediss://redis:6380/1"},
        "director": {
            "nodeSelector": {"node-role.kubernetes.io/edge": ""},
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "service": {"type": "NodePort", "addresses": ["198.18.0.9"], "externalTrafficPolicy": "Cluster"},
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": 2, "memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "value": "mcp", "effect": "NoExecute", "tolerationSeconds": 30}],
        "opentelemetry": {"endpoint": "http://collector:4318"},
        "drainTimeoutSeconds": 0.5,
        "logLevel": "debug",
        "accessPaths": [{"name": "dsl", "networks": ["100.64.0.0/16"]},
                        {"name": "lte", "networks": ["10.128.0.0/12", "2001:db8:4::/48"]}],
    },
    "on-path-gateways": {
        "policy": {"allowedCpes": ["198.18.10.0/24", "2001:db8:10::/64"]},
        "onPath": {
            "enabled": True,
            "cpeInterfaces": ["eth1"],
            "nodeSelector": {"mcp.mptcp.dev/gateway": "true"},
            "tolerations": [{"key": "gateway", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
}


def all_cases() -> dict[str, Pool]:
    cases = {f"sample-{name}": pool_of(body) for name, body in sample_pools().items()}
    for name, spec in EDGE_CASES.items():
        cases[name] = pool_of({"metadata": {"name": "p" + str(len(name)), "namespace": "mcp"}, "spec": spec})
    return cases


CASES = all_cases()


def test_samples_exist() -> None:
    assert set(sample_pools()) == {"single", "director", "join-address"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_children_validate_strictly(case: str, version: str) -> None:
    children = builders.build_children(CASES[case])
    assert children
    for obj in children:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{case}: {obj['kind']} {obj['metadata']['name']} invalid for {version}: {path}: {exc.message}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_config_file_is_accepted_by_the_proxy(case: str) -> None:
    configmap = builders.build_configmap(CASES[case])
    for text in configmap["data"].values():
        config = parse_config(yaml.safe_load(text))
        assert config.admin == "0.0.0.0:9090"
        assert config.kernel.apply_sysctls is False
        assert config.affinity.advertise is None and config.affinity.pod_name is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_text_is_the_proxy_models_own(case: str) -> None:
    # The ConfigMap is rendered with libyaml's emitter (when PyYAML has it) for speed: the text
    # must be exactly what the proxy's ProxyConfig.to_yaml writes (pure-Python emitter), or an
    # operator upgrade would change every ConfigMap's hash and roll every pod.
    pool = CASES[case]
    data = builders.build_configmap(pool)["data"]
    ordinals = [None] if set(data) == {"config.yaml"} else range(len(pool.spec.affinity.join_addresses))
    assert list(data.values()) == [builders.build_proxy_config(pool, o).to_yaml() for o in ordinals]


def test_statefulset_hashes_the_configmap_it_is_given() -> None:
    pool = CASES["sample-single"]
    configmap = builders.build_configmap(pool)
    annotation = builders.CONFIG_HASH_ANNOTATION
    given = builders.build_statefulset(pool, configmap)["spec"]["template"]["metadata"]["annotations"]
    built = builders.build_statefulset(pool)["spec"]["template"]["metadata"]["annotations"]
    assert given[annotation] == built[annotation] == builders.config_hash(configmap)


def test_single_sample_golden() -> None:
    pool = CASES["sample-single"]
    sts = builders.build_statefulset(pool)
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert sts["metadata"]["name"] == "single" and sts["spec"]["serviceName"] == "single-pods"
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["selector"]["matchLabels"] == builders.selector_labels(pool)
    assert container["args"] == ["proxy", "--config", "/etc/mcpool/config.yaml"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["sysctls"] == [
        {"name": "net.mptcp.enabled", "value": "1"},
        {"name": "net.mptcp.checksum_enabled", "value": "1"},
        {"name": "net.ipv4.tcp_fastopen", "value": "3"},
    ]
    assert pod["terminationGracePeriodSeconds"] > pool.spec.drain_timeout_seconds
    # SIGTERM itself starts the drain (and tells the directors): a preStop hook would only delay
    # it and take its time from the grace period (docs/operations.md, rolling update).
    assert "lifecycle" not in container
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["OTEL_SERVICE_NAME"]["value"] == "mcpool-proxy"
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == (
        "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),mcpool.pool=single"
    )
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    order = [e["name"] for e in container["env"]]
    assert order.index("POD_NAME") < order.index("OTEL_RESOURCE_ATTRIBUTES")
    svc = builders.build_service(pool)
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["ports"] == [{"name": "convert", "port": 5124, "targetPort": "convert", "protocol": "TCP"}]
    assert [c["kind"] for c in builders.build_children(pool)] == [
        "ServiceAccount", "ConfigMap", "Service", "Service", "StatefulSet", "PodDisruptionBudget"
    ]


def test_director_sample_golden() -> None:
    pool = CASES["sample-director"]
    children = builders.build_children(pool)
    kinds = {(c["kind"], c["metadata"]["name"]) for c in children}
    assert ("DaemonSet", "steered-director") in kinds and ("ConfigMap", "steered-director") in kinds
    ds = builders.build_director_daemonset(pool)
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"mcp.mptcp.dev/director": "true"}
    container = pod["containers"][0]
    assert container["args"] == ["director", "--config", "/etc/mcpool-director/director.yaml"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mcp-redis", "key": "password"}}} in container["env"]
    director_config = yaml.safe_load(builders.build_director_configmap(pool)["data"]["director.yaml"])
    index = builders.director_index(pool)  # per-pool node resources (docs/affinity.md)
    assert director_config == {
        "vip": "198.18.0.10",
        "ports": [5124, 1080],
        "redis_url": "redis://mcp-redis.mcp.svc:6379/0",
        "pool": "mcp.steered",
        "nft_table": f"mcpool_{index:03x}",
        "device_prefix": f"mcp{index:03x}v",
        "queue_num": director_config["queue_num"],
        "mark_base": director_config["mark_base"],
        "vxlan_vni_base": director_config["vxlan_vni_base"],
        "route_table_base": director_config["route_table_base"],
        "metrics_listen": director_config["metrics_listen"],
        "vxlan_port": 4789,
        "pod_mac": "02:6d:63:70:00:01",
        "snapshot_grace_s": 10.0,
    }
    # The director and the pods agree on the tunnel: same VIP, port and receive MAC.
    pod_affinity = parse_config(yaml.safe_load(builders.build_configmap(pool)["data"]["config.yaml"])).affinity
    assert (pod_affinity.vip, pod_affinity.vxlan_port, pod_affinity.pod_mac) == (
        director_config["vip"], director_config["vxlan_port"], director_config["pod_mac"]
    )
    proxy = parse_config(yaml.safe_load(builders.build_configmap(pool)["data"]["config.yaml"]))
    assert proxy.affinity.mechanism == "director" and proxy.affinity.backend == "redis"
    assert proxy.affinity.pool == "mcp.steered"
    assert proxy.upstream.protocol == "mptcp" and proxy.listen.socks5 == "[::]:1080"
    sts_container = builders.build_statefulset(pool)["spec"]["template"]["spec"]["containers"][0]
    assert sts_container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    env = {e["name"]: e.get("value") for e in sts_container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
    assert builders.build_service(pool)["spec"]["loadBalancerIP"] == "198.18.0.10"


def test_join_address_sample_golden() -> None:
    pool = CASES["sample-join-address"]
    cm = builders.build_configmap(pool)
    assert sorted(cm["data"]) == ["joined-0.yaml", "joined-1.yaml"]
    for ordinal, address in enumerate(["198.18.1.10", "198.18.1.11"]):
        config = parse_config(yaml.safe_load(cm["data"][f"joined-{ordinal}.yaml"]))
        assert config.affinity.mechanism == "join-address"
        assert config.affinity.join_address == f"{address}:5124"
    services = builders.build_join_services(pool)
    assert [s["metadata"]["name"] for s in services] == ["joined-join-0", "joined-join-1"]
    assert services[1]["spec"]["loadBalancerIP"] == "198.18.1.11"
    assert services[1]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "joined-1"
    sts = builders.build_statefulset(pool)
    pod = sts["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["proxy", "--config", "/etc/mcpool/$(POD_NAME).yaml"]
    assert {"name": "net.mptcp.allow_join_initial_addr_port", "value": "0"} in pod["securityContext"]["sysctls"]
    # Needs NET_ADMIN for its signal endpoint: runs as uid 0 holding only that capability.
    security = pod["containers"][0]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]} and security["runAsUser"] == 0


def test_scaling_changes_neither_config_nor_hash() -> None:
    body = sample_pools()["join-address"]
    one = pool_of({**body, "spec": {**body["spec"], "replicas": 1}})
    two = pool_of(body)
    assert builders.build_configmap(one) == builders.build_configmap(two)
    hash_one = builders.build_statefulset(one)["spec"]["template"]["metadata"]["annotations"]
    assert hash_one == builders.build_statefulset(two)["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pool_gets_the_admission_filter_from_an_init_container(case: str) -> None:
    """Whatever the mechanism (none too, whose proxy holds no capability), an init container with
    CAP_NET_ADMIN alone installs the kernel admission filter for the proxy's own configuration,
    and the proxy is told where to find it installed."""
    pool = CASES[case]
    pod = builders.build_statefulset(pool)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    proxy = pod["containers"][0]
    assert init["name"] == "admission" and init["image"] == proxy["image"] == pool.spec.image
    assert init["command"] == ["mcpool"]
    assert init["args"] == ["admission", "install", "--config", builders.config_path(pool)]
    assert init["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
    }  # fmt: skip
    assert [e["name"] for e in init["env"]] == ["POD_NAME"]  # no secret reaches it
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    proxy_mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert init_mounts["admission"]["mountPath"] == proxy_mounts["admission"]["mountPath"] == builders.ADMISSION_DIR
    assert "readOnly" not in init_mounts["admission"] and proxy_mounts["admission"]["readOnly"] is True
    assert init_mounts["config"] == proxy_mounts["config"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["admission"]
    for data in builders.build_configmap(pool)["data"].values():
        kernel = parse_config(yaml.safe_load(data)).kernel
        assert kernel.admission_filter is True and kernel.admission_status_file == builders.ADMISSION_STATUS_FILE
    if pool.spec.affinity.mechanism == "none":
        assert "NET_ADMIN" not in proxy["securityContext"]["capabilities"].get("add", [])


def test_spec_change_changes_config_hash() -> None:
    # The pods are rolled, so a new pod's admission init container installs the new allowed_cpes.
    a = pool_of({"metadata": {"name": "a", "namespace": "n"}, "spec": {}})
    b = pool_of({"metadata": {"name": "a", "namespace": "n"}, "spec": {"policy": {"allowedCpes": ["198.18.0.0/15"]}}})
    annotation = builders.CONFIG_HASH_ANNOTATION
    hashes = {builders.build_statefulset(p)["spec"]["template"]["metadata"]["annotations"][annotation] for p in (a, b)}
    assert len(hashes) == 2


def test_edge_case_details() -> None:
    socks = CASES["socks5-only-low-port"]
    container = builders.build_statefulset(socks)["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"]["add"] == ["NET_BIND_SERVICE"]
    assert [p["name"] for p in container["ports"]] == ["socks5", "admin"]
    svc = builders.build_service(socks)
    assert svc["spec"]["externalIPs"] == ["198.18.0.5", "2001:db8::5"] and "externalTrafficPolicy" not in svc["spec"]
    sysctls = builders.pod_sysctls(socks)
    assert {"name": "net.ipv4.tcp_fastopen", "value": "3"} not in sysctls
    join = CASES["join-address-v6-custom-port"]
    config = parse_config(yaml.safe_load(builders.build_configmap(join)["data"]["p27-2.yaml"]))
    assert config.affinity.join_address == "[2001:db8::12]:5200"
    assert {"name": "net.mptcp.checksum_enabled", "value": "0"} in builders.pod_sysctls(join)
    assert len(builders.build_configmap(join)["data"]) == 4  # every address, not only replicas
    everything = CASES["director-everything"]
    sts = builders.build_statefulset(everything)
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 16
    proxy = parse_config(yaml.safe_load(next(iter(builders.build_configmap(everything)["data"].values()))))
    assert proxy.access_paths == {"dsl": ["100.64.0.0/16"], "lte": ["10.128.0.0/12", "2001:db8:4::/48"]}
    assert sts["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "mcp", "effect": "NoExecute", "tolerationSeconds": 30}
    ]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"replicas": 3, "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1"]}}, "one affinity.joinAddresses entry per replica"),
        ({"affinity": {"mechanism": "director"}}, "needs spec.redis"),
        ({"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}}, "director.vip or service.addresses"),
        ({"listeners": {"convert": {"enabled": False}}}, "enable at least one"),
        ({"listeners": {"socks5": {"enabled": True, "port": 5124}}}, "must differ"),
        ({"service": {"addresses": ["198.18.0.1", "198.18.0.2"]}}, "at most one address"),
        ({"policy": {"allowedCpes": ["nope"]}}, "spec.policy.allowedCpes.0"),
        ({"replicass": 1}, "unknown field"),
        ({"replicas": -1}, "spec.replicas"),
        ({"accessPaths": [{"name": "other", "networks": ["198.18.1.0/24"]}]}, "'other' is reserved"),
        ({"accessPaths": [{"name": "dsl", "networks": ["198.18.1.0/24"]}, {"name": "dsl", "networks": ["198.18.2.0/24"]}]},
         "duplicate names ['dsl']"),
    ],
)
def test_invalid_specs_say_what_to_fix(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match=None) as info:
        parse_spec(spec)
    assert fragment in str(info.value)


def test_long_names_are_refused() -> None:
    with pytest.raises(SpecError, match="longer than 40"):
        Pool.from_body({"metadata": {"name": "a" * 41, "namespace": "n"}, "spec": {}})
    assert MCPPoolSpec().replicas == 1


def test_registry_pool_name_is_bounded() -> None:
    pool = pool_of({"metadata": {"name": "b" * 40, "namespace": "n" * 60}, "spec": {}})
    name = builders.registry_pool_name(pool)
    assert len(name) <= 63 and name != builders.registry_pool_name(
        pool_of({"metadata": {"name": "c" * 40, "namespace": "n" * 60}, "spec": {}})
    )


def manifest_objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in [REPO / "manifests" / "rbac.yaml", REPO / "manifests" / "operator.yaml", *sorted(SAMPLES.glob("*.yaml"))]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "MCPPool":
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    objects = manifest_objects()
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Namespace"} <= {o["kind"] for _, o in objects}
    for where, obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} invalid for {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_operator_deployment_is_hardened() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text()) if d}
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]


def test_image_repository_and_allowlist() -> None:
    # --allowed-images (issue 10): tags, digests and registry ports do not confuse the match.
    from mcpool_operator.reconcile import image_refusal, image_repository

    assert image_repository("ghcr.io/mptcp-dev/mcpool:0.1.0") == "ghcr.io/mptcp-dev/mcpool"
    assert image_repository("registry.example:5000/mcp/mcpool") == "registry.example:5000/mcp/mcpool"
    assert image_repository("registry.example:5000/mcp/mcpool:1@sha256:" + "0" * 64) == "registry.example:5000/mcp/mcpool"
    allowed = ("ghcr.io/mptcp-dev/mcpool", "registry.example:5000/mcp/")
    assert image_refusal("ghcr.io/mptcp-dev/mcpool:9", allowed) is None
    assert image_refusal("registry.example:5000/mcp/anything:1", allowed) is None
    assert image_refusal("ghcr.io/mptcp-dev/mcpool-evil:1", allowed) is not None  # no prefix match
    assert image_refusal("registry.example:5000/mcpx/a:1", allowed) is not None
    assert image_refusal("anything:latest", ()) is None  # no list: any image


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
def test_redis_sentinel_and_cluster_render_for_pods_and_directors(mode: str) -> None:
    from mcpool_proxy.cluster.director import DirectorConfig

    redis: dict[str, Any] = {"passwordSecretRef": {"name": "redis-auth"}}
    if mode == "sentinel":
        redis["sentinel"] = {"addresses": ["redis-sentinel.redis:26379", "[2001:db8::5]:26379"],
                             "masterName": "mcpool", "db": 2, "passwordSecretRef": {"name": "sentinel-auth", "key": "pw"}}  # fmt: skip
    else:
        redis["cluster"] = {"addresses": ["redis-0.redis:6379", "redis-1.redis:6379"], "tls": True}
    pool = pool_of({"apiVersion": "mcp.mptcp.dev/v1alpha1", "kind": "MCPPool", "metadata": {"name": "ha", "namespace": "mcp"},
                    "spec": {"affinity": {"mechanism": "director"}, "director": {"vip": "198.18.0.10"}, "redis": redis}})  # fmt: skip
    proxy = parse_config(yaml.safe_load(builders.build_configmap(pool)["data"]["config.yaml"])).affinity
    director = DirectorConfig.model_validate(yaml.safe_load(builders.build_director_configmap(pool)["data"]["director.yaml"]))
    assert proxy.backend == "redis" and proxy.redis_url is None and director.redis_url is None
    # Pods and directors are told the same Redis.
    assert proxy.redis == director.redis
    if mode == "sentinel":
        assert proxy.redis_sentinel is not None and proxy.redis_cluster is None
        assert proxy.redis_sentinel.addresses == ["redis-sentinel.redis:26379", "[2001:db8::5]:26379"]
        assert (proxy.redis_sentinel.master_name, proxy.redis_sentinel.db) == ("mcpool", 2)
    else:
        assert proxy.redis_cluster is not None and proxy.redis_sentinel is None
        assert proxy.redis_cluster.addresses == ["redis-0.redis:6379", "redis-1.redis:6379"] and proxy.redis_cluster.tls
    sts_env = builders.build_statefulset(pool)["spec"]["template"]["spec"]["containers"][0]["env"]
    ds_env = builders.build_director_daemonset(pool)["spec"]["template"]["spec"]["containers"][0]["env"]
    for env in (sts_env, ds_env):
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
        assert secrets["REDIS_PASSWORD"] == {"name": "redis-auth", "key": "password"}
        if mode == "sentinel":
            assert secrets["REDIS_SENTINEL_PASSWORD"] == {"name": "sentinel-auth", "key": "pw"}
        else:
            assert "REDIS_SENTINEL_PASSWORD" not in secrets
