"""Hostile and honest clients for the proxy's denial-of-service tests and benchmark, each bounded
in count and time and meant for loopback or the caller's own network namespaces only.

`python -m mcpool_tools.flood MODE [options]` runs one client and prints one JSON line of results:

- `transfer`: an allowed CPE doing Convert (or, `--protocol socks5`, SOCKS5) transfers back to
  back (`SEND n seed` to the test data server), each checked by sha256; throughput, transfers,
  bad transfers, errors;
- `strangers`: connections from random addresses of a prefix outside `policy.allowed_cpes`, at a
  target rate, each held open silently (up to `--hold` at once, the oldest closed first);
- `cpe-flood`: one allowed address opening connections as fast as it can, held silently (up to
  `--hold`), i.e. one CPE trying to take every handshake slot;
- `slowloris`: `--count` connections that send a Convert message (or SOCKS5 greeting) one byte
  at a time, never completing it.

The caller picks the namespace (`ip netns exec NS python -m mcpool_tools.flood ...`).
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import ipaddress
import json
import random
import resource
import socket
import sys
import time
from typing import Any

from mcpool_proxy.config import split_hostport

__all__ = ["main"]

IPPROTO_MPTCP = 262


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def transfer(target: tuple[str, int], dest: tuple[str, int], source: str, duration_s: float, size: int,
             pattern: str = "testserver", protocol: str = "convert") -> dict[str, Any]:  # fmt: skip
    """`pattern`: whose byte pattern the data server sends: `testserver` (mcpool_tools.testserver)
    or `random` (random.Random(seed).randbytes, the proxy tests' data server). `protocol`: the
    listener's, `convert` or `socks5`."""
    from mcpool_proxy.cpe.convert_client import convert_connect
    from mcpool_proxy.cpe.socks5_client import socks5_connect

    def open_transfer(request: bytes) -> tuple[socket.socket, bytes]:
        if protocol == "socks5":
            sock = socks5_connect(target, dest, source=source, timeout_s=10)
            sock.sendall(request)
            return sock, b""
        sock, _, early = convert_connect(target, dest, source=source, early_data=request, timeout_s=10)
        return sock, early

    from .testserver import pattern_sha256

    started = time.monotonic()
    deadline = started + duration_s
    transfers = bad = errors = 0
    moved = 0
    slowest = 0.0
    seed = 0
    last_error = ""
    while time.monotonic() < deadline:
        seed += 1
        want = pattern_sha256(seed, size) if pattern == "testserver" else hashlib.sha256(_pattern(seed, size)).hexdigest()
        t0 = time.monotonic()
        try:
            sock, early = open_transfer(f"SEND {size} {seed}\n".encode())
            with sock:
                sock.settimeout(10)
                h = hashlib.sha256(early)
                got = len(early)
                while True:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    h.update(chunk)
                    got += len(chunk)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors += 1
            last_error = repr(exc)
            continue
        slowest = max(slowest, time.monotonic() - t0)
        transfers += 1
        moved += got
        if got != size or h.hexdigest() != want:
            bad += 1
    seconds = time.monotonic() - started
    return {"mode": "transfer", "protocol": protocol, "transfers": transfers, "bad": bad, "errors": errors, "bytes": moved,
            "seconds": round(seconds, 3), "mbit_per_s": round(moved * 8 / seconds / 1e6, 1),
            "slowest_transfer_s": round(slowest, 3), "last_error": last_error}  # fmt: skip


def _random_source(net: ipaddress.IPv4Network | ipaddress.IPv6Network, rng: random.Random) -> str:
    span = max(net.num_addresses - 2, 1)
    return str(net.network_address + 1 + rng.randrange(span))


def _flood(target: tuple[str, int], pick_source: Any, duration_s: float, rate: float, hold: int,
           mode: str) -> dict[str, Any]:  # fmt: skip
    held: collections.deque[socket.socket] = collections.deque()
    started = time.monotonic()
    deadline = started + duration_s
    attempts = failures = 0
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = started
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if interval and now < next_at:
                time.sleep(min(next_at - now, 0.01))
                continue
            next_at += interval
            s = socket.socket(_family(target[0]), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.bind((pick_source(), 0))
                err = s.connect_ex(target)
            except OSError as exc:
                err = exc.errno or -1
            attempts += 1
            if err not in (0, errno.EINPROGRESS):
                failures += 1
                s.close()
                continue
            held.append(s)
            while len(held) > hold:
                held.popleft().close()
    finally:
        # How many of the held connections the proxy completed (SYN-ACK came: connected).
        connected = 0
        for s in held:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    s.getpeername()
                    connected += 1
                except OSError:
                    pass
            s.close()
    seconds = time.monotonic() - started
    return {"mode": mode, "attempts": attempts, "failures": failures, "seconds": round(seconds, 3),
            "per_s": round(attempts / seconds, 1), "held_connected_at_end": connected, "held": min(hold, attempts)}


def strangers(target: tuple[str, int], prefix: str, duration_s: float, rate: float, hold: int) -> dict[str, Any]:
    net = ipaddress.ip_network(prefix)
    rng = random.Random(1)
    return _flood(target, lambda: _random_source(net, rng), duration_s, rate, hold, "strangers")


def cpe_flood(target: tuple[str, int], source: str, duration_s: float, rate: float, hold: int) -> dict[str, Any]:
    return _flood(target, lambda: source, duration_s, rate, hold, "cpe-flood")


# What slowloris dribbles, one byte at a time, never complete: a Convert message announcing 255
# words (version 1, magic 0x2263), or a SOCKS5 greeting announcing 255 methods.
_SLOW_PAYLOADS = {"convert": bytes([1, 255, 0x22, 0x63]) + bytes(1016), "socks5": bytes([5, 255]) + bytes(255)}


def slowloris(target: tuple[str, int], source: str, count: int, duration_s: float,
              protocol: str = "convert") -> dict[str, Any]:  # fmt: skip
    """`count` connections dribbling an incomplete handshake of `protocol`."""
    header = _SLOW_PAYLOADS[protocol]
    conns: list[tuple[socket.socket, int]] = []
    closed_by_proxy = 0
    started = time.monotonic()
    for _ in range(count):
        s = socket.socket(_family(target[0]), socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.bind((source, 0))
            s.connect(target)
        except OSError:
            s.close()
            closed_by_proxy += 1
            continue
        s.setblocking(False)
        conns.append((s, 0))
    while conns and time.monotonic() - started < duration_s:
        still: list[tuple[socket.socket, int]] = []
        for s, sent in conns:
            try:
                if s.recv(4096) == b"":
                    raise ConnectionError("closed")
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                closed_by_proxy += 1
                continue
            try:
                if sent < len(header):
                    s.send(header[sent : sent + 1])
                    sent += 1
            except OSError:
                s.close()
                closed_by_proxy += 1
                continue
            still.append((s, sent))
        conns = still
        time.sleep(0.2)
    for s, _ in conns:
        s.close()
    return {"mode": "slowloris", "count": count, "closed_by_proxy": closed_by_proxy,
            "open_at_end": len(conns), "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcpool_tools.flood", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["transfer", "strangers", "cpe-flood", "slowloris"])
    parser.add_argument("--target", required=True, help="the proxy's listener, host:port")
    parser.add_argument("--dest", help="transfer: the data server, host:port")
    parser.add_argument("--source", help="transfer, cpe-flood, slowloris: the client address")
    parser.add_argument("--prefix", help="strangers: the prefix their addresses are drawn from")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds (at most 120)")
    parser.add_argument("--rate", type=float, default=0.0, help="connections per second (0: as fast as possible)")
    parser.add_argument("--hold", type=int, default=1000, help="connections held open at once (at most 20000)")
    parser.add_argument("--count", type=int, default=100, help="slowloris connections (at most 5000)")
    parser.add_argument("--size", type=int, default=1_000_000, help="transfer: bytes per transfer")
    parser.add_argument("--protocol", choices=sorted(_SLOW_PAYLOADS), default="convert",
                        help="slowloris: whose handshake to dribble; transfer: through which listener")
    parser.add_argument("--pattern", choices=["testserver", "random"], default="testserver",
                        help="transfer: the data server's byte pattern")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65536):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    duration = min(args.duration, 120.0)
    target = split_hostport(args.target)
    if args.mode == "transfer":
        result = transfer(target, split_hostport(args.dest), args.source, duration, args.size, args.pattern,
                          args.protocol)  # fmt: skip
    elif args.mode == "strangers":
        result = strangers(target, args.prefix, duration, args.rate, min(args.hold, 20_000))
    elif args.mode == "cpe-flood":
        result = cpe_flood(target, args.source, duration, args.rate, min(args.hold, 20_000))
    else:
        result = slowloris(target, args.source, min(args.count, 5000), duration, args.protocol)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
