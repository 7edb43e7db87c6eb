"""Pure builders: one MCPPool (`spec.Pool`) in, the plain Kubernetes objects of its pool out.

Every function here is deterministic and does no I/O, so the whole desired state of a pool can be
unit-tested and validated against the Kubernetes schemas without a cluster. The reconciler
(`mcpool_operator.reconcile`) adds owner references and talks to the API; nothing here may.

The proxy's configuration is rendered from the proxy's own model (`mcpool_proxy.config`), so a
ConfigMap this module writes is one the proxy accepts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import yaml
from mcpool_proxy.config import (
    DEFAULT_POD_MAC,
    DEFAULT_VXLAN_PORT,
    AffinityConfig,
    KernelConfig,
    ListenConfig,
    MarkerConfig,
    PolicyConfig,
    ProxyConfig,
    RedisClusterConfig,
    RedisSentinelConfig,
    RelayConfig,
    TransparentConfig,
    UpstreamConfig,
)
from pydantic import BaseModel

from .spec import MAX_RENDERED_WORKERS, Pool, RedisSpec

__all__ = [
    "ADMIN_PORT",
    "CONFIG_HASH_ANNOTATION",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "POOL_LABEL",
    "build_children",
    "build_configmap",
    "build_director_configmap",
    "build_director_daemonset",
    "build_headless_service",
    "build_join_services",
    "build_pdb",
    "build_proxy_config",
    "build_service",
    "build_service_account",
    "build_statefulset",
    "config_hash",
    "cpu_cores",
    "pod_sysctls",
    "proxy_config_yaml",
    "proxy_workers",
    "selector_labels",
    "status_selector",
]

ADMIN_PORT = 9090
# The on-path pods share the node's port space: their admin port is not the pods' 9090.
ONPATH_ADMIN_PORT = 9095
CONFIG_DIR = "/etc/mcpool"
DIRECTOR_CONFIG_DIR = "/etc/mcpool-director"
RUN_AS_USER = 10001
# The admission init container's status file (kernel.admission_status_file), on an emptyDir that
# lives as long as the pod, as does the network namespace the filter is installed in.
ADMISSION_DIR = "/run/mcpool"
ADMISSION_STATUS_FILE = f"{ADMISSION_DIR}/admission.json"
MANAGED_BY = "mcpool-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
POOL_LABEL = "mcp.mptcp.dev/pool"
CONFIG_HASH_ANNOTATION = "mcp.mptcp.dev/config-hash"


# --- names -------------------------------------------------------------------------------------
# Deterministic: the reconciler finds children by name, so a restart never creates duplicates.


def statefulset_name(pool: Pool) -> str:
    return pool.name


def service_name(pool: Pool) -> str:
    return pool.name


def headless_service_name(pool: Pool) -> str:
    return f"{pool.name}-pods"


def join_service_name(pool: Pool, ordinal: int) -> str:
    return f"{pool.name}-join-{ordinal}"


def configmap_name(pool: Pool) -> str:
    return f"{pool.name}-config"


def service_account_name(pool: Pool) -> str:
    return f"{pool.name}-mcp"


def pdb_name(pool: Pool) -> str:
    return pool.name


def director_name(pool: Pool) -> str:
    return f"{pool.name}-director"


def pod_name(pool: Pool, ordinal: int) -> str:
    return f"{statefulset_name(pool)}-{ordinal}"


def registry_pool_name(pool: Pool) -> str:
    """The pool's key prefix in the shared Redis: unique across namespaces, at most 63 chars."""
    name = f"{pool.namespace}.{pool.name}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:52]}-{digest}"


# --- labels ------------------------------------------------------------------------------------


def selector_labels(pool: Pool, component: str = "proxy") -> dict[str, str]:
    """The immutable selector of a workload (never add keys: selectors cannot change)."""
    return {
        "app.kubernetes.io/name": "mcpool",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/component": component,
    }


def labels(pool: Pool, component: str = "proxy") -> dict[str, str]:
    return {
        **selector_labels(pool, component),
        MANAGED_BY_LABEL: MANAGED_BY,
        POOL_LABEL: pool.name,
    }


