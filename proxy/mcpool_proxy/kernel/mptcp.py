"""MPTCP and TCP sockets: the one module that names every socket option mcpool uses (MPTCP,
TCP Fast Open, TCP_INFO, the listener's options).

Everything else in mcpool asks this module for MPTCP sockets and listeners and for what the kernel
knows about a connection (its token, its subflows and their addresses, byte counters, the options
of the SYN-ACK), so that each kernel interface is spelled once, next to the kernel version that
introduced it and what happens on a kernel without it. Struct layouts follow
`include/uapi/linux/mptcp.h` and `linux/tcp.h`. Sysctls are in `sysctl.py`, netlink events in
`mptcp_events.py`.

This module keeps no per-connection state; every function but `wait_writable` is synchronous and
safe to call from any thread, and none raises for "the kernel cannot tell us" (it returns None or
[]).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass

from ..fdwatch import FdWatch
from .sysctl import SYSCTL_MPTCP_ENABLED

__all__ = [
    "IP_TRANSPARENT",
    "IPV6_TRANSPARENT",
    "set_mark",
    "set_transparent",
    "IPPROTO_MPTCP",
    "MPTCP_FULL_INFO",
    "MPTCP_INFO",
    "MPTCP_INFO_FLAG_FALLBACK",
    "MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED",
    "MPTCP_SUBFLOW_ADDRS",
    "MPTCP_TCPINFO",
    "MSG_FASTOPEN",
    "SOL_MPTCP",
    "TCPI_OPT_SYN_DATA",
    "TCP_FASTOPEN",
    "TCP_FASTOPEN_CONNECT",
    "MptcpInfo",
    "SubflowInfo",
    "create_listener",
    "create_socket",
    "decode_mptcp_info",
    "decode_subflow_addrs",
    "enable_fastopen_listener",
    "fastopen_used",
    "get_mptcp_info",
    "get_mptcp_token",
    "get_subflows",
    "is_mptcp_socket",
    "live_subflows",
    "kernel_version",
    "mptcp_supported",
    "reset_on_close",
    "enable_fastopen_connect",
    "set_liveness",
    "set_nodelay",
    "set_syn_mss",
]

# Named as before the move to kernel/, so log lines keep their logger field.
log = logging.getLogger("mcpool_proxy.mptcp")

# --- protocol and option numbers -----------------------------------------------------------------

# socket(AF_INET[6], SOCK_STREAM, IPPROTO_MPTCP): Linux 5.6+. Without CONFIG_MPTCP socket() fails
# with EPROTONOSUPPORT (or EINVAL on some older kernels); with net.mptcp.enabled=0 with ENOPROTOOPT;
# without CONFIG_MPTCP_IPV6 an AF_INET6 MPTCP socket fails with EAFNOSUPPORT.
IPPROTO_MPTCP = 262
# getsockopt level for the MPTCP-specific options below: Linux 5.16+ (EOPNOTSUPP before, and on a
# plain TCP socket or an MPTCP socket that fell back to TCP).
SOL_MPTCP = 284
# struct mptcp_info: Linux 5.16+. The struct grew over time (see _MPTCP_INFO_FIELDS); the kernel
# copies min(optlen, its size) and reports the length, so fields past the length are absent.
MPTCP_INFO = 1
# Array of struct tcp_info, one per subflow, behind a struct mptcp_subflow_data header: 5.16+.
MPTCP_TCPINFO = 2
# Array of struct mptcp_subflow_addrs (local, remote sockaddr_storage) behind the same header: 5.16+.
MPTCP_SUBFLOW_ADDRS = 3
# struct mptcp_full_info: subflow ids, addresses, tcp_info and mptcp_info in one consistent
# snapshot: Linux 6.5+ (EOPNOTSUPP before; we then use MPTCP_SUBFLOW_ADDRS + MPTCP_TCPINFO).
MPTCP_FULL_INFO = 4

# mptcpi_flags bits: 5.16+.
MPTCP_INFO_FLAG_FALLBACK = 1 << 0
MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED = 1 << 1

# sendto(..., MSG_FASTOPEN, addr) connects and puts the data in the SYN if a TFO cookie is cached
# (TCP: 3.7+; MPTCP sockets: 6.2+; before that an MPTCP socket answers EOPNOTSUPP).
MSG_FASTOPEN = 0x20000000
# setsockopt(IPPROTO_TCP, TCP_FASTOPEN, qlen) on a listener accepts data in SYNs (TCP: 3.7+;
# on an MPTCP listener: 6.2+, ENOPROTOOPT/EOPNOTSUPP before: the listener then works without 0-RTT).
TCP_FASTOPEN = 23
# setsockopt(IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1): connect() defers the SYN to the first write
# (TCP: 4.11+; MPTCP: 6.2+).
TCP_FASTOPEN_CONNECT = 30
# tcp_info.tcpi_options bit: the SYN carried data that the peer acknowledged (TCP: 4.x+). On an
# MPTCP socket TCP_INFO describes the first subflow (6.x+), which is the one that carried the SYN.
TCPI_OPT_SYN_DATA = 0x20

# Errors that mean "this kernel/namespace cannot make an MPTCP socket" (see IPPROTO_MPTCP above).
_NO_MPTCP_ERRNOS = frozenset(
    {errno.EPROTONOSUPPORT, errno.ENOPROTOOPT, errno.EINVAL, errno.EAFNOSUPPORT}
)
# Errors from SOL_MPTCP getsockopt meaning "not an MPTCP connection (any more)" or "too old".
_NOT_MPTCP_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EINVAL})


# --- kernel facts --------------------------------------------------------------------------------


@functools.cache
def kernel_version() -> tuple[int, int, int]:
    """The running kernel's (major, minor, patch), e.g. (6, 18, 44); missing parts are 0."""
    parts: list[int] = []
    for piece in os.uname().release.split(".")[:3]:
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits) if digits else 0)
        if not digits or len(digits) != len(piece):
            break  # "6.18-rc1": stop at the first non-numeric part
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


