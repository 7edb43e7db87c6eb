"""A stand-in MCP pod for the director test, run inside a pod namespace.

An MPTCP echo server that first sends its pod name, then echoes every byte; it registers
itself and, from the kernel's MPTCP netlink events, each connection's token in Redis (the same
registry + listener the proxy uses). At each connection's end it appends a JSON line with the
token, the peer and the kernel's subflow count to --record. Prints "ready" once registered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
from typing import Any

from mcpool_proxy.cluster import RedisRegistry, RegistrationResult
from mcpool_proxy.cluster.podside import publish_tokens
from mcpool_proxy.kernel import steering
from mcpool_proxy.kernel.mptcp_events import MptcpEventListener

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1


def mptcp_info(sock: Any) -> tuple[int, int]:
    """(additional subflows, local token) from the kernel's MPTCP_INFO."""
    raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 64)
    return raw[0], struct.unpack_from("=I", raw, 12)[0]


class DelayedRegistry:
    """Test hook: registers tokens late, to provoke the join-before-registration race."""

    def __init__(self, inner: RedisRegistry, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.pod_name = inner.pod_name

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        await asyncio.sleep(self.delay_s)
        return await self.inner.register_connection(token, cpe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--advertise", required=True)
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--register-delay-ms", type=int, default=0)
    p.add_argument("--pod-mac", default="02:6d:63:70:00:01")
    p.add_argument("--join-wait-s", type=float, default=5.0)
    args = p.parse_args()

    steering.setup_pod_receive(args.vip, 4789, args.pod_mac)
    registry = RedisRegistry(args.redis, args.pool, args.name, args.advertise, heartbeat_ttl_s=3)
    await registry.start()
    listener = MptcpEventListener()
    listener.open()
    source: Any = registry
    if args.register_delay_ms:
        source = DelayedRegistry(registry, args.register_delay_ms / 1000)
    publisher = asyncio.create_task(publish_tokens(source, listener, local_ports={args.port}))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        # The client counts its join as soon as it sends the SYN; this pod's kernel counts it
        # only once the join completed here. Wait (bounded) for that before talking, so the
        # record says whether the join reached this pod. No event exists: poll the kernel.
        # A first byte makes the client's side fully established (MPTCP v1: it needs data or a
        # DSS ack from us), which is when its path manager opens the join.
        writer.write(b"+")
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + args.join_wait_s
        while mptcp_info(sock)[0] < 1 and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        subflows = mptcp_info(sock)[0]
        writer.write(args.name.encode() + b"\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        token = mptcp_info(sock)[1]
        with open(args.record, "a") as f:  # noqa: ASYNC230 - one short line per connection
            f.write(json.dumps({"pod": args.name, "peer": list(peer[:2]), "subflows": subflows, "token": token}) + "\n")
        writer.write_eof()
        await writer.drain()
        writer.close()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.port))
    sock.listen(128)
    server = await asyncio.start_server(handle, sock=sock)
    await registry.register_pod("ready")
    print("ready", flush=True)
    draining: set[asyncio.Task[None]] = set()

    async def drain() -> None:
        await registry.register_pod("draining")
        print("draining", flush=True)

    # SIGUSR1: start draining, as a pod being replaced does (no new CPEs, its joins still come).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: draining.add(asyncio.ensure_future(drain())))
    try:
        await asyncio.Future()
    finally:
        publisher.cancel()
        server.close()
        await registry.stop()


if __name__ == "__main__":
    asyncio.run(main())
