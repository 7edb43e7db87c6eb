"""The proxy's configuration model: the contract between the data plane and the operator.

The proxy loads it from YAML (`mcpool proxy --config FILE`) and validates it here; the operator
imports the same model to render each pool's ConfigMap, so a configuration the operator writes is
one the proxy accepts. Everything a pod can be told lives in this one module; nothing here does
I/O beyond reading the file in `load_config`.

Every timeout and limit is a named field with its unit in the name and a default that is safe
for an MCP exposed to the Internet: nobody may connect until `policy.allowed_cpes` says so.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

__all__ = [
    "AdminAddress",
    "AffinityConfig",
    "ConfigError",
    "HostPort",
    "KernelConfig",
    "LimitsConfig",
    "ListenConfig",
    "MarkerConfig",
    "PolicyConfig",
    "ProxyConfig",
    "RedisClusterConfig",
    "RedisSentinelConfig",
    "RedisTarget",
    "RelayConfig",
    "ResolverConfig",
    "Socks5User",
    "TransparentConfig",
    "UpstreamConfig",
    "dscp_value",
    "load_config",
    "parse_config",
    "redis_target",
    "split_hostport",
    "split_redis_address",
    "DEFAULT_DENIED_DESTINATIONS",
    "DEFAULT_PRIVATE_DESTINATIONS",
    "FEED_RETAIN_S",
    "MAX_WORKERS",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Destinations an MCP must never relay to unless an operator removes them on purpose: they reach
# the proxy itself, the node, or a cloud's instance metadata service (credential theft).
DEFAULT_DENIED_DESTINATIONS: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"; connecting to 0.0.0.0 reaches the local host
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, including 169.254.169.254 (instance metadata)
    "224.0.0.0/4",  # multicast: never a TCP destination
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::/96",  # IPv4-compatible IPv6 (deprecated): ::a9fe:a9fe would be 169.254.169.254
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
    "fd00:ec2::254/128",  # AWS IPv6 instance metadata
)

# --- inside a cluster: private and shared ranges (issue 10) -------------------------------------
# Where a cluster's pods, Services, nodes, API server, kubelets (10250) and Redis live. An allowed
# CPE must not reach them through the proxy, so they are refused by default like the ranges above
# (and under the same switch, `deny_default_destinations`); `policy.allowed_destinations` opens a
# part of them on purpose. Their NAT64 and 6to4 forms are refused with them (policy.py).
DEFAULT_PRIVATE_DESTINATIONS: tuple[str, ...] = (
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 shared address space (CGNAT; some clusters' pod networks)
    "fc00::/7",  # RFC 4193 unique local addresses
    "64:ff9b:1::/48",  # RFC 8215 local-use NAT64 prefix: translates into private IPv4 networks
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why, for a human."""


def split_hostport(value: str) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" or ":port" into (host, port); raise ValueError if malformed.

    An empty host means every address ("::" with dual-stack listening).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string like '[::]:5124' or '0.0.0.0:5124', got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"{value!r}: an IPv6 address must be written '[addr]:port'")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r}: missing ':port' (e.g. '0.0.0.0:5124')")
        if ":" in host:
            raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. '[{host}]:{port_text}'")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    if host == "":
        host = "::"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


def _check_hostport(value: str) -> str:
    split_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_hostport)]
AdminAddress = HostPort


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR prefix (e.g. '192.0.2.0/24' or '2001:db8::/32')") from None


CIDR = Annotated[str, AfterValidator(lambda v: str(_network(v)))]


def _path_name(value: str) -> str:
    if value == "other":
        raise ValueError("'other' is reserved for subflows that match no access path")
    return value


