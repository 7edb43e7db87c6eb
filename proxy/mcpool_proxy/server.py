"""The MPTCP concentrator proxy: listeners, the RFC 8803 Convert and SOCKS5 handshakes, and the
wiring of policy, upstream connect, relay, connection table, metrics and admin HTTP.

`mcpool proxy --config FILE` runs `main()`: it validates the configuration (one line per problem
and exit status 2 if invalid), applies the kernel settings of `config.kernel` in the proxy's
network namespace (MPTCP DSS checksums; the TCP Fast Open server bit), binds the listeners and the
admin server, then prints exactly `mcpool-proxy ready` on stdout. SIGTERM (or `POST /drain`)
drains: listeners close, `/readyz` turns 503, live connections continue for up to
`drain_timeout_s`, then the rest are closed (reason `drained`) and the process exits 0. A second
SIGTERM exits at once (status 0); SIGINT exits at once (status 130).

Listeners are MPTCP sockets (TCP if the kernel has no MPTCP; TCP clients are accepted either
way), dual-stack when bound to `::`, with TCP_FASTOPEN so a Convert message can arrive in the
SYN (it is then readable as soon as the connection is accepted).

Convert handshake checks, in order, each failure answered with an Error TLV and a close:
malformed/oversized message (1; unsupported version 0; client-only TLV rules 2), client not in
`allowed_cpes` (32), cookie (3), destination refused (32), TCP options in the Connect TLV the
converter cannot honour (33), connection limits (64), upstream connect (96/97/65, see
`upstream.py`). A timeout before a complete message closes without an answer (counted). On success
the answer carries an Extended TCP Header TLV rebuilt from the upstream socket's TCP_INFO (the
kernel does not keep the SYN-ACK itself: ports, flags and options are real, sequence numbers,
window and checksum are zero), and a Supported TCP Extensions TLV if the client sent Info.
Bytes the client sent after its Convert message are never read by the handshake, so the relay
forwards them upstream in order.

Every per-connection coroutine catches everything, logs one line, counts and closes: no input
can stop the proxy.

Observability (issue 3, see docs/operations.md): each accepted connection gets a trace
(`telemetry.ConnectionTrace`; a no-op unless OTEL_* configures an exporter) with child spans for
the handshake and the upstream connect and an event per error answer; the subflow watcher follows
its subflows by token from the kernel's MPTCP events; at close one span and one log line carry the
same fields (`telemetry.connection_fields`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import errno
import functools
import ipaddress
import logging
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .admin import AdminServer
from .affinity.mptcp_events import MptcpEventListener
from .affinity.podside import PodAffinity
from .config import ConfigError, KernelConfig, ProxyConfig, load_config, split_hostport
from .connections import Connection, ConnectionObserver, ConnectionTable, Mode
from .convert import (
    HEADER_BYTES,
    ConnectTLV,
    ConvertError,
    ConvertMessage,
    ErrorCode,
    ExtendedTcpHeaderTLV,
    InfoTLV,
    SupportedTcpExtensionsTLV,
    decode_message,
    encode_message,
    error_message,
    message_length,
    validate_client_request,
)
from .logs import configure_logging, log_connection_closed
from .metrics import PathSample, ProxyMetrics, observe
from .mptcp import (
    SYSCTL_MPTCP_CHECKSUM,
    SYSCTL_TCP_FASTOPEN,
    create_socket,
    enable_fastopen_listener,
    get_mptcp_info,
    get_mptcp_token,
    get_subflows,
    read_sysctl,
    write_sysctl,
)
from .policy import (
    REFUSAL_REASONS,
    IPAddress,
    Policy,
    Refusal,
    address_text,
    format_endpoint,
    local_addresses,
    normalize_address,
)
from .relay import CloseReason, Relay, RelayPools, resolve_mode
from .socks5 import (
    Method,
    Reply,
    Socks5Error,
    encode_method_selection,
    encode_reply,
    encode_userpass_status,
    greeting_length,
    parse_greeting,
    parse_request,
    parse_userpass,
    request_length,
    userpass_length,
)
from .telemetry import (
    NOOP_TRACE,
    ConnectionTrace,
    SubflowWatcher,
    Telemetry,
    connection_fields,
    initial_subflow,
    join_refusals,
    mptcp_counters,
)
from .upstream import UpstreamError, connect_upstream, set_nodelay

__all__ = ["Proxy", "apply_kernel_settings", "configure_logging", "main"]

log = logging.getLogger("mcpool.proxy")

READY_LINE = "mcpool-proxy ready"

# TCP option kinds the converter supports (RFC 8803 Supported TCP Extensions): what the Linux
# stack negotiates with servers (MSS, window scale, SACK, timestamps) and, towards clients, MPTCP.
SUPPORTED_TCP_OPTION_KINDS: tuple[int, ...] = (2, 3, 4, 8, 30)

# After a refusal the proxy half-closes and reads (discarding) for this long before closing:
# closing a socket with unread input sends RST, which can destroy the answer in flight.
_REFUSAL_LINGER_S = 1.0
# How long a SOCKS5 client refused at accept may take to send the request it is refused for.
_REFUSAL_HANDSHAKE_S = 2.0
# Resolved addresses of a SOCKS5 domain name tried in turn, at most.
_SOCKS5_MAX_CANDIDATES = 3

# How many connections one readiness event of a listener accepts before yielding.
_ACCEPT_BATCH = 64

# struct tcp_info: tcpi_options at byte 5, snd_wscale in the low nibble of byte 6,
# tcpi_snd_mss at byte 16 (include/uapi/linux/tcp.h, stable since 2.6).
_TCP_INFO_LEN = 104
_TCPI_OPT_TIMESTAMPS, _TCPI_OPT_SACK, _TCPI_OPT_WSCALE = 1, 2, 4


class _HandshakeFailed(Exception):
    """A handshake ended without a relay; already answered and counted by whoever raised it."""


class _ClientGone(Exception):
    """The client closed before completing its handshake."""


class _Oversize(Exception):
    pass


@dataclass(eq=False, slots=True)
class _Attempt:
    """What the handshake of one accepted connection learnt, for its span and counters."""

    trace: ConnectionTrace
    protocol: str
    error: str | None = None  # the handshake_errors label, once it failed
    answered: bool = False  # an error answer (Convert Error TLV, SOCKS5 reply) was sent
    destination: tuple[str, int] | None = None
    requested: str | None = None
    started: float = 0.0  # time.monotonic() at accept


_NO_ATTEMPT = _Attempt(NOOP_TRACE, "none")
# The attempt whose handshake runs in the current task (each accepted connection has its own).
_attempt: contextvars.ContextVar[_Attempt] = contextvars.ContextVar("mcpool_attempt", default=_NO_ATTEMPT)

# How long exiting waits for the collector to take the last spans (it never blocks the relay).
_TRACE_FLUSH_S = 2.0


# -- kernel settings --------------------------------------------------------------------------------
def apply_kernel_settings(kernel: KernelConfig) -> dict[str, Any]:
    """Apply `config.kernel` in this network namespace (if `apply_sysctls`) and report what is in
    force: {"mptcp_checksum": bool|None, "tcp_fastopen": int|None, "tcp_fastopen_server": bool|None}.

    A checksum setting of false leaves the namespace's value alone (it is never turned off).
    """
    if kernel.apply_sysctls:
        if kernel.mptcp_checksum and read_sysctl(SYSCTL_MPTCP_CHECKSUM) != "1":
            write_sysctl(SYSCTL_MPTCP_CHECKSUM, 1)
        if kernel.tcp_fastopen_server:
            current = read_sysctl(SYSCTL_TCP_FASTOPEN)
            if current is not None and current.isdigit() and not int(current) & 0x2:
                write_sysctl(SYSCTL_TCP_FASTOPEN, int(current) | 0x2)
    checksum = read_sysctl(SYSCTL_MPTCP_CHECKSUM)
    tfo = read_sysctl(SYSCTL_TCP_FASTOPEN)
    tfo_value = int(tfo) if tfo is not None and tfo.isdigit() else None
    return {
        "mptcp_checksum": None if checksum is None else checksum == "1",
        "tcp_fastopen": tfo_value,
        "tcp_fastopen_server": None if tfo_value is None else bool(tfo_value & 0x2),
    }


# -- small helpers ----------------------------------------------------------------------------------
def _reconstruct_synack(sock: socket.socket) -> bytes | None:
    """A TCP header with the options the server's SYN-ACK carried, rebuilt from TCP_INFO.

    None if the kernel will not tell (e.g. TCP_INFO refused on an MPTCP socket).
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        local_port = sock.getsockname()[1]
        remote_port = sock.getpeername()[1]
    except OSError:
        return None
    if len(info) < 20:
        return None
    opts_bits = info[5]
    snd_wscale = info[6] & 0x0F
    (snd_mss,) = struct.unpack_from("=I", info, 16)
    timestamps = bool(opts_bits & _TCPI_OPT_TIMESTAMPS)
    # snd_mss excludes the 12 bytes of timestamp option every segment carries.
    mss = min(snd_mss + (12 if timestamps else 0), 0xFFFF)
    options = struct.pack("!BBH", 2, 4, mss)
    sack = bool(opts_bits & _TCPI_OPT_SACK)
    if sack and timestamps:
        options += bytes([4, 2, 8, 10]) + bytes(8)
    elif timestamps:
        options += bytes([1, 1, 8, 10]) + bytes(8)
    elif sack:
        options += bytes([1, 1, 4, 2])
    if opts_bits & _TCPI_OPT_WSCALE:
        options += bytes([1, 3, 3, snd_wscale])
    data_offset = (20 + len(options)) // 4
    header = struct.pack(
        "!HHIIBBHHH", remote_port, local_port, 0, 0, data_offset << 4, 0x12, 0, 0, 0
    )
    return header + options