def status_selector(pool: Pool) -> str:
    """The label selector written to status.selector (the scale subresource's labelSelectorPath)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(pool).items())


def _meta(pool: Pool, name: str, component: str = "proxy") -> dict[str, Any]:
    return {"name": name, "namespace": pool.namespace, "labels": labels(pool, component)}


# --- proxy configuration -----------------------------------------------------------------------


def build_proxy_config(pool: Pool, ordinal: int | None = None) -> ProxyConfig:
    """The configuration of pod `ordinal` (only join-address pods differ from each other)."""
    spec = pool.spec
    listen = ListenConfig(
        convert=f"[::]:{spec.listeners.convert.port}" if spec.listeners.convert.enabled else None,
        socks5=f"[::]:{spec.listeners.socks5.port}" if spec.listeners.socks5.enabled else None,
        # 0 disables TFO on the listeners, so the setting and the pod's sysctl agree.
        fastopen_queue=4096 if spec.listeners.fast_open else 0,
    )
    mechanism = spec.affinity.mechanism
    join_address = None
    if mechanism == "join-address":
        if ordinal is None:
            raise ValueError("join-address pools have one configuration per pod: pass the ordinal")
        address = spec.affinity.join_addresses[ordinal]
        host = f"[{address}]" if ":" in address else address
        join_address = f"{host}:{spec.effective_join_port()}"
    affinity = AffinityConfig(
        mechanism=mechanism,
        backend="redis" if spec.redis is not None else "memory",
        **redis_keys(spec.redis),
        pool=registry_pool_name(pool),
        # pod_name and advertise stay null: the proxy reads POD_NAME and POD_IP from its
        # environment (downward API), which a shared ConfigMap cannot know.
        pod_name=None,
        advertise=None,
        join_address=join_address,
        # director: the pod holds the VIP and decapsulates the director's tunnel itself (the
        # tunnel parameters are the ones director_config renders).
        vip=spec.director_vip() if mechanism == "director" else None,
        vxlan_port=DEFAULT_VXLAN_PORT,
        pod_mac=DEFAULT_POD_MAC,
    )
    return ProxyConfig(
        listen=listen,
        admin=f"0.0.0.0:{ADMIN_PORT}",
        upstream=UpstreamConfig(
            protocol=spec.upstream.protocol, connect_timeout_s=spec.upstream.connect_timeout_seconds
        ),
        policy=PolicyConfig(
            allowed_cpes=list(spec.policy.allowed_cpes),
            # The cluster's own ranges join the refused ones (more specific than the private
            # ranges they sit in, so an allowedDestinations entry for 10/8 leaves them refused).
            denied_destinations=[*spec.policy.denied_destinations, *spec.cluster.refused()],
            allowed_destinations=list(spec.policy.allowed_destinations),
            deny_default_destinations=spec.policy.deny_default_destinations,
            allowed_ports=list(spec.policy.allowed_ports),
            max_connections=spec.policy.max_connections,
            max_connections_per_cpe=spec.policy.max_connections_per_cpe,
            handshake_timeout_s=spec.policy.handshake_timeout_seconds,
            max_handshake_bytes=spec.policy.max_handshake_bytes,
        ),
        relay=RelayConfig(
            mode=spec.relay.mode,
            idle_timeout_s=spec.relay.idle_timeout_seconds,
            buffer_bytes=spec.relay.buffer_bytes,
        ),
        # The pod's securityContext.sysctls set these (see pod_sysctls); the proxy must not try.
        kernel=KernelConfig(
            mptcp_checksum=spec.kernel.mptcp_checksum,
            tcp_fastopen_server=spec.listeners.fast_open,
            apply_sysctls=False,
            # Installed by the pod's init container (admission_container), so the proxy needs no
            # CAP_NET_ADMIN for it.
            admission_status_file=ADMISSION_STATUS_FILE,
        ),
        affinity=affinity,
        drain_timeout_s=spec.drain_timeout_seconds,
        log_level=spec.log_level,
        access_paths={path.name: list(path.networks) for path in spec.access_paths},
        workers=proxy_workers(pool),
    )


def cpu_cores(quantity: int | float | str) -> float:
    """A Kubernetes CPU quantity in cores: 2, "1.5", "1500m", "2k" (rare, but valid);
    ValueError if it is none."""
    text = str(quantity).strip()
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    factor = 1.0
    if text and text[-1] in suffixes:
        factor, text = suffixes[text[-1]], text[:-1]
    try:
        value = float(text) * factor
    except ValueError:
        raise ValueError(f"{quantity!r} is not a CPU quantity") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{quantity!r} is not a CPU quantity")
    return value


def proxy_workers(pool: Pool) -> int:
    """The proxy's `workers`: spec.workers if set, else the pod's whole cores (limits.cpu, else
    requests.cpu, rounded down), at least 1 and at most MAX_RENDERED_WORKERS; 1 with no CPU
    given. A worker is one Python process and uses one core at most, so fewer workers than
    cores leaves CPU unused and more only adds contention."""
    spec = pool.spec
    if spec.workers is not None:
        return spec.workers
    resources = spec.resources
    cpu = resources.limits.get("cpu", resources.requests.get("cpu"))
    if cpu is None:
        return 1
    try:
        cores = cpu_cores(cpu)
    except ValueError:
        return 1  # the API server validated the quantity; a form this parser misses is one core
    return max(1, min(MAX_RENDERED_WORKERS, int(cores)))


def _config_file_names(pool: Pool) -> list[tuple[str, int | None]]:
    if pool.spec.affinity.mechanism == "join-address":
        # One file per join address, not per replica, so scaling does not change the ConfigMap
        # (and so does not roll every pod).
        return [
            (f"{pod_name(pool, i)}.yaml", i) for i in range(len(pool.spec.affinity.join_addresses))
        ]
    return [("config.yaml", None)]


def config_path(pool: Pool) -> str:
    """The --config argument; $(POD_NAME) is expanded by the kubelet from the container's env."""
    if pool.spec.affinity.mechanism == "join-address":
        return f"{CONFIG_DIR}/$(POD_NAME).yaml"
    return f"{CONFIG_DIR}/config.yaml"