AccessPathName = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$"), AfterValidator(_path_name)
]


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a limit must not silently leave the default in force.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ListenConfig(_Model):
    """Where the proxy accepts clients. Each listener is an MPTCP socket (TCP clients work too)."""

    convert: HostPort | None = Field(
        default="[::]:5124",
        description="RFC 8803 Convert listener address, e.g. '[::]:5124'; null disables it.",
    )
    socks5: HostPort | None = Field(
        default=None, description="SOCKS5 listener address, e.g. '[::]:1080'; null disables it."
    )
    transparent: list[HostPort] = Field(
        default_factory=list,
        description="Transparent (implicit mode) listeners: the MCP's own address and a port, at most "
        "one IPv4 and one IPv6, e.g. ['198.51.100.7:5125', '[2001:db8::7]:5125'] (never a wildcard); "
        "marked MPTCP SYNs of that family are sent to it by TPROXY (see `transparent`); empty: off.",
    )
    backlog: int = Field(default=4096, ge=1, le=65535, description="listen() backlog per listener.")
    fastopen_queue: int = Field(
        default=4096,
        ge=0,
        le=65535,
        description="TCP Fast Open queue length on the listeners (0 disables TFO, i.e. no 0-RTT).",
    )

    @model_validator(mode="after")
    def _one_listener(self) -> ListenConfig:
        if self.convert is None and self.socks5 is None and not self.transparent:
            raise ValueError("enable at least one of listen.convert, listen.socks5 and listen.transparent")
        if self.convert is not None and self.convert == self.socks5:
            raise ValueError("listen.convert and listen.socks5 must use different addresses")
        families: set[int] = set()
        for address in self.transparent:
            host, _ = split_hostport(address)
            ip = None if host == "localhost" else ipaddress.ip_address(host)
            if ip is None or ip.is_unspecified:
                # A wildcard listener would also catch the pass-through flows the socket rule sees.
                raise ValueError(f"listen.transparent: {address!r} must be one of the MCP's own addresses, "
                                 "not a wildcard")
            if ip.version in families:
                raise ValueError(f"listen.transparent: at most one IPv{ip.version} address")
            families.add(ip.version)
            if address in (self.convert, self.socks5):
                raise ValueError("listen.transparent must not share an address with another listener")
        return self


class UpstreamConfig(_Model):
    """How the proxy reaches the destination server."""

    protocol: Literal["tcp", "mptcp"] = Field(
        default="tcp",
        description="'mptcp' opens MPTCP upstream (the kernel falls back to TCP if the server lacks it).",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Upstream connect timeout.")


class Socks5User(_Model):
    """One SOCKS5 username/password (RFC 1929) credential."""

    username: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=255)


class PolicyConfig(_Model):
    """Who may connect, where to, and how much. The defaults make the proxy a closed relay."""

    allowed_cpes: list[CIDR] = Field(
        default_factory=list,
        description="CIDR prefixes of clients (CPEs, phones) allowed to use the proxy. Empty: nobody.",
    )
    denied_destinations: list[CIDR] = Field(
        default_factory=list,
        description="CIDRs refused as destinations, added to the built-in defaults "
        "(loopback, link-local, metadata, private and shared ranges) and the proxy's own addresses; "
        "e.g. cluster pod/service CIDRs.",
    )
    deny_default_destinations: bool = Field(
        default=True,
        description="Refuse the built-in defaults (DEFAULT_DENIED_DESTINATIONS, "
        "DEFAULT_PRIVATE_DESTINATIONS: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, "
        "64:ff9b:1::/48) and the proxy's own addresses, the VIP included. Turn off only in a lab "
        "where the server really is on loopback.",
    )
    # --- opening refused ranges on purpose (issue 10) ---
    allowed_destinations: list[CIDR] = Field(
        default_factory=list,
        description="CIDRs opened as destinations although a refused range covers them. The most "
        "specific prefix decides: a destination is refused when the longest refused prefix holding "
        "it is longer than the longest allowed prefix holding it (equal length: allowed). So "
        "'10.0.0.0/8' opens the default 10/8 but not a more specific refused '10.96.0.0/12' "
        "(e.g. the cluster's Service range), nor a proxy's own address (/32, /128). Ports are "
        "still checked against allowed_ports.",
    )
    allowed_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, description="Destination ports allowed; empty: every port."
    )
    max_connections: int = Field(default=50_000, ge=1, description="Global limit of live connections.")
    max_connections_per_cpe: int = Field(
        default=1_000, ge=1, description="Limit of live connections per client address."
    )
    max_handshakes: int = Field(
        default=4096,
        ge=1,
        description="Connections allowed in their Convert/SOCKS5 handshake at once; beyond, new ones are "
        "refused at once (Resource Exceeded), so a flood of silent clients cannot exhaust descriptors.",
    )
    handshake_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Time a client has to send a complete Convert/SOCKS5 request."
    )
    max_handshake_bytes: int = Field(
        default=1020,
        ge=64,
        le=65535,
        description="Largest Convert message or SOCKS5 request accepted (RFC 8803 caps a Convert "
        "message at 255 32-bit words = 1020 bytes).",
    )
    cookies: list[str] = Field(
        default_factory=list,
        description="If set, Convert clients must send a Cookie TLV whose body (hex) is one of these "
        "(none: Missing Cookie, code 3; another: Not Authorized, code 32).",
    )
    # -- per-client cookies (RFC 8803 section 4.2.6) -------------------------------------------
    cookie_secret_file: str | None = Field(
        default=None,
        description="File holding the secret of per-client Convert cookies (e.g. a mounted Secret): each "
        "client must send HMAC-SHA256(secret, its address as 4 or 16 bytes), first 16 bytes "
        "(`policy.client_cookie`). Read at start; combined with policy.cookies, either is accepted.",
    )
    socks5_users: list[Socks5User] = Field(
        default_factory=list,
        description="If set, SOCKS5 clients must authenticate with username/password; else no-auth.",
    )

    @model_validator(mode="after")
    def _check_cookies(self) -> PolicyConfig:
        for cookie in self.cookies:
            try:
                raw = bytes.fromhex(cookie)
            except ValueError:
                raise ValueError(f"policy.cookies: {cookie!r} is not hex") from None
            if not raw:
                raise ValueError("policy.cookies: an empty cookie would accept everybody")
        return self

    def cookie_bytes(self) -> frozenset[bytes]:
        return frozenset(bytes.fromhex(c) for c in self.cookies)


