"""The MCPPool custom resource: its typed spec and the identity of one pool.

`MCPPoolSpec` is the single source of truth for the resource's shape: the CRD's OpenAPI schema
is generated from it (`mcpool_operator.crd`), the operator parses every object it handles with
it, and the builders (`mcpool_operator.builders`) read nothing else. Field names are snake_case
in Python and camelCase in Kubernetes (aliases), as the Kubernetes API conventions ask.

The cross-field rules are written twice on purpose: once as CEL `x-kubernetes-validations` (the
API server rejects a bad object before anybody sees it) and once as pydantic validators (an
object that got past an older API server without CEL still gets a human-readable `Degraded`
condition instead of a broken pool). `tests/operator/test_crd.py` checks both agree.

Nothing here talks to Kubernetes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "DEFAULT_IMAGE",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "VERSION",
    "MAX_POOL_NAME_LENGTH",
    "AffinitySpec",
    "ClusterSpec",
    "DEFAULT_POD_CIDRS",
    "DEFAULT_SERVICE_CIDRS",
    "DirectorSpec",
    "KernelSpec",
    "ListenersSpec",
    "MCPPoolSpec",
    "Pool",
    "PolicySpec",
    "RedisClusterSpec",
    "RedisSentinelSpec",
    "RedisSpec",
    "RelaySpec",
    "ResourcesSpec",
    "SecretKeyRef",
    "ServiceSpec",
    "SpecError",
    "Toleration",
    "UpstreamSpec",
    "parse_spec",
]

GROUP = "mcp.mptcp.dev"
VERSION = "v1alpha1"
KIND = "MCPPool"
PLURAL = "mcppools"
SINGULAR = "mcppool"
SHORT_NAME = "mcpp"
CATEGORY = "mcp"
DEFAULT_IMAGE = "ghcr.io/mptcp-dev/mcpool:0.1.0"

# Children are named "<pool>-<suffix>" (longest: "<pool>-director" plus the DaemonSet's
# 5-character pod suffix, and "<pool>-join-<ordinal>"); Services must be DNS-1035 labels of at
# most 63 characters and StatefulSet pods carry "<pool>-<hash>" revision labels.
MAX_POOL_NAME_LENGTH = 40
MAX_REPLICAS = 1000
# Proxy worker processes per pod: an explicit `workers` up to the proxy's own bound (its config's
# MAX_WORKERS); rendered from the pod's CPU, at most MAX_RENDERED_WORKERS (past that many Python
# processes one larger pod is better split into more pods: each worker holds its own state).
MAX_WORKERS = 64
MAX_RENDERED_WORKERS = 16
POOL_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A director forwards to each pod through one slot of its packet mark (8 bits, slot 0 unused:
# kernel/steering.py MAX_SLOTS); a pod beyond would get no slot and its flows would be dropped.
MAX_DIRECTOR_REPLICAS = 255
DIRECTOR_REPLICAS_MESSAGE = (
    f"affinity.mechanism director takes at most {MAX_DIRECTOR_REPLICAS} replicas (one director "
    "forwarding slot per pod)"
)


JOIN_ADDRESSES_UNIQUE_MESSAGE = "affinity.joinAddresses must not repeat an address (each pod announces its own)"
REDIS_URL_CREDENTIALS_MESSAGE = (
    "redis.url must not carry credentials ('user:password@host'): it is stored in plain text in "
    "ConfigMaps; put the password in a Secret and reference it with redis.passwordSecretRef"
)


# --- CEL rules that hold on every shape the API server feeds them --------------------------------
# The API server evaluates each rule not only on stored objects (fully defaulted) but also on
# every `default` in the schema when the CRD is created, and those defaults are NOT defaulted
# further: the rule on `service` sees the bare `{}`. A rule that reads `self.type` there fails
# with "no such key" and the whole CRD is refused. So every rule reads optional fields through
# these helpers, which fall back to the model's own default when a field is absent.
DEFAULT_CONVERT_PORT = 5124
DEFAULT_SOCKS5_PORT = 1080


def _cel_has(path: str) -> str:
    """`has()` for every step of a dotted path: `(has(self.a) && has(self.a.b))`."""
    parts = path.split(".")
    return "(" + " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts))) + ")"


def _cel_get(path: str, default: str) -> str:
    """`self.<path>`, or the CEL literal `default` when any step of the path is absent."""
    return f"({_cel_has(path)} ? self.{path} : {default})"


def _cel_size(path: str) -> str:
    """`size(self.<path>)`, or 0 when any step of the path is absent."""
    return f"({_cel_has(path)} ? size(self.{path}) : 0)"


_CONVERT_ON = _cel_get("convert.enabled", "true")
_SOCKS5_ON = _cel_get("socks5.enabled", "false")
_MECHANISM = _cel_get("affinity.mechanism", "'none'")
_SERVICE_TYPE = _cel_get("type", "'LoadBalancer'")


class SpecError(ValueError):
    """An MCPPool spec the operator cannot turn into a pool; the message says what to fix."""


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (e.g. '198.18.0.10' or '2001:db8::10')") from None


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR prefix (e.g. '192.0.2.0/24' or '2001:db8::/32')") from None


IPAddress = Annotated[str, Field(min_length=2, max_length=45), AfterValidator(_ip)]
CIDRPrefix = Annotated[str, Field(min_length=2, max_length=49), AfterValidator(_cidr)]
Port = Annotated[int, Field(ge=1, le=65535)]
LabelValue = Annotated[str, Field(max_length=253)]
# A Kubernetes resource quantity ("500m", "128Mi", 2); the API server checks the syntax.
Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


class _Spec(BaseModel):
    # Unknown keys are errors (the CRD prunes them; a typo must not silently keep a default).
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel
    )


class ConvertListenerSpec(_Spec):
    """The RFC 8803 (0-RTT TCP Convert) listener."""

    enabled: bool = Field(default=True, description="Accept RFC 8803 Convert clients.")
    port: Port = Field(default=DEFAULT_CONVERT_PORT, description="TCP port of the Convert listener (RFC 8803 uses 5124).")


class Socks5ListenerSpec(_Spec):
    """The SOCKS5 (RFC 1928) CONNECT listener, for clients that already speak SOCKS5 over MPTCP."""

    enabled: bool = Field(default=False, description="Accept SOCKS5 clients.")
    port: Port = Field(default=DEFAULT_SOCKS5_PORT, description="TCP port of the SOCKS5 listener.")


class ListenersSpec(_Spec):
    """Which client protocols the pool accepts, on which ports (each an MPTCP listener)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_CONVERT_ON} || {_SOCKS5_ON}",
                    "message": "enable at least one of listeners.convert and listeners.socks5",
                },
                {
                    "rule": f"!({_CONVERT_ON} && {_SOCKS5_ON}) || "
                    f"{_cel_get('convert.port', str(DEFAULT_CONVERT_PORT))} != "
                    f"{_cel_get('socks5.port', str(DEFAULT_SOCKS5_PORT))}",
                    "message": "listeners.convert.port and listeners.socks5.port must differ",
                },
            ]
        }
    )

    convert: ConvertListenerSpec = Field(
        default_factory=ConvertListenerSpec, description="RFC 8803 Convert listener."
    )
    socks5: Socks5ListenerSpec = Field(
        default_factory=Socks5ListenerSpec, description="SOCKS5 listener."
    )
    fast_open: bool = Field(
        default=True,
        description="Enable TCP Fast Open on the listeners (net.ipv4.tcp_fastopen=3 in the pods) so "
        "Convert clients can send their request in the SYN (0-RTT).",
    )

    @model_validator(mode="after")
    def _one_listener(self) -> ListenersSpec:
        if not (self.convert.enabled or self.socks5.enabled):
            raise ValueError("enable at least one of listeners.convert and listeners.socks5")
        if self.convert.enabled and self.socks5.enabled and self.convert.port == self.socks5.port:
            raise ValueError("listeners.convert.port and listeners.socks5.port must differ")
        return self


