"""The kernel's MPTCP netlink events as a token source, against the real kernel.

The token published for a server-side connection must be the one the kernel reports in
MPTCP_INFO for the accepted socket (the token a client's MP_JOIN carries), it must be in the
registry before userspace accept() returns, and client-side connections must not be published.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from conftest import free_port
from mcpool_proxy.cluster import (
    MemoryRegistry,
    MptcpEventListener,
    RegistrationResult,
    publish_tokens,
)
from mcpool_proxy.kernel.mptcp_events import parse_messages
from support import requires_netns

pytestmark = requires_netns
IPPROTO_MPTCP = 262


class ObservedRegistry(MemoryRegistry):
    """A memory registry that signals each change, so the test awaits instead of polling."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.changed = asyncio.Event()

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        result = await super().register_connection(token, cpe)
        self.changed.set()
        return result

    async def unregister_connection(self, token: int, cpe: str | None = None) -> None:
        await super().unregister_connection(token, cpe)
        self.changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def token_of(sock: socket.socket) -> int:
    token: int = struct.unpack_from("=I", sock.getsockopt(284, 1, 64), 12)[0]
    return token


async def test_created_event_publishes_the_server_token_before_accept() -> None:
    port = free_port()
    registry = ObservedRegistry("pod-a")
    listener = MptcpEventListener()
    listener.open()
    publisher = asyncio.create_task(publish_tokens(registry, listener, local_ports={port}))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    try:
        server.bind(("127.0.0.1", port))
        server.listen()
        # Loopback: the handshake completes inside connect(), before the loop reads any event.
        client.connect(("127.0.0.1", port))
        # The kernel created the connection; wait for its event to be published, *then* accept.
        await registry.wait_until(lambda: bool(registry.live_connections()))
        accepted, _ = server.accept()
        server_token = token_of(accepted)
        assert dict(registry.live_connections()) == {server_token: "127.0.0.1"}
        assert token_of(client) not in registry.live_connections()  # client side: not ours
        assert registry.store.tokens == {server_token: "pod-a"}

        accepted.close()
        client.close()
        await registry.wait_until(lambda: not registry.live_connections())
        assert registry.store.tokens == {}
    finally:
        publisher.cancel()
        listener.close()
        server.close()
        client.close()


def test_parse_messages_ignores_other_families_and_truncation() -> None:
    # nlmsghdr(len=16+4, type=0x99) + genl header, cmd 1 (created), no attributes.
    msg = struct.pack("=IHHII", 20, 0x99, 0, 0, 0) + bytes([1, 1, 0, 0])
    assert [e.kind for e in parse_messages(msg, 0x99)] == ["created"]
    assert parse_messages(msg, 0x98) == []
    assert parse_messages(msg[:10], 0x99) == []
    # A token attribute (type 1, u32) and a truncated attribute after it.
    attrs = struct.pack("=HHI", 8, 1, 0xCAFEF00D) + struct.pack("=HH", 40, 5)
    msg = struct.pack("=IHHII", 16 + 4 + len(attrs), 0x99, 0, 0, 0) + bytes([3, 1, 0, 0]) + attrs
    (event,) = parse_messages(msg, 0x99)
    assert (event.kind, event.token, event.saddr) == ("closed", 0xCAFEF00D, None)