class RelayConfig(_Model):
    """How bytes move between client and server."""

    mode: Literal["auto", "splice", "buffered"] = Field(
        default="auto",
        description="'splice' keeps bytes in the kernel (os.splice through a pipe) past each direction's first "
        "small reads, which are copied (a short request or reply costs no pipe); 'buffered' copies through "
        "userspace; 'auto' uses splice where the platform has it.",
    )
    idle_timeout_s: float = Field(
        default=3600.0, gt=0, description="Close a connection after this long with no bytes either way."
    )
    buffer_bytes: int = Field(
        default=262_144,
        ge=4096,
        le=16 * 1024 * 1024,
        description="Bytes held per direction at most (pipe size for splice, buffer for the fallback): "
        "a slow reader makes the proxy stop reading, never buffer more.",
    )


class KernelConfig(_Model):
    """Per-network-namespace kernel settings the proxy applies at start (needs CAP_NET_ADMIN or a
    pod `securityContext.sysctls`; if it cannot, it logs and reports what is in force)."""

    mptcp_checksum: bool = Field(
        default=True,
        description="Set net.mptcp.checksum_enabled=1: without DSS checksums, kernel 6.18 was measured "
        "to occasionally corrupt two-subflow streams; with them the kernel detects and recovers.",
    )
    tcp_fastopen_server: bool = Field(
        default=True,
        description="Enable the server side of TCP Fast Open (net.ipv4.tcp_fastopen |= 0x2) so clients "
        "can carry the Convert message in the SYN (0-RTT) once they have a cookie.",
    )
    apply_sysctls: bool = Field(
        default=True,
        description="Write the sysctls above at start; false when the pod spec sets them already.",
    )
    # -- refusing what the proxy cannot be (kernel/admission.py, kernel/mptcp.py) ---------------
    require_mptcp: bool = Field(
        default=True,
        description="Refuse to start if a listener cannot be MPTCP (CONFIG_MPTCP missing, net.mptcp.enabled=0). "
        "False: start with TCP listeners, log a warning and report `mptcp: false` in /readyz.",
    )
    admission_filter: bool = Field(
        default=True,
        description="Drop SYNs from clients outside policy.allowed_cpes in the kernel (an nftables table "
        "`mcpool_admission` in the pod's namespace, removed at exit unless admission_status_file says it was "
        "installed before the proxy), so strangers never hold a handshake "
        "slot. Needs nft and CAP_NET_ADMIN; without them the proxy logs it and refuses strangers in userspace.",
    )
    admission_table: str = Field(
        default="mcpool_admission",
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$",
        description="Name of the nftables table (family inet) of the admission filter.",
    )
    admission_status_file: str | None = Field(
        default=None,
        description="Where `mcpool admission install --config FILE` (run before the proxy, e.g. by the pod's "
        "init container, the one container with CAP_NET_ADMIN) records the filter it installed. If the file is "
        "there and matches this configuration, the proxy reports the filter active and neither installs nor "
        "removes it; otherwise it installs the filter itself. null: the proxy always installs it itself.",
    )


