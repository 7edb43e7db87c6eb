"""The benchmark's load generator: one server and three clients, the same for every path measured.

`python -m bench.loadgen server|bulk|rate|idle ...`, run by `bench.dataplane` inside the lab's
namespaces, pinned to the load-generator core. Each client prints one JSON object on stdout; the
server prints `loadgen server ready` and then one JSON line per finished bulk transfer, so the
orchestrator can check that both ends counted exactly the same number of bytes.

A client reaches the server one of three ways, chosen by its options, so the direct, mcpool and
HAProxy runs differ only in the path and never in the generator:
- `--connect SRV:PORT` alone: an MPTCP connection straight to the server (or to a plain TCP proxy
  such as HAProxy, which forwards to a fixed backend);
- `--connect PROXY:5124 --convert-to SRV:PORT`: an MPTCP connection to an RFC 8803 converter that
  starts with a Convert message (the converter's reply is skipped and its length checked).

Hot loops are written for CPython's sake: preallocated buffers, `send`/`recv_into` on memoryviews,
raw `select.epoll` instead of asyncio for the connection-rate and idle clients and the rate server.
This module measures; it does not verify content (the bench does that separately with sha256).

Wire protocol (first bytes after any Convert message):
- bulk port: `U <id>\\n` then data until the client's FIN (server reports the count);
  `D <id>\\n`, the server sends until it reads any byte (`S`) or EOF, then FIN (server reports).
- rate port: `R` padded to REQUEST_BYTES -> RESPONSE_BYTES bytes and the server closes first;
  `I` padded likewise -> one byte `k` and the connection stays open until the client closes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import threading
import time
from typing import Any

from mcpool_proxy.config import split_hostport
from mcpool_proxy.cpe.convert_client import build_request, convert_connect

__all__ = ["REQUEST_BYTES", "RESPONSE_BYTES", "main", "raise_nofile"]

IPPROTO_MPTCP = 262
BULK_BUFFER_BYTES = 1 << 20
REQUEST_BYTES = 64
RESPONSE_BYTES = 256
RATE_REQUEST = b"R" + b"." * (REQUEST_BYTES - 2) + b"\n"
IDLE_REQUEST = b"I" + b"." * (REQUEST_BYTES - 2) + b"\n"
RESPONSE = bytes(range(256)) * (RESPONSE_BYTES // 256)
CONVERT_MAGIC = 0x2263
NOFILE_TARGET = 65536


def raise_nofile(target: int = NOFILE_TARGET) -> int:
    """Raise RLIMIT_NOFILE to `target` (the hard limit too where CAP_SYS_RESOURCE allows, else up
    to the hard limit); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listener(host: str, port: int, mptcp: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(65535)
    return sock


# ---- server -------------------------------------------------------------------------------------

_print_lock = threading.Lock()


def _emit(obj: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _bulk_connection(conn: socket.socket) -> None:
    buf = bytearray(BULK_BUFFER_BYTES)
    view = memoryview(buf)
    try:
        header = b""
        while b"\n" not in header:
            chunk = conn.recv(256)
            if not chunk:
                return
            header += chunk
        line, _, rest = header.partition(b"\n")
        verb, ident = line.decode().split()
        if verb == "U":
            count = len(rest)
            while got := conn.recv_into(buf):
                count += got
            _emit({"id": ident, "dir": "up", "bytes": count})
        elif verb == "D":
            count = 0
            stop = bool(rest)
            while not stop:
                count += conn.send(view)
                try:
                    # Any byte (or EOF) from the client ends the download; checking once per
                    # megabyte costs one cheap syscall.
                    conn.recv(16, socket.MSG_DONTWAIT)
                    stop = True
                except BlockingIOError:
                    pass
            conn.shutdown(socket.SHUT_WR)
            _emit({"id": ident, "dir": "down", "bytes": count})
            while conn.recv_into(buf):
                pass
    except OSError as exc:
        _emit({"error": f"bulk: {exc}"})
    finally:
        conn.close()


def _bulk_acceptor(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_bulk_connection, args=(conn,), daemon=True).start()


def _rate_server(listeners: list[socket.socket]) -> None:
    """Accept, answer the request, close (R) or hold (I): one epoll loop for every connection."""
    ep = select.epoll()
    by_fd: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    listen_fds = {s.fileno(): s for s in listeners}
    for s in listeners:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
    while True:
        for fd, _ in ep.poll():
            lst = listen_fds.get(fd)
            if lst is not None:
                while True:
                    try:
                        conn, _ = lst.accept()
                    except BlockingIOError:
                        break
                    except OSError:
                        break  # e.g. EMFILE: the client sees the failure and reports it
                    conn.setblocking(False)
                    by_fd[conn.fileno()] = conn
                    ep.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = by_fd[fd]
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if data:
                got = pending.pop(fd, b"") + data
                if len(got) < REQUEST_BYTES:
                    pending[fd] = got
                    continue
                if got[:1] == b"R":
                    try:
                        conn.send(RESPONSE)
                    except OSError:
                        pass
                else:
                    try:
                        conn.send(b"k")
                    except OSError:
                        pass
                    continue
            pending.pop(fd, None)
            ep.unregister(fd)
            del by_fd[fd]
            conn.close()


def serve(host: str, ports: dict[str, int]) -> None:
    raise_nofile()
    bulk = [_listener(host, ports["bulk_mptcp"], True), _listener(host, ports["bulk_tcp"], False)]
    rate = [_listener(host, ports["rate_mptcp"], True), _listener(host, ports["rate_tcp"], False)]
    for listener in bulk:
        threading.Thread(target=_bulk_acceptor, args=(listener,), daemon=True).start()
    _emit({"ready": True})
    print("loadgen server ready", flush=True)
    _rate_server(rate)


# ---- client side --------------------------------------------------------------------------------


class Target:
    """Where a client connects and what it sends first."""

    def __init__(self, connect: str, convert_to: str | None) -> None:
        self.host, self.port = split_hostport(connect)
        self.address = (self.host, self.port)
        self.family = _family(self.host)
        self.convert_to = split_hostport(convert_to) if convert_to else None
        self.preamble = build_request(self.convert_to) if self.convert_to else b""

    def open_blocking(self, timeout_s: float = 10.0) -> tuple[socket.socket, bytes]:
        """A connected blocking socket and the bytes already received after any Convert reply."""
        if self.convert_to is not None:
            sock, _, rest = convert_connect(self.address, self.convert_to, timeout_s=timeout_s)
            return sock, rest
        sock = socket.socket(self.family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        sock.settimeout(timeout_s)
        sock.connect(self.address)
        sock.settimeout(None)
        return sock, b""


def bulk(target: Target, direction: str, seconds: float, ident: str) -> dict[str, Any]:
    buf = bytearray(os.urandom(BULK_BUFFER_BYTES))
    view = memoryview(buf)
    sock, rest = target.open_blocking()
    try:
        sock.sendall(f"{'U' if direction == 'up' else 'D'} {ident}\n".encode())
        start = time.monotonic()
        deadline = start + seconds
        count = 0
        if direction == "up":
            if rest:
                raise RuntimeError(f"unexpected {len(rest)} bytes from the server")
            send = sock.send
            while time.monotonic() < deadline:
                count += send(view)
            sock.shutdown(socket.SHUT_WR)
            # The server closes after reading everything: the clock stops when it has all of it.
            extra = 0
            while got := sock.recv_into(buf):
                extra += got
            if extra:
                raise RuntimeError(f"server sent {extra} bytes during an upload")
        else:
            count = len(rest)
            recv_into = sock.recv_into
            while time.monotonic() < deadline:
                got = recv_into(buf)
                if not got:
                    raise RuntimeError("server closed before the client asked it to stop")
                count += got
            sock.send(b"S")
            while got := recv_into(buf):
                count += got
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    return {"id": ident, "dir": direction, "bytes": count, "seconds": elapsed,
            "gbit_s": count * 8 / elapsed / 1e9}


class _EpollClient:
    """Non-blocking connects with a bounded number in flight, driven by one epoll loop."""

    def __init__(self, target: Target, request: bytes) -> None:
        self.target = target
        self.payload = target.preamble + request
        self.ep = select.epoll()
        # fd -> [socket, bytes received, first bytes (for the Convert reply length), started]
        self.conns: dict[int, list[Any]] = {}
        self.errors = 0
        self.error_samples: list[str] = []
        self.buf = bytearray(65536)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text)

    def start_one(self) -> None:
        sock = socket.socket(self.target.family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        sock.setblocking(False)
        rc = sock.connect_ex(self.target.address)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.error(f"connect: {os.strerror(rc)}")
            return
        fd = sock.fileno()
        self.conns[fd] = [sock, 0, b"", time.monotonic()]
        self.ep.register(fd, select.EPOLLOUT)

    def expected_prefix(self, first: bytes) -> int | None:
        """Length of the converter's reply given its first bytes (None: not enough bytes yet)."""
        if self.target.convert_to is None:
            return 0
        if len(first) < 4:
            return None
        if first[0] != 1 or int.from_bytes(first[2:4], "big") != CONVERT_MAGIC:
            return -1
        return first[1] * 4

    def on_event(self, fd: int, ev: int) -> tuple[str, int] | None:
        """Advance one connection; returns ('eof', total bytes) when the server closed it,
        ('data', total) after new bytes, ('error', 0) on failure, or None (nothing to report)."""
        state = self.conns[fd]
        sock: socket.socket = state[0]
        if ev & select.EPOLLOUT:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(fd)
                self.error(f"connect: {os.strerror(err)}")
                return ("error", 0)
            try:
                sock.send(self.payload)
            except OSError as exc:
                self.close(fd)
                self.error(f"send: {exc}")
                return ("error", 0)
            self.ep.modify(fd, select.EPOLLIN)
            return None
        try:
            got = sock.recv_into(self.buf)
        except OSError as exc:
            self.close(fd)
            self.error(f"recv: {exc}")
            return ("error", 0)
        if got == 0:
            return ("eof", state[1])
        if len(state[2]) < 4:
            state[2] += bytes(self.buf[: 4 - len(state[2])])
        state[1] += got
        return ("data", state[1])

    def close(self, fd: int) -> None:
        state = self.conns.pop(fd)
        self.ep.unregister(fd)
        state[0].close()


def rate(target: Target, seconds: float, concurrency: int, per_s: float | None = None) -> dict[str, Any]:
    """Connections for `seconds`, at most `concurrency` in flight; with `per_s`, paced: a new one
    starts only when the schedule of `per_s` a second allows (an open loop below saturation, so
    the CPU a connection costs is measured at a load every path can carry)."""
    client = _EpollClient(target, RATE_REQUEST)
    done = 0
    started = 0
    durations: list[float] = []  # connect to the server's close, per completed connection
    start = time.monotonic()
    deadline = start + seconds

    def due(now: float) -> bool:
        return per_s is None or started < (now - start) * per_s + 1

    for _ in range(concurrency):
        if not due(start):
            break
        client.start_one()
        started += 1
    now = start
    while client.conns or (per_s is not None and now < deadline):
        if per_s is not None:
            # Start what the schedule owes (within the in-flight bound), then sleep in poll
            # until the next start is due or an event arrives.
            while now < deadline and len(client.conns) < concurrency and due(now):
                client.start_one()
                started += 1
            wait = max(0.0, min(1.0, (started - (now - start) * per_s) / per_s)) if now < deadline else 1.0
        else:
            wait = 1.0
        for fd, ev in client.ep.poll(wait):
            if fd not in client.conns:
                continue
            result = client.on_event(fd, ev)
            if result is None or result[0] == "data":
                continue
            if result[0] == "eof":
                state = client.conns[fd]
                prefix = client.expected_prefix(state[2])
                client.close(fd)
                if prefix is None or prefix < 0 or result[1] != prefix + RESPONSE_BYTES:
                    client.error(f"got {result[1]} bytes, expected reply {prefix} + {RESPONSE_BYTES}")
                else:
                    done += 1
                    durations.append(time.monotonic() - state[3])
            if now < deadline and per_s is None:
                client.start_one()
        now = time.monotonic()
        if now >= deadline and not client.conns:
            break
    elapsed = time.monotonic() - start
    durations.sort()

    def quantile(q: float) -> float | None:
        return round(durations[min(len(durations) - 1, int(q * len(durations)))] * 1e3, 3) if durations else None

    return {"connections": done, "errors": client.errors, "error_samples": client.error_samples,
            "seconds": elapsed, "per_s": done / elapsed, "latency_ms_p50": quantile(0.5),
            "latency_ms_p99": quantile(0.99)}


def idle(target: Target, count: int, concurrency: int) -> int:
    """Open `count` connections that the server acknowledged end to end, report, hold them until
    a line on stdin, close them all."""
    client = _EpollClient(target, IDLE_REQUEST)
    established: set[int] = set()
    started = 0
    start = time.monotonic()
    deadline = start + 120.0
    while started < min(concurrency, count):
        client.start_one()
        started += 1
    while len(established) + client.errors < count and time.monotonic() < deadline:
        for fd, ev in client.ep.poll(1.0):
            if fd not in client.conns or fd in established:
                continue
            result = client.on_event(fd, ev)
            if result is None:
                continue
            if result[0] == "data":
                state = client.conns[fd]
                prefix = client.expected_prefix(state[2])
                if prefix is None or result[1] < prefix + 1:
                    continue
                if prefix < 0 or result[1] != prefix + 1:
                    client.close(fd)
                    client.error(f"got {result[1]} bytes, expected reply {prefix} + 1")
                else:
                    established.add(fd)
                    # Idle from now on: stop watching it, so it costs nothing here either.
                    client.ep.unregister(fd)
            elif result[0] == "eof":
                client.close(fd)
                client.error("closed before the server acknowledged")
            if started < count:
                client.start_one()
                started += 1
    elapsed = time.monotonic() - start
    _emit({"established": len(established), "errors": client.errors,
           "error_samples": client.error_samples, "seconds": elapsed})
    sys.stdin.readline()
    for fd in list(client.conns):
        state = client.conns.pop(fd)
        state[0].close()
    _emit({"closed": len(established)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--host", default="0.0.0.0")
    for name, default in (("bulk-mptcp", 7001), ("bulk-tcp", 7002), ("rate-mptcp", 7003), ("rate-tcp", 7004)):
        srv.add_argument(f"--{name}", type=int, default=default)
    for name in ("bulk", "rate", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--connect", required=True, metavar="HOST:PORT")
        p.add_argument("--convert-to", metavar="HOST:PORT", help="send a Convert message for this destination")
        if name == "bulk":
            p.add_argument("--direction", choices=["up", "down"], required=True)
            p.add_argument("--seconds", type=float, default=5.0)
            p.add_argument("--id", default="0")
        if name == "rate":
            p.add_argument("--seconds", type=float, default=5.0)
            p.add_argument("--concurrency", type=int, default=64)
            p.add_argument("--per-s", type=float, default=None, help="pace new connections to this many a second")
        if name == "idle":
            p.add_argument("--count", type=int, default=10_000)
            p.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args(argv)
    if args.command == "server":
        serve(args.host, {"bulk_mptcp": args.bulk_mptcp, "bulk_tcp": args.bulk_tcp,
                          "rate_mptcp": args.rate_mptcp, "rate_tcp": args.rate_tcp})
        return 0
    raise_nofile()
    target = Target(args.connect, args.convert_to)
    if args.command == "bulk":
        _emit(bulk(target, args.direction, args.seconds, args.id))
    elif args.command == "rate":
        _emit(rate(target, args.seconds, args.concurrency, args.per_s))
    else:
        return idle(target, args.count, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
