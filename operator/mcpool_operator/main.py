"""`mcpool operator`: run the kopf operator that reconciles MCPPool resources.

Parses the command line into `OperatorOptions`, sets up structured (JSON) logging and, only when
the standard OTEL_* variables ask for it, an OTLP trace exporter; then runs kopf with a registry
built by `handlers.build_registry`. `run()` is the programmatic entry the tests and the benchmark
use (same code path, their own stop flag and API connection).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Callable, Sequence

import kopf
from mcpool_proxy.config import split_hostport
from prometheus_client import start_http_server

from .handlers import OperatorOptions, build_registry
from .kube import Connection, KubeClient
from .metrics import OperatorMetrics
from .reconcile import EventPoster, Reconciler, kopf_event

__all__ = ["main", "parse_args", "run"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_args(argv: Sequence[str]) -> OperatorOptions:
    parser = argparse.ArgumentParser(
        prog="mcpool operator", description="Reconcile MCPPool resources into running MCP pools."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; exact names)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        metavar="URL",
        help="liveness endpoint served by kopf ('' disables it)",
    )
    parser.add_argument(
        "--metrics-listen",
        default="0.0.0.0:8081",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (reconciles, errors, latency, pools by condition) at "
        "http://HOST:PORT/metrics ('' disables it)",
    )
    parser.add_argument("--resync-interval", type=float, default=300.0, metavar="S",
                        help="reconcile every pool at least this often (seconds)")
    # An integer: it reaches the API as ?timeoutSeconds=N, which the server parses with ParseInt
    # (a float such as 300.0 is refused with HTTP 400 and no watch ever starts).
    parser.add_argument("--watch-server-timeout", type=_positive_int, default=300, metavar="S",
                        help="ask the API server to end watches after this many whole seconds "
                        "(they silently stall otherwise)")
    parser.add_argument("--watch-client-timeout", type=float, default=360.0, metavar="S",
                        help="give up on a watch connection after this long")
    parser.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                        help="timeout of each API request")
    parser.add_argument(
        "--director-image",
        default=None,
        metavar="IMAGE",
        help="image of every director DaemonSet, whatever the pool's spec.image says (the director "
        "runs as root with NET_ADMIN on the host network; see docs/operator.md)",
    )
    parser.add_argument(
        "--allowed-images",
        action="append",
        default=[],
        metavar="REPO[,REPO...]",
        help="image repositories a pool's spec.image may name (repeatable or comma-separated; an "
        "entry ending in '/' allows every repository under it); a pool naming another gets "
        "Degraded=True (ImageNotAllowed) and no child objects. Unset: any image",
    )
    parser.add_argument("--max-concurrent-reconciles", type=_positive_int, default=8, metavar="N",
                        help="reconcile at most N pools at once; the others wait in arrival order (a "
                        "burst of new pools is then ready a few at a time instead of all at the end)")
    parser.add_argument("--log-format", choices=("json", "plain", "full"), default="json")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    args = parser.parse_args(list(argv))
    namespaces = tuple(args.namespace)
    if not namespaces and not args.all_namespaces:
        # In a pod, default to the pod's own namespace (the namespaced Role's scope).
        own = os.environ.get("POD_NAMESPACE")
        if not own:
            parser.error("give --namespace NS (repeatable) or --all-namespaces")
        namespaces = (own,)
    return OperatorOptions(
        namespaces=namespaces,
        all_namespaces=bool(args.all_namespaces),
        liveness_endpoint=args.liveness or None,
        resync_interval_s=args.resync_interval,
        watch_server_timeout_s=args.watch_server_timeout,
        watch_client_timeout_s=args.watch_client_timeout,
        request_timeout_s=args.request_timeout,
        log_format=args.log_format,
        verbose=bool(args.verbose),
        director_image=args.director_image or None,
        allowed_images=tuple(e.strip() for arg in args.allowed_images for e in arg.split(",") if e.strip()),
        metrics_listen=args.metrics_listen or None,
        max_concurrent_reconciles=args.max_concurrent_reconciles,
    )


def setup_tracing() -> bool:
    """Export spans over OTLP/HTTP only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    os.environ.setdefault("OTEL_SERVICE_NAME", "mcpool-operator")
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


async def run(
    options: OperatorOptions,
    *,
    connection: Connection | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    post_event: EventPoster = kopf_event,
    on_reconciler: Callable[[Reconciler], None] | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or forever). `on_reconciler` is shown the
    reconciler before kopf starts (tests wait on its per-pool reconcile counters)."""
    client = KubeClient(connection, request_timeout_s=options.request_timeout_s)
    metrics = OperatorMetrics()
    reconciler = Reconciler(
        client,
        post_event=post_event,
        director_image=options.director_image,
        allowed_images=options.allowed_images,
        metrics=metrics,
        max_concurrent=options.max_concurrent_reconciles,
        drain_poll_s=options.drain_poll_s,
    )
    registry = build_registry(options, reconciler)
    if on_reconciler is not None:
        on_reconciler(reconciler)
    server = None
    if options.metrics_listen is not None:
        host, port = split_hostport(options.metrics_listen)
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=options.all_namespaces,
            namespaces=() if options.all_namespaces else options.namespaces,
            standalone=True,
            liveness_endpoint=options.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await reconciler.close()
        if server is not None:
            server.shutdown()
            server.server_close()
        await client.close()


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    log_format = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(verbose=options.verbose, log_format=log_format[options.log_format])
    setup_tracing()
    try:
        asyncio.run(run(options))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
