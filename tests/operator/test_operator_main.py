"""`mcpool operator` command line, kopf settings, and the reconcile span."""

from __future__ import annotations

import logging

import kopf
import pytest
from mcpool_operator import reconcile
from mcpool_operator.handlers import FINALIZER, OperatorOptions, configure_settings
from mcpool_operator.kube import KubeClient
from mcpool_operator.main import parse_args
from mcpool_proxy.cli import SUBCOMMANDS
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def test_cli_is_wired() -> None:
    assert SUBCOMMANDS["operator"][0] == "mcpool_operator.main"


def test_namespace_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert parse_args(["-n", "a", "--namespace", "b"]).namespaces == ("a", "b")
    options = parse_args(["--all-namespaces", "--liveness", ""])
    assert options.all_namespaces and options.liveness_endpoint is None
    with pytest.raises(SystemExit):
        parse_args([])  # neither: refuse rather than guess
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "-A"])
    monkeypatch.setenv("POD_NAMESPACE", "mcp")
    assert parse_args([]).namespaces == ("mcp",)


def test_settings() -> None:
    settings = kopf.OperatorSettings()
    configure_settings(settings, OperatorOptions(watch_server_timeout_s=123, watch_client_timeout_s=150, request_timeout_s=7))
    assert settings.persistence.finalizer == FINALIZER == "mcp.mptcp.dev/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.watching.server_timeout == 123 and settings.watching.client_timeout == 150
    assert settings.networking.request_timeout == 7
    assert settings.peering.standalone is True
    assert settings.posting.level == logging.WARNING


async def test_reconcile_emits_a_span_for_an_invalid_spec() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    original = reconcile._tracer
    reconcile._tracer = tracer
    written: list[tuple[object, ...]] = []

    class FakeStatusClient(KubeClient):
        async def get(self, ref, subresource=None):  # type: ignore[no-untyped-def]
            return body  # the live pool, no status yet

        async def patch(self, ref, patch, subresource=None):  # type: ignore[no-untyped-def]
            written.append((ref, patch, subresource))
            return {}

    try:
        reconciler = reconcile.Reconciler(FakeStatusClient(), post_event=lambda *args: written.append(args))
        body = {
            "apiVersion": "mcp.mptcp.dev/v1alpha1",
            "kind": "MCPPool",
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "generation": 3},
            "spec": {"replicas": "many"},
        }
        outcome = await reconciler.reconcile(body, logging.getLogger("test"))
    finally:
        reconcile._tracer = original
    assert outcome.spec_error and "spec.replicas" in outcome.spec_error
    (span,) = exporter.get_finished_spans()
    assert span.name == "mcpool.reconcile"
    assert span.attributes is not None and span.attributes["mcpool.pool"] == "p"
    assert span.attributes["mcpool.generation"] == 3
    assert span.status.status_code == trace.StatusCode.ERROR
    status_patch = [w for w in written if len(w) == 3 and w[2] == "status"]
    assert status_patch and status_patch[0][1]["status"]["observedGeneration"] == 3  # type: ignore[index]
    assert any(len(w) == 4 and w[1] == "Warning" and w[2] == "InvalidSpec" for w in written)


def test_watch_server_timeout_reaches_the_api_as_an_integer() -> None:
    # kopf sends str(server_timeout) as ?timeoutSeconds=; a real API server parses it with
    # ParseInt and answers "300.0" with HTTP 400, so no watch would ever start.
    settings = kopf.OperatorSettings()
    configure_settings(settings, parse_args(["--all-namespaces"]))
    assert str(settings.watching.server_timeout) == "300"
    configure_settings(settings, parse_args(["-A", "--watch-server-timeout", "45"]))
    assert str(settings.watching.server_timeout) == "45"


@pytest.mark.parametrize("value", ["2.5", "0", "-3", "soon"])
def test_watch_server_timeout_must_be_whole_positive_seconds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["-A", "--watch-server-timeout", value])
    assert "--watch-server-timeout" in capsys.readouterr().err


def test_max_concurrent_reconciles_flag() -> None:
    assert parse_args(["-A"]).max_concurrent_reconciles == 8
    assert parse_args(["-A", "--max-concurrent-reconciles", "3"]).max_concurrent_reconciles == 3


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_concurrent_reconciles_must_be_positive(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["-A", "--max-concurrent-reconciles", value])
    assert "--max-concurrent-reconciles" in capsys.readouterr().err
