"""A real OTLP/HTTP trace receiver for the tests: decodes `ExportTraceServiceRequest` protobufs
(as a collector would) and keeps the spans, flattened for assertions.

Modes: "ok" answers 200 with an `ExportTraceServiceResponse`; "slow" accepts the request and
never answers until the receiver stops (a hung collector). A dead collector needs no receiver:
point the exporter at a port nobody listens on (`dead_endpoint`).

The listening socket may be created inside a network namespace (`create_socket` called by a
thread switched into it): a socket stays in the namespace it was created in, so a proxy in a
lab namespace can export to 127.0.0.1 of its own namespace while this process serves it.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedEvent:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any]


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_unix_nano: int
    end_unix_nano: int
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]


@dataclass
class OtlpReceiver:
    mode: str = "ok"
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    content_types: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1") -> str:
        """Bind (in the calling thread's network namespace), serve in a thread; the endpoint URL."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
                pass

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if receiver.mode == "slow":
                    # A collector that took the request and hangs: answer only at shutdown.
                    receiver._stopping.wait()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._store(request, self.headers.get("Content-Type", ""), self.path)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer((host, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        port = server.server_address[1]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- decoding --------------------------------------------------------------------------------
    def _store(self, request: ExportTraceServiceRequest, content_type: str, path: str) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_unix_nano=s.start_time_unix_nano,
                            end_unix_nano=s.end_time_unix_nano,
                            attributes=_attrs(s.attributes),
                            events=[ReceivedEvent(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events],
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            scope=ss.scope.name,
                        )
                    )
        with self._cond:
            self.requests += 1
            self.content_types.add(content_type)
            self.paths.add(path)
            self.spans.extend(spans)
            self._cond.notify_all()

    # -- waiting -----------------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[ReceivedSpan], bool], count: int = 1,
                 timeout_s: float = 15.0) -> list[ReceivedSpan]:
        """Block until `count` received spans satisfy `predicate` (woken by each request)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [s for s in self.spans if predicate(s)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, s.attributes.get("client.port")) for s in self.spans]
                    raise AssertionError(f"timed out waiting for {count} matching spans; have {names}")
                self._cond.wait(left)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]


def dead_endpoint(host: str = "127.0.0.1") -> str:
    """An endpoint URL on a port with no listener (connect is refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"http://{host}:{port}"


@contextmanager
def running_receiver(mode: str = "ok") -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver(mode=mode)
    endpoint = receiver.start()
    try:
        yield receiver, endpoint
    finally:
        receiver.stop()
