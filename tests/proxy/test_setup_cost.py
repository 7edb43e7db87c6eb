"""What a proxied connection costs to set up (issue 12, point 3), checked on real sockets: the
per-connection socket options come from the listener (the accepted socket has them without a
setsockopt of its own), a short request and reply are copied rather than spliced (no pipe taken),
bulk is still spliced, and the event loop setting picks uvloop or asyncio."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest
from helpers import DataServer, ProxyThread, pattern, recv_all, sha256
from mcpool_proxy.cli import loop_factory
from mcpool_proxy.cpe.convert_client import convert_connect
from mcpool_proxy.relay import CloseReason, Relay, RelayPools
from support import requires_mptcp

MPTCP = 262


def _pair(proto: int) -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    return a, b


async def _exchange(proto: int, request: bytes, reply: bytes) -> tuple[Relay, bytes, bytes]:
    """client -> relay -> server: `request` up, `reply` down, both ends half-close."""
    client_end, relay_client = _pair(proto)
    relay_server, server_end = _pair(proto)
    relay = Relay(relay_client, relay_server, mode="splice", idle_timeout_s=30, pools=RelayPools(65536))
    relay.start()
    got: dict[str, bytes] = {}

    def side(sock: socket.socket, data: bytes, key: str) -> None:
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got[key] = recv_all(sock)
        sender.join(30)

    try:
        await asyncio.gather(asyncio.to_thread(side, client_end, request, "down"),
                             asyncio.to_thread(side, server_end, reply, "up"))
        assert await asyncio.wait_for(relay.wait(), 10) in (CloseReason.CLIENT_CLOSED, CloseReason.SERVER_CLOSED)
    finally:
        client_end.close()
        server_end.close()
    return relay, got["up"], got["down"]


@pytest.mark.parametrize("proto", [0, pytest.param(MPTCP, marks=requires_mptcp)], ids=["tcp", "mptcp"])
async def test_short_exchange_is_copied_without_a_pipe(proto: int) -> None:
    request, reply = pattern(1, 64), pattern(2, 256)
    relay, up, down = await _exchange(proto, request, reply)
    assert (up, down) == (request, reply)
    assert relay.bytes_up == 64 and relay.bytes_down == 256
    # No splice pipe was ever created for it: the pool allocates on first use only.
    assert relay.pools.pipes.allocated_bytes == 0
    assert relay.spliced  # the mode stays splice: bulk would be spliced


@pytest.mark.parametrize("proto", [0, pytest.param(MPTCP, marks=requires_mptcp)], ids=["tcp", "mptcp"])
async def test_bulk_after_a_short_start_is_spliced_byte_exact(proto: int) -> None:
    request, reply = pattern(3, 3_000_000), pattern(4, 100)
    relay, up, down = await _exchange(proto, request, reply)
    assert sha256(up) == sha256(request) and down == reply
    # The upload went through a pipe once it was past its first small reads.
    assert relay.pools.pipes.allocated_bytes > 0
    assert relay.spliced and relay.held_buffers == 0


@requires_mptcp
def test_accepted_socket_has_the_listeners_options(start_proxy: Any, data_server: DataServer) -> None:
    """TCP_NODELAY and keepalive (idle, interval, count) are set on the listener once and read
    back, as configured, on the proxy's side of an accepted MPTCP connection, which got no
    setsockopt of its own."""
    proxy: ProxyThread = start_proxy(limits={"keepalive_idle_s": 77, "keepalive_interval_s": 11,
                                             "keepalive_count": 5})
    listener = proxy.proxy._listeners["convert"]
    assert listener.fileno() in proxy.proxy._preset
    sock, _, _ = convert_connect(proxy.convert, data_server.address, early_data=b"ECHO\n", timeout_s=10)
    with sock:
        proxy.wait_for(lambda: len(proxy.proxy.table) == 1, what="the relayed connection")
        (conn,) = list(proxy.proxy.table)
        accepted = conn.relay.client
        assert accepted.proto == MPTCP
        options = [accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                   accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                   accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                   accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                   accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)]
        assert [bool(options[0]), bool(options[1]), *options[2:]] == [True, True, 77, 11, 5]
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_event_loop_setting() -> None:
    factory, name = loop_factory("asyncio")
    assert (factory, name) == (None, "asyncio")
    pytest.importorskip("uvloop")
    factory, name = loop_factory("auto")
    assert name == "uvloop" and factory is not None
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    assert loop_factory("uvloop")[1] == "uvloop"


async def test_a_convert_message_and_what_follows_it_in_one_read() -> None:
    """With `spill`, the first read takes what the client sent right behind its message: the
    message alone is returned and the rest kept, in order, for the relay (hs.pending); without
    it nothing past the message is read."""
    from mcpool_proxy.config import parse_config
    from mcpool_proxy.fronts.base import Handshake
    from mcpool_proxy.observe.telemetry import NOOP_TRACE

    def length_of(prefix: bytes) -> int:  # a 1-byte length prefix
        return 1 + prefix[0] if prefix else 1

    config = parse_config({})
    for spill, expect_pending in ((4096, b"request"), (0, b"")):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            theirs.sendall(b"\x03abc" + b"request")
            hs = Handshake(ours, ("127.0.0.1", 1), "convert", NOOP_TRACE, None, config, None, None)  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()
            assert await hs.read_message(length_of, loop.time() + 5, spill=spill) == b"\x03abc"
            assert hs.pending == expect_pending
            theirs.close()
            assert ours.recv(100) == (b"" if spill else b"request")