# libyaml's emitter when PyYAML has it (10x faster; the ConfigMap is most of a new pool's build
# cost); the pure-Python one otherwise. Both give the same text for what a ProxyConfig dumps
# (tests/operator/test_operator_builders.py compares them with ProxyConfig.to_yaml).
_YAML_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def proxy_config_yaml(config: ProxyConfig) -> str:
    """`config.to_yaml()`, the text the proxy loads back, rendered with `_YAML_DUMPER`."""
    return yaml.dump(config.model_dump(mode="json", by_alias=True), Dumper=_YAML_DUMPER, sort_keys=False)


def build_configmap(pool: Pool) -> dict[str, Any]:
    data = {
        name: proxy_config_yaml(build_proxy_config(pool, ordinal)) for name, ordinal in _config_file_names(pool)
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(pool, configmap_name(pool)),
        "data": data,
    }


def config_hash(configmap: Mapping[str, Any]) -> str:
    """A digest of a ConfigMap's data: put on the pod template, a change rolls the pods."""
    text = json.dumps(configmap.get("data", {}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- pods --------------------------------------------------------------------------------------


def pod_sysctls(pool: Pool) -> list[dict[str, str]]:
    """MPTCP sysctls are per network namespace, so each pod sets its own (needs the kubelet's
    --allowed-unsafe-sysctls; see docs/operator.md)."""
    spec = pool.spec
    sysctls = [
        {"name": "net.mptcp.enabled", "value": "1"},
        {"name": "net.mptcp.checksum_enabled", "value": "1" if spec.kernel.mptcp_checksum else "0"},
    ]
    if spec.affinity.mechanism == "join-address":
        # Sets the MP_CAPABLE C flag: clients must join the pod's own address, not the VIP.
        sysctls.append({"name": "net.mptcp.allow_join_initial_addr_port", "value": "0"})
    if spec.listeners.fast_open:
        sysctls.append({"name": "net.ipv4.tcp_fastopen", "value": "3"})
    return sysctls


def _proxy_capabilities(pool: Pool) -> list[str]:
    caps = []
    # join-address: the pod adds its join address and an MPTCP 'signal' endpoint; director: the
    # pod puts the VIP on its loopback and decapsulates the director's tunnel (direct return).
    if pool.spec.affinity.mechanism in ("join-address", "director"):
        caps.append("NET_ADMIN")
    if any(port < 1024 for port in pool.spec.listener_ports()):
        caps.append("NET_BIND_SERVICE")
    return caps


def _container_security(capabilities: list[str]) -> dict[str, Any]:
    security: dict[str, Any] = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if capabilities:
        security["capabilities"]["add"] = list(capabilities)
        # Kubernetes gives added capabilities to a non-root process only through file
        # capabilities, which allowPrivilegeEscalation=false disables; so a container that needs
        # one runs as uid 0 holding nothing but that capability (ALL else dropped).
        security.update({"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False})
    return security


def _proxy_env(pool: Pool) -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
    ]
    env.extend(_redis_env(pool))
    if pool.spec.opentelemetry.endpoint:
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": pool.spec.opentelemetry.endpoint})
    env.append({"name": "OTEL_SERVICE_NAME", "value": "mcpool-proxy"})
    # $(VAR) references expand only to variables defined earlier in this list.
    env.append(
        {
            "name": "OTEL_RESOURCE_ATTRIBUTES",
            "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
            f"mcpool.pool={pool.name}",
        }
    )
    return env


def redis_keys(redis: RedisSpec | None) -> dict[str, Any]:
    """The proxy's and the director's Redis keys (redis_url, redis_sentinel or redis_cluster)."""
    if redis is None:
        return {}
    if redis.sentinel is not None:
        sentinel = redis.sentinel
        return {"redis_sentinel": RedisSentinelConfig(addresses=sentinel.addresses, master_name=sentinel.master_name,
                                                      db=sentinel.db, tls=sentinel.tls)}  # fmt: skip
    if redis.cluster is not None:
        return {"redis_cluster": RedisClusterConfig(addresses=redis.cluster.addresses, tls=redis.cluster.tls)}
    return {"redis_url": redis.url}


def _redis_env(pool: Pool) -> list[dict[str, Any]]:
    redis = pool.spec.redis
    if redis is None:
        return []
    refs = [("REDIS_PASSWORD", redis.password_secret_ref)]
    if redis.sentinel is not None:
        refs.append(("REDIS_SENTINEL_PASSWORD", redis.sentinel.password_secret_ref))
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for name, ref in refs if ref is not None]  # fmt: skip


def _tolerations(items: list[Any]) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in items]


def _place(pod_spec: dict[str, Any], node_selector: Mapping[str, str], tolerations: list[Any]) -> None:
    """Node selector and tolerations of a pod spec, each only when set (an empty one would
    still be a field the server-side apply owns)."""
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = _tolerations(tolerations)


def _resources(pool: Pool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pool.spec.resources.requests:
        out["requests"] = dict(pool.spec.resources.requests)
    if pool.spec.resources.limits:
        out["limits"] = dict(pool.spec.resources.limits)
    return out


def admission_container(pool: Pool) -> dict[str, Any]:
    """The init container that installs the kernel admission filter (`mcpool admission install`)
    in the pod's network namespace, so strangers' SYNs are dropped in every pool, whatever its
    mechanism, while the proxy keeps only the capabilities its mechanism needs.

    It alone holds CAP_NET_ADMIN (nft speaks netlink, which checks nothing else), as uid 0 because
    Kubernetes gives an added capability to a non-root process only through file capabilities,
    which allowPrivilegeEscalation=false disables. It runs for seconds and exits before the proxy
    starts. Nothing needs removing: the table is in the pod's namespace, freed with the pod. A
    changed configuration reaches the filter with a new pod (the config hash on the template rolls
    the pods), whose init container installs it afresh."""
    env = [e for e in _proxy_env(pool) if e["name"] == "POD_NAME"]  # $(POD_NAME) in the config path
    return {
        "name": "admission",
        "image": pool.spec.image,
        "imagePullPolicy": pool.spec.image_pull_policy,
        "command": ["mcpool"],
        "args": ["admission", "install", "--config", config_path(pool)],
        "env": env,
        "securityContext": _container_security(["NET_ADMIN"]),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "admission", "mountPath": ADMISSION_DIR},
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    }


def build_statefulset(pool: Pool, configmap: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pool's StatefulSet; `configmap` is `build_configmap(pool)` when the caller has it
    already (its hash goes on the pod template)."""
    spec = pool.spec
    ports = [{"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}]
    if spec.listeners.convert.enabled:
        ports.insert(0, {"name": "convert", "containerPort": spec.listeners.convert.port, "protocol": "TCP"})
    if spec.listeners.socks5.enabled:
        ports.insert(-1, {"name": "socks5", "containerPort": spec.listeners.socks5.port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "proxy",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["mcpool"],
        "args": ["proxy", "--config", config_path(pool)],
        "env": _proxy_env(pool),
        "ports": ports,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "admin"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": _container_security(_proxy_capabilities(pool)),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    resources = _resources(pool)
    if resources:
        container["resources"] = resources
    container["volumeMounts"].append({"name": "admission", "mountPath": ADMISSION_DIR, "readOnly": True})
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(pool),
        # The proxy never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Above the drain timeout, so SIGTERM's drain finishes before the kubelet's SIGKILL.
        "terminationGracePeriodSeconds": math.ceil(spec.drain_timeout_seconds) + 15,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": pod_sysctls(pool),
        },
        "initContainers": [admission_container(pool)],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(pool)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            {"name": "admission", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ],
    }
    _place(pod_spec, spec.node_selector, spec.tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(pool, statefulset_name(pool)),
        "spec": {
            "replicas": spec.replicas,
            "serviceName": headless_service_name(pool),
            # Pods are independent proxies: start and replace them all at once.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels(pool)},
            "template": {
                "metadata": {
                    "labels": labels(pool),
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: config_hash(configmap if configmap is not None else build_configmap(pool))
                    },
                },
                "spec": pod_spec,
            },
        },
    }


# --- services ----------------------------------------------------------------------------------


def _service_ports(pool: Pool) -> list[dict[str, Any]]:
    spec = pool.spec
    ports = []
    if spec.listeners.convert.enabled:
        ports.append({"name": "convert", "port": spec.listeners.convert.port, "targetPort": "convert", "protocol": "TCP"})
    if spec.listeners.socks5.enabled:
        ports.append({"name": "socks5", "port": spec.listeners.socks5.port, "targetPort": "socks5", "protocol": "TCP"})
    return ports


def build_service(pool: Pool) -> dict[str, Any]:
    """The VIP Service clients connect to."""
    svc = pool.spec.service
    spec: dict[str, Any] = {
        "type": svc.type,
        "selector": selector_labels(pool),
        "ports": _service_ports(pool),
    }
    if svc.type in ("LoadBalancer", "NodePort"):
        spec["externalTrafficPolicy"] = svc.external_traffic_policy
    if svc.addresses:
        if svc.type == "LoadBalancer":
            spec["loadBalancerIP"] = svc.addresses[0]
        else:
            spec["externalIPs"] = list(svc.addresses)
    meta = _meta(pool, service_name(pool))
    if svc.annotations:
        meta["annotations"] = dict(svc.annotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def build_headless_service(pool: Pool) -> dict[str, Any]:
    """The StatefulSet's governing Service: stable DNS names for the pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool, headless_service_name(pool)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(pool),
            "ports": [{"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"}],
            "publishNotReadyAddresses": True,
        },
    }


def build_join_services(pool: Pool) -> list[dict[str, Any]]:
    """For join-address: pod N's own address, routed to pod N only."""
    if pool.spec.affinity.mechanism != "join-address":
        return []
    port = pool.spec.effective_join_port()
    services = []
    for ordinal in range(pool.spec.replicas):
        selector = {**selector_labels(pool), "statefulset.kubernetes.io/pod-name": pod_name(pool, ordinal)}
        services.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(pool, join_service_name(pool, ordinal)),
                "spec": {
                    "type": "LoadBalancer",
                    "loadBalancerIP": pool.spec.affinity.join_addresses[ordinal],
                    "externalTrafficPolicy": "Local",
                    "selector": selector,
                    "ports": [{"name": "join", "port": port, "targetPort": port, "protocol": "TCP"}],
                },
            }
        )
    return services


def build_service_account(pool: Pool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(pool, service_account_name(pool)),
        "automountServiceAccountToken": False,
    }


def build_pdb(pool: Pool) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(pool, pdb_name(pool)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(pool)}},
    }


# --- director ----------------------------------------------------------------------------------


# Per-node resources of a pool's director (docs/affinity.md, "Per-node resources"): directors of
# several pools share a node (host network), so each pool gets its own nft table, tunnel device
# prefix, NFQUEUE, mark range, VNI range, route tables and metrics port, all derived from one
# index in [0, DIRECTOR_SLOTS) taken from a stable hash of namespace/name. Two pools with the same
# index collide: the second director finds the first one's table (its comment names the owner),
# refuses to start and says so; renaming either pool picks another index.
DIRECTOR_SLOTS = 4096
DIRECTOR_QUEUE_BASE = 8192  # NFQUEUE numbers 8192..12287
DIRECTOR_MARK_BASE = 0x4000  # marks 0x4000_0000..0x4fff_ffff: high 16 bits = 0x4000 + index
DIRECTOR_VNI_BASE = 0x10000  # VNI = base + index * 256 + pod slot (slots 1..255)
DIRECTOR_ROUTE_TABLE_BASE = 0x100000  # table = base + index * 256 + pod slot
DIRECTOR_METRICS_PORT_BASE = 19000  # 127.0.0.1:19000..23095 on the node