class LimitsConfig(_Model):
    """What one client (CPE) may cost before it has been served, and how dead peers are found.

    The caps apply in the pipeline before any front reads a byte, so every front gets them."""

    max_handshakes_per_cpe: int = Field(
        default=64,
        ge=1,
        description="Connections of one client address in their handshake at once; beyond, refused at once "
        "(Convert Resource Exceeded 64, SOCKS5 general failure), so one CPE cannot take every "
        "policy.max_handshakes slot.",
    )
    new_connections_per_cpe_per_s: float = Field(
        default=200.0,
        gt=0,
        description="Sustained rate of new connections one client address may open (a token bucket); "
        "beyond, refused at once like max_handshakes_per_cpe. With kernel.admission_filter, SYNs beyond twice "
        "this rate (and burst) are also dropped in the kernel.",
    )
    new_connections_burst_per_cpe: int = Field(
        default=400, ge=1, description="Bucket size of new_connections_per_cpe_per_s: connections one client may "
        "open at once after being quiet.",
    )
    tcp_user_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="TCP_USER_TIMEOUT on both legs where the kernel accepts it (TCP sockets; MPTCP sockets "
        "refuse it on 6.18, see kernel/mptcp.py): unacknowledged data older than this closes the connection. "
        "Once set it also decides when unanswered keepalive probes end a TCP connection (the kernel then ignores "
        "keepalive_count). 0: the kernel default (about 15 minutes of retransmissions).",
    )
    keepalive_idle_s: int = Field(
        default=60,
        ge=0,
        le=32767,
        description="TCP keepalive on both legs: probe after this many idle seconds (0 disables keepalive).",
    )
    keepalive_interval_s: int = Field(default=10, ge=1, le=32767, description="Seconds between keepalive probes.")
    keepalive_count: int = Field(
        default=6, ge=1, le=127, description="Unanswered keepalive probes after which the peer is dead."
    )
    subflow_loss_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="An MPTCP client connection whose every subflow died (keepalive, retransmissions) is kept "
        "by the kernel, silently, for a new subflow to join; the proxy closes it (reason client_lost) after "
        "this long without one. Checked every keepalive_interval_s while keepalive is on.",
    )
    pipe_budget_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=0,
        description="Pipe memory the splice relay may hold at once (pipes count against the per-user "
        "fs.pipe-user-pages-soft, 64 MiB for every pod of one UID on a node by default); beyond it, or when "
        "the kernel gives a smaller pipe than relay.buffer_bytes, a direction is relayed buffered "
        "(counted in mcpool_splice_fallbacks_total, logged once).",
    )


class ResolverConfig(_Model):
    """How SOCKS5 domain names are resolved: c-ares (aiodns) on the event loop, bounded."""

    servers: list[str] = Field(
        default_factory=list,
        description="DNS servers ('192.0.2.53' or '[2001:db8::53]:5353'); empty: those of /etc/resolv.conf.",
    )
    timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Longest a name may take to resolve (all tries); then Host Unreachable."
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="Names being resolved at once; beyond, a SOCKS5 request by name is refused (general failure) "
        "instead of queueing behind a slow DNS server.",
    )

    @model_validator(mode="after")
    def _check_servers(self) -> ResolverConfig:
        for server in self.servers:
            try:
                split_resolver_server(server)
            except ValueError as exc:
                raise ValueError(f"resolver.servers: {exc}") from None
        return self


