"""Fixtures for the proxy's own tests: a data server, free ports and in-process proxies that are
always stopped, even when a test fails."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import DataServer, ProxyThread, free_port, make_config  # noqa: E402


@pytest.fixture
def data_server() -> Iterator[DataServer]:
    server = DataServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., ProxyThread]]:
    """start_proxy(**config_sections) -> a running ProxyThread on fresh loopback ports."""
    started: list[ProxyThread] = []

    def start(*, host: str = "127.0.0.1", own_addresses: Any = (), **sections: Any) -> ProxyThread:
        ports = {"convert": free_port(host), "socks5": free_port(host), "admin": free_port()}
        proxy = ProxyThread(make_config(ports, host, **sections), own_addresses=own_addresses)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