class AffinitySpec(_Spec):
    """How every subflow of one MPTCP connection reaches the pod that owns the connection."""

    mechanism: Literal["none", "director", "join-address"] = Field(
        default="none",
        description="'director': a DaemonSet steers MP_JOIN SYNs by token through Redis (needs "
        "spec.redis); 'join-address': each pod announces its own address with ADD_ADDR and the "
        "C flag (needs one affinity.joinAddresses entry per replica); 'none': single pod or "
        "external per-client routing.",
    )
    join_addresses: list[IPAddress] = Field(
        default_factory=list,
        max_length=MAX_REPLICAS,
        # Two pods announcing one address would steal each other's subflows.
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="For 'join-address': the address pod N announces is entry N; each gets its own "
        "LoadBalancer Service '<pool>-join-N' with that loadBalancerIP. No duplicates.",
    )
    join_port: Port | None = Field(
        default=None,
        description="For 'join-address': the port pods announce and their join Services expose; "
        "default: listeners.convert.port.",
    )

    @model_validator(mode="after")
    def _unique_join_addresses(self) -> AffinitySpec:
        # Addresses are normalised by _ip, so '2001:DB8::1' and '2001:db8::1' count as one.
        if len(set(self.join_addresses)) != len(self.join_addresses):
            raise ValueError(JOIN_ADDRESSES_UNIQUE_MESSAGE)
        return self