@functools.cache
def mptcp_supported() -> bool:
    """Whether this process can create IPPROTO_MPTCP sockets (probed once, then cached).

    The answer belongs to the network namespace the first caller ran in; mcpool runs each
    component in one namespace, so caching is safe.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
        except OSError:
            continue
        return True
    return False


_fallback_warned = False
_fallback_lock = threading.Lock()


def _warn_fallback_once(exc: OSError) -> None:
    global _fallback_warned
    with _fallback_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    log.warning(
        "kernel refused an MPTCP socket (%s); using plain TCP instead. Check CONFIG_MPTCP and "
        "sysctl %s=1 (kernel %s)",
        errno.errorcode.get(exc.errno or 0, exc.errno),
        SYSCTL_MPTCP_ENABLED,
        ".".join(map(str, kernel_version())),
    )


def create_socket(family: int, *, mptcp: bool = True, blocking: bool = True) -> tuple[socket.socket, bool]:
    """A new SOCK_STREAM socket of `family`: MPTCP if asked for and possible, else plain TCP.

    Returns (sock, is_mptcp). The fallback is logged once per process, never raised; any other
    error (e.g. EMFILE) is raised. `blocking=False` creates it non-blocking (SOCK_NONBLOCK, Linux
    2.6.27+), saving the separate syscall of `setblocking(False)`.
    """
    kind = socket.SOCK_STREAM if blocking else socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    if mptcp:
        try:
            return socket.socket(family, kind, IPPROTO_MPTCP), True
        except OSError as exc:
            if exc.errno not in _NO_MPTCP_ERRNOS:
                raise
            _warn_fallback_once(exc)
    return socket.socket(family, kind, socket.IPPROTO_TCP), False


async def wait_writable(sock: socket.socket, timeout_s: float | None = None, *,
                        loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Wait until a non-blocking `connect_ex` on `sock` has finished; False if `timeout_s` passed.

    The asyncio way (`loop.sock_connect`) cannot open an outgoing MPTCP socket: glibc's
    getaddrinfo rejects protocol 262. A bare future and one timer rather than asyncio.wait_for,
    whose extra future showed in the proxy's per-connection profile; cancelling the caller
    cancels the wait. The caller reads SO_ERROR for the outcome.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    watch = FdWatch(loop)
    done: asyncio.Future[bool] = loop.create_future()
    fd = sock.fileno()

    def finish(connected: bool) -> None:
        if not done.done():
            done.set_result(connected)

    watch.add_writer(fd, finish, True)
    timer = loop.call_later(timeout_s, finish, False) if timeout_s is not None else None
    try:
        return await done
    finally:
        if timer is not None:
            timer.cancel()
        watch.remove_writer(fd)


def is_mptcp_socket(sock: socket.socket) -> bool:
    """Whether `sock` was created with IPPROTO_MPTCP (accepted sockets inherit the listener's)."""
    return sock.proto == IPPROTO_MPTCP


# --- MPTCP_INFO ----------------------------------------------------------------------------------

# (name, struct format, offset) in struct mptcp_info with natural alignment, grouped by the kernel
# that added them: 5.16 (first 40 bytes), 5.16 local_addr_*, 5.16 csum_enabled, 6.5 retransmits and
# byte counters, 6.8 subflows_total, 6.10 last_* timers (96 bytes in all).
_MPTCP_INFO_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("subflows", "B", 0),
    ("add_addr_signal", "B", 1),
    ("add_addr_accepted", "B", 2),
    ("subflows_max", "B", 3),
    ("add_addr_signal_max", "B", 4),
    ("add_addr_accepted_max", "B", 5),
    ("flags", "I", 8),
    ("token", "I", 12),
    ("write_seq", "Q", 16),
    ("snd_una", "Q", 24),
    ("rcv_nxt", "Q", 32),
    ("local_addr_used", "B", 40),
    ("local_addr_max", "B", 41),
    ("csum_enabled", "B", 42),
    ("retransmits", "I", 44),
    ("bytes_retrans", "Q", 48),
    ("bytes_sent", "Q", 56),
    ("bytes_received", "Q", 64),
    ("bytes_acked", "Q", 72),
    ("subflows_total", "B", 80),
    ("last_data_sent_ms", "I", 84),
    ("last_data_recv_ms", "I", 88),
    ("last_ack_recv_ms", "I", 92),
)
MPTCP_INFO_SIZE = 96  # sizeof(struct mptcp_info) on 6.10+ (measured 96 on 6.18)
_MPTCP_INFO_NAMES = tuple(name for name, _, _ in _MPTCP_INFO_FIELDS)
_MPTCP_INFO_UNPACKERS = tuple(
    (name, struct.Struct("=" + fmt), offset) for name, fmt, offset in _MPTCP_INFO_FIELDS
)
# The same layout as one struct (padding spelled out), checked against the offsets at import.
_MPTCP_INFO_STRUCT = struct.Struct("=6B2xIIQQQ3BxIQQQQB3xIII")
assert _MPTCP_INFO_STRUCT.size == MPTCP_INFO_SIZE


