"""The kernel's MPTCP netlink events as a token source, against the real kernel.

The token published for a server-side connection must be the one the kernel reports in
MPTCP_INFO for the accepted socket (the token a client's MP_JOIN carries), it must be in the
registry before userspace accept() returns, and client-side connections must not be published.
One `mptcp_pm` subscription per process serves both the token publisher and the subflow watcher.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from conftest import RedisServer, free_port
from mcpool_proxy.cluster import MemoryRegistry, RegistrationResult
from mcpool_proxy.cluster.podside import publish_tokens
from mcpool_proxy.config import parse_config
from mcpool_proxy.cpe.convert_client import convert_connect
from mcpool_proxy.kernel.mptcp_events import (
    MptcpEvent,
    MptcpEventHub,
    MptcpEventListener,
    parse_messages,
)
from mcpool_proxy.observe.telemetry import SubflowWatcher
from mcpool_proxy.server import Proxy, start_affinity
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


class CountingListeners:
    """A listener factory for `MptcpEventHub` that remembers every netlink socket it opened."""

    def __init__(self) -> None:
        self.made: list[MptcpEventListener] = []

    def __call__(self) -> MptcpEventListener:
        listener = MptcpEventListener()
        self.made.append(listener)
        return listener


class ObservedWatcher(SubflowWatcher):
    """A subflow watcher that signals each event it applies."""

    def __init__(self, listen_ports: set[int]) -> None:
        super().__init__(listen_ports)
        self.changed = asyncio.Event()

    def handle_event(self, event: MptcpEvent) -> None:
        super().handle_event(event)
        self.changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def test_one_subscription_serves_the_token_publisher_and_the_subflow_watcher() -> None:
    port = free_port()
    listeners = CountingListeners()
    hub = MptcpEventHub(listeners)
    registry = ObservedRegistry("pod-a")
    watcher = ObservedWatcher({port})
    watching = asyncio.create_task(watcher.run(hub))
    subscription = hub.subscribe()
    publisher = asyncio.create_task(publish_tokens(registry, subscription, local_ports={port}))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    try:
        server.bind(("127.0.0.1", port))
        server.listen()
        client.connect(("127.0.0.1", port))
        # Neither consumer is told about the connection but by the kernel's events: the
        # publisher registers its token, the watcher starts following its subflows.
        await registry.wait_until(lambda: bool(registry.live_connections()))
        accepted, _ = server.accept()
        server_token = token_of(accepted)
        assert dict(registry.live_connections()) == {server_token: "127.0.0.1"}
        await watcher.wait_until(lambda: server_token in watcher.states)
        assert watcher.source == "netlink"
        assert watcher.states[server_token].count == 1  # the initial subflow, from CREATED
        assert len(listeners.made) == 1 and hub.subscriptions_opened == 1 and hub.subscribers == 2

        accepted.close()
        client.close()
        await registry.wait_until(lambda: not registry.live_connections())
        await watcher.wait_until(lambda: server_token not in watcher.states)
    finally:
        publisher.cancel()
        watching.cancel()
        await asyncio.gather(publisher, watching, return_exceptions=True)
        subscription.close()
        server.close()
        client.close()
    # The watcher's subscription closed when its task ended, the publisher's just now: the last
    # one out closed the netlink socket.
    assert hub.subscribers == 0 and listeners.made[0]._sock is None


async def test_proxy_and_its_pod_affinity_share_one_subscription(redis_server: RedisServer) -> None:
    """What `mcpool proxy` runs (`server.run`: a Proxy, then `start_affinity`) opens one
    `mptcp_pm` subscription, which the subflow watcher and the token publisher both consume."""
    convert_port = free_port()
    config = parse_config({
        "listen": {"convert": f"127.0.0.1:{convert_port}"},
        "policy": {"allowed_cpes": ["127.0.0.0/8"], "deny_default_destinations": False},
        "kernel": {"apply_sysctls": False},
        "affinity": {"mechanism": "director", "backend": "redis", "redis_url": redis_server.url,
                     "pool": "shared-events", "pod_name": "pod-a", "advertise": "198.18.10.2"},
    })  # fmt: skip
    listeners = CountingListeners()
    proxy = Proxy(config, own_addresses=(), mptcp_events=MptcpEventHub(listeners))
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.listen()  # the kernel completes the upstream handshake from the backlog
    await proxy.start()
    try:
        affinity = await start_affinity(proxy)
        try:
            assert affinity.registry is not None
            sock, _, _ = await asyncio.to_thread(
                convert_connect, ("127.0.0.1", convert_port), upstream.getsockname()[:2]
            )
            with sock:
                (conn,) = list(proxy.table)
                assert conn.token is not None
                token = int(conn.token, 16)
                assert token in affinity.registry.live_connections()
                assert proxy.subflows.source == "netlink"
                assert token in proxy.subflows.states
                hub = proxy.mptcp_events
                assert affinity.mptcp_events is hub
                assert len(listeners.made) == 1 and hub.subscriptions_opened == 1 and hub.subscribers == 2
        finally:
            await affinity.stop()
    finally:
        await proxy.stop()
        upstream.close()
    assert listeners.made[0]._sock is None


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
