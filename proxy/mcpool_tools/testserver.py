"""A deterministic data server for the demo, the integration tests and the benchmark.

`python -m mcpool_tools.testserver --listen HOST:PORT [--mptcp]` prints `testserver ready` once
listening, then serves any number of concurrent connections. Each connection starts with one
request line (at most 256 bytes):

- `SEND <n> [seed]\\n`   the server sends `n` bytes of `pattern_bytes(seed, ...)` and closes.
- `SINK [n] [seed]\\n`   the server reads to EOF, answers `<sha256-hex> <count>\\n`, then sends `n`
                         pattern bytes (default 0) and closes: the client half-closes first and
                         must still receive the whole reply.
- `ECHO\\n`             echo every byte until EOF, then half-close.
- `GET /bytes/<n>[?seed=S] HTTP/1.x`  an HTTP/1.0-style response with `n` pattern bytes (for curl).

The byte stream is a function of (seed, offset) only, so a client verifies content with
`pattern_sha256(seed, n)` without holding the data. This module is also that client-side library;
it must not depend on the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import socket
import sys
from collections.abc import Iterator

from mcpool_proxy.config import split_hostport

__all__ = [
    "BLOCK_BYTES",
    "PatternReader",
    "main",
    "pattern_bytes",
    "pattern_chunks",
    "pattern_sha256",
    "recv_all_sha256",
    "send_pattern",
]

IPPROTO_MPTCP = 262
BLOCK_BYTES = 65536
STREAM_LIMIT_BYTES = 262_144
DEFAULT_SEED = 1


def _block(seed: int, index: int) -> bytes:
    # One independently seeded PRNG per 64 KiB block: any offset is cheap to regenerate, and no
    # block repeats another, so a skipped-and-replayed span can never look correct.
    return random.Random((seed << 40) | index).randbytes(BLOCK_BYTES)


def pattern_chunks(seed: int, n: int, offset: int = 0) -> Iterator[bytes]:
    """The stream's bytes [offset, offset+n) in chunks of at most BLOCK_BYTES."""
    end = offset + n
    pos = offset
    while pos < end:
        index, start = divmod(pos, BLOCK_BYTES)
        stop = min(BLOCK_BYTES, start + end - pos)
        yield _block(seed, index)[start:stop]
        pos += stop - start


def pattern_bytes(seed: int, n: int, offset: int = 0) -> bytes:
    """The stream's bytes [offset, offset+n) in one piece (fine for a few hundred MB)."""
    return b"".join(pattern_chunks(seed, n, offset))


def pattern_sha256(seed: int, n: int) -> str:
    """sha256 hex of the first n bytes of the stream for `seed`."""
    digest = hashlib.sha256()
    for chunk in pattern_chunks(seed, n):
        digest.update(chunk)
    return digest.hexdigest()


class PatternReader:
    """Incremental sha256 and count of received bytes (what a client verifies against)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def update(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        self.count += len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def send_pattern(sock: socket.socket, seed: int, n: int) -> None:
    """Blocking: send n pattern bytes on sock."""
    for chunk in pattern_chunks(seed, n):
        sock.sendall(chunk)


def recv_all_sha256(sock: socket.socket, bufsize: int = 262_144, initial: bytes = b"") -> tuple[str, int]:
    """Blocking: read to EOF; return (sha256 hex, byte count), counting `initial` first."""
    reader = PatternReader()
    reader.update(initial)
    buf = bytearray(bufsize)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(buf)
        if not got:
            return reader.hexdigest(), reader.count
        reader.update(view[:got])


async def _send_stream(writer: asyncio.StreamWriter, seed: int, n: int) -> None:
    for chunk in pattern_chunks(seed, n):
        writer.write(chunk)
        await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            writer.write(b"ERR request line too long\n")
            return
        except asyncio.IncompleteReadError:
            return
        words = line.decode("ascii", "replace").split()
        if not words:
            writer.write(b"ERR empty request\n")
            return
        verb = words[0].upper()
        if verb == "SEND" and 2 <= len(words) <= 3:
            seed = int(words[2]) if len(words) == 3 else DEFAULT_SEED
            await _send_stream(writer, seed, int(words[1]))
        elif verb == "SINK" and len(words) <= 3:
            reply_n = int(words[1]) if len(words) >= 2 else 0
            seed = int(words[2]) if len(words) == 3 else DEFAULT_SEED
            counted = PatternReader()
            while chunk := await reader.read(262_144):
                counted.update(chunk)
            writer.write(f"{counted.hexdigest()} {counted.count}\n".encode())
            await _send_stream(writer, seed, reply_n)
        elif verb == "ECHO" and len(words) == 1:
            while chunk := await reader.read(262_144):
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
        elif verb == "GET" and len(words) == 3 and words[1].startswith("/bytes/"):
            path, _, query = words[1][len("/bytes/"):].partition("?")
            seed = DEFAULT_SEED
            for item in query.split("&"):
                key, _, value = item.partition("=")
                if key == "seed":
                    seed = int(value)
            n = int(path)
            # Skip the request headers; the response does not depend on them.
            while await reader.readline() not in (b"\r\n", b"\n", b""):
                pass
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {n}\r\nConnection: close\r\n\r\n".encode()
            )
            await _send_stream(writer, seed, n)
        else:
            writer.write(b"ERR unknown request\n")
        await writer.drain()
    except (ConnectionError, ValueError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _listening_socket(host: str, port: int, mptcp: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proto = IPPROTO_MPTCP if mptcp else 0
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # "[::]" serves IPv4 too.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, mptcp: bool = False) -> None:
    sock = _listening_socket(host, port, mptcp)
    # The limit also sets the reader's buffer high-water mark (2x): keep it large for SINK.
    server = await asyncio.start_server(_handle, sock=sock, limit=STREAM_LIMIT_BYTES)
    print("testserver ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcpool_tools.testserver",
                                     description="deterministic data server (SEND/SINK/ECHO/HTTP GET)")
    parser.add_argument("--listen", required=True, help="HOST:PORT, e.g. [::]:8000")
    parser.add_argument("--mptcp", action="store_true", help="listen with IPPROTO_MPTCP")
    args = parser.parse_args(argv)
    host, port = split_hostport(args.listen)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, args.mptcp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