@dataclass(frozen=True)
class MptcpInfo:
    """struct mptcp_info of one MPTCP connection. Fields the kernel did not return are 0."""

    subflows: int  # additional subflows (the initial one is not counted)
    add_addr_signal: int
    add_addr_accepted: int
    subflows_max: int
    add_addr_signal_max: int
    add_addr_accepted_max: int
    flags: int
    token: int  # the local connection token, as the peer's MP_JOINs carry it
    write_seq: int
    snd_una: int
    rcv_nxt: int
    local_addr_used: int
    local_addr_max: int
    csum_enabled: bool
    retransmits: int
    bytes_retrans: int
    bytes_sent: int
    bytes_received: int
    bytes_acked: int
    subflows_total: int  # all live subflows, initial included (6.8+; 0 before)
    last_data_sent_ms: int = 0
    last_data_recv_ms: int = 0
    last_ack_recv_ms: int = 0
    returned_bytes: int = MPTCP_INFO_SIZE  # how much of the struct the kernel filled in

    @property
    def token_hex(self) -> str:
        return f"{self.token:08x}"

    @property
    def fallback(self) -> bool:
        return bool(self.flags & MPTCP_INFO_FLAG_FALLBACK)

    @property
    def subflow_count(self) -> int:
        """Live subflows: subflows_total where the kernel has it, else 1 + additional subflows."""
        if self.returned_bytes > 80:
            return self.subflows_total
        return self.subflows + 1