def director_index(pool: Pool) -> int:
    """The pool's stable index among directors on a node (see the scheme above)."""
    digest = hashlib.sha256(f"{pool.namespace}/{pool.name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % DIRECTOR_SLOTS


def director_config(pool: Pool) -> dict[str, Any]:
    """The keys of `mcpool director --config FILE`."""
    redis = pool.spec.redis
    index = director_index(pool)
    return {
        "vip": pool.spec.director_vip(),
        "ports": pool.spec.listener_ports(),
        **{key: value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value
           for key, value in redis_keys(redis).items()},  # fmt: skip
        "pool": registry_pool_name(pool),
        "nft_table": f"mcpool_{index:03x}",
        "device_prefix": f"mcp{index:03x}v",  # + slot: at most 9 characters
        "queue_num": DIRECTOR_QUEUE_BASE + index,
        "mark_base": (DIRECTOR_MARK_BASE + index) << 16,
        "vxlan_vni_base": DIRECTOR_VNI_BASE + index * 256,
        "route_table_base": DIRECTOR_ROUTE_TABLE_BASE + index * 256,
        "metrics_listen": f"127.0.0.1:{DIRECTOR_METRICS_PORT_BASE + index}",
        # The pods' side of the tunnel (build_proxy_config renders the same values).
        "vxlan_port": DEFAULT_VXLAN_PORT,
        "pod_mac": DEFAULT_POD_MAC,
        # Keep table entries a restarted Redis lacks until the pods have re-registered.
        "snapshot_grace_s": AffinityConfig.model_fields["heartbeat_ttl_s"].default,
    }


def build_director_configmap(pool: Pool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(pool, director_name(pool), "director"),
        "data": {"director.yaml": yaml.safe_dump(director_config(pool), sort_keys=False)},
    }


def _node_daemonset(
    pool: Pool, name: str, component: str, configmap: dict[str, Any], pod_spec: dict[str, Any]
) -> dict[str, Any]:
    """A host-network node component's DaemonSet (director, on-path MCP): rolled when its
    ConfigMap changes (the config hash on the template)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(pool, name, component),
        "spec": {
            "selector": {"matchLabels": selector_labels(pool, component)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {
                    "labels": labels(pool, component),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(configmap)},
                },
                "spec": pod_spec,
            },
        },
    }


def build_director_daemonset(pool: Pool, *, image: str | None = None) -> dict[str, Any]:
    """`image`: the operator's `--director-image`, overriding spec.image."""
    spec = pool.spec
    env: list[dict[str, Any]] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}},
        *_redis_env(pool),
        {"name": "OTEL_SERVICE_NAME", "value": "mcpool-director"},
    ]
    if spec.opentelemetry.endpoint:
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec.opentelemetry.endpoint})
    container = {
        "name": "director",
        "image": image or spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["mcpool"],
        "args": ["director", "--config", f"{DIRECTOR_CONFIG_DIR}/director.yaml"],
        "env": env,
        # nftables rules and the NFQUEUE/raw sockets in the node's network namespace.
        "securityContext": _container_security(["NET_ADMIN", "NET_RAW"]),
        "volumeMounts": [
            {"name": "config", "mountPath": DIRECTOR_CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "serviceAccountName": service_account_name(pool),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": director_name(pool)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
        ],
    }
    _place(pod_spec, spec.director.node_selector, spec.director.tolerations)
    return _node_daemonset(pool, director_name(pool), "director", build_director_configmap(pool), pod_spec)


# --- implicit mode: the on-path DaemonSet ---------------------------------------------------------

# The address rendered into the on-path configuration: each pod replaces it with its node's own
# (`mcpool proxy --transparent-address $(NODE_IP)`), since one ConfigMap serves every node.
ONPATH_PLACEHOLDER_ADDRESS = "192.0.2.1"
ONPATH_CONFIG_DIR = "/etc/mcpool-onpath"


def onpath_name(pool: Pool) -> str:
    return f"{pool.name}-onpath"


def build_onpath_config(pool: Pool) -> ProxyConfig:
    """The on-path MCP's configuration: the pool's policy, relay and upstream, a transparent
    listener instead of Convert/SOCKS5, the kernel rules installed by the proxy itself."""
    spec = pool.spec
    onpath = spec.on_path
    base = build_proxy_config(pool, 0 if spec.affinity.mechanism == "join-address" else None)
    address = ONPATH_PLACEHOLDER_ADDRESS
    return ProxyConfig(
        listen=ListenConfig(convert=None, socks5=None, transparent=[f"{address}:{onpath.port}"]),
        admin=f"0.0.0.0:{ONPATH_ADMIN_PORT}",
        upstream=base.upstream,
        policy=base.policy,
        relay=base.relay,
        # The node's sysctls are the node's (a host-network pod cannot set them per pod):
        # docs/implicit.md lists the ones the node must have.
        kernel=KernelConfig(mptcp_checksum=spec.kernel.mptcp_checksum, tcp_fastopen_server=False,
                            apply_sysctls=False),
        transparent=TransparentConfig(
            marker=MarkerConfig(dscp=onpath.marker.dscp, source=list(onpath.marker.source_prefixes)),
            cpe_interfaces=list(onpath.cpe_interfaces),
            join_address=f"{address}:{onpath.join_port}",
            upstream_source=onpath.upstream_source,
        ),
        drain_timeout_s=spec.drain_timeout_seconds,
        log_level=spec.log_level,
    )


def build_onpath_configmap(pool: Pool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(pool, onpath_name(pool), "onpath"),
        "data": {"onpath.yaml": build_onpath_config(pool).to_yaml()},
    }


def build_onpath_daemonset(pool: Pool) -> dict[str, Any]:
    """Host-network MCPs on the gateway nodes. Capabilities: NET_ADMIN only (nftables, ip rules,
    the path manager's endpoint, and IP_TRANSPARENT, which NET_ADMIN or NET_RAW allows: measured,
    so NET_RAW is not added)."""
    spec = pool.spec
    onpath = spec.on_path
    container: dict[str, Any] = {
        "name": "proxy",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["mcpool"],
        "args": ["proxy", "--config", f"{ONPATH_CONFIG_DIR}/onpath.yaml", "--transparent-address", "$(NODE_IP)"],
        "env": [
            {"name": "NODE_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
            *_proxy_env(pool),
        ],
        "ports": [{"name": "admin", "containerPort": ONPATH_ADMIN_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "admin"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        # Not ready while the transparent listener is unbound (its marked SYNs are dropped).
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 5,
                           "failureThreshold": 2},
        "securityContext": _container_security(["NET_ADMIN"]),
        "volumeMounts": [
            {"name": "config", "mountPath": ONPATH_CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    resources = _resources(pool)
    if resources:
        container["resources"] = resources
    container["volumeMounts"].append({"name": "admission", "mountPath": ADMISSION_DIR, "readOnly": True})
    pod_spec: dict[str, Any] = {
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "serviceAccountName": service_account_name(pool),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": math.ceil(spec.drain_timeout_seconds) + 15,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": onpath_name(pool)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    _place(pod_spec, onpath.node_selector, onpath.tolerations)
    return _node_daemonset(pool, onpath_name(pool), "onpath", build_onpath_configmap(pool), pod_spec)


def onpath_cleanup_name(pool: Pool) -> str:
    return f"{pool.name}-onpath-cleanup"


def _cleanup_daemonset(ds: dict[str, Any], pool: Pool, component: str, cleanup: dict[str, Any],
                       idle_args: list[str], idle_mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn a node DaemonSet `ds` into its cleanup twin: same nodes, host network and config, but
    `cleanup` (the real container with `--cleanup-only`) as init container and a container that
    only idles (`idle_args`), so a Ready pod means its node is clean."""
    ds["metadata"]["name"] = f"{pool.name}-{component}"
    ds["metadata"]["labels"] = labels(pool, component)
    ds["spec"]["selector"] = {"matchLabels": selector_labels(pool, component)}
    template = ds["spec"]["template"]
    template["metadata"] = {"labels": labels(pool, component)}
    pod_spec = template["spec"]
    real = pod_spec["containers"][0]
    idle: dict[str, Any] = {
        "name": "done",
        "image": real["image"],
        "imagePullPolicy": real["imagePullPolicy"],
        "command": ["mcpool"],
        "args": idle_args,
        "securityContext": _container_security([]),
        "resources": {"requests": {"cpu": "1m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }
    if idle_mounts:
        idle["volumeMounts"] = idle_mounts
    pod_spec["initContainers"] = [cleanup]
    pod_spec["containers"] = [idle]
    pod_spec["terminationGracePeriodSeconds"] = 5
    return ds


def build_onpath_cleanup_daemonset(pool: Pool) -> dict[str, Any]:
    """Runs `mcpool proxy --cleanup-only` on every node an on-path MCP of the pool may have run on
    (same nodeSelector and tolerations, host network, the on-path ConfigMap and the node's
    address), in an init container: a Ready pod means its node holds no nft table, ip rule,
    route or join endpoint of the pool. An on-path MCP removes them itself at exit; this is for
    one that was killed (OOM, a grace period exceeded). Made when the pool is deleted or turns
    onPath off, deleted once every pod is Ready."""
    ds = build_onpath_daemonset(pool)
    proxy = ds["spec"]["template"]["spec"]["containers"][0]
    cleanup = {key: value for key, value in proxy.items()
               if key not in ("ports", "livenessProbe", "readinessProbe", "resources")}  # fmt: skip
    cleanup["name"] = "cleanup"
    cleanup["args"] = [*proxy["args"], "--cleanup-only"]
    return _cleanup_daemonset(
        ds, pool, "onpath-cleanup", cleanup,
        ["proxy", "--config", f"{ONPATH_CONFIG_DIR}/onpath.yaml", "--idle"],
        [{"name": "config", "mountPath": ONPATH_CONFIG_DIR, "readOnly": True}],
    )  # fmt: skip


def director_cleanup_name(pool: Pool) -> str:
    return f"{pool.name}-director-cleanup"


def build_director_cleanup_daemonset(pool: Pool, *, image: str | None = None) -> dict[str, Any]:
    """Runs `mcpool director --cleanup-only` on every node a director of the pool may have run
    on (same nodeSelector and tolerations), with the director's own ConfigMap, in an init
    container: a Ready pod means its node holds nothing of the pool any more. Made when the pool
    is deleted or leaves mechanism 'director', deleted once every pod is Ready."""
    ds = build_director_daemonset(pool, image=image)
    director = ds["spec"]["template"]["spec"]["containers"][0]
    cleanup = {**director, "name": "cleanup",
               "args": ["director", "--config", f"{DIRECTOR_CONFIG_DIR}/director.yaml", "--cleanup-only"]}  # fmt: skip
    return _cleanup_daemonset(ds, pool, "director-cleanup", cleanup,
                              ["director", "--config", f"{DIRECTOR_CONFIG_DIR}/director.yaml", "--idle"], [])  # fmt: skip


# --- everything --------------------------------------------------------------------------------


def build_children(pool: Pool, *, director_image: str | None = None) -> list[dict[str, Any]]:
    """Every object of the pool, in creation order (config before the pods that mount it)."""
    configmap = build_configmap(pool)
    children = [
        build_service_account(pool),
        configmap,
        build_headless_service(pool),
        build_service(pool),
        *build_join_services(pool),
    ]
    if pool.spec.affinity.mechanism == "director":
        children += [build_director_configmap(pool), build_director_daemonset(pool, image=director_image)]
    children += [build_statefulset(pool, configmap), build_pdb(pool)]
    if pool.spec.on_path.enabled:
        children += [build_onpath_configmap(pool), build_onpath_daemonset(pool)]
    return children
