"""The relay on real loopback sockets (TCP and kernel MPTCP): byte-exact in both modes, splice
really used on MPTCP sockets, half-close, back-pressure, idle timeout, reset propagation and
initial bytes ordering."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Literal

import pytest
from helpers import pattern, recv_all, sha256
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


class Rig:
    """client_end <-> [relay client side | relay server side] <-> server_end."""

    def __init__(self, proto: int = 0) -> None:
        self.client_end, self.relay_client = _pair(proto)
        self.relay_server, self.server_end = _pair(proto)

    def relay(self, mode: Literal["splice", "buffered"], *, idle_timeout_s: float = 30.0, buffer_bytes: int = 65536,
              initial_up: bytes = b"") -> Relay:
        return Relay(
            self.relay_client, self.relay_server, mode=mode,
            idle_timeout_s=idle_timeout_s, pools=RelayPools(buffer_bytes), initial_up=initial_up,
        )

    def close(self) -> None:
        for s in (self.client_end, self.relay_client, self.relay_server, self.server_end):
            s.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _send_then_shutdown(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _transfer(rig: Rig, size: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Both directions at once; returns (up sent, up received, down sent, down received)."""
    up, down = pattern(1, size), pattern(2, size)
    results: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=_send_then_shutdown, args=(rig.client_end, up)),
        threading.Thread(target=_send_then_shutdown, args=(rig.server_end, down)),
        threading.Thread(target=lambda: results.__setitem__("up", recv_all(rig.server_end))),
        threading.Thread(target=lambda: results.__setitem__("down", recv_all(rig.client_end))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return up, results["up"], down, results["down"]


@pytest.mark.parametrize("mode", ["splice", "buffered"])
@pytest.mark.parametrize("proto", [0, pytest.param(MPTCP, marks=requires_mptcp)], ids=["tcp", "mptcp"])
async def test_byte_exact_both_directions(mode: Literal["splice", "buffered"], proto: int) -> None:
    rig = Rig(proto)
    try:
        relay = rig.relay(mode)
        relay.start()
        up, got_up, down, got_down = await asyncio.to_thread(_transfer, rig, 4_000_000)
        reason = await asyncio.wait_for(relay.wait(), 10)
        assert sha256(got_up) == sha256(up)
        assert sha256(got_down) == sha256(down)
        assert relay.bytes_up == relay.bytes_down == 4_000_000
        assert reason in (CloseReason.CLIENT_CLOSED, CloseReason.SERVER_CLOSED)
        # Splice must really have been used (no fallback), including from MPTCP sockets.
        assert relay.spliced is (mode == "splice")
        assert relay.held_buffers == 0
    finally:
        rig.close()


async def test_half_close_client_still_gets_full_reply(rig: Rig) -> None:
    relay = rig.relay("splice")
    relay.start()
    request = pattern(3, 100_000)
    reply = pattern(4, 2_000_000)

    def server() -> bytes:
        got = recv_all(rig.server_end)  # until the client's FIN arrives through the relay
        rig.server_end.sendall(reply)
        rig.server_end.close()
        return got

    def client() -> bytes:
        _send_then_shutdown(rig.client_end, request)
        return recv_all(rig.client_end)

    got_request, got_reply = await asyncio.gather(asyncio.to_thread(server), asyncio.to_thread(client))
    assert sha256(got_request) == sha256(request)
    assert sha256(got_reply) == sha256(reply)
    assert await asyncio.wait_for(relay.wait(), 10) == CloseReason.CLIENT_CLOSED


@pytest.mark.parametrize("mode", ["splice", "buffered"])
async def test_back_pressure_bounds_what_the_proxy_reads(mode: Literal["splice", "buffered"], rig: Rig) -> None:
    small = 32 * 1024
    for s in (rig.client_end, rig.relay_server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, small)
    for s in (rig.relay_client, rig.server_end):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
    relay = rig.relay(mode, buffer_bytes=65536)
    relay.start()
    data = pattern(5, 16_000_000)

    def send_until_blocked() -> int:
        # The server never reads: the sender must get stuck after a bounded amount.
        rig.client_end.settimeout(1.0)
        sent = 0
        try:
            while sent < len(data):
                sent += rig.client_end.send(data[sent : sent + 65536])
        except TimeoutError:
            pass
        return sent

    sent = await asyncio.to_thread(send_until_blocked)
    assert sent < 4_000_000, f"proxy kept reading without a reader: {sent} bytes accepted"
    assert relay.held_buffers <= 2
    # Now the server reads: everything arrives, in order, nothing lost or duplicated.
    rig.client_end.settimeout(None)

    def finish() -> bytes:
        t = threading.Thread(target=_send_then_shutdown, args=(rig.client_end, data[sent:]))
        t.start()
        got = recv_all(rig.server_end)
        t.join()
        return got

    got = await asyncio.to_thread(finish)
    assert sha256(got) == sha256(data)


async def test_idle_timeout_resets_both_sides(rig: Rig) -> None:
    """An idle timeout is an abort: both ends see a reset, never a clean end of stream that a
    client without length framing could take for a complete transfer."""
    relay = rig.relay("splice", idle_timeout_s=0.3)
    relay.start()
    assert await asyncio.wait_for(relay.wait(), 5) == CloseReason.IDLE_TIMEOUT
    rig.client_end.settimeout(5)
    rig.server_end.settimeout(5)
    with pytest.raises(ConnectionResetError):
        rig.client_end.recv(1)
    with pytest.raises(ConnectionResetError):
        rig.server_end.recv(1)


async def test_traffic_keeps_the_idle_timer_away(rig: Rig) -> None:
    relay = rig.relay("buffered", idle_timeout_s=0.4)
    relay.start()
    for i in range(8):  # 8 x 0.1 s of traffic spans twice the idle timeout
        await asyncio.to_thread(rig.client_end.sendall, bytes([i]))
        assert await asyncio.to_thread(rig.server_end.recv, 1) == bytes([i])
        await asyncio.sleep(0.1)
    assert not relay.done.done()
    relay.abort()
    assert await relay.wait() == CloseReason.DRAINED


async def test_server_reset_is_passed_on(rig: Rig) -> None:
    import struct

    relay = rig.relay("splice")
    relay.start()
    await asyncio.to_thread(rig.client_end.sendall, b"x")
    assert await asyncio.to_thread(rig.server_end.recv, 1) == b"x"
    rig.server_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rig.server_end.close()
    assert await asyncio.wait_for(relay.wait(), 5) == CloseReason.SERVER_RESET
    rig.client_end.settimeout(5)
    with pytest.raises(ConnectionResetError):
        rig.client_end.recv(1)


@pytest.mark.parametrize("mode", ["splice", "buffered"])
async def test_initial_bytes_go_first(mode: Literal["splice", "buffered"], rig: Rig) -> None:
    relay = rig.relay(mode, initial_up=b"early-")
    relay.start()
    await asyncio.to_thread(_send_then_shutdown, rig.client_end, b"later")
    got = await asyncio.to_thread(recv_all, rig.server_end)
    assert got == b"early-later"
    rig.server_end.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(relay.wait(), 5)
    assert relay.bytes_up == len(b"early-later")
