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

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .telemetry import SpanAccounting, SubflowWatcher

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def __init__(self, watcher: SubflowWatcher, join_refusals: Callable[[], dict[str, int]]) -> None:
        self._watcher = watcher
        self._join_refusals = join_refusals

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
        source = GaugeMetricFamily(
            "mcpool_mptcp_subflow_watch_info",
            "How subflows are watched: netlink events, MPTCP_INFO sampling, or none.",
            labels=["source"],
        )
        source.add_metric([w.source], 1)
        yield source


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
            "mcpool_handshakes_in_progress", "Client connections still in the Convert/SOCKS5 handshake.", registry=r
        )
        self.closed = Counter(
            "mcpool_connections_closed",
            "Relayed connections closed, by reason (client_closed, server_closed, idle_timeout, "
            "client_reset, server_reset, error, drained).",
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
        self.upstream_latency = Histogram(
            "mcpool_upstream_connect_duration_seconds",
            "Time to establish the upstream connection (successful connects).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
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

    def add_subflow_watch(self, watcher: SubflowWatcher, join_refusals: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_SubflowCollector(watcher, join_refusals))

    def add_tracing(self, accounting: SpanAccounting, enabled: bool) -> None:
        self.registry.register(_TracingCollector(accounting, enabled))

    def render(self) -> bytes:
        return generate_latest(self.registry)
