"""Opening the proxy's connection to the destination server, over TCP or MPTCP, with a timeout.

`loop.sock_connect()` cannot be used for MPTCP on this platform (glibc's getaddrinfo rejects
protocol 262), so the socket comes from `kernel.mptcp.create_socket`, the address is already numeric,
and the connect is a non-blocking `connect_ex` followed by waiting for writability and reading
`SO_ERROR`.

Failures raise `UpstreamError`, which carries the answer for each client protocol. The mapping,
following RFC 8803 section 4.2.8 and RFC 1928 section 6:

| what happened                                   | Convert error (value)           | SOCKS5 reply |
|-------------------------------------------------|---------------------------------|--------------|
| server answered the SYN with RST (ECONNREFUSED) | 96 Connection Reset             | 0x05 refused |
| no route / ICMP net unreachable (ENETUNREACH)   | 97 Destination Unreachable (0)  | 0x03 network |
| ICMP host unreachable (EHOSTUNREACH)            | 97 Destination Unreachable (1)  | 0x04 host    |
| ICMP administratively prohibited (EACCES/EPERM) | 97 Destination Unreachable (13) | 0x02 ruleset |
| no answer within connect_timeout_s (ETIMEDOUT)  | 65 Network Failure              | 0x04 host    |
| out of fds, memory or ports (EMFILE, ENOBUFS, EADDRNOTAVAIL) | 64 Resource Exceeded   | 0x01 general |
| anything else                                   | 65 Network Failure              | 0x01 general |

RFC 8803 asks the Destination Unreachable value to echo the ICMP code; the kernel reports only an
errno, so the value is the ICMP code that errno stands for (0 net, 1 host, 13 prohibited). A
silent timeout is not evidence of an unreachable destination (no ICMP arrived), hence Network
Failure.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .codec.convert import ErrorCode
from .codec.socks5 import Reply
from .kernel.mptcp import (
    create_socket,
    enable_fastopen_connect,
    set_liveness,
    set_mark,
    set_nodelay,
    set_syn_mss,
    set_transparent,
    wait_writable,
)
from .policy import IPAddress, address_text, format_endpoint, normalize_address

if TYPE_CHECKING:
    from .config import LimitsConfig

__all__ = ["UpstreamError", "UpstreamOptions", "connect_upstream", "classify_errno"]


@dataclass
class UpstreamError(Exception):
    """The upstream connect failed; says what to answer in each client protocol."""

    reason: str  # metric label: refused, network_unreachable, host_unreachable, prohibited, timeout, error
    errno: int | None
    convert_code: ErrorCode
    convert_value: bytes
    socks5_reply: Reply
    detail: str

    def __str__(self) -> str:
        return self.detail


def classify_errno(err: int | None, detail: str) -> UpstreamError:
    """Map a connect errno (None: our own timeout) to the answers in the module docstring."""
    if err == errno.ECONNREFUSED:
        return UpstreamError("refused", err, ErrorCode.CONNECTION_RESET, b"", Reply.CONNECTION_REFUSED, detail)
    if err == errno.ENETUNREACH:
        return UpstreamError(
            "network_unreachable", err, ErrorCode.DESTINATION_UNREACHABLE, b"\x00", Reply.NETWORK_UNREACHABLE, detail
        )
    if err == errno.EHOSTUNREACH:
        return UpstreamError(
            "host_unreachable", err, ErrorCode.DESTINATION_UNREACHABLE, b"\x01", Reply.HOST_UNREACHABLE, detail
        )
    if err in (errno.EACCES, errno.EPERM):
        return UpstreamError(
            "prohibited", err, ErrorCode.DESTINATION_UNREACHABLE, b"\x0d", Reply.NOT_ALLOWED, detail
        )
    if err is None or err == errno.ETIMEDOUT:
        return UpstreamError("timeout", err, ErrorCode.NETWORK_FAILURE, b"", Reply.HOST_UNREACHABLE, detail)
    if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL):
        # Out of descriptors, memory or ephemeral ports: the proxy's resources, not the network.
        return UpstreamError("resources", err, ErrorCode.RESOURCE_EXCEEDED, b"", Reply.GENERAL_FAILURE, detail)
    return UpstreamError("error", err, ErrorCode.NETWORK_FAILURE, b"", Reply.GENERAL_FAILURE, detail)


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    """How to open one upstream connection beyond address and protocol."""

    mss: int | None = None  # TCP_MAXSEG before connect: the MSS announced in the SYN
    fastopen_data: bytes = b""  # open with TCP Fast Open, these bytes in the SYN if a cookie allows
    liveness: LimitsConfig | None = None  # keepalive and TCP_USER_TIMEOUT (kernel.mptcp.set_liveness)
    source: str | None = None  # implicit mode: bind the client's own address (IP_TRANSPARENT)
    mark: int | None = None  # SO_MARK (the CPE converter's marker on every subflow)


async def connect_upstream(
    address: str | IPAddress, port: int, protocol: str, timeout_s: float, options: UpstreamOptions | None = None,
    *, loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[socket.socket, int]:
    """Connect to `address` (numeric; IPv4-mapped IPv6 is connected as IPv4); returns the
    connected non-blocking socket and how many of `options.fastopen_data` it has sent (the rest
    is the caller's to send). `protocol` is "tcp" or "mptcp" (TCP if the kernel lacks it; the
    kernel itself falls back to TCP when the server does not answer MP_CAPABLE).

    With `fastopen_data` the socket is opened with TCP_FASTOPEN_CONNECT: when the kernel holds a
    Fast Open cookie of the server, the data goes in the SYN (0-RTT) and the server may answer
    before the handshake completes; without a cookie the SYN asks for one and nothing is sent
    early.

    `options.source` (implicit mode): connect from this address although it is not ours
    (IP_TRANSPARENT, bound before the connect), so the server sees the client's own address and
    no address translation is needed; the replies must be routed back through this host.
    `options.mark`: SO_MARK on the socket (reaches every MPTCP subflow; the CPE converter's marker).
    """
    opts = options or UpstreamOptions()
    host = address_text(address) if isinstance(address, str) else str(normalize_address(address))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = (host, port)
    try:
        sock, _ = create_socket(family, mptcp=(protocol == "mptcp"), blocking=False)
    except OSError as exc:
        raise classify_errno(exc.errno, f"cannot create a socket: {exc.strerror}") from None
    try:
        set_nodelay(sock)
        if opts.mark is not None:
            set_mark(sock, opts.mark)
        if opts.source is not None:
            try:
                set_transparent(sock)
                sock.bind((address_text(opts.source), 0))
            except OSError as exc:
                raise classify_errno(exc.errno, f"cannot bind the client's address {opts.source}: {exc.strerror}") from None
        if opts.liveness is not None:
            live = opts.liveness
            set_liveness(sock, user_timeout_s=live.tcp_user_timeout_s, keepalive_idle_s=live.keepalive_idle_s,
                         keepalive_interval_s=live.keepalive_interval_s, keepalive_count=live.keepalive_count)
        if opts.mss is not None:
            try:
                set_syn_mss(sock, opts.mss)
            except OSError as exc:
                raise classify_errno(exc.errno, f"cannot set the MSS {opts.mss}: {exc.strerror}") from None
        fastopen = bool(opts.fastopen_data) and enable_fastopen_connect(sock)
        sent = 0
        err = sock.connect_ex(target)
        if fastopen and err == 0:
            # TCP_FASTOPEN_CONNECT: connect() returned at once and the SYN leaves with the first
            # write, carrying as much data as the cookie and MSS allow.
            try:
                sent = sock.send(opts.fastopen_data)
            except (BlockingIOError, InterruptedError):
                sent = 0  # no cookie yet: the SYN asked for one; the data follows the handshake
            except OSError as exc:
                raise classify_errno(exc.errno, f"connect to {format_endpoint(*target)}: {exc.strerror}") from None
            err = errno.EINPROGRESS
        if err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            if not await wait_writable(sock, timeout_s, loop=loop):
                raise classify_errno(
                    None, f"connect to {format_endpoint(*target)} timed out after {timeout_s:g}s"
                )
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            raise classify_errno(err, f"connect to {format_endpoint(*target)}: {errno.errorcode.get(err, err)} ({err})")
        return sock, sent
    except BaseException:
        sock.close()
        raise