class SecretKeyRef(_Spec):
    """A key in a Secret in the pool's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="password", min_length=1, max_length=253, description="Key in the Secret.")


RedisAddressSpec = Annotated[str, Field(min_length=3, max_length=261, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")]


class RedisSentinelSpec(_Spec):
    """Redis behind Sentinel: pods and directors ask the sentinels for the primary and follow a failover."""

    addresses: list[RedisAddressSpec] = Field(
        min_length=1, max_length=16, description="host:port of the sentinels (usually three, port 26379)."
    )
    master_name: str = Field(
        min_length=1, max_length=253, description="Name of the monitored primary (`sentinel monitor NAME ...`)."
    )
    db: int = Field(default=0, ge=0, le=65535, description="Database number on the primary.")
    tls: bool = Field(default=False, description="TLS to the sentinels and the data nodes.")
    password_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the sentinels' own password (`requirepass` on the sentinels), "
        "given to pods and directors as REDIS_SENTINEL_PASSWORD; the data nodes' password is "
        "redis.passwordSecretRef.",
    )


class RedisClusterSpec(_Spec):
    """A Redis Cluster: every key of a pool carries the pool's hash tag, so one pool lives in one slot."""

    addresses: list[RedisAddressSpec] = Field(
        min_length=1, max_length=16, description="host:port of one or more cluster nodes to learn the slot map from."
    )
    tls: bool = Field(default=False, description="TLS to every node.")


REDIS_ONE_MODE_MESSAGE = "redis: set exactly one of url, sentinel and cluster"


class RedisSpec(_Spec):
    """The Redis holding the affinity table (soft state the pods rebuild): one URL, Sentinel or a Redis Cluster."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!" + _cel_get("url", "''") + ".contains('@')", "message": REDIS_URL_CREDENTIALS_MESSAGE},
                {
                    "rule": f"({_cel_has('url')} ? 1 : 0) + ({_cel_has('sentinel')} ? 1 : 0) + "
                    f"({_cel_has('cluster')} ? 1 : 0) == 1",
                    "message": REDIS_ONE_MODE_MESSAGE,
                },
            ]
        }
    )

    url: str | None = Field(
        default=None,
        min_length=9,
        max_length=1024,
        pattern=r"^rediss?://",
        description="A single Redis: redis://host:port/db or rediss:// for TLS, without credentials (no '@': "
        "the URL is rendered into ConfigMaps in plain text; use passwordSecretRef).",
    )
    sentinel: RedisSentinelSpec | None = Field(default=None, description=RedisSentinelSpec.__doc__)
    cluster: RedisClusterSpec | None = Field(default=None, description=RedisClusterSpec.__doc__)
    password_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the Redis password (given to pods as REDIS_PASSWORD)."
    )

    @model_validator(mode="after")
    def _no_credentials(self) -> RedisSpec:
        if self.url is not None and "@" in self.url:
            raise ValueError(REDIS_URL_CREDENTIALS_MESSAGE)
        given = [name for name in ("url", "sentinel", "cluster") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"{REDIS_ONE_MODE_MESSAGE} (got {', '.join(given) or 'none'})")
        return self


ACCESS_PATH_OTHER_MESSAGE = "accessPaths: the name 'other' is reserved for subflows that match no access path"


class AccessPathSpec(_Spec):
    """An access network of the customers (e.g. DSL, LTE) and the CPE-side networks it uses."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": "self.name != 'other'", "message": ACCESS_PATH_OTHER_MESSAGE}]}
    )

    name: str = Field(
        min_length=1,
        max_length=32,
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="Name in the metrics and dashboards (e.g. dsl, lte); not 'other'.",
    )
    networks: list[CIDRPrefix] = Field(
        min_length=1,
        max_length=256,
        description="CIDR prefixes of the CPE addresses on this access network.",
    )

    @model_validator(mode="after")
    def _not_other(self) -> AccessPathSpec:
        if self.name == "other":
            raise ValueError(ACCESS_PATH_OTHER_MESSAGE)
        return self