def decode_mptcp_info(raw: bytes) -> MptcpInfo:
    """Decode a struct mptcp_info of any length the kernel returned (fields past it read 0)."""
    if len(raw) >= MPTCP_INFO_SIZE:  # the common case on 6.10+: one unpack
        values = dict(zip(_MPTCP_INFO_NAMES, _MPTCP_INFO_STRUCT.unpack_from(raw, 0), strict=True))
    else:
        values = {
            name: (
                unpacker.unpack_from(raw, offset)[0] if offset + unpacker.size <= len(raw) else 0
            )
            for name, unpacker, offset in _MPTCP_INFO_UNPACKERS
        }
    return MptcpInfo(
        subflows=values["subflows"],
        add_addr_signal=values["add_addr_signal"],
        add_addr_accepted=values["add_addr_accepted"],
        subflows_max=values["subflows_max"],
        add_addr_signal_max=values["add_addr_signal_max"],
        add_addr_accepted_max=values["add_addr_accepted_max"],
        flags=values["flags"],
        token=values["token"],
        write_seq=values["write_seq"],
        snd_una=values["snd_una"],
        rcv_nxt=values["rcv_nxt"],
        local_addr_used=values["local_addr_used"],
        local_addr_max=values["local_addr_max"],
        csum_enabled=bool(values["csum_enabled"]),
        retransmits=values["retransmits"],
        bytes_retrans=values["bytes_retrans"],
        bytes_sent=values["bytes_sent"],
        bytes_received=values["bytes_received"],
        bytes_acked=values["bytes_acked"],
        subflows_total=values["subflows_total"],
        last_data_sent_ms=values["last_data_sent_ms"],
        last_data_recv_ms=values["last_data_recv_ms"],
        last_ack_recv_ms=values["last_ack_recv_ms"],
        returned_bytes=min(len(raw), MPTCP_INFO_SIZE),
    )


def get_mptcp_info(sock: socket.socket) -> MptcpInfo | None:
    """The kernel's MPTCP_INFO for `sock`; None for a TCP socket, a fallen-back or closed one."""
    if not is_mptcp_socket(sock):
        return None
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_SIZE)
    except OSError as exc:
        if exc.errno in _NOT_MPTCP_ERRNOS or exc.errno == errno.EBADF:
            return None
        raise
    if not raw:
        return None
    info = decode_mptcp_info(raw)
    return None if info.fallback else info


_FLAGS_AND_TOKEN = struct.Struct("=II")  # struct mptcp_info: flags at 8, token at 12


def get_mptcp_token(sock: socket.socket) -> int | None:
    """The connection's MPTCP token, as `get_mptcp_info(sock).token` (None for a TCP socket, a
    fallen-back or closed one), reading and decoding only the first 16 bytes of MPTCP_INFO: the
    proxy needs nothing else per connection, and the full decode showed in its profile."""
    if not is_mptcp_socket(sock):
        return None
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, _FLAGS_AND_TOKEN.size + 8)
    except OSError as exc:
        if exc.errno in _NOT_MPTCP_ERRNOS or exc.errno == errno.EBADF:
            return None
        raise
    if len(raw) < _FLAGS_AND_TOKEN.size + 8:
        if not raw:
            return None
        info = decode_mptcp_info(raw)
        return None if info.fallback else info.token
    flags, token = _FLAGS_AND_TOKEN.unpack_from(raw, 8)
    return None if flags & MPTCP_INFO_FLAG_FALLBACK else int(token)


# --- subflows: MPTCP_FULL_INFO or MPTCP_SUBFLOW_ADDRS + MPTCP_TCPINFO ------------------------------


@dataclass(frozen=True)
class SubflowInfo:
    """One subflow of an MPTCP connection, from the kernel's per-subflow view."""

    local: tuple[str, int]  # (ip without brackets, port)
    remote: tuple[str, int]
    bytes_sent: int | None  # tcpi_bytes_sent (includes retransmissions); None if unknown
    bytes_received: int | None  # tcpi_bytes_received
    rtt_us: int | None  # tcpi_rtt, smoothed RTT in microseconds
    subflow_id: int | None = None  # kernel subflow id (MPTCP_FULL_INFO only)
    tcpi_options: int | None = None  # tcpi_options bits (TCPI_OPT_SYN_DATA, ...)


