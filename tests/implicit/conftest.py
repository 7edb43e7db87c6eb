"""Fixtures for the implicit-mode tests: one `ImplicitLab` per test module (namespace prefix
`mti...`) with the MPTCP test server running; teardown always removes this module's namespaces."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
from implicit_e2e import SERVER_PORT
from mcpool_tools.lab import ImplicitLab


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[ImplicitLab]:
    suffix = zlib.crc32(request.module.__name__.encode()) % 1000
    with ImplicitLab(f"mti{suffix}") as built:
        built.start_testserver(f"[::]:{SERVER_PORT}", mptcp=True)
        yield built
