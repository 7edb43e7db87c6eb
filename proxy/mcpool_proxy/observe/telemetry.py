"""OpenTelemetry traces of proxied connections, and the watcher of their MPTCP subflows.

What is here:

- `Telemetry.from_environment()`: tracing configured only by the standard `OTEL_*` variables.
  With no `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`/`OTEL_EXPORTER_OTLP_ENDPOINT` (or with
  `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`) there is no tracer provider at all and
  every per-connection call is a method of a shared no-op object: no spans, no ids, no threads.
  With an endpoint, spans go through a `BatchSpanProcessor` to the OTLP HTTP/protobuf exporter.
  The processor is wrapped so that the proxy never waits for a collector: when the bounded queue
  (`OTEL_BSP_MAX_QUEUE_SIZE`) is full a finished span is dropped and counted, and a batch the
  exporter could not deliver is counted too (`SpanAccounting`, exposed as
  `mcpool_otel_spans_dropped_total`). The SDK's own drop counting is internal API that changed
  between releases, so the counting is done here, at the two public seams.
- `ConnectionTrace`: one span per proxied connection, named by mode (`convert`, `socks5`), from
  accept to close, with child spans for the handshake and the upstream connect, an event per
  Convert/SOCKS5 error sent and per subflow joining or leaving.
- `connection_fields()`: the attributes of a closed connection, used for the span *and* for the
  connection's log line, so logs and traces carry the same fields.
- `SubflowWatcher`: follows the subflows of live connections from the kernel's `mptcp_pm`
  netlink events (a subscription of the process's one `kernel.mptcp_events.MptcpEventHub`,
  shared with the token publisher), or by sampling `MPTCP_INFO` when events are unavailable. Per event it does a dict
  lookup by token, so it stays cheap with 10,000 connections; between events it costs nothing.
- `join_refusals()`: the kernel's counters of MP_JOINs it refused in this network namespace.

It must not know about listeners, policy or the relay: the server calls it at connection events.
Nothing here runs per byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..kernel.mptcp import get_mptcp_info, get_subflows
from ..policy import address_text

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from ..config import ProxyConfig
    from ..kernel.mptcp_events import MptcpEvent, MptcpEventHub

__all__ = [
    "ConnectionTrace",
    "NOOP_TRACE",
    "SpanAccounting",
    "SubflowState",
    "SubflowWatcher",
    "Telemetry",
    "connection_fields",
    "join_refusals",
    "mptcp_counters",
    "network_type",
]

log = logging.getLogger("mcpool.telemetry")

SERVICE_NAME_DEFAULT = "mcpool-proxy"
# The SDK's default for OTEL_BSP_MAX_QUEUE_SIZE; read here too because the drop accounting
# enforces the same bound before the SDK's queue (which would drop silently).
_BSP_MAX_QUEUE_DEFAULT = 2048

# Span and event names, and the project's attribute keys (documented in docs/operations.md).
EVENT_ERROR_SENT = "mcpool.error_sent"
EVENT_SUBFLOW_JOINED = "mcpool.mptcp.subflow_joined"
EVENT_SUBFLOW_CLOSED = "mcpool.mptcp.subflow_closed"
ATTR_TOKEN = "mcpool.mptcp.token"
ATTR_SUBFLOWS = "mcpool.mptcp.subflows"
ATTR_MAX_SUBFLOWS = "mcpool.mptcp.max_subflows"
ATTR_FALLBACK = "mcpool.mptcp.fallback"
ATTR_BYTES_UP = "mcpool.bytes_up"
ATTR_BYTES_DOWN = "mcpool.bytes_down"
ATTR_CLOSE_REASON = "mcpool.close_reason"

AttributeValue = str | bool | int | float


def network_type(address: str) -> str:
    """OpenTelemetry `network.type` of an address ("ipv4" also for IPv4-mapped IPv6)."""
    if ":" not in address or (address.lower().startswith("::ffff:") and "." in address):
        return "ipv4"
    return "ipv6"


# -- export accounting ------------------------------------------------------------------------------
class SpanAccounting:
    """Counts of finished spans: exported, and dropped by reason (`queue_full`, `export_failed`).

    Updated from the event loop (span end) and the exporter thread, hence the lock; read by the
    metrics collector at scrape time.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.exported = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0}
        self._queued = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        """A span finished: may it enter the queue? (False: dropped and counted.)"""
        with self._lock:
            if self._queued >= self.max_queue:
                self.dropped["queue_full"] += 1
                return False
            self._queued += 1
            return True

    def taken(self, count: int) -> None:
        """The batch processor handed `count` queued spans to the exporter."""
        with self._lock:
            self._queued = max(0, self._queued - count)

    def delivered(self, count: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.dropped["export_failed"] += count

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return sum(self.dropped.values())


class _CountingExporter(SpanExporter):
    """Wraps the real exporter: counts what it delivered and what it could not."""

    def __init__(self, inner: SpanExporter, accounting: SpanAccounting) -> None:
        self.inner = inner
        self.accounting = accounting
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.accounting.taken(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - a broken exporter must cost spans, not the proxy
            log.debug("span export raised", exc_info=True)
            result = SpanExportResult.FAILURE
        ok = result is SpanExportResult.SUCCESS
        self.accounting.delivered(len(spans), ok)
        # One line per change of state, not per batch: a dead collector must not flood the log.
        if ok == self._failing:
            self._failing = not ok
            if ok:
                log.info("tracing: span export works again")
            else:
                log.warning("tracing: span export failing; spans are dropped and counted in "
                            "mcpool_otel_spans_dropped_total")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """In front of the BatchSpanProcessor: admits a finished span only while the queue has room,
    so the SDK's queue never overflows unseen, and `on_end` never blocks."""

    def __init__(self, inner: SpanProcessor, accounting: SpanAccounting) -> None:
        self.inner = inner
        self.accounting = accounting

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        if self.accounting.admit():
            self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


# -- configuration from OTEL_* ----------------------------------------------------------------------
def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _env_int(name: str, default: int) -> int:
    try:
        value = int(_env(name))
    except ValueError:
        return default
    return value if value > 0 else default


def _build_resource(
    config: ProxyConfig | None, service_name: str = SERVICE_NAME_DEFAULT, pool: str | None = None
) -> Resource:
    """service.name, k8s.* from the downward API, the pool; OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME override these defaults (the operator's settings win)."""
    defaults: dict[str, AttributeValue] = {"service.name": service_name}
    for env_name, key in (
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
        ("NODE_NAME", "k8s.node.name"),
    ):
        if _env(env_name):
            defaults[key] = _env(env_name)
    if "k8s.pod.name" in defaults:
        defaults["service.instance.id"] = defaults["k8s.pod.name"]
    if config is not None:
        defaults["mcpool.pool"] = config.affinity.pool
    if pool is not None:
        defaults["mcpool.pool"] = pool
    from_env = OTELResourceDetector().detect()
    return Resource.create({k: v for k, v in defaults.items() if k not in from_env.attributes}).merge(from_env)


def _make_exporter() -> SpanExporter | None:
    """The exporter the OTEL_* variables ask for; None for "no tracing"."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return None
    kind = _env("OTEL_TRACES_EXPORTER").lower() or "otlp"
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none): tracing off", kind)
        return None
    if not (_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None  # the documented "no endpoint, no cost" case
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            log.error(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc but opentelemetry-exporter-otlp-proto-grpc is not "
                "installed: tracing off (use http/protobuf, port 4318)"
            )
            return None
        grpc_exporter: SpanExporter = GrpcExporter()
        return grpc_exporter
    if protocol != "http/protobuf":
        log.error("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (http/protobuf, grpc): tracing off", protocol)
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Endpoint, headers, timeout, compression and TLS files: the exporter reads OTEL_* itself.
    return OTLPSpanExporter()


# -- per-connection traces --------------------------------------------------------------------------
class ConnectionTrace:
    """The trace of one connection. This base class is the no-op used when tracing is off: every
    method returns at once, so the proxy calls them unconditionally."""

    __slots__ = ()

    recording = False

    @property
    def trace_id(self) -> str | None:
        return None

    @property
    def span_id(self) -> str | None:
        return None

    def end_handshake(self, error: str | None = None) -> None:
        """The client's request is complete (or the handshake failed with `error`)."""

    def set_destination(self, host: str, port: int, requested: str | None = None) -> None:
        """The destination the client asked for (`requested`: a SOCKS5 domain name)."""

    def begin_upstream(self, host: str, port: int) -> None:
        """An upstream connect attempt starts (one child span per attempt)."""

    def end_upstream(self, error: str | None = None) -> None:
        """The current upstream connect attempt ended (`error`: its reason)."""

    def error_sent(self, protocol: str, name: str, code: int | None, detail: str) -> None:
        """A Convert Error TLV (code) or SOCKS5 reply/refusal (code or None) went to the client."""

    def subflow_event(self, joined: bool, local: tuple[str, int], remote: tuple[str, int],
                      timestamp_ns: int | None = None) -> None:
        """A subflow of this connection joined (True) or closed (False)."""

    def finish(self, fields: Mapping[str, AttributeValue | None], error: str | None = None) -> None:
        """The connection ended: set `fields` (see `connection_fields`) and end the span."""


NOOP_TRACE = ConnectionTrace()


class _SpanTrace(ConnectionTrace):
    __slots__ = ("_tracer", "_span", "_context", "_handshake", "_upstream", "_finished", "_start_ns", "recording")

    def __init__(self, tracer: otel_trace.Tracer, mode: str, client: tuple[str, int]) -> None:
        self._tracer = tracer
        host, port = client
        self._start_ns = time.time_ns()
        self._span = tracer.start_span(
            mode,
            kind=SpanKind.SERVER,
            start_time=self._start_ns,
            attributes={
                "client.address": host,
                "client.port": port,
                "network.transport": "tcp",
                "network.type": network_type(host),
                "mcpool.mode": mode,
            },
        )
        # Sampled out (OTEL_TRACES_SAMPLER): no children, no attributes, no events -- at high
        # connection rates sampling is how tracing stays cheap, so the unsampled path must be.
        self.recording = self._span.is_recording()
        self._context = otel_trace.set_span_in_context(self._span)
        self._handshake: otel_trace.Span | None = None
        if self.recording:
            self._handshake = tracer.start_span(f"{mode}.handshake", context=self._context, kind=SpanKind.INTERNAL)
        self._upstream: otel_trace.Span | None = None
        self._finished = False

    @property
    def trace_id(self) -> str | None:
        ctx = self._span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    @property
    def span_id(self) -> str | None:
        ctx = self._span.get_span_context()
        return f"{ctx.span_id:016x}" if ctx.is_valid else None

    def end_handshake(self, error: str | None = None) -> None:
        if self._handshake is not None:
            if error is not None:
                self._handshake.set_status(Status(StatusCode.ERROR, error))
                self._handshake.set_attribute("error.type", error)
            self._handshake.end()
            self._handshake = None

    def set_destination(self, host: str, port: int, requested: str | None = None) -> None:
        if not self.recording:
            return
        self._span.set_attribute("server.address", requested or host)
        self._span.set_attribute("server.port", port)
        if requested is not None:
            self._span.set_attribute("mcpool.destination.address", host)

    def begin_upstream(self, host: str, port: int) -> None:
        if not self.recording:
            return
        self.end_upstream("abandoned")
        self._upstream = self._tracer.start_span(
            "upstream.connect",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={
                "server.address": host,
                "server.port": port,
                "network.transport": "tcp",
                "network.type": network_type(host),
            },
        )

    def end_upstream(self, error: str | None = None) -> None:
        if self._upstream is not None:
            if error is not None:
                self._upstream.set_status(Status(StatusCode.ERROR, error))
                self._upstream.set_attribute("error.type", error)
            self._upstream.end()
            self._upstream = None

    def error_sent(self, protocol: str, name: str, code: int | None, detail: str) -> None:
        if not self.recording:
            return
        attributes: dict[str, AttributeValue] = {"mcpool.protocol": protocol, "mcpool.error.name": name,
                                                 "mcpool.error.detail": detail}
        if code is not None:
            attributes["mcpool.error.code"] = code
        self._span.add_event(EVENT_ERROR_SENT, attributes)

    def subflow_event(self, joined: bool, local: tuple[str, int], remote: tuple[str, int],
                      timestamp_ns: int | None = None) -> None:
        if self._finished or not self.recording:
            return
        attributes: dict[str, AttributeValue] = {
            "network.local.address": local[0],
            "network.local.port": local[1],
            "network.peer.address": remote[0],
            "network.peer.port": remote[1],
        }
        if timestamp_ns is not None and timestamp_ns < self._start_ns:
            # Measured on the lab: a CPE's join can complete before the proxy's accept() returns.
            # The event is placed at the span's start (trace viewers drop events outside their
            # span) and says so.
            attributes["mcpool.mptcp.before_accept"] = True
            timestamp_ns = self._start_ns
        self._span.add_event(
            EVENT_SUBFLOW_JOINED if joined else EVENT_SUBFLOW_CLOSED, attributes, timestamp=timestamp_ns
        )

    def finish(self, fields: Mapping[str, AttributeValue | None], error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if not self.recording:
            return  # a non-recording span has nothing to end or export
        self.end_handshake(error)
        self.end_upstream(error)
        self._span.set_attributes({k: v for k, v in fields.items() if v is not None})
        if error is not None:
            self._span.set_attribute("error.type", error)
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


class Telemetry:
    """Tracing for one proxy: `connection()` starts a connection's trace; `accounting` counts
    exported and dropped spans; `shutdown()` flushes within a bounded time."""

    def __init__(self, provider: TracerProvider | None = None, accounting: SpanAccounting | None = None) -> None:
        self.provider = provider
        self.accounting = accounting or SpanAccounting(_BSP_MAX_QUEUE_DEFAULT)
        self._tracer = provider.get_tracer("mcpool.proxy") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def tracer(self, name: str) -> otel_trace.Tracer | None:
        """A tracer for another component of this process (the director); None when off."""
        return self.provider.get_tracer(name) if self.provider is not None else None

    @classmethod
    def from_environment(
        cls,
        config: ProxyConfig | None = None,
        *,
        service_name: str = SERVICE_NAME_DEFAULT,
        pool: str | None = None,
    ) -> Telemetry:
        """Tracing as the OTEL_* variables say; disabled (no cost) without an OTLP endpoint."""
        exporter = _make_exporter()
        if exporter is None:
            return cls()
        return cls.with_exporter(exporter, config=config, service_name=service_name, pool=pool)

    @classmethod
    def with_exporter(
        cls,
        exporter: SpanExporter,
        *,
        config: ProxyConfig | None = None,
        service_name: str = SERVICE_NAME_DEFAULT,
        pool: str | None = None,
    ) -> Telemetry:
        """Tracing to `exporter` through the bounded batch processor (tests use it directly)."""
        accounting = SpanAccounting(_env_int("OTEL_BSP_MAX_QUEUE_SIZE", _BSP_MAX_QUEUE_DEFAULT))
        # The sampler comes from OTEL_TRACES_SAMPLER(_ARG), read by the SDK. No atexit hook: a
        # dead collector must not hold the process at exit; `shutdown()` is bounded instead.
        provider = TracerProvider(
            resource=_build_resource(config, service_name, pool), shutdown_on_exit=False
        )
        batch = BatchSpanProcessor(
            _CountingExporter(exporter, accounting), max_queue_size=accounting.max_queue
        )
        provider.add_span_processor(_BoundedProcessor(batch, accounting))
        log.info("tracing on", extra={"fields": {"exporter": type(exporter).__name__,
                                                 "max_queue": accounting.max_queue}})
        return cls(provider, accounting)

    def connection(self, mode: str, client: tuple[str, int]) -> ConnectionTrace:
        """Start the trace of a connection just accepted (the shared no-op when tracing is off)."""
        if self._tracer is None:
            return NOOP_TRACE
        return _SpanTrace(self._tracer, mode, client)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued, giving up after `timeout_s` (the exporter thread is a daemon:
        a hung collector cannot keep the process alive). Blocking: call it in a thread."""
        provider = self.provider
        if provider is None:
            return
        done = threading.Event()

        def flush() -> None:
            try:
                provider.shutdown()  # exports what is queued, then stops the worker
            finally:
                done.set()

        threading.Thread(target=flush, name="otel-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("tracing: collector did not take the last spans within %.1f s", timeout_s)


# -- what a closed connection reports --------------------------------------------------------------
def connection_fields(
    *,
    connection_id: int,
    mode: str,
    client: tuple[str, int],
    destination: tuple[str, int] | None,
    requested: str | None,
    token: str | None,
    mptcp: bool,
    subflows: int,
    max_subflows: int,
    bytes_up: int,
    bytes_down: int,
    close_reason: str,
    duration_s: float,
    relay_mode: str | None,
) -> dict[str, AttributeValue | None]:
    """The fields of one closed connection, with OpenTelemetry attribute names: the span's
    attributes and the connection's log line are both built from this (None: not applicable)."""
    return {
        "mcpool.connection.id": connection_id,
        "mcpool.mode": mode,
        "client.address": client[0],
        "client.port": client[1],
        "server.address": None if destination is None else (requested or destination[0]),
        "server.port": None if destination is None else destination[1],
        "mcpool.destination.address": None if destination is None or requested is None else destination[0],
        "network.transport": "tcp",
        "network.type": network_type(client[0]),
        ATTR_TOKEN: token,
        ATTR_FALLBACK: not mptcp,
        ATTR_SUBFLOWS: subflows,
        ATTR_MAX_SUBFLOWS: max_subflows,
        ATTR_BYTES_UP: bytes_up,
        ATTR_BYTES_DOWN: bytes_down,
        ATTR_CLOSE_REASON: close_reason,
        "mcpool.duration_s": round(duration_s, 6),
        "mcpool.relay_mode": relay_mode,
    }


# -- subflow watching -------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class SubflowState:
    """The subflows of one server-side MPTCP connection, by (local, remote) endpoint."""

    token: int
    live: set[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=set)
    max_subflows: int = 0
    joins: int = 0
    trace: ConnectionTrace | None = None
    sock: socket.socket | None = None  # sampling mode only
    # The kernel's CREATED/ESTABLISHED event gave the initial subflow: attach() needs no
    # `initial` (the server skips reading the socket's addresses, two system calls).
    initial_known: bool = False
    # Events seen before the server attached its trace (joins can beat the handshake):
    # (joined, local, remote, time_ns), replayed onto the span at attach.
    pending: list[tuple[bool, tuple[str, int], tuple[str, int], int]] | None = None

    @property
    def count(self) -> int:
        return len(self.live)


_PENDING_MAX = 16


class SubflowWatcher:
    """Subflows of the proxy's live MPTCP connections, keyed by token.

    Fed by `handle_event()` (from `run_events`, over a subscription of the process's
    `MptcpEventHub`) or, where events are unavailable, by `sample()` (from
    `run_sampling`). The server calls `attach()` when it knows a connection's token (from
    MPTCP_INFO after the handshake) and `detach()` when the relay ends.

    Counters for metrics: `established` (subflows live now on tracked connections),
    `joins_accepted`, `subflows_closed`, `failovers` (a subflow closed while its relayed
    connection still had others).
    """

    def __init__(self, listen_ports: Iterable[int] = ()) -> None:
        self.listen_ports = frozenset(listen_ports)
        self.states: dict[int, SubflowState] = {}
        self.established = 0
        self.joins_accepted = 0
        self.subflows_closed = 0
        self.failovers = 0  # subflows closed while their relayed connection kept others
        self.source = "none"  # "netlink" or "sampling" once running

    # -- bookkeeping shared by both sources ----------------------------------------------------
    def _add(self, state: SubflowState, local: tuple[str, int], remote: tuple[str, int],
             *, join: bool, when_ns: int) -> None:
        key = (local, remote)
        if key in state.live:
            return
        state.live.add(key)
        self.established += 1
        state.max_subflows = max(state.max_subflows, len(state.live))
        if join:
            state.joins += 1
            self.joins_accepted += 1
            self._tell(state, True, local, remote, when_ns)

    def _remove(self, state: SubflowState, local: tuple[str, int], remote: tuple[str, int],
                when_ns: int) -> None:
        key = (local, remote)
        if key not in state.live:
            return
        state.live.discard(key)
        self.established -= 1
        self.subflows_closed += 1
        if state.live and state.trace is not None:
            self.failovers += 1
        self._tell(state, False, local, remote, when_ns)

    @staticmethod
    def _tell(state: SubflowState, joined: bool, local: tuple[str, int], remote: tuple[str, int],
              when_ns: int) -> None:
        if state.trace is not None:
            state.trace.subflow_event(joined, local, remote, when_ns)
        else:
            if state.pending is None:
                state.pending = []
            if len(state.pending) < _PENDING_MAX:
                state.pending.append((joined, local, remote, when_ns))

    def _forget(self, token: int) -> None:
        state = self.states.pop(token, None)
        if state is not None:
            # `live` stays as it was: detach() returns it as the subflows at close.
            self.established -= len(state.live)

    # -- the server's side -----------------------------------------------------------------------
    def knows_initial(self, token: int) -> bool:
        """Whether the events already told connection `token`'s initial subflow, so that
        `attach()` needs no `initial` (events usually arrive before the handshake ends)."""
        state = self.states.get(token)
        return state is not None and state.initial_known

    def attach(self, token: int, trace: ConnectionTrace, *, sock: socket.socket | None = None,
               initial: Sequence[tuple[tuple[str, int], tuple[str, int]]] = ()) -> SubflowState:
        """The server relays connection `token`: subflow changes go to `trace` from now on (and
        those seen earlier are replayed). `initial` are subflows known not to be joins (the
        initial subflow, from the socket's addresses): seeding them makes the count right even if
        this runs before the kernel's CREATED event is read, and they dedupe with it. Without
        events, the kernel's subflow list is sampled now, so joins so far are reported at once."""
        state = self.states.get(token)
        if state is None:
            state = SubflowState(token)
            self.states[token] = state
        state.sock = sock
        now = time.time_ns()
        for local, remote in initial:
            self._add(state, local, remote, join=False, when_ns=now)
        state.trace = trace
        if state.pending:
            for joined, local, remote, when_ns in state.pending:
                trace.subflow_event(joined, local, remote, when_ns)
        state.pending = None
        if self.source == "sampling":
            self.sample([state])
        return state

    def detach(self, token: int) -> SubflowState | None:
        """The relay ended (the proxy closed its socket): forget the connection and return its
        final state (subflows at close, max subflows). Later events for it are ignored."""
        state = self.states.get(token)
        if state is None:
            return None
        state.trace = None
        state.pending = None
        state.sock = None
        self._forget(token)
        return state

    # -- netlink events ------------------------------------------------------------------------
    def handle_event(self, event: MptcpEvent) -> None:
        """Apply one `mptcp_pm` event (events of other connections are ignored)."""
        token = event.token
        if token is None:
            return
        kind = event.kind
        # Most events are about connections not tracked here (the proxy's own upstream side,
        # closes of untracked tokens): they return before anything is allocated.
        if kind == "created" or kind == "established":
            # Server-side connections accepted on our listeners only: the proxy's own upstream
            # MPTCP connections (client side) are not the subject of these metrics.
            if not event.server_side:
                return
            if self.listen_ports and event.sport not in self.listen_ports:
                return
            state = self.states.get(token)
            if state is None:
                state = self.states[token] = SubflowState(token)
            local, remote = _event_endpoints(event)
            if local is not None and remote is not None:
                self._add(state, local, remote, join=False, when_ns=time.time_ns())
                state.initial_known = True
        elif kind == "sub_established" or kind == "sub_closed":
            state = self.states.get(token)
            if state is None:
                return
            local, remote = _event_endpoints(event)
            if local is None or remote is None:
                return
            if kind == "sub_established":
                self._add(state, local, remote, join=True, when_ns=time.time_ns())
            else:
                self._remove(state, local, remote, time.time_ns())
        elif kind == "closed":
            self._forget(token)

    async def run_events(self, events: AsyncIterable[MptcpEvent]) -> None:
        """Consume `events` until cancelled."""
        self.source = "netlink"
        async for event in events:
            try:
                self.handle_event(event)
            except Exception:  # noqa: BLE001 - a surprising event must not stop the watching
                log.exception("subflow watcher: cannot apply %r", event)

    def handle_events(self, events: Iterable[MptcpEvent]) -> None:
        """Apply a batch of events, each on its own (a surprising one is logged and skipped)."""
        for event in events:
            try:
                self.handle_event(event)
            except Exception:  # noqa: BLE001 - a surprising event must not stop the watching
                log.exception("subflow watcher: cannot apply %r", event)

    # -- sampling fallback -----------------------------------------------------------------------
    def sample(self, states: Iterable[SubflowState] | None = None) -> None:
        """Compare each attached connection's subflows with the kernel's view (MPTCP_INFO: one
        getsockopt; the subflow list is read only when the count changed)."""
        now = time.time_ns()
        for state in list(self.states.values()) if states is None else states:
            sock = state.sock
            if sock is None or sock.fileno() < 0:
                continue
            try:
                info = get_mptcp_info(sock)
                if info is None or info.subflow_count == len(state.live):
                    continue
                current = {(sf.local, sf.remote) for sf in get_subflows(sock)}
            except OSError:
                continue
            for local, remote in current - state.live:
                self._add(state, _unmap(local), _unmap(remote), join=True, when_ns=now)
            for local, remote in state.live - current:
                self._remove(state, local, remote, now)

    async def run_sampling(self, interval_s: float = 2.0, batch: int = 500) -> None:
        """Sample every `interval_s` until cancelled, yielding to the loop every `batch`
        connections (10,000 connections: 20 short slices per round)."""
        self.source = "sampling"
        while True:
            await asyncio.sleep(interval_s)
            states = list(self.states.values())
            for start in range(0, len(states), batch):
                self.sample(states[start:start + batch])
                await asyncio.sleep(0)

    async def run(self, events: MptcpEventHub | None = None, sampling_interval_s: float = 2.0) -> None:
        """Watch with netlink events if the kernel lets us subscribe, else by sampling."""
        if events is not None:
            try:
                subscription = events.subscribe()
            except OSError as exc:
                log.warning("MPTCP events unavailable (%s): sampling MPTCP_INFO every %.1f s instead",
                            exc, sampling_interval_s)
            else:
                try:
                    await self.run_events(subscription)
                finally:
                    subscription.close()
                return
        await self.run_sampling(sampling_interval_s)


def _unmap(endpoint: tuple[str, int]) -> tuple[str, int]:
    """The endpoint as events spell it (IPv4-mapped shown as IPv4): the policy's canonical text."""
    return address_text(endpoint[0]), endpoint[1]


def _event_endpoints(event: MptcpEvent) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    if event.saddr is None or event.daddr is None or event.sport is None or event.dport is None:
        return None, None
    return (event.saddr, event.sport), (event.daddr, event.dport)


def initial_subflow(sock: socket.socket) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(local, remote) of a connection's initial subflow, as events spell them: what the accepted
    socket's own addresses are. None if the socket is gone."""
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    return _unmap((str(local[0]), int(local[1]))), _unmap((str(remote[0]), int(remote[1])))


# -- MP_JOINs the kernel refused -------------------------------------------------------------------
# MPTcpExt counters (/proc/net/netstat, per network namespace) of joins refused on the server
# side, with the label each gets: no connection with that token here (a join steered to the wrong
# pod), refused by the path manager's limits, or a failed HMAC.
JOIN_REFUSAL_COUNTERS: dict[str, str] = {
    "MPJoinNoTokenFound": "no_token",
    "MPJoinRejected": "limit",
    "MPJoinAckHMacFailure": "hmac_failure",
}
_NETSTAT = "/proc/net/netstat"


def mptcp_counters(path: str = _NETSTAT) -> dict[str, int]:
    """Every MPTcpExt counter of this network namespace since it was created, by its name without
    the prefix ({} if the kernel has none)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("MPTcpExt:"):
            return dict(zip(header.split()[1:], (int(v) for v in values.split()[1:]), strict=False))
    return {}


def join_refusals(path: str = _NETSTAT) -> dict[str, int]:
    """Refused MP_JOINs in this network namespace since it was created, by reason ({} if the
    kernel has no MPTcpExt counters)."""
    counters = mptcp_counters(path)
    if not counters:
        return {}
    return {label: counters.get(name, 0) for name, label in JOIN_REFUSAL_COUNTERS.items()}
