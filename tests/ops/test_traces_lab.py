"""Traces of real proxied connections on the namespace lab, asserted on the OTLP wire: a real
receiver in the proxy's namespace decodes the protobufs the `mcpool proxy` process exports.

- a two-link MPTCP connection gives a `convert` span with the semantic-convention and MPTCP
  attributes, a subflow-join event for the LTE subflow, and handshake/upstream child spans; its
  log line carries the same fields and the trace and span ids;
- refused destinations give error events with the code sent (Convert 32, SOCKS5 0x02);
- a dead or hung collector does not stop transfers (compared in the same run with a proxy
  without a collector); what it costs is counted in `mcpool_otel_spans_dropped_total`.
"""

from __future__ import annotations

import pytest
from mcpool_proxy.cpe.convert_client import ConvertRefused
from mcpool_proxy.cpe.socks5_client import Socks5Refused
from mcpool_tools.lab import Lab
from ops_helpers import (
    MB,
    POD_NAME,
    POD_NAMESPACE,
    POOL,
    SERVER_PORT,
    cpe_convert,
    cpe_socks5,
    download,
    logs,
    otel_env,
    sample,
    scrape,
    start_proxy,
    wait_subflows,
)
from support import requires_netns, wait_for

pytestmark = [requires_netns, pytest.mark.netns]

JOINED = "mcpool.mptcp.subflow_joined"
ERROR_SENT = "mcpool.error_sent"


def test_two_link_connection_span_with_join_event_and_log_line(ops_lab: Lab, receiver_in_mcp) -> None:
    lab = ops_lab
    rx, endpoint = receiver_in_mcp("ok")
    proxy, (convert_port, _, _) = start_proxy(lab, "traced", otel=otel_env(endpoint))
    try:
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            client_port = sock.getsockname()[1]
            entry = wait_subflows(proxy, sock, 2)
            sent_up = download(sock, 3 * MB, 5, early)
        (span,) = rx.wait_for(lambda s: s.name == "convert" and s.attributes.get("client.port") == client_port)
    finally:
        proxy.stop()

    a = span.attributes
    assert a["client.address"] == lab.cpe_dsl_ip
    assert a["server.address"] == lab.srv_ip and a["server.port"] == SERVER_PORT
    assert a["network.transport"] == "tcp" and a["network.type"] == "ipv4"
    assert a["mcpool.mptcp.token"] == entry["token"] and a["mcpool.mptcp.fallback"] is False
    # At close the client's subflows may already be going away one by one (SUB_CLOSED can be
    # read before the relay sees the DATA_FIN), so "subflows at close" is 2 or 1.
    assert a["mcpool.mptcp.max_subflows"] == 2 and a["mcpool.mptcp.subflows"] in (1, 2)
    assert a["mcpool.bytes_up"] == sent_up and a["mcpool.bytes_down"] == 3 * MB
    assert a["mcpool.close_reason"] in ("server_closed", "client_closed")
    joins = [e for e in span.events if e.name == JOINED]
    assert len(joins) == 1
    assert joins[0].attributes["network.peer.address"] == lab.cpe_lte_ip
    assert joins[0].attributes["network.local.address"] == lab.mcp_ip
    assert span.start_unix_nano <= joins[0].time_unix_nano <= span.end_unix_nano
    assert span.resource["k8s.pod.name"] == POD_NAME and span.resource["k8s.namespace.name"] == POD_NAMESPACE
    assert span.resource["mcpool.pool"] == POOL and span.resource["service.name"] == "mcpool-proxy"
    children = {s.name: s for s in rx.trace(span.trace_id) if s.parent_span_id == span.span_id}
    assert set(children) == {"convert.handshake", "upstream.connect"}
    assert children["upstream.connect"].attributes["server.address"] == lab.srv_ip
    assert children["convert.handshake"].end_unix_nano <= children["upstream.connect"].start_unix_nano

    (line,) = [e for e in logs(proxy) if e["msg"] == "connection closed" and e.get("client.port") == client_port]
    assert line["trace_id"] == span.trace_id and line["span_id"] == span.span_id
    for key, value in a.items():
        if key != "error.type":
            assert line[key] == value, key