class Toleration(_Spec):
    """A pod toleration (same meaning as core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class DirectorSpec(_Spec):
    """The director DaemonSet (mechanism 'director'): host-network pods that steer SYNs."""

    vip: IPAddress | None = Field(
        default=None,
        description="The address clients connect to, which the director intercepts; default: the "
        "first of service.addresses.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Nodes that run the director (where the VIP's traffic arrives)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of the director pods."
    )


class PolicySpec(_Spec):
    """Who may use the pool, where to, and how much (defaults: nobody may connect)."""

    allowed_cpes: list[CIDRPrefix] = Field(
        default_factory=list,
        max_length=4096,
        description="CIDR prefixes of the clients (CPEs, phones) allowed to connect. Empty: nobody.",
    )
    denied_destinations: list[CIDRPrefix] = Field(
        default_factory=list,
        max_length=4096,
        description="Destination CIDRs refused in addition to the defaults (loopback, link-local, "
        "metadata, private and shared ranges, the pods' own addresses and the VIP) and the "
        "cluster's ranges (spec.cluster).",
    )
    deny_default_destinations: bool = Field(
        default=True,
        description="Refuse loopback, link-local, metadata, the private and shared ranges (10/8, "
        "172.16/12, 192.168/16, 100.64/10, fc00::/7, 64:ff9b:1::/48), the pods' own addresses and "
        "the VIP as destinations.",
    )
    # --- opening refused ranges on purpose (issue 10) ---
    allowed_destinations: list[CIDRPrefix] = Field(
        default_factory=list,
        max_length=4096,
        description="Destination CIDRs opened although a refused range covers them; the most "
        "specific prefix decides (equal length: allowed), so opening 10.0.0.0/8 leaves the more "
        "specific spec.cluster ranges refused.",
    )
    allowed_ports: list[Port] = Field(
        default_factory=list, max_length=1024, description="Destination ports allowed; empty: every port."
    )
    max_connections: int = Field(
        default=50_000, ge=1, le=10_000_000, description="Live connections per pod at most."
    )
    max_connections_per_cpe: int = Field(
        default=1_000, ge=1, le=10_000_000, description="Live connections per client address per pod at most."
    )
    handshake_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="Time a client has to send a complete Convert/SOCKS5 request."
    )
    max_handshake_bytes: int = Field(
        default=1020, ge=64, le=65535, description="Largest Convert message or SOCKS5 request accepted."
    )


# --- the cluster's own ranges (issue 10) -------------------------------------------------------
# Used when spec.cluster leaves them unset: kubeadm's defaults (pods behind flannel 10.244/16,
# Services 10.96/12), k3s/RKE2 (10.42/16, 10.43/16) and Calico's default pool (192.168/16). The
# private ranges are refused anyway; the cluster's ranges matter because they stay refused, as
# more specific prefixes, when policy.allowedDestinations opens a private range.
DEFAULT_POD_CIDRS: tuple[str, ...] = ("10.244.0.0/16", "10.42.0.0/16", "192.168.0.0/16")
DEFAULT_SERVICE_CIDRS: tuple[str, ...] = ("10.96.0.0/12", "10.43.0.0/16")


class ClusterSpec(_Spec):
    """The cluster's own address ranges, refused as destinations (an allowed CPE must not reach
    the API server, kubelets, Redis or any pod through the pool)."""

    pod_cidrs: list[CIDRPrefix] | None = Field(
        default=None,
        alias="podCIDRs",
        max_length=64,
        description="The cluster's pod CIDRs (kube-controller-manager --cluster-cidr). Unset: "
        "10.244.0.0/16, 10.42.0.0/16 and 192.168.0.0/16, with a ClusterRanges=False status "
        "condition and a Warning event.",
    )
    service_cidrs: list[CIDRPrefix] | None = Field(
        default=None,
        alias="serviceCIDRs",
        max_length=64,
        description="The cluster's Service CIDRs (kube-apiserver --service-cluster-ip-range). Unset: "
        "10.96.0.0/12 and 10.43.0.0/16, with a ClusterRanges=False status condition and a Warning event.",
    )

    def refused(self) -> list[str]:
        """Pod then Service ranges, the defaults standing in for what is unset."""
        pods = self.pod_cidrs if self.pod_cidrs is not None else list(DEFAULT_POD_CIDRS)
        services = self.service_cidrs if self.service_cidrs is not None else list(DEFAULT_SERVICE_CIDRS)
        return [*pods, *services]

    def defaulted(self) -> list[str]:
        """The camelCase names of the fields left to their defaults."""
        return [name for name, value in (("cluster.podCIDRs", self.pod_cidrs),
                                         ("cluster.serviceCIDRs", self.service_cidrs)) if value is None]  # fmt: skip


class UpstreamSpec(_Spec):
    """How the pods reach destination servers."""

    protocol: Literal["tcp", "mptcp"] = Field(
        default="tcp", description="'mptcp' tries MPTCP upstream (the kernel falls back to TCP)."
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120, description="Upstream connect timeout.")


class RelaySpec(_Spec):
    """How bytes move between client and server inside a pod."""

    mode: Literal["auto", "splice", "buffered"] = Field(
        default="auto", description="'splice' keeps bytes in the kernel; 'buffered' copies; 'auto' picks."
    )
    idle_timeout_seconds: float = Field(
        default=3600.0, gt=0, le=604_800, description="Close a connection idle for this long."
    )
    buffer_bytes: int = Field(
        default=262_144, ge=4096, le=16 * 1024 * 1024, description="Bytes buffered per direction at most."
    )


class KernelSpec(_Spec):
    """Per-pod MPTCP kernel settings, applied through the pod's securityContext.sysctls."""

    mptcp_checksum: bool = Field(
        default=True,
        description="net.mptcp.checksum_enabled=1: DSS checksums catch stream corruption seen on "
        "two-subflow connections without them. Turn off only after measuring.",
    )