def split_resolver_server(value: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353' -> (ip, port)."""
    text = value.strip()
    if text.startswith("[") or text.count(":") == 1:
        return split_hostport(text)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (optionally with :port)") from None
    return text, 53


# The director's tunnel to the pods (kernel/steering.py): both ends must agree on the UDP port and
# on the MAC of the pod's receive device, so the defaults are named once, here, for both configs.
DEFAULT_VXLAN_PORT = 4789
# The most worker processes one pod may run (`workers`); the operator caps what it renders from
# the pod's CPU at the same figure.
MAX_WORKERS = 64
DEFAULT_POD_MAC = "02:6d:63:70:00:01"
# How much history a pool's change stream keeps (`affinity.feed_retain_s` of the pods, which trim
# it, and `feed_retain_s` of the directors, which follow it). A director reads the whole table
# after every reconnect and follows the stream from the cursor it read before: the stream must
# still hold that cursor when the full read ends (else a gap, and another full read). Bounded by
# time rather than length, so it covers a full read at any size: ~25 s at 1M connections
# (docs/scaling.md), with margin. Below FEED_RETAIN_MIN_S a brief stall of one director already
# costs a full read; above FEED_RETAIN_MAX_S the stream's memory (one entry per change) is the
# larger part of the pool's in Redis.
FEED_RETAIN_S = 120.0
FEED_RETAIN_MIN_S = 10.0
FEED_RETAIN_MAX_S = 3600.0
FEED_RETAIN_HELP = (
    "How long the pool's change stream (mcpool:{pool}:feed) keeps its entries: older ones are trimmed at each "
    "write, on Redis's clock. A director's full read of the table must end well within it, else it ends in a "
    "gap and is repeated: raise it where a full read takes more than a fraction of it (a very large table, a "
    "slow Redis). Longer costs Redis memory (one entry per change). Pods and directors of a pool should agree."
)


# -- where the affinity table lives: one Redis, Redis behind Sentinel, or a Redis Cluster ---------
# (pods and directors share these, so both speak the same modes with the same keys)


_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def split_redis_address(value: str) -> tuple[str, int]:
    """Split a Redis node's "host:port" (a DNS name, an IPv4 address or "[v6]:port")."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string like 'redis-sentinel.redis:26379', got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, port = split_hostport(text)
        return host, port
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: a Redis address needs a host and a port, e.g. 'redis-0.redis:6379'")
    if ":" in host:
        raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. '[{host}]:{port_text}'")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    if not _DNS_NAME.match(host):
        raise ValueError(f"{value!r}: {host!r} is neither a host name nor an IP address")
    return host, int(port_text)


def _redis_address(value: str) -> str:
    split_redis_address(value)
    return value.strip()


RedisAddress = Annotated[str, AfterValidator(_redis_address)]


class RedisSentinelConfig(_Model):
    """Redis behind Sentinel: the sentinels name the current primary and clients follow a failover.

    The data nodes' password comes from $REDIS_PASSWORD, the sentinels' own (when they have
    `requirepass`) from $REDIS_SENTINEL_PASSWORD: neither is written into a configuration file.
    """

    addresses: list[RedisAddress] = Field(
        min_length=1,
        description="host:port of the sentinels (usually three or more, port 26379); any one that "
        "answers names the primary.",
    )
    master_name: str = Field(
        min_length=1, description="Name of the monitored primary (`sentinel monitor NAME ...`), e.g. 'mymaster'."
    )
    db: int = Field(default=0, ge=0, description="Database number on the primary.")
    username: str | None = Field(default=None, description="ACL user on the data nodes (default: 'default').")
    sentinel_username: str | None = Field(default=None, description="ACL user on the sentinels.")
    tls: bool = Field(default=False, description="TLS to the sentinels and to the data nodes.")


class RedisClusterConfig(_Model):
    """A Redis Cluster: the client learns the slot map from any seed node and follows resharding
    and replica promotion. Every key of a pool shares the pool's hash tag (one slot), so the
    registry's scripts stay single-slot. The password comes from $REDIS_PASSWORD."""

    addresses: list[RedisAddress] = Field(
        min_length=1, description="host:port of one or more cluster nodes to learn the slot map from."
    )
    username: str | None = Field(default=None, description="ACL user (default: 'default').")
    tls: bool = Field(default=False, description="TLS to every node.")


RedisTarget = str | RedisSentinelConfig | RedisClusterConfig


def redis_target(
    section: str,
    url: str | None,
    sentinel: RedisSentinelConfig | None,
    cluster: RedisClusterConfig | None,
) -> RedisTarget | None:
    """The one Redis that `section` names (None if none); ValueError naming the keys if several.

    `section` is the keys' parent as the user writes it ('affinity'), '' for top-level keys."""
    def key(name: str) -> str:
        return f"{section}.{name}" if section else name

    given = [key(name) for name, value in (("redis_url", url), ("redis_sentinel", sentinel),
                                           ("redis_cluster", cluster)) if value is not None]  # fmt: skip
    if len(given) > 1:
        raise ValueError(
            f"set only one of {key('redis_url')}, {key('redis_sentinel')}, {key('redis_cluster')} "
            f"(got {' and '.join(given)})"
        )
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{key('redis_url')} must start with redis://, rediss:// or unix://, got {url!r}")
    return url if url is not None else sentinel if sentinel is not None else cluster


class AffinityConfig(_Model):
    """How subflows of one MPTCP connection find the pod that owns it (see docs/affinity.md)."""

    mechanism: Literal["director", "join-address", "none"] = Field(
        default="none", description="'director' (token steering via Redis), 'join-address' (C flag), or 'none'."
    )
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="Where the affinity table lives: in-process or shared Redis."
    )
    redis_url: str | None = Field(
        default=None,
        description="A single Redis: redis://[:password@]host:port/db; the password may instead come from "
        "REDIS_PASSWORD. Exclusive with redis_sentinel and redis_cluster.",
    )
    redis_sentinel: RedisSentinelConfig | None = Field(
        default=None,
        description="Redis behind Sentinel, which survives the primary's failure: {addresses: [sentinel "
        "host:port...], master_name, db, username, sentinel_username, tls}. Data nodes' password from "
        "REDIS_PASSWORD, the sentinels' from REDIS_SENTINEL_PASSWORD.",
    )
    redis_cluster: RedisClusterConfig | None = Field(
        default=None,
        description="A Redis Cluster: {addresses: [seed host:port...], username, tls}; password from REDIS_PASSWORD.",
    )
    pool: str = Field(default="default", min_length=1, max_length=63, description="Pool name (key prefix).")
    pod_name: str | None = Field(
        default=None, description="This pod's name in the registry; default: $POD_NAME or the hostname."
    )
    advertise: str | None = Field(
        default=None, description="Address the director forwards this pod's flows to (the pod IP)."
    )
    join_address: HostPort | None = Field(
        default=None,
        description="For 'join-address': the address:port this pod announces with ADD_ADDR (must be on the pod).",
    )
    heartbeat_ttl_s: float = Field(default=10.0, gt=0, le=300, description="Registry entries expire after this.")
    feed_retain_s: float = Field(
        default=FEED_RETAIN_S, ge=FEED_RETAIN_MIN_S, le=FEED_RETAIN_MAX_S, description=FEED_RETAIN_HELP
    )
    vip: Annotated[str, AfterValidator(lambda v: str(ipaddress.ip_address(v)))] | None = Field(
        default=None,
        description="The pool's VIP when a director forwards to this pod: the pod puts it on lo and "
        "decapsulates the director's VXLAN (direct server return). Null: this pod sets up no receive side.",
    )
    vxlan_port: int = Field(
        default=DEFAULT_VXLAN_PORT, ge=1, le=65535, description="UDP port of the director's VXLAN tunnel to this pod."
    )
    pod_mac: str = Field(
        default=DEFAULT_POD_MAC,
        pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$",
        description="MAC of this pod's VXLAN receive device; must equal the director's pod_mac.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AffinityConfig:
        target = redis_target("affinity", self.redis_url, self.redis_sentinel, self.redis_cluster)
        if self.backend == "redis" and target is None:
            raise ValueError(
                "affinity.backend 'redis' needs affinity.redis_url, affinity.redis_sentinel or affinity.redis_cluster"
            )
        if self.mechanism == "director" and self.backend != "redis":
            # The director learns token ownership only from the shared table.
            raise ValueError("affinity.mechanism 'director' needs affinity.backend 'redis'")
        if self.mechanism == "join-address" and self.join_address is None:
            raise ValueError("affinity.mechanism 'join-address' needs affinity.join_address")
        return self

    @property
    def redis(self) -> RedisTarget | None:
        """The Redis of the affinity table, whichever way it is given."""
        return redis_target("affinity", self.redis_url, self.redis_sentinel, self.redis_cluster)



# -- implicit mode (issue 9): the MCP on the path; kept in its own block -----------------------------
DSCP_NAMES: dict[str, int] = {
    "cs0": 0, "cs1": 8, "af11": 10, "af12": 12, "af13": 14, "cs2": 16, "af21": 18, "af22": 20,
    "af23": 22, "cs3": 24, "af31": 26, "af32": 28, "af33": 30, "cs4": 32, "af41": 34, "af42": 36,
    "af43": 38, "cs5": 40, "ef": 46, "cs6": 48, "cs7": 56,
}


def _dscp(value: Any) -> str:
    text = str(value).strip().lower()
    if text in DSCP_NAMES:
        return text
    if text.isdigit() and 0 <= int(text) < 64:
        return text
    raise ValueError(f"{value!r} is not a DSCP: a name (af11, cs1, ef...) or a number 0-63")


DSCP = Annotated[str, AfterValidator(_dscp)]


def dscp_value(dscp: str) -> int:
    """The 6-bit DSCP of a name ('af11') or number ('10')."""
    return DSCP_NAMES[dscp] if dscp in DSCP_NAMES else int(dscp)


class MarkerConfig(_Model):
    """How the MCP tells an MP_CAPABLE SYN that a CPE converter added from one an end host sent
    itself: only SYNs passing every configured test are terminated here."""

    dscp: DSCP | None = Field(
        default="af11",
        description="DSCP the CPE converter puts on its MPTCP subflows (default AF11, TOS 0x28); "
        "null: no DSCP test.",
    )
    source: list[CIDR] = Field(
        default_factory=list,
        description="If set, a SYN counts as converted only when its source is in one of these "
        "prefixes too (e.g. the CPEs' own access addresses); with dscp null, the only test.",
    )

    @model_validator(mode="after")
    def _some_test(self) -> MarkerConfig:
        if self.dscp is None and not self.source:
            raise ValueError("transparent.marker: set dscp, source or both (with neither every MPTCP SYN "
                             "would be terminated, including phones' own end-to-end connections)")
        return self


class TransparentConfig(_Model):
    """Implicit mode: the MCP sits on the CPEs' DSL path and terminates only what the CPE converted
    (TPROXY of marked MP_CAPABLE SYNs to `listen.transparent`); everything else is routed
    untouched. Used only when `listen.transparent` is set."""

    marker: MarkerConfig = Field(default_factory=MarkerConfig)
    cpe_interfaces: list[Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.:@-]+$")]] = Field(
        default_factory=list,
        description="Interfaces facing the CPEs; only SYNs arriving on them are intercepted. Empty: any.",
    )
    join_address: HostPort | None = Field(
        default=None,
        description="The MCP's own address:port announced with ADD_ADDR (C flag set) so a CPE's other "
        "links join here although they never cross this path; the port must differ from "
        "listen.transparent's. Null: no announcement (joins then cannot reach this MCP).",
    )
    upstream_source: Literal["client", "mcp"] = Field(
        default="client",
        description="'client': connect upstream from the client's own address (IP_TRANSPARENT, no "
        "address translation; return traffic must route through this MCP); 'mcp': from the MCP's address.",
    )
    install_rules: bool = Field(
        default=True,
        description="Install the nftables table and policy routing at start (removed at exit); false "
        "when something else provides them.",
    )
    nft_table: str = Field(
        default="mcpool_tproxy", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$", description="The nftables table (inet)."
    )
    fwmark: int = Field(default=0x1, ge=1, le=0xFFFFFFFF, description="Mark routing intercepted packets locally.")
    route_table: int = Field(default=100, ge=1, le=0xFFFFFFFE, description="Routing table with the local route.")
    rule_priority: int = Field(default=4200, ge=1, le=32765, description="Priority of the fwmark ip rule.")
    bind_retry_s: float = Field(
        default=1.0, gt=0, le=60,
        description="While listen.transparent cannot be bound, retry this often (marked SYNs are dropped "
        "and /readyz fails meanwhile).",
    )

    @model_validator(mode="after")
    def _join_port(self) -> TransparentConfig:
        if self.join_address is not None:
            host, _ = split_hostport(self.join_address)
            if host == "localhost" or ipaddress.ip_address(host).is_unspecified:
                raise ValueError("transparent.join_address must be an address of the MCP, not a wildcard")
        return self

