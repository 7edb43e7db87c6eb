"""Fixtures for the affinity tests: a real redis-server, and network namespaces named `mtk-*`;
and the helpers several of them share (a poller of a director's in-memory state, its metric
samples, a probe run in an anonymous network namespace).

redis-server runs with persistence off in a temporary directory on a free port, optionally
inside a network namespace, and is killed at teardown whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis
from support import require_command

if TYPE_CHECKING:
    from mcpool_proxy.cluster.director import Director


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process that a test may kill and start again on the same port."""

    def __init__(self, workdir: Path, port: int, netns: str | None = None, bind: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.port = port
        self.netns = netns
        self.bind = bind
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "127.0.0.1") else self.bind
        return f"redis://{host}:{self.port}/0"

    def start(self) -> None:
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", self.bind, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
        ]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_answers()

    def _wait_until_answers(self, timeout_s: float = 10.0) -> None:
        cli = ["redis-cli", "-h", self.bind if self.bind != "0.0.0.0" else "127.0.0.1", "-p", str(self.port), "ping"]
        if self.netns:
            cli = ["ip", "netns", "exec", self.netns, *cli]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            if subprocess.run(cli, capture_output=True, text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.02)
        raise TimeoutError("redis-server did not answer PING")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cli(self, *args: str) -> str:
        host = self.bind if self.bind != "0.0.0.0" else "127.0.0.1"
        cmd = ["redis-cli", "-h", host, "-p", str(self.port), *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_command("redis-server", "redis-server")
    server = RedisServer(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def until(check: Callable[[], object], what: str, timeout_s: float = 10.0, step_s: float = 0.02) -> None:
    """Poll `check()` until it is true: a director's in-memory state (the feed signals nothing a
    test can await). The asyncio twin of support.wait_for, which would block the loop the feed
    runs on."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(step_s)


def sample(director: Director, name: str, **labels: str) -> float:
    """One sample of the director's metrics; 0 when it has none yet."""
    return director.metrics.registry.get_sample_value(name, labels) or 0.0


def run_unshared(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`python args...` in an anonymous network namespace of its own (`unshare -n`: nobody else's
    nft tables, queues or links), with this test run's import path; fails the test, with the
    probe's output, when it exits non-zero."""
    require_command("unshare", "util-linux")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(["unshare", "-n", sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
