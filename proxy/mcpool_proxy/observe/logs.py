"""Structured logging for every mcpool process: JSON lines on stderr when it is not a terminal
(a pod's log collector), readable text when it is (a person at a shell).

A log call adds structured fields with `extra={"fields": {...}}`; they become top-level keys of
the JSON object (or `key=value` pairs in text). `log_connection_closed` writes the one line per
connection close, with the same fields as the connection's span plus `trace_id` and `span_id`, so
a log line leads to its trace and back.

It must not format anything expensive per byte: the proxy logs at connection events only.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "log_connection_closed"]

CONNECTION_CLOSED = "connection closed"

# What json.dumps(entry, default=str, separators=(",", ":")) would build on every call; one
# encoder serves every line (it keeps no state between calls). default=str: an address object or
# enum in a field must not lose the whole line.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (Unix seconds), level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


def configure_logging(level: str, *, json_logs: bool | None = None, stream: IO[str] | None = None) -> None:
    """Send every logger to `stream` (stderr): JSON when it is not a terminal, unless told."""
    out = sys.stderr if stream is None else stream
    if json_logs is None:
        json_logs = not out.isatty()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request access lines of the admin server would drown the connection lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The OTLP exporter logs every failed export, often with a traceback: with a dead collector
    # that is a few lines per batch. Failures are counted (mcpool_otel_spans_dropped_total) and
    # telemetry.py logs once when exporting starts failing and once when it recovers.
    logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.CRITICAL)


def log_connection_closed(
    logger: logging.Logger,
    fields: Mapping[str, Any],
    *,
    trace_id: str | None,
    span_id: str | None,
    error: str | None = None,
) -> None:
    """The one line per closed connection: `fields` (as on the span, None values left out),
    `trace_id`/`span_id` when the connection was traced, `error` if it ended in one."""
    if not logger.isEnabledFor(logging.INFO):
        return
    entry = {k: v for k, v in fields.items() if v is not None}
    if error is not None:
        entry["error.type"] = error
    if trace_id is not None:
        entry["trace_id"] = trace_id
        entry["span_id"] = span_id
    logger.info(CONNECTION_CLOSED, extra={"fields": entry})
