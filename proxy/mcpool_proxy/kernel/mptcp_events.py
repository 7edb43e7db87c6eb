"""The kernel's MPTCP path-manager events (generic netlink `mptcp_pm`), as an async iterator.

Why: a pod must publish a connection's token before the client's MP_JOIN reaches the director.
userspace `accept()` (and MPTCP_INFO after it) can come later than the join, so the token is
taken from the kernel's `MPTCP_EVENT_CREATED`, multicast on the `mptcp_pm_events` group of the
pod's network namespace as soon as the kernel creates the connection (the server side emits it
when the third ACK creates the child socket, kernel >= 5.12; `MPTCP_ATTR_SERVER_SIDE` since 5.19).

The generic netlink plumbing is a few lines over a raw socket, kept here rather than on
pyroute2's socket classes: pyroute2 0.9's `mptcp` module has endpoint/limit commands but no event
decoding, and a raw non-blocking socket integrates with asyncio with no helper thread. Parsing is
pure (`parse_messages`) and tested on its own. Needs CAP_NET_ADMIN in the namespace (the group is
GENL_MCAST_CAP_NET_ADMIN since 6.7). If events are lost (ENOBUFS on overflow), the registry still
learns the token when the server registers the accepted socket (idempotent).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cluster.registry import AffinityRegistry

__all__ = [
    "MptcpEvent",
    "MptcpEventListener",
    "parse_messages",
    "publish_tokens",
    "EVENT_NAMES",
]

log = logging.getLogger("mcpool.affinity.events")

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

MPTCP_GENL_NAME = "mptcp_pm"
MPTCP_GENL_EV_GRP_NAME = "mptcp_pm_events"

# include/uapi/linux/mptcp_pm.h
EVENT_NAMES: dict[int, str] = {
    1: "created",
    2: "established",
    3: "closed",
    6: "announced",
    7: "removed",
    10: "sub_established",
    11: "sub_closed",
    13: "sub_priority",
    15: "listener_created",
    16: "listener_closed",
}
ATTR_TOKEN = 1
ATTR_FAMILY = 2
ATTR_SADDR4 = 5
ATTR_SADDR6 = 6
ATTR_DADDR4 = 7
ATTR_DADDR6 = 8
ATTR_SPORT = 9
ATTR_DPORT = 10
ATTR_SERVER_SIDE = 18

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class MptcpEvent:
    """One path-manager event. Addresses are from the kernel's view: `saddr`/`sport` local,
    `daddr`/`dport` remote (on a pod: the VIP and the CPE)."""

    kind: str
    token: int | None
    saddr: str | None = None
    daddr: str | None = None
    sport: int | None = None
    dport: int | None = None
    server_side: bool | None = None


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, i)
        if length < _NLA.size or i + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[i + _NLA.size : i + length]
        i += (length + 3) & ~3


# The decoder below runs for every MPTCP event of the namespace (several per connection, most of
# them about connections nobody here tracks), so it walks the datagram in place with bound
# unpackers instead of slicing each attribute, and formats addresses with inet_ntop instead of
# ipaddress objects (measured: the event path was ~10 % of the proxy's CPU per connection).
_unpack_nla = _NLA.unpack_from
_unpack_u32 = struct.Struct("=I").unpack_from
_unpack_be16 = struct.Struct("!H").unpack_from
_unpack_nlmsghdr = _NLMSGHDR.unpack_from
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ZERO_80 = bytes(10)


def _ipv6_text(raw: bytes) -> str:
    """The text of a 16-byte address as `str(ipaddress)` spells it, IPv4-mapped unwrapped."""
    if raw[:12] == _V4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    if raw[:10] != _ZERO_80:
        # glibc's inet_ntop and ipaddress agree (RFC 5952) except for the embedded-IPv4 forms,
        # which need the first 80 bits zero.
        return socket.inet_ntop(socket.AF_INET6, raw)
    return str(ipaddress.IPv6Address(raw))


def _decode_event(cmd: int, data: bytes, start: int = 0, end: int | None = None) -> MptcpEvent:
    """The event whose attributes are `data[start:end]`."""
    if end is None:
        end = len(data)
    token: int | None = None
    saddr: str | None = None
    daddr: str | None = None
    sport: int | None = None
    dport: int | None = None
    server_side: bool | None = None
    i = start
    while i + 4 <= end:
        length, kind = _unpack_nla(data, i)
        if length < 4 or i + length > end:
            break
        kind &= NLA_TYPE_MASK
        v = i + 4
        size = length - 4
        if kind == ATTR_TOKEN:
            if size >= 4:
                token = _unpack_u32(data, v)[0]
        elif kind == ATTR_SPORT or kind == ATTR_DPORT:
            if size >= 2:
                if kind == ATTR_SPORT:
                    sport = _unpack_be16(data, v)[0]
                else:
                    dport = _unpack_be16(data, v)[0]
        elif kind == ATTR_SADDR4 or kind == ATTR_DADDR4:
            if size >= 4:
                text = socket.inet_ntop(socket.AF_INET, data[v : v + 4])
                if kind == ATTR_SADDR4:
                    saddr = text
                else:
                    daddr = text
        elif kind == ATTR_SADDR6 or kind == ATTR_DADDR6:
            if size >= 16:
                text = _ipv6_text(data[v : v + 16])
                if kind == ATTR_SADDR6:
                    saddr = text
                else:
                    daddr = text
        elif kind == ATTR_SERVER_SIDE:
            if size > 0:
                server_side = bool(data[v])
        i += (length + 3) & ~3
    name = EVENT_NAMES.get(cmd)
    return MptcpEvent(name if name is not None else f"event{cmd}", token, saddr, daddr, sport, dport, server_side)


def parse_messages(data: bytes, family_id: int) -> list[MptcpEvent]:
    """Decode the MPTCP events in one netlink datagram (other message types are skipped)."""
    events: list[MptcpEvent] = []
    i = 0
    size = len(data)
    while i + 16 <= size:
        length, msg_type, _flags, _seq, _pid = _unpack_nlmsghdr(data, i)
        if length < 16 or i + length > size:
            break
        if msg_type == family_id and length >= 20:
            # nlmsghdr (16 bytes), genlmsghdr (4 bytes: cmd, version, reserved), attributes.
            events.append(_decode_event(data[i + 16], data, i + 20, i + length))
        i += (length + 3) & ~3
    return events


def _nla(kind: int, value: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(value), kind) + value
    return raw + b"\0" * ((-len(raw)) % 4)


def _resolve_family(sock: socket.socket, name: str) -> tuple[int, dict[str, int]]:
    """CTRL_CMD_GETFAMILY: the family's id and its multicast groups (name -> id)."""
    body = _GENLHDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + body)
    data = sock.recv(65536)
    length, msg_type, _f, _s, _p = _NLMSGHDR.unpack_from(data, 0)
    if msg_type == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
        raise OSError(code, f"generic netlink family {name!r}: {os.strerror(code)} (kernel without MPTCP?)")
    family_id = -1
    groups: dict[str, int] = {}
    for kind, value in _attrs(data[_NLMSGHDR.size + _GENLHDR.size : length]):
        if kind == CTRL_ATTR_FAMILY_ID:
            family_id = struct.unpack_from("=H", value)[0]
        elif kind == CTRL_ATTR_MCAST_GROUPS:
            for _index, group in _attrs(value):
                group_attrs = dict(_attrs(group))
                gname = group_attrs.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0").decode()
                gid = group_attrs.get(CTRL_ATTR_MCAST_GRP_ID)
                if gname and gid is not None:
                    groups[gname] = struct.unpack_from("=I", gid)[0]
    if family_id < 0:
        raise OSError(errno.ENOENT, f"generic netlink family {name!r} has no id")
    return family_id, groups


