"""Prometheus metrics of one proxy, in its own `CollectorRegistry` (never the global one, so two
proxies in one process — the tests — do not mix their counts).

Counters are incremented at connection events, never per byte: the byte counters are computed at
scrape time from the totals of closed connections plus the live relays' counters, so the relay's
hot path pays nothing for them.

Every way a connection can end has a label value (`mcpool_connections_closed_total{reason}`); every
handshake failure has one (`mcpool_handshake_errors_total{protocol,error}`); every policy refusal
has one (`mcpool_policy_refusals_total{reason}`).

MPTCP-aware metrics come from the subflow watcher (`telemetry.SubflowWatcher`) and the kernel's
MP_JOIN counters, tracing metrics from the span accounting (`telemetry.SpanAccounting`); both are
read at scrape time too (`add_subflow_watch`, `add_tracing`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..relay import RelayPools
    from .telemetry import SpanAccounting, SubflowWatcher

__all__ = ["CONTENT_TYPE", "OPENMETRICS_CONTENT_TYPE", "AccessPathBytes", "ProxyMetrics", "observe"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# One sample of per-path bytes: (connection id, key of the subflow within it, local address,
# remote address, bytes from the client, bytes to the client).
PathSample = tuple[int, Hashable, str, str, int, int]


def observe(histogram: Any, value: float, trace_id: str | None) -> None:
    """Observe `value`; with a trace id, as the bucket's exemplar (shown only in the OpenMetrics
    exposition), so a slow point on a latency graph links to the trace of that connection."""
    if trace_id is None:
        histogram.observe(value)
    else:
        histogram.observe(value, exemplar={"trace_id": trace_id})


class _LiveCollector(Collector):
    """Byte counters and active connections, read from the proxy when scraped."""

    def __init__(self, live: Callable[[], tuple[int, int, int]], closed_bytes: Callable[[], tuple[int, int]]) -> None:
        self._live = live
        self._closed_bytes = closed_bytes

    def collect(self) -> Iterable[Metric]:
        active, live_up, live_down = self._live()
        closed_up, closed_down = self._closed_bytes()
        relayed = CounterMetricFamily(
            "mcpool_relayed_bytes",
            "Bytes relayed, by direction (up: client to server, down: server to client).",
            labels=["direction"],
        )
        relayed.add_metric(["up"], closed_up + live_up)
        relayed.add_metric(["down"], closed_down + live_down)
        yield relayed
        gauge = GaugeMetricFamily("mcpool_connections_active", "Connections being relayed now.")
        gauge.add_metric([], active)
        yield gauge


class _SubflowCollector(Collector):
    """Subflows of live connections and MP_JOIN outcomes, read when scraped."""

    def __init__(self, watcher: SubflowWatcher, join_refusals: Callable[[], dict[str, int]],
                 kernel: Callable[[], dict[str, int]]) -> None:
        self._watcher = watcher
        self._join_refusals = join_refusals
        self._kernel = kernel

    def collect(self) -> Iterable[Metric]:
        w = self._watcher
        established = GaugeMetricFamily(
            "mcpool_mptcp_subflows",
            "MPTCP subflows established now on client connections (relayed or in their handshake)."
        )
        established.add_metric([], w.established)
        yield established
        joins = CounterMetricFamily(
            "mcpool_mptcp_joins_accepted",
            "Additional subflows (MP_JOIN) the kernel established on the proxy's client connections."
        )
        joins.add_metric([], w.joins_accepted)
        yield joins
        closed = CounterMetricFamily(
            "mcpool_mptcp_subflows_closed", "Subflows that closed while their connection was relayed."
        )
        closed.add_metric([], w.subflows_closed)
        yield closed
        refused = CounterMetricFamily(
            "mcpool_mptcp_joins_refused",
            "MP_JOINs the kernel refused in the proxy's network namespace since the proxy started, by "
            "reason (no_token: no connection with that token here; limit: path-manager limits; "
            "hmac_failure).",
            labels=["reason"],
        )
        for reason, value in sorted(self._join_refusals().items()):
            refused.add_metric([reason], value)
        yield refused
        kernel = self._kernel()
        failovers = CounterMetricFamily(
            "mcpool_mptcp_failovers",
            "Subflows lost while their connection lived on, by how it was seen (stale: the "
            "kernel declared a subflow stale after repeated losses and moved its data to the "
            "others, MPTcpExtSubflowStale; closed: a subflow closed while others still carried "
            "the connection).",
            labels=["kind"],
        )
        failovers.add_metric(["stale"], kernel.get("SubflowStale", 0))
        failovers.add_metric(["closed"], w.failovers)
        yield failovers
        checksum = CounterMetricFamily(
            "mcpool_mptcp_dss_checksum_errors",
            "DSS checksum errors the kernel counted in the proxy's network namespace since the proxy "
            "started (MPTcpExtDataCsumErr): data altered on a path, usually by a middlebox.",
        )
        checksum.add_metric([], kernel.get("DataCsumErr", 0))
        yield checksum
        source = GaugeMetricFamily(
            "mcpool_mptcp_subflow_watch_info",
            "How subflows are watched: netlink events, MPTCP_INFO sampling, or none.",
            labels=["source"],
        )
        source.add_metric([w.source], 1)
        yield source


class NftCounters(Collector):
    """Named nft counters as one Prometheus counter family `name_total{label}`, read with one
    `nft list counters` per scrape (`read`: counter name -> packets). `names` keeps those only,
    in that order; None: every counter, sorted. A table that is not there yet exports nothing."""

    def __init__(self, name: str, documentation: str, label: str, read: Callable[[], dict[str, int]],
                 names: Iterable[str] | None = None) -> None:
        self._name, self._doc, self._label, self._read = name, documentation, label, read
        self._names = None if names is None else tuple(names)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._doc, labels=[self._label])

    def describe(self) -> Iterable[Metric]:
        # Registration asks for the names: without this it would run `nft` before the table exists.
        yield self._family()

    def collect(self) -> Iterable[Metric]:
        try:
            counters = self._read()
        except (RuntimeError, OSError):
            counters = {}
        family = self._family()
        for name in self._names if self._names is not None else sorted(counters):
            if name in counters:
                family.add_metric([name], counters[name])
        yield family


# MP_CAPABLE SYNs implicit mode's nft table classified (intercepted: sent to the transparent
# listener; unbound: marked but no listener, dropped; stranger: marked from outside
# policy.allowed_cpes, reset; passed: unmarked, routed untouched as end-to-end MPTCP).
TRANSPARENT_VERDICTS = ("intercepted", "unbound", "stranger", "passed")


def transparent_syns(read: Callable[[], dict[str, int]]) -> NftCounters:
    """`mcpool_transparent_syns_total{verdict}`."""
    return NftCounters(
        "mcpool_transparent_syns",
        "MP_CAPABLE SYNs classified by implicit mode's nft table, by verdict (intercepted, "
        "unbound: dropped for want of a listener, stranger: marked from outside "
        "policy.allowed_cpes and reset, passed: unmarked, end-to-end MPTCP).",
        "verdict", read, TRANSPARENT_VERDICTS,
    )  # fmt: skip


Labels = tuple[str, str, str]  # path, local family, remote family


class AccessPathBytes(Collector):
    """Bytes per access path: `mcpool_access_path_bytes_total{path,local_family,remote_family,
    direction}`, from the kernel's per-subflow byte counters of live MPTCP connections (the
    relay's counters for plain TCP and fallen-back connections), read when scraped.

    `paths` maps a path name (`dsl`, `lte`) to networks; a subflow belongs to the first path one
    of whose networks holds its remote (CPE-side) address, else to `other`. No per-CPE label:
    the series count is paths x families x 2. When a connection closes (`closed()`), what it
    relayed since the last scrape is added to its paths in the proportions of that scrape (to its
    initial subflow's path if it was never scraped), so short connections count in full; a
    subflow that ends while its connection lives on keeps what it had at the last scrape. The
    kernel's sent bytes include retransmissions.
    """

    def __init__(self, paths: Mapping[str, Sequence[str]], sample: Callable[[], Iterable[PathSample]]) -> None:
        self._paths = [(name, [ipaddress.ip_network(n) for n in nets]) for name, nets in paths.items()]
        self._sample = sample
        # connection id -> subflow key -> (labels, up, down) as of the last scrape
        self._last: dict[int, dict[Hashable, tuple[Labels, int, int]]] = {}
        self._ended: dict[Labels, list[int]] = {}
        self._path_of: dict[str, str] = {}  # remote address -> path (a CPE's few addresses)

    def _path(self, address: str) -> str:
        path = self._path_of.get(address)
        if path is None:
            path = "other"
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                ip = None
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip is not None:
                for name, nets in self._paths:
                    if any(ip.version == net.version and ip in net for net in nets):
                        path = name
                        break
            if len(self._path_of) > 65536:  # bounded: addresses of CPEs that came and went
                self._path_of.clear()
            self._path_of[address] = path
        return path

    def _labels(self, local: str, remote: str) -> Labels:
        from .telemetry import network_type

        return self._path(remote), network_type(local), network_type(remote)

    def _add(self, labels: Labels, up: int, down: int) -> None:
        ended = self._ended.setdefault(labels, [0, 0])
        ended[0] += up
        ended[1] += down

    def closed(self, conn_id: int, client: str, up: int, down: int) -> None:
        """Connection `conn_id` from `client` ended having relayed `up`/`down` bytes."""
        last = self._last.pop(conn_id, {})
        seen_up = sum(u for _, u, _ in last.values())
        seen_down = sum(d for _, _, d in last.values())
        initial = self._labels(client, client)
        for labels, u, d in last.values():
            self._add(labels, u, d)
        for total, seen, index in ((up, seen_up, 0), (down, seen_down, 1)):
            extra = total - seen
            if extra <= 0:
                continue
            if seen == 0:
                self._add(initial, *((extra, 0) if index == 0 else (0, extra)))
                continue
            for labels, u, d in last.values():
                part = extra * (u if index == 0 else d) // seen
                self._add(labels, *((part, 0) if index == 0 else (0, part)))

    def collect(self) -> Iterable[Metric]:
        current: dict[int, dict[Hashable, tuple[Labels, int, int]]] = {}
        for conn_id, key, local, remote, up, down in self._sample():
            current.setdefault(conn_id, {})[key] = (self._labels(local, remote), up, down)
        for conn_id, subflows in self._last.items():
            now = current.get(conn_id, {})
            for key, (labels, up, down) in subflows.items():
                if key not in now:  # a subflow gone (or a connection closed unannounced)
                    self._add(labels, up, down)
        self._last = current
        totals: dict[Labels, list[int]] = {k: list(v) for k, v in self._ended.items()}
        for subflows in current.values():
            for labels, up, down in subflows.values():
                total = totals.setdefault(labels, [0, 0])
                total[0] += up
                total[1] += down
        family = CounterMetricFamily(
            "mcpool_access_path_bytes",
            "Bytes carried per access path (the pool's access_paths mapping of CPE-side "
            "networks; 'other' when none matches), by the subflow's local and remote address "
            "family and direction (up: from the client).",
            labels=["path", "local_family", "remote_family", "direction"],
        )
        # Every configured path appears (at 0) even before it carried a byte.
        for name, _ in self._paths:
            totals.setdefault((name, "ipv4", "ipv4"), [0, 0])
        for (path, lf, rf), (up, down) in sorted(totals.items()):
            family.add_metric([path, lf, rf, "up"], up)
            family.add_metric([path, lf, rf, "down"], down)
        yield family


class _TracingCollector(Collector):
    """Span export accounting, read when scraped."""

    def __init__(self, accounting: SpanAccounting, enabled: bool) -> None:
        self._accounting = accounting
        self._enabled = enabled

    def collect(self) -> Iterable[Metric]:
        a = self._accounting
        enabled = GaugeMetricFamily(
            "mcpool_otel_tracing_enabled", "1 if spans are exported (an OTLP endpoint is configured)."
        )
        enabled.add_metric([], int(self._enabled))
        yield enabled
        exported = CounterMetricFamily("mcpool_otel_spans_exported", "Spans the collector accepted.")
        exported.add_metric([], a.exported)
        yield exported
        dropped = CounterMetricFamily(
            "mcpool_otel_spans_dropped",
            "Spans lost instead of slowing the proxy, by reason (queue_full: the bounded export queue "
            "was full; export_failed: the collector did not accept the batch).",
            labels=["reason"],
        )
        for reason, value in sorted(a.dropped.items()):
            dropped.add_metric([reason], value)
        yield dropped


class _PipeCollector(Collector):
    """Splice pipe memory and the relay's fallbacks to buffered, read from the pool when scraped."""

    def __init__(self, pools: RelayPools) -> None:
        self._pipes = pools.pipes

    def collect(self) -> Iterable[Metric]:
        pipes = self._pipes
        allocated = GaugeMetricFamily(
            "mcpool_splice_pipe_bytes", "Capacity of the splice pipes that exist now (in use or pooled)."
        )
        allocated.add_metric([], pipes.allocated_bytes)
        yield allocated
        fallbacks = CounterMetricFamily(
            "mcpool_splice_fallbacks",
            "Relay directions that went buffered instead of splice, by reason (budget: "
            "limits.pipe_budget_bytes spent; small_pipe: the kernel gave a smaller pipe than asked, "
            "e.g. fs.pipe-user-pages-soft reached).",
            labels=["reason"],
        )
        for reason in ("budget", "small_pipe"):
            fallbacks.add_metric([reason], pipes.fallbacks.get(reason, 0))
        yield fallbacks


class ProxyMetrics:
    """All metrics of one Proxy; `render()` gives the Prometheus text exposition."""

    def __init__(
        self,
        live: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter(
            "mcpool_connections_accepted", "Client connections accepted, by listener.", ["protocol"], registry=r
        )
        self.handshaking = Gauge(
            "mcpool_handshakes_in_progress", "Client connections still in their handshake (Convert, SOCKS5, transparent).", registry=r
        )
        self.closed = Counter(
            "mcpool_connections_closed",
            "Relayed connections closed, by reason (client_closed, server_closed, idle_timeout, "
            "client_reset, server_reset, error, drained, client_lost).",
            ["reason"],
            registry=r,
        )
        self.handshake_errors = Counter(
            "mcpool_handshake_errors",
            "Handshakes that ended without a relay, by protocol and error (Convert error name, "
            "SOCKS5 reply name, timeout, client_closed, ...).",
            ["protocol", "error"],
            registry=r,
        )
        self.policy_refusals = Counter(
            "mcpool_policy_refusals", "Connections refused by policy, by reason.", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "mcpool_upstream_connect_errors", "Failed upstream connects, by reason.", ["reason"], registry=r
        )
        self.upstream_fastopen = Counter(
            "mcpool_upstream_fastopen",
            "Upstream connects opened with TCP Fast Open because the client's SYN carried data, by outcome "
            "(syn_data: the upstream SYN carried it too; no_cookie: no cookie of the server yet, sent after).",
            ["outcome"],
            registry=r,
        )
        latency_buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.upstream_latency = Histogram(
            "mcpool_upstream_connect_duration_seconds",
            "Time to establish the upstream connection (successful connects); exemplars carry "
            "the connection's trace id when tracing is on.",
            buckets=latency_buckets,
            registry=r,
        )
        self.handshake_latency = Histogram(
            "mcpool_handshake_duration_seconds",
            "Time from accept to the start of the relay (Convert/SOCKS5 handshake, policy and "
            "upstream connect), by protocol; exemplars carry the connection's trace id when "
            "tracing is on.",
            ["protocol"],
            buckets=latency_buckets,
            registry=r,
        )
        self.fallbacks = Counter(
            "mcpool_mptcp_fallbacks",
            "Relayed client connections that came without MPTCP (plain TCP, or MPTCP that fell "
            "back to TCP during the handshake), by protocol.",
            ["protocol"],
            registry=r,
        )
        self.active_by_mode = Gauge(
            "mcpool_connections_active_by_mode",
            "Connections being relayed now, by mode (convert, socks5, transparent) and client transport "
            "(mptcp, tcp).",
            ["mode", "transport"],
            registry=r,
        )
        self.relay_mode = Gauge(
            "mcpool_relay_mode_info", "Relay mode configured (1 for the mode in use).", ["mode"], registry=r
        )
        self.relays = Counter(
            "mcpool_relays", "Relays started, by the mode they actually used.", ["mode"], registry=r
        )
        self.mptcp_checksum = Gauge(
            "mcpool_mptcp_checksum_enabled",
            "1 if net.mptcp.checksum_enabled is on in the proxy's network namespace, 0 if off, -1 unknown.",
            registry=r,
        )
        self.fastopen_server = Gauge(
            "mcpool_tcp_fastopen_server_enabled",
            "1 if the server bit (0x2) of net.ipv4.tcp_fastopen is on, 0 if off, -1 unknown.",
            registry=r,
        )
        self.draining = Gauge("mcpool_draining", "1 while the proxy drains (SIGTERM).", registry=r)
        self.drain_started = Gauge(
            "mcpool_drain_started_timestamp_seconds",
            "Unix time the drain started (0 while not draining).",
            registry=r,
        )
        self.drain_timeout = Gauge(
            "mcpool_drain_timeout_seconds", "The configured drain_timeout_s (the drain's grace period).", registry=r
        )
        self.admission_filter = Gauge(
            "mcpool_admission_filter_active",
            "1 if strangers' SYNs are dropped in the kernel (kernel.admission_filter installed), 0 if only the "
            "userspace check refuses them.",
            registry=r,
        )
        self.transparent_unbound = Gauge(
            "mcpool_transparent_unbound",
            "Transparent listeners configured but not bound (their marked SYNs are dropped).", registry=r,
        )
        self.subflows_per_connection = Histogram(
            "mcpool_mptcp_subflows_per_connection",
            "Most subflows a relayed connection had at once, observed at close (1 for plain TCP or "
            "a connection that fell back to TCP).",
            buckets=(1, 2, 3, 4, 6, 8),
            registry=r,
        )
        self.closed_bytes_up = 0
        self.closed_bytes_down = 0
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r.register(_LiveCollector(live, lambda: (self.closed_bytes_up, self.closed_bytes_down)))

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: `.labels()` takes a lock and
        builds its key on every call, which showed in the per-connection profile. Like
        `.labels()`, the series appears in the exposition on first use only."""
        key = (metric, labels)
        try:
            return self._children[key]
        except KeyError:
            child = self._children[key] = metric.labels(*labels)
            return child

    def add_subflow_watch(self, watcher: SubflowWatcher, join_refusals: Callable[[], dict[str, int]],
                          kernel: Callable[[], dict[str, int]] = dict) -> None:
        """Subflow metrics; `kernel` gives the namespace's MPTcpExt counters since start."""
        self.registry.register(_SubflowCollector(watcher, join_refusals, kernel))

    def add_access_paths(self, paths: Mapping[str, Sequence[str]],
                         sample: Callable[[], Iterable[PathSample]]) -> AccessPathBytes:
        collector = AccessPathBytes(paths, sample)
        self.registry.register(collector)
        return collector

    def add_transparent_counters(self, read: Callable[[], dict[str, int]]) -> None:
        """Implicit mode's classification, from the kernel's own nft counters (read when scraped)."""
        self.registry.register(transparent_syns(read))

    def set_relay_pools(self, pools: RelayPools) -> None:
        self.registry.register(_PipeCollector(pools))

    def add_tracing(self, accounting: SpanAccounting, enabled: bool) -> None:
        self.registry.register(_TracingCollector(accounting, enabled))

    def render(self, openmetrics: bool = False) -> bytes:
        """The exposition: Prometheus text, or OpenMetrics (which carries the exemplars)."""
        if openmetrics:
            text: bytes = generate_openmetrics(self.registry)  # type: ignore[no-untyped-call]
            return text
        return generate_latest(self.registry)
