"""Telemetry without the proxy: OTEL_* configuration, spans on the OTLP wire (a real receiver
decoding the protobufs), drop accounting against a dead and a hung collector, the subflow
watcher fed with kernel-shaped events, the join-refusal counters, and the log line format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcpool_proxy.config import parse_config
from mcpool_proxy.kernel.mptcp_events import MptcpEvent
from mcpool_proxy.observe.logs import configure_logging, log_connection_closed
from mcpool_proxy.observe.telemetry import (
    EVENT_ERROR_SENT,
    EVENT_SUBFLOW_JOINED,
    NOOP_TRACE,
    ConnectionTrace,
    SubflowWatcher,
    Telemetry,
    connection_fields,
    join_refusals,
    network_type,
)
from otlp_receiver import OtlpReceiver, dead_endpoint, running_receiver

OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "POD_NAME", "POD_NAMESPACE",
)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    # Export promptly and give up fast: tests wait on the receiver, not on timers.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")


@pytest.fixture
def receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    with running_receiver("ok") as pair:
        yield pair


def _fields(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        connection_id=7, mode="convert", client=("198.18.1.2", 40000), destination=("198.18.200.2", 8000),
        requested=None, token="0a0b0c0d", mptcp=True, subflows=2, max_subflows=2, bytes_up=10,
        bytes_down=20, close_reason="client_closed", duration_s=0.5, relay_mode="splice",
    )
    base.update(overrides)
    return connection_fields(**base)  # type: ignore[arg-type]


# -- configuration -----------------------------------------------------------------------------------
def test_no_endpoint_means_no_tracer_and_the_shared_noop() -> None:
    telemetry = Telemetry.from_environment()
    assert not telemetry.enabled and telemetry.provider is None
    trace = telemetry.connection("convert", ("198.18.1.2", 1))
    assert trace is NOOP_TRACE and trace.trace_id is None
    trace.error_sent("convert", "not_authorized", 32, "x")
    trace.finish(_fields())  # all no-ops


@pytest.mark.parametrize("var,value", [("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")])
def test_disabled_by_standard_variables(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(var, value)
    assert not Telemetry.from_environment().enabled


def test_unsupported_protocol_turns_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    assert not Telemetry.from_environment().enabled


def test_network_type() -> None:
    assert network_type("198.18.1.2") == "ipv4"
    assert network_type("::ffff:198.18.1.2") == "ipv4"
    assert network_type("2001:db8:1::2") == "ipv6"


# -- spans on the wire -------------------------------------------------------------------------------
def test_connection_span_and_children_on_the_otlp_wire(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[OtlpReceiver, str]
) -> None:
    rx, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("POD_NAME", "pool-a-0")
    monkeypatch.setenv("POD_NAMESPACE", "edge")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab")
    config = parse_config({"affinity": {"pool": "pool-a"}})
    telemetry = Telemetry.from_environment(config)
    assert telemetry.enabled
    trace = telemetry.connection("socks5", ("2001:db8:1::2", 40001))
    trace.end_handshake()
    trace.set_destination("198.18.200.2", 8000, requested="server.example")
    trace.begin_upstream("198.18.200.2", 8000)
    trace.end_upstream()
    trace.subflow_event(True, ("2001:db8:100::2", 1080), ("2001:db8:2::2", 50000))
    trace.finish(_fields(mode="socks5", client=("2001:db8:1::2", 40001), requested="server.example"))
    telemetry.shutdown(5)

    (span,) = rx.wait_for(lambda s: s.name == "socks5")
    assert rx.paths == {"/v1/traces"} and rx.content_types == {"application/x-protobuf"}
    assert span.kind == 2  # SPAN_KIND_SERVER
    assert span.trace_id == trace.trace_id and span.span_id == trace.span_id
    a = span.attributes
    assert a["client.address"] == "2001:db8:1::2" and a["client.port"] == 40001
    assert a["server.address"] == "server.example" and a["server.port"] == 8000
    assert a["mcpool.destination.address"] == "198.18.200.2"
    assert a["network.transport"] == "tcp" and a["network.type"] == "ipv6"
    assert a["mcpool.mptcp.token"] == "0a0b0c0d" and a["mcpool.mptcp.subflows"] == 2
    assert a["mcpool.bytes_up"] == 10 and a["mcpool.bytes_down"] == 20
    assert a["mcpool.close_reason"] == "client_closed" and a["mcpool.mptcp.fallback"] is False
    assert span.event_names() == [EVENT_SUBFLOW_JOINED]
    assert span.events[0].attributes["network.peer.address"] == "2001:db8:2::2"
    r = span.resource
    assert r["service.name"] == "mcpool-proxy"
    assert r["k8s.pod.name"] == "pool-a-0" and r["k8s.namespace.name"] == "edge"
    assert r["mcpool.pool"] == "pool-a" and r["deployment.environment"] == "lab"
    children = {s.name: s for s in rx.trace(span.trace_id) if s.parent_span_id == span.span_id}
    assert set(children) == {"socks5.handshake", "upstream.connect"}
    assert children["upstream.connect"].kind == 3  # CLIENT
    assert children["upstream.connect"].attributes["server.port"] == 8000
    assert telemetry.accounting.exported == 3 and telemetry.accounting.dropped_total == 0


def test_error_event_status_and_service_name_override(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[OtlpReceiver, str]
) -> None:
    rx, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint + "/v1/traces")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-mcp")
    telemetry = Telemetry.from_environment()
    trace = telemetry.connection("convert", ("198.18.1.2", 40002))
    trace.error_sent("convert", "not_authorized", 32, "destination 127.0.0.1 refused")
    trace.finish(_fields(destination=("127.0.0.1", 8000), token=None, mptcp=False, subflows=1,
                         close_reason="refused"), error="not_authorized")
    telemetry.shutdown(5)
    (span,) = rx.wait_for(lambda s: s.name == "convert")
    assert span.resource["service.name"] == "edge-mcp"
    (event,) = span.events
    assert event.name == EVENT_ERROR_SENT
    assert event.attributes["mcpool.error.code"] == 32
    assert event.attributes["mcpool.error.name"] == "not_authorized"
    assert span.status_code == 2 and span.attributes["error.type"] == "not_authorized"
    (handshake,) = [s for s in rx.trace(span.trace_id) if s.name == "convert.handshake"]
    assert handshake.status_code == 2  # the handshake failed too


def test_sampler_from_environment(monkeypatch: pytest.MonkeyPatch, receiver: tuple[OtlpReceiver, str]) -> None:
    rx, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    telemetry = Telemetry.from_environment()
    for port in range(5):
        telemetry.connection("convert", ("198.18.1.2", port)).finish(_fields())
    telemetry.shutdown(5)
    assert rx.spans == [] and telemetry.accounting.exported == 0
    assert telemetry.accounting.dropped_total == 0  # not sampled is not dropped


# -- a collector that is dead or hangs ------------------------------------------------------------------
def test_dead_collector_costs_counted_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", dead_endpoint())
    telemetry = Telemetry.from_environment()
    for port in range(10):
        trace = telemetry.connection("convert", ("198.18.1.2", port))
        trace.end_handshake()
        trace.finish(_fields())
    telemetry.shutdown(10)
    acc = telemetry.accounting
    assert acc.exported == 0
    assert acc.dropped["export_failed"] + acc.dropped["queue_full"] == 20


def test_hung_collector_fills_the_bounded_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    with running_receiver("slow") as (rx, endpoint):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        telemetry = Telemetry.from_environment()
        assert telemetry.accounting.max_queue == 8
        for port in range(100):
            telemetry.connection("convert", ("198.18.1.2", port)).finish(_fields())
        acc = telemetry.accounting
        # 200 spans ended (connection + handshake each). At most one batch is with the hung
        # exporter and at most 8 wait in the queue; every other span was dropped, and counted.
        assert acc.dropped["queue_full"] >= 200 - 8 - 4
        assert acc.exported == 0
    telemetry.shutdown(5)


# -- subflow watcher ---------------------------------------------------------------------------------
class Recorder(ConnectionTrace):
    def __init__(self) -> None:
        self.events: list[tuple[bool, tuple[str, int], tuple[str, int], int | None]] = []

    def subflow_event(self, joined: bool, local: tuple[str, int], remote: tuple[str, int],
                      timestamp_ns: int | None = None) -> None:
        self.events.append((joined, local, remote, timestamp_ns))


POD, DSL, LTE = "198.18.100.2", "198.18.1.2", "198.18.2.2"


def _ev(kind: str, token: int = 0xAA, saddr: str | None = POD, daddr: str | None = DSL, sport: int | None = 5124,
        dport: int | None = 40000, server_side: bool | None = None) -> MptcpEvent:
    return MptcpEvent(kind=kind, token=token, saddr=saddr, daddr=daddr, sport=sport, dport=dport,
                      server_side=server_side)


def test_watcher_follows_joins_before_and_after_attach() -> None:
    w = SubflowWatcher(listen_ports=[5124])
    w.handle_event(_ev("created", server_side=True))
    w.handle_event(_ev("established", server_side=True))
    assert w.established == 1
    # The LTE join beats the end of the handshake: it is kept and replayed at attach.
    w.handle_event(_ev("sub_established", daddr=LTE, dport=50000))
    assert w.established == 2 and w.joins_accepted == 1
    rec = Recorder()
    state = w.attach(0xAA, rec)
    assert [(j, r) for j, _, r, _ in rec.events] == [(True, (LTE, 50000))]
    assert rec.events[0][3] is not None  # replayed with the time the kernel reported it
    w.handle_event(_ev("sub_closed", daddr=LTE, dport=50000))
    w.handle_event(_ev("sub_established", daddr=LTE, dport=50001))
    assert [(j, r) for j, _, r, _ in rec.events][1:] == [(False, (LTE, 50000)), (True, (LTE, 50001))]
    assert state.count == 2 and state.max_subflows == 2 and state.joins == 2
    assert w.detach(0xAA) is state
    assert w.established == 0 and w.states == {} and state.count == 2  # the count at close
    w.handle_event(_ev("sub_established", daddr=LTE, dport=50002))
    w.handle_event(_ev("closed", saddr=None, daddr=None, sport=None, dport=None))
    assert len(rec.events) == 3  # detached: the closed span hears nothing more
    assert w.established == 0 and w.joins_accepted == 2 and w.subflows_closed == 1


def test_watcher_ignores_client_side_and_other_ports() -> None:
    w = SubflowWatcher(listen_ports=[5124])
    w.handle_event(_ev("created", token=1, server_side=False))  # the proxy's own upstream MPTCP
    w.handle_event(_ev("created", token=2, sport=22, server_side=True))  # not our listener
    w.handle_event(_ev("sub_established", token=1, daddr=LTE))
    w.handle_event(_ev("sub_established", token=3, daddr=LTE))  # never created: unknown
    w.handle_event(MptcpEvent(kind="listener_created", token=None))
    assert w.states == {} and w.established == 0 and w.joins_accepted == 0


def test_watcher_attach_seeds_from_the_socket_when_events_were_missed() -> None:
    w = SubflowWatcher()
    rec = Recorder()
    state = w.attach(0xBB, rec, initial=[((POD, 5124), (DSL, 40000)), ((POD, 5124), (LTE, 50000))])
    assert state.count == 2 and w.established == 2 and rec.events == []  # not joins we saw
    w.detach(0xBB)
    assert w.established == 0  # without events nobody else would forget it


def test_watcher_knows_the_initial_subflow_from_created() -> None:
    """The server skips reading the accepted socket's addresses when CREATED already told the
    initial subflow: attach without `initial` still counts it, once."""
    w = SubflowWatcher(listen_ports=[5124])
    assert not w.knows_initial(0xAA)
    w.handle_events([_ev("created", server_side=True), _ev("sub_established", daddr=LTE, dport=50000)])
    assert w.knows_initial(0xAA) and not w.knows_initial(0xAB)
    state = w.attach(0xAA, Recorder())
    assert state.count == 2 and state.joins == 1 and w.established == 2
    # A created event of a connection on another port tells nothing about ours.
    w.handle_event(_ev("created", token=0xAC, sport=22, server_side=True))
    assert not w.knows_initial(0xAC)


def test_watcher_handles_10000_connections_cheaply() -> None:
    w = SubflowWatcher(listen_ports=[5124])
    for token in range(10_000):
        w.handle_event(_ev("created", token=token, dport=token % 60000 + 1, server_side=True))
        w.attach(token, NOOP_TRACE)
        w.handle_event(_ev("sub_established", token=token, daddr=LTE, dport=token % 60000 + 1))
    assert w.established == 20_000 and w.joins_accepted == 10_000
    for token in range(10_000):
        w.handle_event(_ev("closed", token=token))  # the kernel's CLOSED may come first
        w.detach(token)
    assert w.established == 0 and not w.states


def test_join_refusals_from_netstat(tmp_path: Path) -> None:
    netstat = tmp_path / "netstat"
    netstat.write_text(
        "TcpExt: SyncookiesSent ListenDrops\nTcpExt: 1 2\n"
        "MPTcpExt: MPCapableSYNRX MPJoinNoTokenFound MPJoinSynRx MPJoinRejected MPJoinAckHMacFailure\n"
        "MPTcpExt: 5 3 9 2 1\n"
    )
    assert join_refusals(str(netstat)) == {"no_token": 3, "limit": 2, "hmac_failure": 1}
    assert join_refusals(str(tmp_path / "missing")) == {}


# -- logs ----------------------------------------------------------------------------------------------
def test_connection_close_log_line_has_span_fields_and_ids() -> None:
    stream = io.StringIO()
    configure_logging("info", json_logs=True, stream=stream)
    try:
        fields = _fields()
        log_connection_closed(logging.getLogger("mcpool.proxy"), fields, trace_id="ab" * 16, span_id="cd" * 8)
        log_connection_closed(logging.getLogger("mcpool.proxy"), fields, trace_id=None, span_id=None)
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "connection closed" and first["level"] == "info"
    assert first["trace_id"] == "ab" * 16 and first["span_id"] == "cd" * 8
    for key, value in fields.items():
        if value is not None:
            assert first[key] == value
    assert "mcpool.destination.address" not in first  # None fields are left out
    assert "trace_id" not in second


def test_text_logs_for_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", json_logs=False, stream=stream)
    try:
        logging.getLogger("mcpool.proxy").info("hello", extra={"fields": {"a": 1, "b": None}})
    finally:
        logging.getLogger().handlers.clear()
    line = stream.getvalue().strip()
    assert line.endswith("INFO mcpool.proxy: hello a=1")
