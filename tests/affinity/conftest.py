"""Fixtures for the affinity tests: a real redis-server, and network namespaces named `mtk-*`.

redis-server runs with persistence off in a temporary directory on a free port, optionally
inside a network namespace, and is killed at teardown whatever happened.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require_command


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