class ProxyConfig(_Model):
    """The whole configuration of one MCP pod (`mcpool proxy --config FILE`)."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    admin: AdminAddress | None = Field(
        default="127.0.0.1:9090",
        description="Admin HTTP address (/healthz, /readyz, /connections, /metrics); null disables it.",
    )
    admin_trusted_clients: list[CIDR] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Clients allowed to use the admin endpoints that reveal or change state "
        "(/connections: customer addresses; POST /drain). Probes and /metrics are open to all: "
        "otherwise any allowed CPE could relay to a pod's admin port and drain the pool.",
    )
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    resolver: ResolverConfig = Field(default_factory=ResolverConfig)
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    transparent: TransparentConfig = Field(default_factory=TransparentConfig)
    drain_timeout_s: float = Field(
        default=30.0, ge=0, le=86_400, description="On SIGTERM, how long live connections may continue."
    )
    access_paths: dict[AccessPathName, list[CIDR]] = Field(
        default_factory=dict,
        description="Access paths by name (e.g. `dsl`, `lte`) and the CPE-side networks each one "
        "uses: a subflow whose remote address is in one of a path's networks counts for that path "
        "in `mcpool_access_path_bytes_total{path}` (first match in this order; `other` when none "
        "matches). This is how the dashboards show the share the second link carries, without a "
        "label per CPE. Example: `{dsl: [100.64.0.0/16], lte: [10.128.0.0/12, 2001:db8:4::/48]}`.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log verbosity; logs are JSON lines on stderr when it is not a terminal."
    )
    workers: int = Field(
        default=1, ge=1, le=MAX_WORKERS,
        description="Worker processes of this pod, each with its own listeners on the same addresses "
        "(SO_REUSEPORT: the kernel spreads new connections over them; an MP_JOIN finds its connection by "
        "token in whichever worker owns it). 1: one process, no supervisor. Above 1 the `mcpool proxy` "
        "process supervises them: it serves the admin port (the pod's totals), runs the affinity and the "
        "admission filter, and restarts a worker that dies. Not with `listen.transparent` yet.",
    )
    event_loop: Literal["asyncio", "uvloop", "auto"] = Field(
        default="asyncio",
        description="The event loop: `asyncio` (the standard library's), `uvloop` (libuv), or `auto`: uvloop "
        "when it is installed, else asyncio. Measured on the data-plane lab: uvloop saved under 10 % of the "
        "proxy's CPU per connection and raised its setup latency, hence not the default. `uvloop` without "
        "the package stops the start.",
    )

    @model_validator(mode="after")
    def _transparent_ports(self) -> ProxyConfig:
        if self.transparent.join_address is not None:
            if split_hostport(self.transparent.join_address)[1] in {split_hostport(a)[1] for a in self.listen.transparent}:
                # The kernel opens its own join listener on the announced port: same port, EADDRINUSE.
                raise ValueError("transparent.join_address needs a port different from listen.transparent's")
        return self

    @model_validator(mode="after")
    def _workers_modes(self) -> ProxyConfig:
        if self.workers > 1 and self.listen.transparent:
            # Implicit mode's listeners are (re)bound by each proxy with its own retry timer and
            # the classification table, policy routing and join endpoint are installed and removed
            # by the process that binds them: one process per pod until they are split.
            raise ValueError(
                "workers > 1 is not supported with listen.transparent (implicit mode) yet: set workers: 1"
            )
        return self

    def to_yaml(self) -> str:
        """Render as YAML the proxy can load back (the operator's ConfigMap content)."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the configuration reference in README.md)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> ProxyConfig:
    """Validate an already-parsed mapping; raise ConfigError with one line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path) -> ProxyConfig:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))