def test_refused_destinations_give_error_events(ops_lab: Lab, receiver_in_mcp) -> None:
    lab = ops_lab
    rx, endpoint = receiver_in_mcp("ok")
    proxy, (convert_port, socks_port, _) = start_proxy(lab, "refusing", otel=otel_env(endpoint))
    try:
        with pytest.raises(ConvertRefused) as refused:
            cpe_convert(lab, convert_port, ("127.0.0.1", SERVER_PORT))
        assert int(refused.value.code) == 32
        with pytest.raises(Socks5Refused):
            cpe_socks5(lab, socks_port, ("169.254.169.254", 80))
        convert_span, socks_span = (
            rx.wait_for(lambda s, name=name: s.name == name)[0] for name in ("convert", "socks5")
        )
    finally:
        proxy.stop()

    for span, code, name in ((convert_span, 32, "not_authorized"), (socks_span, 2, "not_allowed")):
        (event,) = [e for e in span.events if e.name == ERROR_SENT]
        assert event.attributes["mcpool.error.code"] == code
        assert event.attributes["mcpool.error.name"] == name
        assert span.status_code == 2  # STATUS_CODE_ERROR
        assert span.attributes["mcpool.close_reason"] == "refused"
        assert span.attributes["client.address"] == lab.cpe_dsl_ip
        assert not [s for s in rx.trace(span.trace_id) if s.name == "upstream.connect"]
    assert convert_span.attributes["server.address"] == "127.0.0.1"


def _transfers(lab: Lab, convert_port: int, connections: int) -> None:
    for i in range(connections):
        sock, early = cpe_convert(lab, convert_port, (lab.srv_ip, SERVER_PORT))
        with sock:
            download(sock, 1 * MB if i else 20 * MB, 100 + i, early)


def test_dead_or_hung_collector_does_not_stop_transfers(ops_lab: Lab, receiver_in_mcp) -> None:
    lab = ops_lab
    connections = 12
    spans = 3 * connections  # connection, handshake, upstream connect
    _, hung_endpoint = receiver_in_mcp("slow")
    plain, (plain_port, _, _) = start_proxy(lab, "no-collector")
    dead, (dead_port, _, _) = start_proxy(lab, "dead-collector", otel=otel_env("http://127.0.0.1:9"))
    hung, (hung_port, _, _) = start_proxy(
        lab, "hung-collector",
        otel=otel_env(hung_endpoint, OTEL_BSP_MAX_QUEUE_SIZE="8", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
                      OTEL_EXPORTER_OTLP_TIMEOUT="30"),
    )
    try:
        # Every transfer completes byte-exact through each proxy (download() checks sha256).
        for port in (plain_port, dead_port, hung_port):
            _transfers(lab, port, connections)

        def dropped(proxy) -> float:  # noqa: ANN001
            s = scrape(proxy)
            return sample(s, "mcpool_otel_spans_dropped_total", reason="queue_full") + sample(
                s, "mcpool_otel_spans_dropped_total", reason="export_failed")

        # No collector: nothing exported, nothing dropped, tracing reported off.
        s = scrape(plain)
        assert dropped(plain) == 0 and sample(s, "mcpool_otel_spans_exported_total") == 0
        assert sample(s, "mcpool_otel_tracing_enabled") == 0
        # Dead collector: every span is eventually dropped (failed exports), none exported.
        wait_for(lambda: dropped(dead) == spans, 30, f"{spans} dropped spans on the dead-collector proxy")
        assert sample(scrape(dead), "mcpool_otel_spans_exported_total") == 0
        # Hung collector: one batch is stuck in the exporter, at most 8 queue, the rest dropped.
        s = scrape(hung)
        assert sample(s, "mcpool_otel_spans_dropped_total", reason="queue_full") >= spans - 8 - 4
        assert sample(s, "mcpool_otel_spans_exported_total") == 0
        assert sample(s, "mcpool_connections_closed_total", reason="server_closed") + sample(
            s, "mcpool_connections_closed_total", reason="client_closed") == connections
    finally:
        for proxy in (plain, dead, hung):
            proxy.stop()
    # Even with a hung collector the proxy exits promptly on SIGTERM, with status 0.
    assert hung.proc.returncode == 0
