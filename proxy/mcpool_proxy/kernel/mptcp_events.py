"""The kernel's MPTCP path-manager events (generic netlink `mptcp_pm`): one subscription per
process (`MptcpEventHub`), fanned out to every consumer as an async iterator.

Consumers: the token publisher (`cluster.podside`) and the subflow watcher
(`observe.telemetry.SubflowWatcher`). Both see every event of the namespace, so one netlink socket
serves both: the kernel copies each event once per subscribed socket, and the event path is part
of the proxy's per-connection CPU.

Why the events: a pod must publish a connection's token before the client's MP_JOIN reaches the director.
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
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "EVENT_NAMES",
    "MptcpEvent",
    "MptcpEventHub",
    "MptcpEventListener",
    "MptcpSubscription",
    "parse_messages",
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
    """One netlink subscription to the current network namespace's MPTCP events; iterate with
    `async for`. A process has one, owned by its `MptcpEventHub` (tests may use one directly).

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
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[MptcpEvent]]:
        """The events of each datagram, as they arrive (what the hub fans out)."""
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
                batch = parse_messages(bytes(view[:size]), family_id)
                if batch:
                    yield batch
        finally:
            if registered:
                self._remove_reader()

    def _remove_reader(self) -> None:
        if self._reader is not None:
            loop, fd = self._reader
            self._reader = None
            if not loop.is_closed():
                loop.remove_reader(fd)


# How many events one subscription holds for a consumer that has not caught up, at most; beyond
# it events are dropped and counted, as the kernel drops them (ENOBUFS) for a slow socket.
SUBSCRIPTION_BACKLOG = 65536


class MptcpSubscription:
    """One consumer's view of the hub's events, from its `subscribe()` on; `async for` it, and
    `close()` it when done (the last close closes the netlink subscription)."""

    def __init__(self, hub: MptcpEventHub) -> None:
        self._hub = hub
        self._queue: deque[MptcpEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.closed = False
        self.lost = 0  # events dropped because this consumer was SUBSCRIPTION_BACKLOG behind

    def _deliver(self, batch: list[MptcpEvent]) -> None:
        if len(self._queue) + len(batch) > self._hub.backlog:
            if not self.lost:
                log.warning("MPTCP events lost (a consumer is %d events behind)", len(self._queue))
            self.lost += len(batch)
        else:
            self._queue.extend(batch)
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[MptcpEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[MptcpEvent]:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            while queue:
                yield queue.popleft()
            if self._error is not None:
                # The netlink socket failed (as a lone listener's iteration would): raised once;
                # iterating again resumes with a new read.
                error, self._error = self._error, None
                raise error
            if self.closed:
                return
            self._hub._ensure_pump()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake()
            self._hub._unsubscribe(self)


class MptcpEventHub:
    """The process's one `mptcp_pm` subscription, fanned out to every consumer.

    ```
    hub = MptcpEventHub()
    subscription = hub.subscribe()   # opens the netlink socket on first use; OSError without MPTCP
    async for event in subscription: ...
    subscription.close()             # the last one closes the netlink socket
    ```

    One task reads the socket and hands each datagram's events to every subscription; a consumer
    that falls behind only delays itself (up to `backlog` events, then its events are dropped and
    counted), never the others.
    """

    def __init__(
        self,
        listener_factory: Callable[[], MptcpEventListener] = MptcpEventListener,
        backlog: int = SUBSCRIPTION_BACKLOG,
    ) -> None:
        self._factory = listener_factory
        self.backlog = backlog
        self._listener: MptcpEventListener | None = None
        self._pump: asyncio.Task[None] | None = None
        self._subscriptions: list[MptcpSubscription] = []
        self.subscriptions_opened = 0  # netlink subscriptions opened in this hub's lifetime

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> MptcpSubscription:
        """Every event from now on, for one consumer. Raises OSError if the kernel has no
        `mptcp_pm` events (or this process may not subscribe: CAP_NET_ADMIN)."""
        if self._listener is None:
            listener = self._factory()
            listener.open()
            self._listener = listener
            self.subscriptions_opened += 1
        subscription = MptcpSubscription(self)
        self._subscriptions.append(subscription)
        self._ensure_pump()
        return subscription

    def _ensure_pump(self) -> None:
        if self._pump is None and self._listener is not None:
            self._pump = asyncio.get_running_loop().create_task(self._run(self._listener))

    async def _run(self, listener: MptcpEventListener) -> None:
        try:
            async for batch in listener.batches():
                for subscription in self._subscriptions:
                    subscription._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - each consumer decides what a failure means
            self._pump = None
            for subscription in self._subscriptions:
                subscription._fail(exc)

    def _unsubscribe(self, subscription: MptcpSubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        if not self._subscriptions:
            self.close()

    def close(self) -> None:
        """Close the netlink subscription and end every consumer's iteration."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription.closed = True
            subscription._wake()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