def _check_tcp_options(options: bytes) -> ConvertError | None:
    """The Connect TLV's TCP options: only what the kernel negotiates anyway is accepted."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # End of Option List (and the TLV's zero padding)
            return None
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            return ConvertError(ErrorCode.MALFORMED_MESSAGE, "malformed TCP option in Connect TLV")
        if kind not in SUPPORTED_TCP_OPTION_KINDS:
            return ConvertError(ErrorCode.UNSUPPORTED_TCP_OPTION, f"TCP option kind {kind} is not supported")
        i += options[i + 1]
    return None


def _convert_length(prefix: bytes) -> int:
    total = message_length(prefix)
    return HEADER_BYTES if total is None else total


def _client_of(peer: Any) -> tuple[str, int]:
    return address_text(str(peer[0])), int(peer[1])


# str() of an ipaddress object is slow (it formats from the integer each time) and the same
# destinations recur; address objects are immutable, so their text is cached.
_address_str: Callable[[IPAddress], str] = functools.lru_cache(maxsize=4096)(str)


# -- the proxy --------------------------------------------------------------------------------------
class Proxy:
    """One MCP: construct from a `ProxyConfig`, `await start()`, later `drain()`/`stop()`."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        own_addresses: Iterable[str | IPAddress] | None = None,
        observers: Iterable[ConnectionObserver] = (),
        telemetry: Telemetry | None = None,
        watch_subflows: bool = True,
    ) -> None:
        self.config = config
        self._own_addresses = None if own_addresses is None else list(own_addresses)
        self.policy = Policy(config.policy, self._own_addresses or ())
        self.table = ConnectionTable()
        self.metrics = ProxyMetrics(live=self.table.totals)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.metrics.add_tracing(self.telemetry.accounting, self.telemetry.enabled)
        self.subflows = SubflowWatcher()
        self._watch_subflows = watch_subflows
        self._watch_task: asyncio.Task[None] | None = None
        self._join_refusals_at_start: dict[str, int] = {}
        self._mptcp_counters_at_start: dict[str, int] = {}
        self.metrics.add_subflow_watch(self.subflows, self._join_refusals_since_start,
                                       self._mptcp_counters_since_start)
        self.metrics.add_access_paths(config.access_paths, self._path_samples)
        self.metrics.drain_timeout.set(config.drain_timeout_s)
        # These series exist from the start, at 0: a counter's first increment is then a visible
        # rate (a series born at 1 shows no increase), and dashboards show 0 rather than nothing.
        for reason in (*REFUSAL_REASONS, "max_handshakes"):
            self.metrics.child(self.metrics.policy_refusals, reason)
        for protocol in ("convert", "socks5"):
            self.metrics.child(self.metrics.fallbacks, protocol)
            self.metrics.child(self.metrics.handshake_latency, protocol)
            for transport in ("mptcp", "tcp"):
                self.metrics.child(self.metrics.active_by_mode, protocol, transport)
        self.observers: list[ConnectionObserver] = list(observers)
        self.relay_mode: Literal["splice", "buffered"] = resolve_mode(config.relay.mode)
        self.pools = RelayPools(config.relay.buffer_bytes)
        self.kernel_state: dict[str, Any] = {}
        self.listen_addresses: dict[str, tuple[str, int]] = {}
        self.listeners_mptcp: dict[str, bool] = {}
        self.admin: AdminServer | None = None
        self._listeners: dict[str, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes = 0
        self._idle_handshakes = asyncio.Event()  # set when the last handshake task ends
        self._listening = False
        self._draining = False
        self._empty = asyncio.Event()
        self._empty.set()
        self.drain_requested: Callable[[], None] | None = None
        self._drain_task: asyncio.Task[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Apply kernel settings, bind listeners and the admin server. Raises OSError on bind
        failure (after undoing what was bound)."""
        self._loop = asyncio.get_running_loop()
        self.kernel_state = apply_kernel_settings(self.config.kernel)
        if self._own_addresses is None:
            own = await asyncio.to_thread(local_addresses)
            self.policy = Policy(self.config.policy, own)
        self.metrics.mptcp_checksum.set(_tri(self.kernel_state["mptcp_checksum"]))
        self.metrics.fastopen_server.set(_tri(self.kernel_state["tcp_fastopen_server"]))
        self.metrics.relay_mode.labels(self.relay_mode).set(1)
        try:
            for protocol, address in (("convert", self.config.listen.convert), ("socks5", self.config.listen.socks5)):
                if address is not None:
                    self._listen(protocol, address)
            if self.config.admin is not None:
                host, port = split_hostport(self.config.admin)
                self.admin = AdminServer(
                    self, "127.0.0.1" if host == "localhost" else host, port, self.config.admin_trusted_clients
                )
                await self.admin.start()
        except BaseException:
            await self.stop()
            raise
        self._listening = True
        self._start_subflow_watch()
        log.info(
            "proxy listening",
            extra={
                "fields": {
                    "listeners": {k: format_endpoint(*v) for k, v in self.listen_addresses.items()},
                    "listeners_mptcp": self.listeners_mptcp,
                    "admin": self.config.admin,
                    "relay_mode": self.relay_mode,
                    "kernel": self.kernel_state,
                    "own_addresses": [str(a) for a in self.policy.own_addresses],
                }
            },
        )
        if self.config.kernel.mptcp_checksum and not self.kernel_state["mptcp_checksum"]:
            log.warning(
                "MPTCP checksums are OFF in this namespace although kernel.mptcp_checksum is set: "
                "two-subflow streams may be corrupted on some kernels (set net.mptcp.checksum_enabled=1)"
            )

    def _listen(self, protocol: str, address: str) -> None:
        host, port = split_hostport(address)
        if host == "localhost":
            host = "127.0.0.1"
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock, is_mptcp = create_socket(family, mptcp=True)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" serves IPv4 clients too (as IPv4-mapped addresses, which policy unwraps).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1)
            sock.bind((host, port))
            if self.config.listen.fastopen_queue > 0:
                enable_fastopen_listener(sock, self.config.listen.fastopen_queue)
            sock.listen(self.config.listen.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        bound = sock.getsockname()
        self._listeners[protocol] = sock
        self.listen_addresses[protocol] = (str(bound[0]), int(bound[1]))
        self.listeners_mptcp[protocol] = is_mptcp
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_acceptable, sock, protocol)

    def _start_subflow_watch(self) -> None:
        # Only MPTCP listeners have subflows to watch; the refusal counters are namespace-wide
        # and cumulative, so they are reported relative to now.
        self._join_refusals_at_start = join_refusals()
        self._mptcp_counters_at_start = mptcp_counters()
        if not self._watch_subflows or not any(self.listeners_mptcp.values()):
            return
        self.subflows.listen_ports = frozenset(port for _, port in self.listen_addresses.values())
        assert self._loop is not None
        self._watch_task = self._loop.create_task(self.subflows.run(MptcpEventListener))

    def _join_refusals_since_start(self) -> dict[str, int]:
        now = join_refusals()
        return {k: v - self._join_refusals_at_start.get(k, 0) for k, v in now.items()}

    def _mptcp_counters_since_start(self) -> dict[str, int]:
        now = mptcp_counters()
        return {k: v - self._mptcp_counters_at_start.get(k, 0) for k, v in now.items()}

    def _path_samples(self) -> Iterable[PathSample]:
        """Per-subflow bytes of live connections, for the access-path metric (read when scraped:
        one getsockopt per MPTCP connection)."""
        for conn in self.table:
            sock = conn.relay.client
            if conn.mptcp and sock.fileno() >= 0:
                try:
                    subflows = get_subflows(sock)
                except OSError:
                    subflows = []
                if subflows:
                    for sf in subflows:
                        yield ((conn.id, sf.local, sf.remote), sf.local[0], sf.remote[0],
                               sf.bytes_received or 0, sf.bytes_sent or 0)
                    continue
            # Plain TCP (or subflows unreadable): one path, the client's address, both ends alike.
            yield (conn.id,), conn.client[0], conn.client[0], conn.relay.bytes_up, conn.relay.bytes_down

    def _close_listeners(self) -> None:
        for sock in self._listeners.values():
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        self._listening = False

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting, let live connections finish for up to `timeout_s`, then close the rest.
        Returns how many were closed by the deadline."""
        self.stop_accepting()
        log.info("draining", extra={"fields": {"live": len(self.table), "timeout_s": timeout_s}})
        try:
            async with asyncio.timeout(timeout_s):
                # Connections still in their handshake (e.g. waiting for the upstream connect)
                # get their answer and, if it succeeds, their relay: wait for both.
                while self._tasks_pending() or not self._empty.is_set():
                    self._idle_handshakes.clear()
                    if self._tasks_pending():
                        await self._idle_handshakes.wait()
                    await self._empty.wait()
            return 0
        except TimeoutError:
            return self._abort_all()

    def stop_accepting(self) -> None:
        """The first step of a drain, synchronous so that /readyz answers 503 from the moment
        the signal or POST /drain is handled: not ready, and new connections are reset.

        The listening sockets stay open until `stop()`: an MP_JOIN SYN is looked up like any
        SYN and needs the listener on its port, so closing it would leave every live connection
        unable to add or re-add a subflow during the drain — exactly when a CPE that loses a
        link needs it (measured on 6.18: with the listener closed, a join from a newly added
        endpoint never arrived, MPJoinSynRx stayed 0)."""
        if not self._draining:
            self.metrics.drain_started.set(time.time())
        self._draining = True
        self.metrics.draining.set(1)

    def _abort_all(self) -> int:
        aborted = 0
        for conn in self.table:
            conn.relay.abort(CloseReason.DRAINED)
            aborted += 1
        for task in list(self._tasks):
            task.cancel()
        return aborted

    async def stop(self) -> None:
        """Close everything now."""
        self._draining = True
        self._close_listeners()
        self._abort_all()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        self.pools.close()

    # -- admin target --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._listening and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def connections(self) -> list[dict[str, Any]]:
        return self.connection_list()

    def connection_list(self) -> list[dict[str, Any]]:
        return [conn.describe() for conn in self.table]

    def readiness(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "listening": self._listening,
            "draining": self._draining,
            "connections": len(self.table),
            "mptcp_checksum": self.kernel_state.get("mptcp_checksum"),
            "tcp_fastopen_server": self.kernel_state.get("tcp_fastopen_server"),
            "relay_mode": self.relay_mode,
        }

    def render_metrics(self, openmetrics: bool = False) -> bytes:
        return self.metrics.render(openmetrics)

    def request_drain(self) -> None:
        self.stop_accepting()
        if self.drain_requested is not None:
            self.drain_requested()
        elif self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(self.config.drain_timeout_s))

    # -- accepting -----------------------------------------------------------------------------
    def _on_acceptable(self, listener: socket.socket, protocol: str) -> None:
        assert self._loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: pause accepting briefly instead of spinning on the
                    # still-readable listener.
                    log.error("accept failed (%s): pausing accepts for 0.1 s", exc)
                    fd = listener.fileno()
                    self._loop.remove_reader(fd)
                    self._loop.call_later(0.1, self._resume_accept, listener, protocol)
                else:
                    log.warning("accept failed: %s", exc)
                return
            if self._draining:
                # Draining: a new connection is reset at once, so the client retries another
                # pod instead of waiting on one that is going away.
                self.metrics.child(self.metrics.handshake_errors, protocol, "draining").inc()
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            task = self._loop.create_task(self._handle(sock, peer, protocol))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_accept(self, listener: socket.socket, protocol: str) -> None:
        if self._listening and listener.fileno() >= 0 and self._loop is not None:
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener, protocol)

    async def _handle(self, sock: socket.socket, peer: Any, protocol: str) -> None:
        self.metrics.child(self.metrics.accepted, protocol).inc()
        self.metrics.handshaking.inc()
        handed_over = False
        try:
            client = _client_of(peer)
        except (ValueError, IndexError, TypeError):  # not an IP peer: nothing else to do with it
            client = ("?", 0)
        started = time.monotonic()
        attempt = _Attempt(self.telemetry.connection(protocol, client), protocol, started=started)
        _attempt.set(attempt)
        self._handshakes += 1
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            # Refuse strangers and floods before reading anything: a client outside
            # policy.allowed_cpes, or one beyond policy.max_handshakes, must not hold a
            # descriptor for the whole handshake timeout (nor guess SOCKS5 passwords).
            refusal = self.policy.check_client(client[0])
            if refusal is None and self._handshakes > self.config.policy.max_handshakes:
                refusal = Refusal(
                    "max_handshakes",
                    f"{self._handshakes - 1} connections already in their handshake "
                    f"(policy.max_handshakes={self.config.policy.max_handshakes})",
                )
            if refusal is not None:
                await self._refuse_at_accept(sock, client, protocol, refusal)
            elif protocol == "convert":
                handed_over = await self._convert(sock, client)
            else:
                handed_over = await self._socks5(sock, client)
        except _HandshakeFailed:
            pass
        except asyncio.CancelledError:
            self._handshake_error(protocol, "cancelled")
        except Exception as exc:  # noqa: BLE001 - never let one client take the proxy down
            self._handshake_error(protocol, "internal")
            log.error(
                "handshake failed unexpectedly: %r",
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
                extra={"fields": {"protocol": protocol, "client": format_endpoint(*client)}},
            )
        finally:
            self._handshakes -= 1
            self.metrics.handshaking.dec()
            try:
                if not handed_over:
                    try:
                        self._finish_unrelayed(sock, attempt, client, time.monotonic() - started)
                    finally:
                        sock.close()
            finally:
                if not self._tasks_pending():
                    self._idle_handshakes.set()

    async def _refuse_at_accept(
        self, sock: socket.socket, client: tuple[str, int], protocol: str, refusal: Refusal
    ) -> None:
        """Answer a client refused before its handshake: Convert gets its Error TLV (Not
        Authorized 32, or Resource Exceeded 64 for a flood); SOCKS5, whose first message is the
        client's greeting, gets "no acceptable methods" (0xFF) and the close."""
        if protocol == "convert":
            code = ErrorCode.RESOURCE_EXCEEDED if refusal.reason == "max_handshakes" else ErrorCode.NOT_AUTHORIZED
            await self._convert_refuse(sock, client, code, refusal.detail, refusal=refusal)
            return
        answer: bytes | None = encode_method_selection(Method.NO_ACCEPTABLE)
        if refusal.reason != "max_handshakes":
            # RFC 1928's "connection not allowed by ruleset" (0x02) is an answer to a request:
            # take the greeting and the request (briefly, never checking credentials), then say it.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(self.config.policy.handshake_timeout_s, _REFUSAL_HANDSHAKE_S)
            try:
                methods = parse_greeting(await self._read_message(sock, greeting_length, deadline))
                if Method.NO_AUTH in methods:
                    await loop.sock_sendall(sock, encode_method_selection(Method.NO_AUTH))
                    parse_request(await self._read_message(sock, request_length, deadline))
                    answer = encode_reply(Reply.NOT_ALLOWED)
            except (Socks5Error, _Oversize, TimeoutError, _ClientGone, OSError):
                answer = None
        await self._socks5_refuse(sock, client, answer, "not_allowed", refusal.detail, refusal=refusal)

    def _tasks_pending(self) -> bool:
        current = asyncio.current_task()
        return any(task is not current and not task.done() for task in self._tasks)

    def _handshake_error(self, protocol: str, error: str) -> None:
        """Count a handshake that ended without a relay, and remember why for its span."""
        self.metrics.child(self.metrics.handshake_errors, protocol, error).inc()
        _attempt.get().error = error

    def _finish_unrelayed(self, sock: socket.socket, attempt: _Attempt, client: tuple[str, int],
                          duration_s: float) -> None:
        """End the span of a connection that never reached the relay."""
        if not attempt.trace.recording:
            return
        info = get_mptcp_info(sock) if sock.fileno() >= 0 else None
        error = attempt.error or "handshake_failed"
        fields = connection_fields(
            connection_id=0, mode=attempt.protocol, client=client, destination=attempt.destination,
            requested=attempt.requested, token=None if info is None else info.token_hex,
            mptcp=info is not None, subflows=1 if info is None else info.subflow_count,
            max_subflows=1 if info is None else info.subflow_count, bytes_up=0, bytes_down=0,
            close_reason="refused" if attempt.answered else error, duration_s=duration_s, relay_mode=None,
        )
        attempt.trace.finish(fields, error=error)

    async def _read_message(
        self, sock: socket.socket, length_of: Callable[[bytes], int], deadline: float
    ) -> bytes:
        """Read exactly one message whose length `length_of` reveals as its prefix arrives."""
        buf = b""
        limit = self.config.policy.max_handshake_bytes
        # The message is usually in the socket already (it came with or right after the SYN):
        # read what is there without a timeout context and an awaited recv, which cost more than
        # the reads themselves; only a message still on its way takes the awaiting path.
        while True:
            need = length_of(buf)
            if need > limit:
                raise _Oversize(f"handshake message of {need} bytes exceeds policy.max_handshake_bytes ({limit})")
            if len(buf) >= need:
                return buf
            try:
                chunk = sock.recv(need - len(buf))
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                raise _ClientGone(f"client closed after {len(buf)} handshake bytes")
            buf += chunk
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            while True:
                need = length_of(buf)
                if need > limit:
                    raise _Oversize(f"handshake message of {need} bytes exceeds policy.max_handshake_bytes ({limit})")
                if len(buf) >= need:
                    return buf
                chunk = await loop.sock_recv(sock, need - len(buf))
                if not chunk:
                    raise _ClientGone(f"client closed after {len(buf)} handshake bytes")
                buf += chunk

    async def _close_after_answer(self, sock: socket.socket) -> None:
        """Half-close, discard what the client still sends (briefly), close (by the caller)."""
        loop = asyncio.get_running_loop()
        try:
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(_REFUSAL_LINGER_S):
                while await loop.sock_recv(sock, 4096):
                    pass
        except (TimeoutError, OSError):
            pass

    def _log_refusal(self, protocol: str, client: tuple[str, int], error: str, detail: str, **fields: Any) -> None:
        trace = _attempt.get().trace
        if trace.trace_id is not None:
            fields.update(trace_id=trace.trace_id, span_id=trace.span_id)
        log.info(
            "refused: %s",
            detail,
            extra={"fields": {"protocol": protocol, "client": format_endpoint(*client), "error": error, **fields}},
        )

    # -- RFC 8803 Convert ----------------------------------------------------------------------
    async def _convert_refuse(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        code: ErrorCode,
        detail: str,
        value: bytes = b"",
        refusal: Refusal | None = None,
        **fields: Any,
    ) -> None:
        error = code.name.lower()
        self._handshake_error("convert", error)
        if refusal is not None:
            self.metrics.child(self.metrics.policy_refusals, refusal.reason).inc()
        self._log_refusal("convert", client, error, detail, code=int(code), **fields)
        attempt = _attempt.get()
        attempt.answered = True
        attempt.trace.error_sent("convert", error, int(code), detail)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, error_message(code, value))
        except OSError:
            return
        await self._close_after_answer(sock)

    async def _convert(self, sock: socket.socket, client: tuple[str, int]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.policy.handshake_timeout_s
        try:
            raw = await self._read_message(sock, _convert_length, deadline)
            message: ConvertMessage = decode_message(raw)
            connect = validate_client_request(message)
        except ConvertError as exc:
            await self._convert_refuse(sock, client, exc.code, exc.detail)
            return False
        except _Oversize as exc:
            await self._convert_refuse(sock, client, ErrorCode.MALFORMED_MESSAGE, str(exc))
            return False
        except TimeoutError:
            self._handshake_error("convert", "timeout")
            self._log_refusal("convert", client, "timeout", "no complete Convert message in time")
            return False
        except (_ClientGone, OSError) as exc:
            self._handshake_error("convert", "client_closed")
            log.debug("convert client %s gone: %s", format_endpoint(*client), exc)
            return False

        refusal = self.policy.check_cookie(message.cookie.cookie if message.cookie is not None else None)
        if refusal is not None:
            await self._convert_refuse(sock, client, ErrorCode.MISSING_COOKIE, refusal.detail, refusal=refusal)
            return False
        wants_info = any(isinstance(tlv, InfoTLV) for tlv in message.tlvs)
        if connect is None:
            # Info only: say what we support and close; there is nothing to relay.
            try:
                await loop.sock_sendall(sock, encode_message([SupportedTcpExtensionsTLV(SUPPORTED_TCP_OPTION_KINDS)]))
            except OSError:
                self._handshake_error("convert", "client_closed")
                return False
            await self._close_after_answer(sock)
            return False
        return await self._convert_connect(sock, client, connect, wants_info)

    async def _convert_connect(
        self, sock: socket.socket, client: tuple[str, int], connect: ConnectTLV, wants_info: bool
    ) -> bool:
        loop = asyncio.get_running_loop()
        dest = (_address_str(connect.address), connect.port)
        dest_text = format_endpoint(*dest)
        attempt = _attempt.get()
        attempt.destination = dest
        attempt.trace.set_destination(*dest)
        refusal = self.policy.check_destination(connect.address, connect.port)
        if refusal is not None:
            await self._convert_refuse(
                sock, client, ErrorCode.NOT_AUTHORIZED, refusal.detail, refusal=refusal, destination=dest_text
            )
            return False
        option_error = _check_tcp_options(connect.tcp_options)
        if option_error is not None:
            await self._convert_refuse(sock, client, option_error.code, option_error.detail, destination=dest_text)
            return False
        refusal = self.policy.acquire(client[0])
        if refusal is not None:
            await self._convert_refuse(
                sock, client, ErrorCode.RESOURCE_EXCEEDED, refusal.detail, refusal=refusal, destination=dest_text
            )
            return False
        attempt.trace.end_handshake()
        try:
            upstream = await self._connect_upstream(dest)
        except UpstreamError as exc:
            self.policy.release(client[0])
            await self._convert_refuse(
                sock, client, exc.convert_code, exc.detail, exc.convert_value, destination=dest_text
            )
            return False
        except BaseException:
            self.policy.release(client[0])
            raise
        try:
            tlvs: list[Any] = []
            if wants_info:
                tlvs.append(SupportedTcpExtensionsTLV(SUPPORTED_TCP_OPTION_KINDS))
            header = _reconstruct_synack(upstream)
            if header is not None:
                tlvs.append(ExtendedTcpHeaderTLV(header))
            await loop.sock_sendall(sock, encode_message(tlvs))
        except BaseException as exc:
            self.policy.release(client[0])
            upstream.close()
            if isinstance(exc, OSError):
                self._handshake_error("convert", "client_closed")
                return False
            raise
        self._start_relay("convert", sock, upstream, client, dest)
        return True

    async def _connect_upstream(self, dest: tuple[str, int]) -> socket.socket:
        trace = _attempt.get().trace
        trace.begin_upstream(*dest)
        started = time.monotonic()
        try:
            upstream = await connect_upstream(
                dest[0], dest[1], self.config.upstream.protocol, self.config.upstream.connect_timeout_s
            )
        except UpstreamError as exc:
            self.metrics.child(self.metrics.upstream_errors, exc.reason).inc()
            trace.end_upstream(exc.reason)
            raise
        observe(self.metrics.upstream_latency, time.monotonic() - started, trace.trace_id)
        trace.end_upstream()
        return upstream

    # -- SOCKS5 --------------------------------------------------------------------------------
    async def _socks5_refuse(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        answer: bytes | None,
        error: str,
        detail: str,
        refusal: Refusal | None = None,
        **fields: Any,
    ) -> None:
        self._handshake_error("socks5", error)
        if refusal is not None:
            self.metrics.child(self.metrics.policy_refusals, refusal.reason).inc()
        self._log_refusal("socks5", client, error, detail, **fields)
        if answer is not None:
            attempt = _attempt.get()
            attempt.answered = True
            # The code the client reads: the reply field (or the method/auth status byte).
            attempt.trace.error_sent("socks5", error, answer[1] if len(answer) > 1 else None, detail)
            try:
                await asyncio.get_running_loop().sock_sendall(sock, answer)
            except OSError:
                return
        await self._close_after_answer(sock)

    async def _socks5(self, sock: socket.socket, client: tuple[str, int]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.policy.handshake_timeout_s
        stage = "greeting"
        try:
            methods = parse_greeting(await self._read_message(sock, greeting_length, deadline))
            auth = self.policy.socks5_auth_required
            method = Method.USERNAME_PASSWORD if auth else Method.NO_AUTH
            if method not in methods:
                wanted = "username/password authentication" if auth else "the no-authentication method"
                await self._socks5_refuse(
                    sock, client, encode_method_selection(Method.NO_ACCEPTABLE), "no_acceptable_method",
                    f"client does not offer {wanted}",
                )
                return False
            await loop.sock_sendall(sock, encode_method_selection(method))
            if auth:
                stage = "authentication"
                username, password = parse_userpass(await self._read_message(sock, userpass_length, deadline))
                refusal = self.policy.check_socks5_credentials(username, password)
                if refusal is not None:
                    await self._socks5_refuse(
                        sock, client, encode_userpass_status(False), "auth_failed", refusal.detail, refusal=refusal
                    )
                    return False
                await loop.sock_sendall(sock, encode_userpass_status(True))
            stage = "request"
            request = parse_request(await self._read_message(sock, request_length, deadline))
        except Socks5Error as exc:
            answer = None if exc.reply is None or stage != "request" else encode_reply(exc.reply)
            error = "protocol_error" if exc.reply is None else exc.reply.name.lower()
            await self._socks5_refuse(sock, client, answer, error, f"{stage}: {exc.detail}")
            return False
        except _Oversize as exc:
            answer = encode_reply(Reply.GENERAL_FAILURE) if stage == "request" else None
            await self._socks5_refuse(sock, client, answer, "oversize", str(exc))
            return False
        except TimeoutError:
            self._handshake_error("socks5", "timeout")
            self._log_refusal("socks5", client, "timeout", f"no complete SOCKS5 {stage} in time")
            return False
        except (_ClientGone, OSError) as exc:
            self._handshake_error("socks5", "client_closed")
            log.debug("socks5 client %s gone during %s: %s", format_endpoint(*client), stage, exc)
            return False

        requested = request.host if isinstance(request.host, str) else None
        attempt = _attempt.get()
        attempt.requested = requested
        attempt.destination = (str(request.host), request.port)
        attempt.trace.set_destination(str(request.host), request.port)
        candidates = await self._socks5_candidates(sock, client, request.host, request.port)
        if candidates is None:
            return False
        refusal = self.policy.acquire(client[0])
        if refusal is not None:
            await self._socks5_refuse(
                sock, client, encode_reply(Reply.NOT_ALLOWED), "not_allowed", refusal.detail, refusal=refusal
            )
            return False
        attempt.trace.end_handshake()
        upstream: socket.socket | None = None
        last_error: UpstreamError | None = None
        released = False
        try:
            for candidate in candidates:
                try:
                    upstream = await self._connect_upstream((str(candidate), request.port))
                    dest = (str(candidate), request.port)
                    attempt.destination = dest
                    attempt.trace.set_destination(dest[0], dest[1], requested)
                    break
                except UpstreamError as exc:
                    last_error = exc
            if upstream is None:
                assert last_error is not None
                self.policy.release(client[0])
                released = True
                await self._socks5_refuse(
                    sock, client, encode_reply(last_error.socks5_reply), last_error.socks5_reply.name.lower(),
                    last_error.detail,
                )
                return False
            bound = upstream.getsockname()
            await loop.sock_sendall(sock, encode_reply(Reply.SUCCEEDED, ipaddress.ip_address(bound[0]), bound[1]))
        except BaseException as exc:
            # The slot was acquired above: give it back on every way out but the relay, or a
            # CPE loses one slot per failure until it is locked out.
            if not released:
                self.policy.release(client[0])
            if upstream is not None:
                upstream.close()
            if isinstance(exc, OSError):
                self._handshake_error("socks5", "client_closed")
                return False
            raise
        self._start_relay("socks5", sock, upstream, client, dest, requested=requested)
        return True

    async def _socks5_candidates(
        self, sock: socket.socket, client: tuple[str, int], host: IPAddress | str, port: int
    ) -> list[IPAddress] | None:
        """Destination addresses allowed by policy (a domain resolved without blocking the loop);
        None if refused (already answered)."""
        if isinstance(host, str):
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                    self.config.upstream.connect_timeout_s,
                )
            except (OSError, TimeoutError) as exc:
                await self._socks5_refuse(
                    sock, client, encode_reply(Reply.HOST_UNREACHABLE), "host_unreachable",
                    f"cannot resolve {host!r}: {exc}",
                )
                return None
            resolved: list[IPAddress] = []
            for info in infos:
                addr = normalize_address(str(info[4][0]))
                if addr not in resolved:
                    resolved.append(addr)
        else:
            resolved = [normalize_address(host)]
        allowed: list[IPAddress] = []
        first_refusal: Refusal | None = None
        for addr in resolved:
            refusal = self.policy.check_destination(addr, port)
            if refusal is None:
                allowed.append(addr)
            elif first_refusal is None:
                first_refusal = refusal
        if not allowed:
            assert first_refusal is not None
            await self._socks5_refuse(
                sock, client, encode_reply(Reply.NOT_ALLOWED), "not_allowed", first_refusal.detail,
                refusal=first_refusal, destination=str(host),
            )
            return None
        # Each candidate may take connect_timeout_s: a name with dozens of unroutable addresses
        # must not hold a client (and its connection slot) for minutes.
        return allowed[:_SOCKS5_MAX_CANDIDATES]

    # -- relaying ------------------------------------------------------------------------------
    def _start_relay(
        self,
        mode: Mode,
        client_sock: socket.socket,
        upstream: socket.socket,
        client: tuple[str, int],
        dest: tuple[str, int],
        requested: str | None = None,
    ) -> None:
        relay = Relay(
            client_sock,
            upstream,
            mode=self.relay_mode,
            idle_timeout_s=self.config.relay.idle_timeout_s,
            pools=self.pools,
        )
        conn = Connection(self.table.next_id(), mode, client, dest, relay, requested=requested)
        token = get_mptcp_token(client_sock)
        conn.token = None if token is None else f"{token:08x}"
        conn.mptcp = token is not None
        attempt = _attempt.get()
        conn.trace = attempt.trace
        transport = "mptcp" if conn.mptcp else "tcp"
        if not conn.mptcp:
            self.metrics.child(self.metrics.fallbacks, mode).inc()
        self.metrics.child(self.metrics.active_by_mode, mode, transport).inc()
        observe(self.metrics.child(self.metrics.handshake_latency, mode),
                time.monotonic() - attempt.started, conn.trace.trace_id)
        if token is not None:
            first = initial_subflow(client_sock)
            self.subflows.attach(token, conn.trace, sock=client_sock, initial=[first] if first else [])
        self.table.add(conn)
        self._empty.clear()
        self.metrics.child(self.metrics.relays, self.relay_mode).inc()
        for observer in self.observers:
            try:
                observer.opened(conn)
            except Exception:  # noqa: BLE001
                log.exception("connection observer failed on open")
        relay.done.add_done_callback(lambda _: self._relay_closed(conn))
        relay.start()

    def _relay_closed(self, conn: Connection) -> None:
        reason = conn.relay.reason or CloseReason.ERROR
        self.table.remove(conn)
        self.policy.release(conn.client[0])
        self.metrics.child(self.metrics.closed, str(reason)).inc()
        self.metrics.child(self.metrics.active_by_mode, conn.mode, "mptcp" if conn.mptcp else "tcp").dec()
        self.metrics.closed_bytes_up += conn.relay.bytes_up
        self.metrics.closed_bytes_down += conn.relay.bytes_down
        if len(self.table) == 0:
            self._empty.set()
        state = self.subflows.detach(int(conn.token, 16)) if conn.token is not None else None
        # A TCP (or fallen-back) connection is one path: 1 subflow.
        subflows = state.count if state is not None else 1
        max_subflows = max(state.max_subflows, 1) if state is not None else 1
        self.metrics.subflows_per_connection.observe(max_subflows)
        fields = connection_fields(
            connection_id=conn.id,
            mode=conn.mode,
            client=conn.client,
            destination=conn.destination,
            requested=conn.requested,
            token=conn.token,
            mptcp=conn.mptcp,
            subflows=subflows,
            max_subflows=max_subflows,
            bytes_up=conn.relay.bytes_up,
            bytes_down=conn.relay.bytes_down,
            close_reason=str(reason),
            duration_s=time.monotonic() - conn.started_monotonic,
            relay_mode="splice" if conn.relay.spliced else "buffered",
        )
        error = conn.relay.error
        conn.trace.finish(fields, error=None if error is None else str(reason))
        log_connection_closed(log, fields, trace_id=conn.trace.trace_id, span_id=conn.trace.span_id, error=error)
        for observer in self.observers:
            try:
                observer.closed(conn, str(reason))
            except Exception:  # noqa: BLE001
                log.exception("connection observer failed on close")


def _tri(value: bool | None) -> int:
    return -1 if value is None else int(value)


# -- main -----------------------------------------------------------------------------------------
async def run(config: ProxyConfig, *, ready: Callable[[], None] | None = None) -> int:
    """Run a proxy until SIGTERM/SIGINT (or POST /drain); the process's exit status."""
    loop = asyncio.get_running_loop()
    telemetry = Telemetry.from_environment(config)
    proxy = Proxy(config, telemetry=telemetry)
    try:
        await proxy.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await asyncio.to_thread(telemetry.shutdown, 0.1)
        return 1
    # Cluster affinity (docs/affinity.md): register the pod, publish tokens, join address.
    affinity = PodAffinity(config.affinity, [port for _, port in proxy.listen_addresses.values()],
                           metrics_registry=proxy.metrics.registry)
    proxy.observers.append(affinity)
    await affinity.start()
    if ready is not None:
        ready()
    drain_requested = asyncio.Event()
    immediate = asyncio.Event()
    exit_status = 0

    def on_sigterm() -> None:
        if drain_requested.is_set():
            immediate.set()
        else:
            proxy.stop_accepting()
            drain_requested.set()

    def on_sigint() -> None:
        nonlocal exit_status
        exit_status = 130
        immediate.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    proxy.drain_requested = drain_requested.set
    try:
        await _first_of(drain_requested.wait(), immediate.wait())
        aborted = 0
        live_at_signal = len(proxy.table)
        drain_started = time.monotonic()
        if not immediate.is_set():
            await affinity.drain()
            drain = asyncio.ensure_future(proxy.drain(config.drain_timeout_s))
            await _first_of(drain, immediate.wait())
            if drain.done():
                aborted = drain.result()
            else:
                drain.cancel()
        live = len(proxy.table)
        await proxy.stop()
        await affinity.stop()
        log.info(
            "stopped",
            extra={"fields": {"drained_in_time": not immediate.is_set() and aborted == 0,
                              "connections_at_signal": live_at_signal,
                              "closed_at_deadline": aborted, "closed_at_exit": live,
                              "drain_s": round(time.monotonic() - drain_started, 3),
                              "exit_status": exit_status}},
        )
        # Bounded: a dead collector costs at most this much of the exit, never more.
        await asyncio.to_thread(telemetry.shutdown, 0.2 if immediate.is_set() else _TRACE_FLUSH_S)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    return exit_status


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it.

    Each relayed connection holds two sockets (plus a pipe pair while bytes are in flight), and
    the default soft limit of 1024 would cap a proxy at a few hundred connections, with the
    excess reset by the kernel instead of answered with Resource Exceeded.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    needed = 2 * max_connections + 256
    if soft < needed:
        log.warning(
            "open-files limit %d is below the %d that policy.max_connections=%d needs; connections "
            "beyond it are refused by the kernel: raise the limit or lower max_connections",
            soft, needed, max_connections,
        )
    return soft


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool proxy", description="Run the MPTCP concentrator proxy.")
    parser.add_argument("--config", required=True, help="YAML configuration file (see config.py)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(args.log_level or config.log_level)
    raise_open_files_limit(config.policy.max_connections)

    def announce() -> None:
        print(READY_LINE, flush=True)

    return asyncio.run(run(config, ready=announce))