class ServiceSpec(_Spec):
    """The pool's VIP Service that clients connect to."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_SERVICE_TYPE} != 'LoadBalancer' || {_cel_size('addresses')} <= 1",
                    "message": "service.type LoadBalancer takes at most one address (its loadBalancerIP)",
                }
            ]
        }
    )

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="LoadBalancer", description="Service type of the VIP."
    )
    addresses: list[IPAddress] = Field(
        default_factory=list,
        max_length=8,
        description="VIP addresses: the loadBalancerIP for LoadBalancer, externalIPs otherwise.",
    )
    external_traffic_policy: Literal["Local", "Cluster"] = Field(
        default="Local",
        description="For LoadBalancer/NodePort. 'Local' keeps the client's source address, which "
        "policy.allowedCpes and per-client limits depend on.",
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, description="Annotations for the VIP Service (e.g. for a load-balancer controller)."
    )

    @model_validator(mode="after")
    def _lb_addresses(self) -> ServiceSpec:
        if self.type == "LoadBalancer" and len(self.addresses) > 1:
            raise ValueError("service.type LoadBalancer takes at most one address (its loadBalancerIP)")
        return self


class ResourcesSpec(_Spec):
    """CPU and memory of each MCP pod (same meaning as core/v1 ResourceRequirements)."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Resources reserved per pod, e.g. {cpu: 500m, memory: 256Mi}."
    )
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits per pod.")


class OpenTelemetrySpec(_Spec):
    """Where the pods export traces and metrics."""

    endpoint: str | None = Field(
        default=None,
        max_length=1024,
        description="OTLP/HTTP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://otel-collector:4318; unset: no export.",
    )


class OnPathMarkerSpec(_Spec):
    """How the on-path MCP tells a CPE-converted MPTCP connection from an end host's own."""

    dscp: str | None = Field(
        default="af11", max_length=8, pattern=r"^([a-z]{2}[0-9]{1,2}|ef|[0-9]{1,2})$",
        description="DSCP the CPE converters set (default AF11); null: no DSCP test.",
    )
    source_prefixes: list[CIDRPrefix] = Field(
        default_factory=list, max_length=4096,
        description="If set, converted SYNs must also come from these prefixes (the CPEs' own addresses).",
    )


