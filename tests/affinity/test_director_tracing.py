"""The director's steering decisions are traced when OTEL_* asks for it: one span per SYN
decision, with the outcome, the pod and (for an MP_JOIN) the token, so a connection's trace on a
pod (same `mcpool.mptcp.token`) joins the decisions that sent its subflows there.

The packet is the one thing not real here: netfilterqueue packets exist only inside a queue, so
`QueuedSyn` stands in with the same four methods; the SYN bytes and everything else are real.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from mcpool_proxy.cluster import director as director_module
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.observe.telemetry import Telemetry
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).parent))
from test_packet import ipv4, mp_capable, mp_join, tcp_syn  # noqa: E402

VIP = "198.19.255.1"


class QueuedSyn:
    """What the director uses of a netfilterqueue packet."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.mark: int | None = None
        self.verdict: str | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"

    def retain(self) -> None:
        pass


def _director(exporter: InMemorySpanExporter) -> Director:
    config = DirectorConfig(vip=VIP, ports=[5124], redis_url="redis://127.0.0.1:1/0", pool="p")
    telemetry = Telemetry.with_exporter(exporter, service_name="mcpool-director", pool="p")
    director = Director(config, telemetry=telemetry)
    director.table.apply_event({"t": "pod", "op": "add", "pod": "pod-a", "addr": "198.18.100.2", "state": "ready"})
    director.table.apply_event({"t": "token", "op": "add", "token": "0badcafe", "pod": "pod-a"})
    director.slots["pod-a"] = (1, "198.18.100.2")  # plumbing "in place" for the verdict
    return director


def test_each_decision_is_a_span_with_outcome_pod_and_token() -> None:
    exporter = InMemorySpanExporter()
    director = _director(exporter)
    initial = QueuedSyn(ipv4("198.18.1.2", VIP, tcp_syn(mp_capable(), sport=40000)))
    join = QueuedSyn(ipv4("198.18.2.2", VIP, tcp_syn(mp_join(0x0BADCAFE), sport=40001)))
    director._on_packet(initial)
    director._on_packet(join)
    assert director.telemetry.provider is not None
    director.telemetry.provider.force_flush()

    assert initial.verdict == "accept" and join.verdict == "accept"
    spans = {span.attributes["mcpool.director.syn"]: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"initial", "mp_join"}
    assert spans["initial"].name == "director.steer"
    assert spans["initial"].attributes["mcpool.director.outcome"] == "hashed"
    assert spans["initial"].attributes["client.address"] == "198.18.1.2"
    assert spans["mp_join"].attributes["mcpool.director.outcome"] == "token_hit"
    assert spans["mp_join"].attributes["mcpool.director.pod"] == "pod-a"
    assert spans["mp_join"].attributes["mcpool.mptcp.token"] == "0badcafe"
    assert spans["mp_join"].resource.attributes["service.name"] == "mcpool-director"
    assert spans["mp_join"].resource.attributes["mcpool.pool"] == "p"
    director.telemetry.shutdown(1.0)


def test_no_tracing_without_an_exporter() -> None:
    config = DirectorConfig(vip=VIP, ports=[5124], redis_url="redis://127.0.0.1:1/0")
    assert Director(config)._tracer is None


def test_dropped_syns_are_counted_and_warned_about_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpool.director")
    config = DirectorConfig(vip=VIP, ports=[5124], redis_url="redis://127.0.0.1:1/0", pool="p")
    director = Director(config)  # an empty table: no ready pod
    clock = [1000.0]
    director._now = lambda: clock[0]

    def send(n: int) -> list[QueuedSyn]:
        packets = [QueuedSyn(ipv4("198.18.1.2", VIP, tcp_syn(mp_capable(), sport=40000 + i))) for i in range(n)]
        for packet in packets:
            director._on_packet(packet)
        return packets

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mcpool.director" and "dropping SYNs" in r.getMessage()]

    assert {p.verdict for p in send(50)} == {"drop"}
    assert director.metrics.registry.get_sample_value("mcpool_director_dropped_syns_total", {"outcome": "no_ready_pod"}) == 50
    assert len(warnings()) == 1 and "no_ready_pod: 1" in warnings()[0] and "0 ready" in warnings()[0]
    clock[0] += director_module.DROP_WARNING_INTERVAL_S - 1
    send(10)
    assert len(warnings()) == 1  # rate-limited
    clock[0] += 2
    send(1)
    assert len(warnings()) == 2 and "no_ready_pod: 60" in warnings()[1], warnings()
    # A pod in the table whose tunnel is not built yet is a drop too, with its own outcome.
    director.table.apply_event({"t": "pod", "op": "add", "pod": "pod-a", "addr": "198.18.100.2", "state": "ready"})
    send(1)
    assert director.metrics.registry.get_sample_value("mcpool_director_dropped_syns_total", {"outcome": "pod_not_plumbed"}) == 1