class MptcpEventListener:
    """Subscribe to the current network namespace's MPTCP events; iterate with `async for`.

    ```
    listener = MptcpEventListener()
    listener.open()              # raises OSError if the kernel has no mptcp_pm family
    async for event in listener: ...
    listener.close()
    ```
    """

    def __init__(self, rcvbuf_bytes: int = 4 * 1024 * 1024) -> None:
        self.rcvbuf_bytes = rcvbuf_bytes
        self.lost_batches = 0  # ENOBUFS: the kernel dropped events because we were slow
        self._sock: socket.socket | None = None
        self._family_id = -1
        self._reader: tuple[asyncio.AbstractEventLoop, int] | None = None  # while registered

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            sock.bind((0, 0))
            self._family_id, groups = _resolve_family(sock, MPTCP_GENL_NAME)
            if MPTCP_GENL_EV_GRP_NAME not in groups:
                raise OSError(errno.ENOENT, f"{MPTCP_GENL_NAME} has no {MPTCP_GENL_EV_GRP_NAME} group")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[MPTCP_GENL_EV_GRP_NAME])
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            # Closed under a live iteration: its reader must not outlive the descriptor.
            self._remove_reader()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> MptcpEventListener:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[MptcpEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[MptcpEvent]:
        if self._sock is None:
            self.open()
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        # One reusable receive buffer: recv(65536) allocates (and shrinks) a 64 KiB object per
        # datagram, and an event datagram is ~100 bytes.
        buffer = bytearray(65536)
        view = memoryview(buffer)
        recv_into = sock.recv_into
        family_id = self._family_id
        waiter: asyncio.Future[None] | None = None
        registered = False

        def readable() -> None:
            nonlocal registered
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            else:
                # Nobody waits (the consumer is busy elsewhere): stop the level-triggered
                # callback from firing every loop iteration until we wait again.
                self._remove_reader()
                registered = False

        # The reader stays registered between waits: every datagram is one event, and adding and
        # removing it per datagram (what loop.sock_recv does) cost two epoll_ctl calls each.
        try:
            while True:
                try:
                    size = recv_into(buffer)
                except (BlockingIOError, InterruptedError):
                    if not registered:
                        loop.add_reader(fd, readable)
                        registered = True
                        self._reader = (loop, fd)
                    waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        waiter = None
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self.lost_batches += 1
                        log.warning("MPTCP events lost (receive buffer overflow)")
                        continue
                    raise
                for event in parse_messages(bytes(view[:size]), family_id):
                    yield event
        finally:
            if registered:
                self._remove_reader()

    def _remove_reader(self) -> None:
        if self._reader is not None:
            loop, fd = self._reader
            self._reader = None
            if not loop.is_closed():
                loop.remove_reader(fd)


# publish_tokens prunes its set of own tokens once per this many new connections (amortised O(1)).
MINE_PRUNE_EVERY = 4096


async def publish_tokens(
    registry: AffinityRegistry,
    listener: MptcpEventListener,
    local_ports: Collection[int] | None = None,
) -> None:
    """Run forever: register each server-side MPTCP connection as the kernel creates it, and
    unregister it when the kernel closes it.

    `local_ports` limits this to connections accepted on those ports (the proxy's listeners);
    client-side connections (the pod's own upstream MPTCP) are never registered.

    Registrations run concurrently (one task each; a close waits for its own connection's
    registration): awaiting them one by one made a burst of new connections queue behind each
    other's Redis round trips, and a join waiting at the director for its token sees exactly
    that queue (measured: 25-50 ms per registration under a burst of 10 connections on 2 cores,
    enough to exceed a 200 ms `join_wait_ms`).
    """
    mine: set[int] = set()
    created = 0
    pending: dict[int, asyncio.Task[Any]] = {}

    def forget(token: int, task: asyncio.Task[Any]) -> None:
        if pending.get(token) is task:
            del pending[token]

    async def unregister_after(token: int, before: asyncio.Task[Any] | None) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        await registry.unregister_connection(token)

    try:
        async for event in listener:
            if event.token is None:
                continue
            token = event.token
            task: asyncio.Task[Any]
            if event.kind == "created":
                # Client-side connections (no SERVER_SIDE attribute) are the pod's own, not owned.
                if not event.server_side or event.daddr is None:
                    continue
                if local_ports is not None and event.sport not in local_ports:
                    continue
                mine.add(token)
                created += 1
                if created % MINE_PRUNE_EVERY == 0:
                    # A lost CLOSED event leaves a token here forever: keep only what the
                    # registry still holds or is registering (it forgets stale tokens itself).
                    mine &= set(registry.live_connections()) | set(pending) | {token}
                task = asyncio.ensure_future(registry.register_connection(token, event.daddr))
            elif event.kind == "closed" and token in mine:
                mine.discard(token)
                task = asyncio.ensure_future(unregister_after(token, pending.get(token)))
            else:
                continue
            pending[token] = task
            task.add_done_callback(lambda t, tok=token: forget(tok, t))  # type: ignore[misc]
    finally:
        for task in list(pending.values()):
            task.cancel()