# struct mptcp_subflow_data {u32 size_subflow_data, num_subflows, size_kernel, size_user}
# aligned(8): 16 bytes, followed by num_subflows elements of size_user bytes.
_SUBFLOW_DATA = struct.Struct("=IIII")
# struct mptcp_subflow_addrs: two unions each as large as __kernel_sockaddr_storage (128 bytes).
_SOCKADDR_STORAGE_SIZE = 128
_SUBFLOW_ADDRS_SIZE = 2 * _SOCKADDR_STORAGE_SIZE
# struct mptcp_subflow_info {u32 id; (4 bytes padding) struct mptcp_subflow_addrs addrs}.
_SUBFLOW_INFO_SIZE = 8 + _SUBFLOW_ADDRS_SIZE
# struct mptcp_full_info: six u32, two __aligned_u64 user pointers, then struct mptcp_info. The
# kernel reads the first 40 bytes and rejects non-zero "set by kernel" fields with EINVAL.
_FULL_INFO_HEAD = struct.Struct("=IIIIIIQQ")
# Our buffer for struct tcp_info per subflow; the kernel copies min(this, its size) (280 on 6.18).
_TCP_INFO_SIZE = 256
# tcp_info offsets (linux/tcp.h): tcpi_options u8 @5, tcpi_rtt u32 @68, tcpi_bytes_received u64
# @128 (4.1+), tcpi_bytes_sent u64 @200 (4.19+).
_TCPI_OPTIONS = 5
_TCPI_RTT = 68
_TCPI_BYTES_RECEIVED = 128
_TCPI_BYTES_SENT = 200
# Subflows asked for per call; the in-kernel path manager allows at most 8 extra subflows.
_MAX_SUBFLOWS = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_libc.getsockopt.restype = ctypes.c_int

# Set when MPTCP_FULL_INFO answered EOPNOTSUPP while the legacy options worked: a pre-6.5 kernel.
_full_info_missing = False