class OnPathSpec(_Spec):
    """Implicit mode: a DaemonSet of host-network MCPs on the gateway nodes that subscriber traffic
    is routed through (see docs/implicit.md for the routing prerequisites)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_cel_get('port', '5125')} != {_cel_get('joinPort', '5126')}",
                    "message": "onPath.port and onPath.joinPort must differ",
                },
            ]
        }
    )

    enabled: bool = Field(default=False, description="Run the on-path DaemonSet.")
    port: Port = Field(default=5125, description="Port of the transparent listener on the node's address.")
    join_port: Port = Field(default=5126, description="Port announced (ADD_ADDR) for the CPEs' other links to join.")
    marker: OnPathMarkerSpec = Field(default_factory=OnPathMarkerSpec, description=OnPathMarkerSpec.__doc__)
    cpe_interfaces: list[Annotated[str, Field(min_length=1, max_length=15)]] = Field(
        default_factory=list, max_length=64,
        description="Node interfaces facing the CPEs (only SYNs arriving there are intercepted); empty: any.",
    )
    upstream_source: Literal["client", "mcp"] = Field(
        default="client",
        description="'client': connect upstream from the subscriber's own address (no NAT; the return path "
        "must pass the same node); 'mcp': from the node's address.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="The gateway nodes that run the on-path MCP."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Their tolerations.")

    @model_validator(mode="after")
    def _check(self) -> OnPathSpec:
        if self.port == self.join_port:
            raise ValueError("onPath.port and onPath.joinPort must differ")
        if not self.marker.dscp and not self.marker.source_prefixes:
            raise ValueError("onPath.marker needs a dscp, sourcePrefixes or both")
        return self


class MCPPoolSpec(_Spec):
    """A pool of MPTCP concentrator proxy (MCP) pods, their Services, configuration and director."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_MECHANISM} != 'join-address' || "
                    f"{_cel_size('affinity.joinAddresses')} >= {_cel_get('replicas', '1')}",
                    "message": "affinity.mechanism join-address needs one affinity.joinAddresses entry per replica",
                },
                {
                    "rule": f"{_MECHANISM} != 'join-address' || "
                    f"{_cel_get('listeners.convert.enabled', 'true')} || {_cel_has('affinity.joinPort')}",
                    "message": "affinity.mechanism join-address needs affinity.joinPort when the Convert listener is disabled",
                },
                {
                    "rule": f"{_MECHANISM} != 'director' || has(self.redis)",
                    "message": "affinity.mechanism director needs spec.redis (the director reads the token table from Redis)",
                },
                {
                    "rule": f"{_MECHANISM} != 'director' || {_cel_get('replicas', '1')} <= {MAX_DIRECTOR_REPLICAS}",
                    "message": DIRECTOR_REPLICAS_MESSAGE,
                },
                {
                    "rule": f"{_MECHANISM} != 'director' || {_cel_has('director.vip')} || "
                    f"{_cel_size('service.addresses')} > 0",
                    "message": "affinity.mechanism director needs director.vip or service.addresses",
                },
            ]
        }
    )

    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS, description="Number of MCP pods.")
    image: str = Field(
        default=DEFAULT_IMAGE, min_length=1, max_length=512, description="Container image of mcpool."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the pool's containers."
    )
    listeners: ListenersSpec = Field(default_factory=ListenersSpec, description=ListenersSpec.__doc__)
    affinity: AffinitySpec = Field(default_factory=AffinitySpec, description=AffinitySpec.__doc__)
    redis: RedisSpec | None = Field(default=None, description=RedisSpec.__doc__)
    director: DirectorSpec = Field(default_factory=DirectorSpec, description=DirectorSpec.__doc__)
    policy: PolicySpec = Field(default_factory=PolicySpec, description=PolicySpec.__doc__)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description=ClusterSpec.__doc__)
    upstream: UpstreamSpec = Field(default_factory=UpstreamSpec, description=UpstreamSpec.__doc__)
    relay: RelaySpec = Field(default_factory=RelaySpec, description=RelaySpec.__doc__)
    kernel: KernelSpec = Field(default_factory=KernelSpec, description=KernelSpec.__doc__)
    service: ServiceSpec = Field(default_factory=ServiceSpec, description=ServiceSpec.__doc__)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description=ResourcesSpec.__doc__)
    workers: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORKERS,
        description="Proxy worker processes per pod (one SO_REUSEPORT listener group; each worker "
        "uses one core). Unset: from the pod's CPU, resources.limits.cpu else resources.requests.cpu, "
        f"rounded down, at least 1 and at most {MAX_RENDERED_WORKERS}; 1 without either. On-path "
        "(implicit) pools always run 1.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels the MCP pods must run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of the MCP pods."
    )
    opentelemetry: OpenTelemetrySpec = Field(
        default_factory=OpenTelemetrySpec, description=OpenTelemetrySpec.__doc__
    )
    on_path: OnPathSpec = Field(default_factory=OnPathSpec, description=OnPathSpec.__doc__)
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="On shutdown, how long live connections may continue; the pods' "
        "terminationGracePeriodSeconds is set above it.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the MCP pods."
    )
    access_paths: list[AccessPathSpec] = Field(
        default_factory=list,
        max_length=16,
        description="The customers' access networks (e.g. DSL and LTE) by CPE-side prefixes: the "
        "pods count bytes per access path (mcpool_access_path_bytes_total{path}) for the "
        "dashboards' bonding view, without a label per CPE. First match wins.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @model_validator(mode="after")
    def _cross_field(self) -> MCPPoolSpec:
        names = [p.name for p in self.access_paths]
        if len(names) != len(set(names)):
            raise ValueError(f"accessPaths: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        mechanism = self.affinity.mechanism
        if mechanism == "join-address":
            if len(self.affinity.join_addresses) < self.replicas:
                raise ValueError(
                    "affinity.mechanism join-address needs one affinity.joinAddresses entry per "
                    f"replica: {self.replicas} replicas, {len(self.affinity.join_addresses)} addresses"
                )
            if not self.listeners.convert.enabled and self.affinity.join_port is None:
                raise ValueError(
                    "affinity.mechanism join-address needs affinity.joinPort when the Convert listener is disabled"
                )
        if mechanism == "director":
            if self.redis is None:
                raise ValueError(
                    "affinity.mechanism director needs spec.redis (the director reads the token table from Redis)"
                )
            if self.replicas > MAX_DIRECTOR_REPLICAS:
                raise ValueError(f"{DIRECTOR_REPLICAS_MESSAGE}: {self.replicas} replicas")
            if self.director.vip is None and not self.service.addresses:
                raise ValueError("affinity.mechanism director needs director.vip or service.addresses")
        return self

    def listener_ports(self) -> list[int]:
        """The client-facing ports, Convert first."""
        ports = []
        if self.listeners.convert.enabled:
            ports.append(self.listeners.convert.port)
        if self.listeners.socks5.enabled:
            ports.append(self.listeners.socks5.port)
        return ports

    def effective_join_port(self) -> int:
        return self.affinity.join_port or self.listeners.convert.port

    def director_vip(self) -> str | None:
        return self.director.vip or (self.service.addresses[0] if self.service.addresses else None)


def _format(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against `kubectl explain mcppool.spec`)"
        problems.append(f"spec.{where}: {msg}" if where != "spec" else f"spec: {msg}")
    return "; ".join(problems)


def parse_spec(data: Mapping[str, Any] | None) -> MCPPoolSpec:
    """Validate an MCPPool's `spec` (camelCase keys); raise SpecError with one clause per problem."""
    try:
        return MCPPoolSpec.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise SpecError(_format(exc)) from None


@dataclass(frozen=True)
class Pool:
    """One MCPPool as the builders need it: identity plus the validated spec."""

    name: str
    namespace: str
    spec: MCPPoolSpec
    uid: str = ""
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Pool:
        """Parse a whole MCPPool object; raise SpecError if it cannot become a pool."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if len(name) > MAX_POOL_NAME_LENGTH:
            raise SpecError(
                f"metadata.name: {name!r} is longer than {MAX_POOL_NAME_LENGTH} characters "
                "(child objects are named after it and must stay within Kubernetes' limits)"
            )
        return cls(
            name=name,
            namespace=str(meta.get("namespace") or "default"),
            spec=parse_spec(body.get("spec")),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
        )
