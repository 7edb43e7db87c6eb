"""Resolving SOCKS5 domain names without the default thread pool: c-ares (`aiodns`/`pycares`) on
the event loop, bounded in time and in the number of names at once, and cancellable.

`loop.getaddrinfo` runs glibc's blocking resolver in the loop's thread pool (a few workers): a
slow or silent DNS server ties up every worker for its whole timeout, and every other SOCKS5
client by name then waits in the queue behind them, unboundedly. Here each lookup is a c-ares
query on the loop's own sockets: `resolver.timeout_s` bounds it (the c-ares channel's own
timeout and tries are set within it, and the await is cancelled at the deadline), and beyond
`resolver.max_in_flight` names at once a request is refused at once (`ResolverBusy`) instead of
queued. Names in /etc/hosts are answered as glibc would (c-ares reads the file).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from .config import ResolverConfig, split_resolver_server

if TYPE_CHECKING:
    import aiodns

__all__ = ["Resolver", "ResolverBusy", "ResolveFailed"]


class ResolverBusy(Exception):
    """`resolver.max_in_flight` names are being resolved already."""


class ResolveFailed(Exception):
    """The name has no address, or no answer came within `resolver.timeout_s`."""


def _server_text(value: str) -> str:
    host, port = split_resolver_server(value)
    if port == 53:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Resolver:
    """One proxy's resolver; `await resolve(name, port)` -> addresses as text, in the order the
    DNS gave them (IPv6 and IPv4 alike)."""

    def __init__(self, config: ResolverConfig) -> None:
        self.config = config
        self.in_flight = 0
        self._dns: aiodns.DNSResolver | None = None

    def _channel(self) -> aiodns.DNSResolver:
        if self._dns is None:
            import aiodns

            # Two tries within the overall timeout: one lost UDP answer is not a failure.
            kwargs: dict[str, Any] = {"timeout": self.config.timeout_s / 2, "tries": 2}
            servers = [_server_text(s) for s in self.config.servers] or None
            self._dns = aiodns.DNSResolver(nameservers=servers, loop=asyncio.get_running_loop(), **kwargs)
        return self._dns

    async def resolve(self, name: str, port: int) -> list[str]:
        if self.in_flight >= self.config.max_in_flight:
            raise ResolverBusy(f"{self.in_flight} names being resolved already (resolver.max_in_flight)")
        self.in_flight += 1
        try:
            future = self._channel().getaddrinfo(name, port=port, type=socket.SOCK_STREAM)
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    result = await future
            except TimeoutError:
                future.cancel()
                raise ResolveFailed(f"no answer within resolver.timeout_s ({self.config.timeout_s:g}s)") from None
            except Exception as exc:  # noqa: BLE001 - aiodns.error.DNSError and friends
                # DNSError's args are (c-ares code, text).
                args: tuple[Any, ...] = tuple(exc.args)
                raise ResolveFailed(str(args[-1]) if args else repr(exc)) from None
        finally:
            self.in_flight -= 1
        found: list[str] = []
        for node in result.nodes:
            host = node.addr[0]
            text = host.decode() if isinstance(host, bytes) else str(host)
            if text not in found:
                found.append(text)
        if not found:
            raise ResolveFailed("no address")
        return found

    async def close(self) -> None:
        dns, self._dns = self._dns, None
        if dns is not None:
            result = dns.close()
            if asyncio.iscoroutine(result):
                await result