def _raw_getsockopt(fd: int, level: int, option: int, buffer: ctypes.Array[ctypes.c_char]) -> int:
    """getsockopt() with an input buffer (socket.getsockopt cannot pass one); returns optlen."""
    optlen = ctypes.c_uint32(len(buffer))
    if _libc.getsockopt(fd, level, option, buffer, ctypes.byref(optlen)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return optlen.value


def _decode_sockaddr(raw: bytes) -> tuple[str, int]:
    family = struct.unpack_from("=H", raw, 0)[0]
    if family == socket.AF_INET:
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return "", 0


def decode_subflow_addrs(raw: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    """Decode one struct mptcp_subflow_addrs (256 bytes) into ((local ip, port), (remote ip, port))."""
    return (
        _decode_sockaddr(raw[:_SOCKADDR_STORAGE_SIZE]),
        _decode_sockaddr(raw[_SOCKADDR_STORAGE_SIZE:_SUBFLOW_ADDRS_SIZE]),
    )


def _decode_tcp_info(raw: bytes) -> tuple[int | None, int | None, int | None, int | None]:
    """(bytes_sent, bytes_received, rtt_us, options) from a struct tcp_info of any length."""

    def field(fmt: str, offset: int) -> int | None:
        if offset + struct.calcsize(fmt) > len(raw):
            return None
        value: int = struct.unpack_from("=" + fmt, raw, offset)[0]
        return value

    return (
        field("Q", _TCPI_BYTES_SENT),
        field("Q", _TCPI_BYTES_RECEIVED),
        field("I", _TCPI_RTT),
        field("B", _TCPI_OPTIONS),
    )


def _subflows_full_info(fd: int) -> list[SubflowInfo]:
    sf_buf = ctypes.create_string_buffer(_SUBFLOW_INFO_SIZE * _MAX_SUBFLOWS)
    tcp_buf = ctypes.create_string_buffer(_TCP_INFO_SIZE * _MAX_SUBFLOWS)
    head = _FULL_INFO_HEAD.pack(
        0,
        _TCP_INFO_SIZE,
        0,
        _SUBFLOW_INFO_SIZE,
        0,
        _MAX_SUBFLOWS,
        ctypes.addressof(sf_buf),
        ctypes.addressof(tcp_buf),
    )
    # Only the header: we read mptcp_info separately when we need it, and a shorter optlen
    # spares the kernel filling it in.
    buffer = ctypes.create_string_buffer(head, _FULL_INFO_HEAD.size)
    _raw_getsockopt(fd, SOL_MPTCP, MPTCP_FULL_INFO, buffer)
    (_, size_tcpinfo_user, _, size_sfinfo_user, num_subflows, _, _, _) = _FULL_INFO_HEAD.unpack(
        buffer.raw
    )
    count = min(num_subflows, _MAX_SUBFLOWS)
    sf_raw, tcp_raw = sf_buf.raw, tcp_buf.raw
    result = []
    for index in range(count):
        entry = sf_raw[index * size_sfinfo_user : (index + 1) * size_sfinfo_user]
        subflow_id = struct.unpack_from("=I", entry, 0)[0]
        local, remote = decode_subflow_addrs(entry[8:])
        tcp = tcp_raw[index * size_tcpinfo_user : (index + 1) * size_tcpinfo_user]
        sent, received, rtt, options = _decode_tcp_info(tcp)
        result.append(SubflowInfo(local, remote, sent, received, rtt, subflow_id, options))
    return result


def _legacy_array(fd: int, option: int, element_size: int) -> list[bytes]:
    buffer = ctypes.create_string_buffer(_SUBFLOW_DATA.size + element_size * _MAX_SUBFLOWS)
    ctypes.memmove(
        buffer, _SUBFLOW_DATA.pack(_SUBFLOW_DATA.size, 0, 0, element_size), _SUBFLOW_DATA.size
    )
    length = _raw_getsockopt(fd, SOL_MPTCP, option, buffer)
    _, num_subflows, _, size_user = _SUBFLOW_DATA.unpack_from(buffer.raw, 0)
    raw = buffer.raw[_SUBFLOW_DATA.size : length]
    count = min(num_subflows, _MAX_SUBFLOWS, len(raw) // size_user if size_user else 0)
    return [raw[i * size_user : (i + 1) * size_user] for i in range(count)]


def _subflows_legacy(fd: int) -> list[SubflowInfo]:
    addrs = _legacy_array(fd, MPTCP_SUBFLOW_ADDRS, _SUBFLOW_ADDRS_SIZE)
    try:
        infos = _legacy_array(fd, MPTCP_TCPINFO, _TCP_INFO_SIZE)
    except OSError:
        infos = []
    # Two calls are two snapshots: pair tcp_info with addresses only if the subflow set matched.
    if len(infos) != len(addrs):
        infos = []
    result = []
    for index, raw in enumerate(addrs):
        local, remote = decode_subflow_addrs(raw)
        sent, received, rtt, options = (
            _decode_tcp_info(infos[index]) if infos else (None, None, None, None)
        )
        result.append(SubflowInfo(local, remote, sent, received, rtt, None, options))
    return result


def get_subflows(sock: socket.socket) -> list[SubflowInfo]:
    """The live subflows of an MPTCP connection with addresses and tcp_info counters.

    One MPTCP_FULL_INFO getsockopt (6.5+), else MPTCP_SUBFLOW_ADDRS + MPTCP_TCPINFO (5.16+).
    [] for a TCP socket, a connection that fell back to TCP, a closed socket or an older kernel.
    """
    global _full_info_missing
    if not is_mptcp_socket(sock):
        return []
    fd = sock.fileno()
    if fd < 0:
        return []
    try:
        if not _full_info_missing:
            try:
                return _subflows_full_info(fd)
            except OSError as exc:
                if exc.errno not in _NOT_MPTCP_ERRNOS:
                    raise
            subflows = _subflows_legacy(fd)
            # The legacy options worked where FULL_INFO did not: the kernel predates 6.5.
            _full_info_missing = True
            return subflows
        return _subflows_legacy(fd)
    except OSError as exc:
        if exc.errno in _NOT_MPTCP_ERRNOS or exc.errno in (errno.EBADF, errno.ENOTCONN):
            return []
        raise


def fastopen_used(sock: socket.socket) -> bool | None:
    """Whether the connection's SYN carried data the peer accepted (TCP Fast Open, 0-RTT).

    Works on either end of a TCP or MPTCP connection (tcp_info of the first subflow);
    None if the kernel does not say.
    """
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(raw) <= _TCPI_OPTIONS:
        return None
    return bool(raw[_TCPI_OPTIONS] & TCPI_OPT_SYN_DATA)


def enable_fastopen_listener(sock: socket.socket, queue_len: int) -> bool:
    """Accept data in SYNs (TCP Fast Open server side) on a listener; False if the kernel refuses.

    Needs net.ipv4.tcp_fastopen bit 0x2 in the namespace to take effect (see sysctl.py).
    MPTCP listeners accept TCP_FASTOPEN at level SOL_TCP since 6.2 (measured on 6.18); older
    kernels refuse it and the listener still works, just without 0-RTT.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, queue_len)
    except OSError as exc:
        log.warning(
            "TCP Fast Open refused on the %s listener (%s): clients cannot send 0-RTT",
            "MPTCP" if is_mptcp_socket(sock) else "TCP",
            exc.strerror,
        )
        return False
    return True


# --- listeners and per-connection options ----------------------------------------------------------


IP_TRANSPARENT = 19  # linux/in.h; socket.IP_TRANSPARENT is missing on some Python builds
IPV6_TRANSPARENT = 75  # linux/in6.h


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT on IPv6 sockets): accept TPROXY'd connections for any
    address, or bind a non-local address (a client's own) before connecting. Needs CAP_NET_ADMIN
    or CAP_NET_RAW; raises OSError (EPERM) otherwise. Accepted sockets inherit it."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK on `sock`: every MPTCP subflow of it carries the mark (the CPE converter's marker,
    turned into a DSCP by an nft rule, since IPV6_TCLASS is refused on MPTCP sockets). Needs
    CAP_NET_ADMIN; raises OSError otherwise."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def create_listener(host: str, port: int, *, backlog: int, fastopen_queue: int, mptcp: bool = True,
                    transparent: bool = False, reuseport: bool = False) -> tuple[socket.socket, bool]:
    """A non-blocking listening socket on (host, port): MPTCP where the kernel has it (TCP clients
    are accepted either way), with TCP Fast Open when `fastopen_queue` > 0. Returns (sock,
    is_mptcp); raises OSError (e.g. EADDRINUSE) after closing what it opened.

    Bound to "::" it is dual-stack (IPv4 clients arrive as IPv4-mapped addresses); bound to any
    other IPv6 address it is IPv6 only. `transparent`: an IP_TRANSPARENT listener, to which TPROXY
    hands connections for other addresses (`set_transparent`); `mptcp=False`: plain TCP.
    `reuseport`: SO_REUSEPORT, so several listeners (one per worker process) share the address
    and the kernel spreads new connections over them by a hash of the 4-tuple; MPTCP listeners
    accept it (applied to the listening subflow; measured on 6.18), and an MP_JOIN still finds
    its connection by token, whichever listener of the group the hash picks.
    """
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sock, is_mptcp = create_socket(family, mptcp=mptcp)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            set_transparent(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1)
        sock.bind((host, port))
        if fastopen_queue > 0:
            enable_fastopen_listener(sock, fastopen_queue)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, is_mptcp


def set_nodelay(sock: socket.socket) -> bool:
    """Disable Nagle: the relay forwards what it gets at once; batching is the endpoints' job.

    MPTCP sockets accept TCP_NODELAY since 5.19 (applied to every subflow); older kernels refuse
    it, which only costs latency, so errors are ignored. False if the kernel refused.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def enable_fastopen_connect(sock: socket.socket) -> bool:
    """TCP_FASTOPEN_CONNECT on a socket about to connect: connect() returns at once and the SYN
    leaves with the first write, carrying its data when a Fast Open cookie of the server is cached
    (TCP: 4.11+; MPTCP: 6.2+, measured on 6.18). False if the kernel refuses: an ordinary connect."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    except OSError:
        return False
    return True


def set_syn_mss(sock: socket.socket, mss: int) -> None:
    """TCP_MAXSEG before connect: the MSS the SYN announces (TCP and MPTCP sockets accept it,
    measured on 6.18). Raises OSError if the kernel refuses the value."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)


def reset_on_close(sock: socket.socket) -> None:
    """Make the coming close() send RST instead of FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- dead peers: keepalive and TCP_USER_TIMEOUT ----------------------------------------------------
#
# Measured on 6.18 (setsockopt on a fresh and an accepted socket of each kind):
#
# | option           | TCP socket | MPTCP socket | without it                                         |
# |------------------|------------|--------------|----------------------------------------------------|
# | SO_KEEPALIVE     | yes        | yes          | an idle connection whose peer vanished (power cut, |
# | TCP_KEEPIDLE     | yes        | yes          | NAT state gone) holds its two descriptors until     |
# | TCP_KEEPINTVL    | yes        | yes          | relay.idle_timeout_s (an hour by default)           |
# | TCP_KEEPCNT      | yes        | yes          |                                                    |
# | TCP_USER_TIMEOUT | yes        | ENOPROTOOPT  | unacknowledged data is retransmitted for           |
# |                  |            |              | net.ipv4.tcp_retries2 (~15 min) before the error   |
#
# On a TCP socket with TCP_USER_TIMEOUT set, the user timeout (not TCP_KEEPCNT) decides when
# unanswered keepalive probes end the connection (tcp_keepalive_timer). On an MPTCP socket the
# keepalive options apply to every subflow. TCP_USER_TIMEOUT is refused on
# MPTCP sockets (also on accepted ones whose client fell back to TCP), so on the client leg a peer
# that vanishes with data in flight is found by the retransmission limit, and an idle one by
# keepalive. But a dead subflow does not end an MPTCP connection: measured on 6.18, when keepalive
# kills the last subflow the MPTCP socket stays established with none, never readable, never in
# error (the kernel waits for a join), so the proxy itself closes connections left without a
# subflow (`live_subflows`, server.py's sweep, limits.subflow_loss_grace_s). Older kernels may refuse more (ENOPROTOOPT/EOPNOTSUPP): the socket then works without
# the option, as above.
_KEEPALIVE_OPTIONS = (
    ("TCP_KEEPIDLE", socket.TCP_KEEPIDLE),
    ("TCP_KEEPINTVL", socket.TCP_KEEPINTVL),
    ("TCP_KEEPCNT", socket.TCP_KEEPCNT),
)
_refused_liveness: set[tuple[bool, str]] = set()


def set_liveness(
    sock: socket.socket, *, user_timeout_s: float, keepalive_idle_s: int, keepalive_interval_s: int,
    keepalive_count: int,
) -> list[str]:
    """Make the kernel find a dead peer of `sock` (see the table above): keepalive after
    `keepalive_idle_s` idle seconds (0: off), TCP_USER_TIMEOUT of `user_timeout_s` (0: the kernel's
    default). Returns the options the kernel refused; each refusal is logged once per socket kind.
    """
    refused: list[str] = []
    settings: list[tuple[str, int, int, int]] = []
    if keepalive_idle_s > 0:
        settings.append(("SO_KEEPALIVE", socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for (name, option), value in zip(
            _KEEPALIVE_OPTIONS, (keepalive_idle_s, keepalive_interval_s, keepalive_count), strict=True
        ):
            settings.append((name, socket.IPPROTO_TCP, option, value))
    mptcp = is_mptcp_socket(sock)
    if user_timeout_s > 0 and not mptcp:
        # Not even tried on MPTCP sockets: 6.18 refuses it there (the table above).
        settings.append(("TCP_USER_TIMEOUT", socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000)))
    for name, level, option, value in settings:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            refused.append(name)
            if (mptcp, name) not in _refused_liveness:
                _refused_liveness.add((mptcp, name))
                log.warning("the kernel refuses %s on %s sockets (%s): dead peers are found later",
                            name, "MPTCP" if mptcp else "TCP", exc.strerror)
    return refused


def live_subflows(sock: socket.socket) -> int | None:
    """Subflows an MPTCP connection has now, the initial one included (mptcpi_subflows_total, 6.8+);
    None for a TCP or fallen-back socket, or a kernel that does not say."""
    info = get_mptcp_info(sock)
    if info is None or info.returned_bytes <= 80:
        return None
    return info.subflows_total
