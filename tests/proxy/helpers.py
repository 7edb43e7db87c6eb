"""Helpers for the proxy's loopback tests: a content-checking data server, a proxy running in a
background thread, free ports, a raw Convert client and network-namespace plumbing.

The data server speaks a one-line protocol so every test can check content by sha256:
`ECHO\\n` echoes until EOF then half-closes; `SINK\\n` reads to EOF and answers
"<sha256 hex> <count>\\n"; `SEND <n> <seed>\\n` sends `pattern(seed, n)` and closes.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from mcpool_proxy.codec.convert import (
    ConnectTLV,
    ConvertMessage,
    CookieTLV,
    decode_message,
    encode_message,
    message_length,
)
from mcpool_proxy.config import ProxyConfig, parse_config
from mcpool_proxy.server import Proxy


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Ports handed out by free_port(): each once per test run.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and stays free until the proxy binds it: taken below the kernel's
    ephemeral range (net.ipv4.ip_local_port_range starts at 32768), where no outgoing connection
    of another test can grab it in between, and never handed out twice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        port = random.randrange(20000, 32768)
        if port in _HANDED_OUT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-32767")


def recv_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = sock.recv(1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def send_and_shut(sock: socket.socket, data: bytes) -> None:
    """Send everything, then half-close (the peer sees EOF, we can still read)."""
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        if not b:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return buf


class DataServer:
    """Threaded content-checking server (see module docstring)."""

    def __init__(self, host: str = "127.0.0.1", *, mptcp: bool = False) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM, 262 if mptcp else 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.connections = 0
        self.peers: list[tuple[str, int]] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.peers.append(peer[:2])
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    b = conn.recv(1)
                    if not b:
                        return
                    line += b
                words = line.decode().split()
                if words[0] == "ECHO":
                    while True:
                        b = conn.recv(1 << 16)
                        if not b:
                            break
                        conn.sendall(b)
                    conn.shutdown(socket.SHUT_WR)
                    recv_all(conn)
                elif words[0] == "SINK":
                    h = hashlib.sha256()
                    count = 0
                    while True:
                        b = conn.recv(1 << 16)
                        if not b:
                            break
                        h.update(b)
                        count += len(b)
                    conn.sendall(f"{h.hexdigest()} {count}\n".encode())
                elif words[0] == "SEND":
                    conn.sendall(pattern(int(words[2]), int(words[1])))
                elif words[0] == "HOLD":
                    recv_all(conn)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def make_config(ports: dict[str, int], host: str = "127.0.0.1", **sections: Any) -> ProxyConfig:
    """A loopback test configuration; `sections` are merged into the YAML-like mapping."""
    h = f"[{host}]" if ":" in host else host
    data: dict[str, Any] = {
        "listen": {"convert": f"{h}:{ports['convert']}", "socks5": f"{h}:{ports['socks5']}"},
        "admin": f"127.0.0.1:{ports['admin']}",
        "policy": {
            "allowed_cpes": ["127.0.0.0/8", "::1/128"],
            # The test servers live on loopback, which the defaults refuse.
            "deny_default_destinations": False,
            "handshake_timeout_s": 2.0,
        },
        # Never touch the host's sysctls or nftables from loopback tests.
        "kernel": {"apply_sysctls": False, "admission_filter": False},
        "log_level": "debug",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


class ProxyThread:
    """A Proxy running on its own event loop in a background thread (tests use blocking clients)."""

    def __init__(self, config: ProxyConfig, **kwargs: Any) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.proxy = Proxy(config, **kwargs)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.proxy.start)

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        async def runner() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        return fut.result(timeout)

    @property
    def convert(self) -> tuple[str, int]:
        host, port = self.proxy.listen_addresses["convert"]
        return host, port

    @property
    def socks5(self) -> tuple[str, int]:
        host, port = self.proxy.listen_addresses["socks5"]
        return host, port

    def admin(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        assert self.config.admin is not None
        url = f"http://{self.config.admin}{path}"
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body: bytes = resp.read()
                return int(resp.status), body
        except urllib.error.HTTPError as exc:
            error_body: bytes = exc.read()
            return exc.code, error_body

    def admin_json(self, path: str) -> Any:
        status, body = self.admin(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self.call(predicate):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            self.call(self.proxy.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def raw_convert(
    converter: tuple[str, int],
    payload: bytes,
    *,
    shutdown: bool = False,
    timeout: float = 10.0,
) -> tuple[socket.socket, ConvertMessage | None, bytes]:
    """Send raw bytes as a Convert client would; return (socket, answer or None, bytes after it)."""
    family = socket.AF_INET6 if ":" in converter[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(converter)
    s.sendall(payload)
    if shutdown:
        s.shutdown(socket.SHUT_WR)
    head = b""
    while len(head) < 4:
        b = s.recv(4 - len(head))
        if not b:
            return s, None, head
        head += b
    total = message_length(head)
    assert total is not None
    body = recv_exact(s, total - 4)
    return s, decode_message(head + body), b""


def convert_request(destination: tuple[str, int], cookie: bytes | None = None) -> bytes:
    import ipaddress

    tlvs: list[Any] = [ConnectTLV(ipaddress.ip_address(destination[0]), destination[1])]
    if cookie is not None:
        tlvs.append(CookieTLV(cookie))
    data: bytes = encode_message(tlvs)
    return data


# -- network namespaces ----------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `name`: sockets created inside stay
    in it after the block. Only this thread moves (setns affects the calling thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot return to the original namespace: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)
