"""Helpers for the operations tests on the namespace lab: proxies started with OTEL_* variables,
an OTLP receiver inside the proxy's namespace, clients in the CPE namespace, `/metrics` parsed
with prometheus-client's own parser, and the proxy's JSON log lines."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from mcpool_proxy.cpe.convert_client import convert_connect
from mcpool_proxy.cpe.socks5_client import socks5_connect
from mcpool_tools.lab import Lab, ProxyProcess
from mcpool_tools.testserver import pattern_sha256, recv_all_sha256
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

T = TypeVar("T")

SERVER_PORT = 8000
MB = 1_000_000
POOL = "ops-pool"
POD_NAME = "ops-pool-0"
POD_NAMESPACE = "edge"

_ports = itertools.count(6000, 3)


def next_ports() -> tuple[int, int, int]:
    """(convert, socks5, admin) ports nobody else in this session uses."""
    base = next(_ports)
    return base, base + 1, base + 2


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set exactly these OTEL_*/POD_* variables (and no inherited ones) while a proxy starts:
    `Lab.popen` hands os.environ to the child."""
    names = [k for k in os.environ if k.startswith("OTEL_") or k.startswith("POD_")]
    saved = {k: os.environ[k] for k in names}
    for k in names:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


def start_proxy(lab: Lab, name: str, *, otel: Mapping[str, str] | None = None,
                **overrides: Any) -> tuple[ProxyProcess, tuple[int, int, int]]:
    """A proxy in the lab's MCP namespace on fresh ports; `otel` are its OTEL_* variables."""
    convert_port, socks_port, admin_port = next_ports()
    config: dict[str, Any] = {
        "listen": {"convert": f"[::]:{convert_port}", "socks5": f"[::]:{socks_port}"},
        "admin": f"127.0.0.1:{admin_port}",
        "policy": {"allowed_cpes": lab.cpe_prefixes},
        "affinity": {"pool": POOL},
        "log_level": "info",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    env = {"POD_NAME": POD_NAME, "POD_NAMESPACE": POD_NAMESPACE, **(otel or {})}
    with environment(env):
        handle = lab.start_proxy(config, name=name)
    return handle, (convert_port, socks_port, admin_port)


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: export promptly in tests
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",  # seconds
        **extra,
    }


# -- clients in the CPE namespace ------------------------------------------------------------------
def cpe_convert(lab: Lab, port: int, destination: tuple[str, int], **kwargs: Any) -> tuple[socket.socket, bytes]:
    with lab.in_netns("cpe"):
        sock, _reply, early = convert_connect((lab.mcp_ip, port), destination, **kwargs)
    sock.settimeout(60)
    return sock, early


def cpe_socks5(lab: Lab, port: int, destination: tuple[str, int], **kwargs: Any) -> socket.socket:
    with lab.in_netns("cpe"):
        sock = socks5_connect((lab.mcp_ip, port), destination, **kwargs)
    sock.settimeout(60)
    return sock


def download(sock: socket.socket, size: int, seed: int, early: bytes = b"") -> int:
    """Ask the test server for `size` pattern bytes, check their sha256; returns bytes sent up."""
    request = f"SEND {size} {seed}\n".encode()
    sock.sendall(request)
    digest, count = recv_all_sha256(sock, initial=early)
    assert count == size
    assert digest == pattern_sha256(seed, size), "downloaded content differs from the server's stream"
    return len(request)


def conn_entry(proxy: ProxyProcess, client_port: int) -> dict[str, Any] | None:
    for conn in proxy.connections():
        if int(conn["client"].rsplit(":", 1)[1]) == client_port:
            return conn
    return None


def wait_subflows(proxy: ProxyProcess, sock: socket.socket, count: int = 2) -> dict[str, Any]:
    """Wait until the proxy's /connections shows `count` subflows for this client socket."""
    port = sock.getsockname()[1]

    def check() -> dict[str, Any] | None:
        entry = conn_entry(proxy, port)
        return entry if entry is not None and len(entry["subflows"]) == count else None

    return wait_for(check, 10.0, f"{count} subflows for client port {port}")


# -- /metrics and logs -------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: ProxyProcess) -> Samples:
    """Every sample of /metrics, parsed by prometheus-client's parser."""
    status, body = proxy.admin_request("GET", "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def logs(proxy: ProxyProcess) -> list[dict[str, Any]]:
    entries = []
    for line in proxy.stderr_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries
