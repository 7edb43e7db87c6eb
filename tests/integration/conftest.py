"""Fixtures for the end-to-end tests: one lab per test module (namespace prefix `mtc...`), test
servers in its server namespace and a proxy in its MCP namespace. Teardown always runs, and
removes only this module's namespaces and the processes running in them."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
from e2e import MPTCP_SERVER_PORT, SERVER_PORT, proxy_config
from mcpool_tools.lab import Lab, ProxyProcess, Topology


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    # One prefix per module, stable across runs, so a crashed run's leftovers are removed by the
    # next run of the same module (`Lab.up` starts with `down`).
    suffix = zlib.crc32(request.module.__name__.encode()) % 1000
    with Lab(Topology(prefix=f"mtc{suffix}")) as built:
        built.start_testserver(f"[::]:{SERVER_PORT}")
        built.start_testserver(f"[::]:{MPTCP_SERVER_PORT}", mptcp=True)
        yield built


@pytest.fixture(scope="module")
def proxy(lab: Lab) -> Iterator[ProxyProcess]:
    handle = lab.start_proxy(proxy_config(lab), name="main")
    yield handle
    handle.stop()
