"""The MPTCP concentrator proxy: the accept loop and the pipeline every connection flows through.

Rooms, in order: accept (the listener's front is known by the listener; strangers' SYNs never
get here when the kernel admission filter is installed, `kernel/admission.py`) -> who may come in
(`policy.check_client`, `policy.max_handshakes`, the per-CPE caps of `limits.py`) -> the front's handshake (`fronts/`: Convert,
SOCKS5) -> where to (`policy.acquire`: connection limits) -> upstream (`upstream.py`, each
candidate in turn) -> relay (`relay.py`). A refusal at any room is answered by the front in its
protocol's own codes; see `fronts/__init__.py` for the interface.

`Proxy` owns the listeners, the connection table, metrics and admin HTTP; `run()` wires in
telemetry and cluster affinity and handles the signals; `mcpool proxy` is `cli.proxy_main`.
Drain: SIGTERM (or `POST /drain`) drains: `/readyz` turns 503, new connections are reset, live
connections continue for up to `drain_timeout_s`, then the rest are closed (reason `drained`) and
the process exits 0. A second SIGTERM exits at once (status 0); SIGINT exits at once (status 130).

Listeners are MPTCP sockets (a kernel without MPTCP stops the start unless
`kernel.require_mptcp` is off, then TCP, said in /readyz; TCP clients are accepted either way), dual-stack when bound to `::`, with TCP_FASTOPEN so a Convert message can arrive in the
SYN (it is then readable as soon as the connection is accepted).

Every per-connection coroutine catches everything, logs one line, counts and closes: no input
can stop the proxy.

Observability (see docs/operations.md): each accepted connection gets a trace
(`observe.telemetry.ConnectionTrace`; a no-op unless OTEL_* configures an exporter) with child
spans for the handshake and the upstream connect and an event per error answer; the subflow
watcher follows its subflows by token from the kernel's MPTCP events; at close one span and one
log line carry the same fields (`observe.telemetry.connection_fields`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, cast

from .cluster.join_address import JoinAddress
from .cluster.podside import PodAffinity
from .config import ProxyConfig, dscp_value, split_hostport
from .connections import Connection, ConnectionObserver, ConnectionTable, Mode
from .fronts import FRONTS, Destination, Front, Handshake
from .kernel.admission import install_script, preinstalled, remove_admission, ruleset_for
from .kernel.mptcp import (
    IPPROTO_MPTCP,
    create_listener,
    get_mptcp_info,
    get_mptcp_token,
    get_subflows,
    live_subflows,
    reset_on_close,
    set_liveness,
    set_nodelay,
)
from .kernel.mptcp_events import MptcpEventHub
from .kernel.path_manager import delete_endpoint, find_signal_endpoint
from .kernel.sysctl import apply_kernel_settings
from .kernel.tproxy import (
    TproxyTarget,
    install_routing,
    install_table,
    mcp_ruleset,
    remove_routing,
    remove_table,
    table_counters,
    table_exists,
)
from .limits import MAX_HANDSHAKES, ClientLimits
from .observe.admin import AdminServer
from .observe.logs import log_connection_closed
from .observe.metrics import PathSample, ProxyMetrics, observe
from .observe.telemetry import (
    SubflowWatcher,
    Telemetry,
    connection_fields,
    initial_subflow,
    join_refusals,
    mptcp_counters,
)
from .policy import (
    REFUSAL_REASONS,
    IPAddress,
    Policy,
    Refusal,
    address_str,
    address_text,
    format_endpoint,
    local_addresses,
    normalize_address,
    read_cookie_secret,
)
from .relay import CloseReason, Relay, RelayPools, resolve_mode
from .resolver import Resolver
from .upstream import UpstreamError, UpstreamOptions, connect_upstream

__all__ = ["READY_LINE", "Connector", "Proxy", "cleanup_kernel", "run", "start_affinity"]

log = logging.getLogger("mcpool.proxy")

READY_LINE = "mcpool-proxy ready"

# An upstream connector: (the connection's handshake, host, port, source address or None) ->
# the connected non-blocking socket; raises UpstreamError.
Connector = Callable[[Handshake, str, int, "str | None"], Awaitable[socket.socket]]

# How many connections one readiness event of a listener accepts before yielding.
_ACCEPT_BATCH = 64

# Refusals at accept allowed to linger at once (each holds a descriptor for up to 1 s); beyond,
# answers are sent without lingering, so a flood of refused clients costs bounded descriptors.
_MAX_LINGERING = 1024

# How long exiting waits for the collector to take the last spans (it never blocks the relay).
_TRACE_FLUSH_S = 2.0


def _client_of(peer: Any) -> tuple[str, int]:
    return address_text(str(peer[0])), int(peer[1])


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
        mptcp_events: MptcpEventHub | None = None,
        connector: Connector | None = None,
        listeners: dict[str, socket.socket] | None = None,
        admin_path: str | None = None,
    ) -> None:
        self.config = config
        # A worker process (`workers.py`): its listening sockets, already bound (SO_REUSEPORT)
        # by the supervisor, by key (`convert`, `socks5`); and its admin server's Unix socket,
        # which the supervisor's admin port reads, instead of `config.admin`.
        self._inherited = dict(listeners or {})
        self.admin_path = admin_path
        # How the upstream room connects (the CPE converter brings its own: marked MPTCP, or a
        # Convert handshake with a converter); default `upstream.connect_upstream`.
        self.connector = connector
        # The process's one mptcp_pm subscription: the subflow watcher's, and the pod affinity's
        # token publisher's when `run()` wires it in.
        self.mptcp_events = mptcp_events if mptcp_events is not None else MptcpEventHub()
        self._own_addresses = None if own_addresses is None else list(own_addresses)
        self.policy = Policy(config.policy, self._with_vip(self._own_addresses or ()))
        self.limits = ClientLimits(config.limits)
        self.resolver = Resolver(config.resolver)
        self.table = ConnectionTable()
        self.metrics = ProxyMetrics(live=self.table.totals)
        if config.listen.transparent:
            self.metrics.add_transparent_counters(self.transparent_counters)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.metrics.add_tracing(self.telemetry.accounting, self.telemetry.enabled)
        self.subflows = SubflowWatcher()
        self._watch_subflows = watch_subflows
        self._watch_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._join_refusals_at_start: dict[str, int] = {}
        self._mptcp_counters_at_start: dict[str, int] = {}
        self.metrics.add_subflow_watch(self.subflows, self._join_refusals_since_start,
                                       self._mptcp_counters_since_start)
        self.access_paths = self.metrics.add_access_paths(config.access_paths, self._path_samples)
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
        self.pools = RelayPools(config.relay.buffer_bytes, pipe_budget_bytes=config.limits.pipe_budget_bytes)
        self.metrics.set_relay_pools(self.pools)
        self.kernel_state: dict[str, Any] = {}
        self.listen_addresses: dict[str, tuple[str, int]] = {}
        self.listeners_mptcp: dict[str, bool] = {}
        self.admission_filter = False  # the kernel/admission.py table is installed
        self._admission_owned = False  # ... and by this process (else by `mcpool admission install`)
        self.admin: AdminServer | None = None
        self._listeners: dict[str, socket.socket] = {}
        # Listeners (by fd) whose accepted sockets inherit the per-connection socket options.
        self._preset: set[int] = set()
        # Implicit mode: transparent listeners not bound yet (address -> last error), the kernel
        # objects installed for them, the retry timer.
        self.transparent_missing: dict[str, str] = {}
        self._tproxy_installed = False
        self._join: JoinAddress | None = None
        self._bind_retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes = 0
        self._lingering = 0  # refusals at accept still lingering (fronts.base.Handshake.linger_s)
        self._idle_handshakes = asyncio.Event()  # set when the last handshake task ends
        self._listening = False
        self._draining = False
        # Unix time the drain began (None: not draining); /readyz reports it with the live
        # count, which is how the operator shows a drain's progress in the pool's status.
        self.drain_started: float | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        self.drain_requested: Callable[[], None] | None = None
        self._drain_task: asyncio.Task[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: str | None = None  # set by fail(): why this pod is not ready for good

    def _with_vip(self, own: Iterable[str | IPAddress]) -> list[str | IPAddress]:
        """The proxy's own addresses plus the pool's VIP: the pod affinity puts the VIP on lo only
        after the listeners (and this list) exist, and a CPE must not reach the pod through it."""
        addresses = list(own)
        if self.config.affinity.vip is not None:
            addresses.append(self.config.affinity.vip)
        return addresses

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Apply kernel settings, bind listeners and the admin server. Raises OSError on bind
        failure (after undoing what was bound)."""
        self._loop = asyncio.get_running_loop()
        self.kernel_state = apply_kernel_settings(self.config.kernel)
        secret_file = self.config.policy.cookie_secret_file
        try:
            secret = None if secret_file is None else read_cookie_secret(secret_file)
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        own: list[str | IPAddress] | list[IPAddress] | None = self._own_addresses
        if own is None:
            own = await asyncio.to_thread(local_addresses)
        self.policy = Policy(self.config.policy, self._with_vip(own), cookie_secret=secret)
        self.metrics.mptcp_checksum.set(_tri(self.kernel_state["mptcp_checksum"]))
        self.metrics.fastopen_server.set(_tri(self.kernel_state["tcp_fastopen_server"]))
        self.metrics.relay_mode.labels(self.relay_mode).set(1)
        try:
            for protocol in FRONTS:
                if protocol == "transparent":
                    continue
                address: str | None = getattr(self.config.listen, protocol)
                if address is not None:
                    self._listen(protocol, address)
            if self.config.listen.transparent:
                self._start_transparent()
            if self.admin_path is not None:
                self.admin = AdminServer(self, "", 0, path=self.admin_path)
                await self.admin.start()
            elif self.config.admin is not None:
                host, port = split_hostport(self.config.admin)
                self.admin = AdminServer(
                    self, "127.0.0.1" if host == "localhost" else host, port, self.config.admin_trusted_clients
                )
                await self.admin.start()
            if self.config.kernel.admission_filter:
                await self._install_admission()
        except BaseException:
            await self.stop()
            raise
        self._listening = True
        self._start_subflow_watch()
        if self.config.limits.keepalive_idle_s > 0 and any(self.listeners_mptcp.values()):
            self._sweep_task = self._loop.create_task(self._sweep_subflowless())
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
                    "admission_filter": self.admission_filter,
                    "event_loop": type(self._loop).__module__.split(".")[0],
                }
            },
        )
        self.metrics.admission_filter.set(int(self.admission_filter))
        if self.config.kernel.mptcp_checksum and not self.kernel_state["mptcp_checksum"]:
            log.warning(
                "MPTCP checksums are OFF in this namespace although kernel.mptcp_checksum is set: "
                "two-subflow streams may be corrupted on some kernels (set net.mptcp.checksum_enabled=1)"
            )

    async def _install_admission(self) -> None:
        """The kernel admission filter: found installed by `mcpool admission install` (the pod's
        init container; then left alone at exit), else installed by the proxy itself."""
        kernel = self.config.kernel
        # Explicit listeners only: a SYN reaches a transparent listener with its original
        # destination port, and implicit mode's table refuses strangers itself (rule 4). With no
        # explicit listener there is nothing to filter (and a transparent listener still unbound
        # must not stop the start).
        ports = sorted({port for key, (_, port) in self.listen_addresses.items() if not key.startswith("transparent")})
        if not ports:
            return
        script = ruleset_for(self.config, ports)
        if await asyncio.to_thread(preinstalled, kernel.admission_status_file, kernel.admission_table, script):
            self.admission_filter = True
            log.info("admission filter installed before the proxy (%s): left in place at exit",
                     kernel.admission_status_file)  # fmt: skip
            return
        self._admission_owned = self.admission_filter = await asyncio.to_thread(install_script, script)

    def _listen(self, protocol: str, address: str, *, key: str | None = None) -> None:
        host, port = split_hostport(address)
        if host == "localhost":
            host = "127.0.0.1"
        key = key or protocol
        inherited = self._inherited.pop(key, None)
        if inherited is not None:
            sock, is_mptcp = inherited, inherited.proto == IPPROTO_MPTCP
        else:
            # "::" serves IPv4 clients too (as IPv4-mapped addresses, which policy unwraps).
            sock, is_mptcp = create_listener(
                host, port, backlog=self.config.listen.backlog, fastopen_queue=self.config.listen.fastopen_queue,
                transparent=protocol == "transparent",
            )
        if not is_mptcp:
            if self.config.kernel.require_mptcp:
                sock.close()
                raise OSError(
                    errno.EPROTONOSUPPORT,
                    f"the {protocol} listener cannot be MPTCP in this network namespace (CONFIG_MPTCP, "
                    f"sysctl net.mptcp.enabled=1?) and kernel.require_mptcp is set: not starting a plain TCP proxy",
                )
            log.warning(
                "the %s listener is plain TCP: this kernel or namespace has no MPTCP (kernel.require_mptcp "
                "is false); clients get one path only, and /readyz says mptcp: false",
                protocol,
            )
        bound = sock.getsockname()
        # TCP_NODELAY and the keepalive settings are copied to every connection the listener
        # accepts (TCP and MPTCP alike; tests/proxy/test_setup_cost.py reads them back on an
        # accepted socket): set once here, not with several setsockopt calls per connection.
        nodelay = set_nodelay(sock)
        live = self.config.limits
        refused = set_liveness(sock, user_timeout_s=live.tcp_user_timeout_s, keepalive_idle_s=live.keepalive_idle_s,
                               keepalive_interval_s=live.keepalive_interval_s, keepalive_count=live.keepalive_count)
        if nodelay and not refused:
            self._preset.add(sock.fileno())
        self._listeners[key] = sock
        self.listen_addresses[key] = (str(bound[0]), int(bound[1]))
        self.listeners_mptcp[key] = is_mptcp
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_acceptable, sock, protocol)

    # -- implicit mode ---------------------------------------------------------------------------
    def _start_transparent(self) -> None:
        """Install the classification table and policy routing (kernel/tproxy.py), announce the
        join address, bind the transparent listeners. A listener that cannot be bound is retried
        every `transparent.bind_retry_s`: meanwhile the table drops the marked SYNs it would get
        (fail closed) and /readyz fails. Failing to install the table is fatal (OSError): a
        transparent listener without it would never see a SYN, and nothing would say so."""
        cfg = self.config.transparent
        targets = [TproxyTarget(*split_hostport(address)) for address in self.config.listen.transparent]
        if cfg.install_rules:
            script = mcp_ruleset(
                targets, allowed=self.config.policy.allowed_cpes,
                dscp=None if cfg.marker.dscp is None else dscp_value(cfg.marker.dscp),
                marker_sources=cfg.marker.source, interfaces=cfg.cpe_interfaces, fwmark=cfg.fwmark,
                table=cfg.nft_table,
            )  # fmt: skip
            try:
                install_table(script)
                self._tproxy_installed = True
                install_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
            except (RuntimeError, OSError) as exc:
                raise OSError(f"cannot install the transparent mode's kernel rules: {exc}") from None
        if cfg.join_address is not None:
            self._join = JoinAddress(cfg.join_address, [t.port for t in targets])
            if not self._join.start():
                log.error("transparent.join_address %s is not announced: CPEs' other links cannot join",
                          cfg.join_address)
        self.transparent_missing = {address: "not bound yet" for address in self.config.listen.transparent}
        self._bind_transparent()

    def _bind_transparent(self) -> None:
        self._bind_retry = None
        for address in list(self.transparent_missing):
            key = "transparent6" if ":" in split_hostport(address)[0] else "transparent"
            try:
                self._listen("transparent", address, key=key)
            except OSError as exc:
                first = self.transparent_missing[address] == "not bound yet"
                self.transparent_missing[address] = f"{exc.strerror or exc}"
                if first:
                    log.error(
                        "cannot bind the transparent listener %s (%s): marked SYNs are dropped and /readyz "
                        "fails until it is bound (retrying every %gs)", address, exc.strerror or exc,
                        self.config.transparent.bind_retry_s,
                    )  # fmt: skip
                continue
            del self.transparent_missing[address]
            log.info("transparent listener bound", extra={"fields": {"listener": address}})
        self.metrics.transparent_unbound.set(len(self.transparent_missing))
        if self.transparent_missing and self._loop is not None and not self._draining:
            self._bind_retry = self._loop.call_later(self.config.transparent.bind_retry_s, self._bind_transparent)

    def _stop_transparent(self) -> None:
        if self._bind_retry is not None:
            self._bind_retry.cancel()
            self._bind_retry = None
        if self._join is not None:
            self._join.stop()
            self._join = None
        cfg = self.config.transparent
        if self._tproxy_installed:
            remove_table(cfg.nft_table)
            remove_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
            self._tproxy_installed = False

    def transparent_counters(self) -> dict[str, int]:
        """The classification table's counters (intercepted, unbound, stranger, passed)."""
        if not self._tproxy_installed:
            return {}
        return table_counters(self.config.transparent.nft_table)

    def _start_subflow_watch(self) -> None:
        # Only MPTCP listeners have subflows to watch; the refusal counters are namespace-wide
        # and cumulative, so they are reported relative to now.
        self._join_refusals_at_start = join_refusals()
        self._mptcp_counters_at_start = mptcp_counters()
        if not self._watch_subflows or not (any(self.listeners_mptcp.values()) or self.config.listen.transparent):
            return
        # A transparent connection's local port is its original destination's, not a listener's:
        # then every server-side connection of this namespace is watched.
        ports = frozenset(port for _, port in self.listen_addresses.values())
        self.subflows.listen_ports = frozenset() if self.config.listen.transparent else ports
        assert self._loop is not None
        self._watch_task = self._loop.create_task(self.subflows.run(self.mptcp_events))

    async def _sweep_subflowless(self) -> None:
        """Close MPTCP client connections that have had no subflow for limits.subflow_loss_grace_s:
        the kernel keeps them, silently, when keepalive kills their last subflow (kernel/mptcp.py).
        One MPTCP_INFO read per live MPTCP connection per keepalive interval."""
        limits = self.config.limits
        since: dict[int, float] = {}
        while True:
            await asyncio.sleep(limits.keepalive_interval_s)
            now = time.monotonic()
            seen: set[int] = set()
            for conn in self.table:
                if not conn.mptcp or conn.relay.client.fileno() < 0:
                    continue
                if live_subflows(conn.relay.client) != 0:
                    continue
                seen.add(conn.id)
                first = since.setdefault(conn.id, now)
                if now - first >= limits.subflow_loss_grace_s:
                    log.info("closing connection %d: no subflow for %.0f s", conn.id, now - first)
                    conn.relay.abort(CloseReason.CLIENT_LOST)
            for gone in set(since) - seen:
                del since[gone]

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
                        yield (conn.id, (sf.local, sf.remote), sf.local[0], sf.remote[0],
                               sf.bytes_received or 0, sf.bytes_sent or 0)
                    continue
            # Plain TCP (or subflows unreadable): one path, the client's address, both ends alike.
            yield conn.id, None, conn.client[0], conn.client[0], conn.relay.bytes_up, conn.relay.bytes_down

    def _close_listeners(self) -> None:
        self._preset.clear()
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
            self.drain_started = time.time()
            self.metrics.drain_started.set(self.drain_started)
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
        self._stop_transparent()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            await asyncio.gather(self._sweep_task, return_exceptions=True)
            self._sweep_task = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self._admission_owned:
            await asyncio.to_thread(remove_admission, self.config.kernel.admission_table)
            self._admission_owned = False
        self.admission_filter = False
        await self.resolver.close()
        self.pools.close()

    # -- admin target --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._listening and not self._draining and self.failure is None and not self.transparent_missing

    def fail(self, reason: str) -> None:
        """A part the pod depends on died (e.g. the affinity's heartbeat): not ready from now on,
        with `reason` in /readyz; the caller drains and exits non-zero."""
        if self.failure is None:
            self.failure = reason
        self.stop_accepting()

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
            "drain_started": self.drain_started,
            "connections": len(self.table),
            "mptcp_checksum": self.kernel_state.get("mptcp_checksum"),
            "tcp_fastopen_server": self.kernel_state.get("tcp_fastopen_server"),
            "relay_mode": self.relay_mode,
            "failure": self.failure,
            # False: a listener fell back to plain TCP (only with kernel.require_mptcp false).
            "mptcp": bool(self.listeners_mptcp) and all(self.listeners_mptcp.values()),
            "listeners_mptcp": dict(self.listeners_mptcp),
            "admission_filter": self.admission_filter,
            **({"transparent_unbound": dict(self.transparent_missing)} if self.config.listen.transparent else {}),
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
        preset = listener.fileno() in self._preset
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
                reset_on_close(sock)
                sock.close()
                continue
            task = self._loop.create_task(self._handle(sock, peer, protocol, preset))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_accept(self, listener: socket.socket, protocol: str) -> None:
        if self._listening and listener.fileno() >= 0 and self._loop is not None:
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener, protocol)

    async def _handle(self, sock: socket.socket, peer: Any, protocol: str, preset: bool = False) -> None:
        """One accepted connection, through the rooms: who may come in, the front's handshake,
        where to, upstream, relay. Catches everything: no input can stop the proxy."""
        self.metrics.child(self.metrics.accepted, protocol).inc()
        self.metrics.handshaking.inc()
        handed_over = False
        try:
            client = _client_of(peer)
        except (ValueError, IndexError, TypeError):  # not an IP peer: nothing else to do with it
            client = ("?", 0)
        front = FRONTS[protocol]
        hs = Handshake(sock, client, protocol, self.telemetry.connection(protocol, client), self.policy,
                       self.config, self.metrics, self.resolver, loop=self._loop)  # fmt: skip
        started = time.monotonic()
        self._handshakes += 1
        in_handshake = True
        admitted: IPAddress | None = None
        try:
            sock.setblocking(False)
            if not preset:
                set_nodelay(sock)
                live = self.config.limits
                set_liveness(sock, user_timeout_s=live.tcp_user_timeout_s, keepalive_idle_s=live.keepalive_idle_s,
                             keepalive_interval_s=live.keepalive_interval_s, keepalive_count=live.keepalive_count)
            # Refuse strangers and floods before reading anything: a client outside
            # policy.allowed_cpes, or one beyond policy.max_handshakes, must not hold a
            # descriptor for the whole handshake timeout (nor guess SOCKS5 passwords).
            refusal = self.policy.check_client(client[0])
            if refusal is None and self._handshakes > self.config.policy.max_handshakes:
                refusal = Refusal(
                    MAX_HANDSHAKES,
                    f"{self._handshakes - 1} connections already in their handshake "
                    f"(policy.max_handshakes={self.config.policy.max_handshakes})",
                )
            if refusal is None:
                # Per-CPE caps (limits.*): one allowed CPE must not take every slot above.
                cpe = normalize_address(client[0])
                refusal = self.limits.admit(cpe)
                if refusal is None:
                    admitted = cpe
            if refusal is not None:
                # A refused connection holds no handshake slot while its answer lingers, or a
                # flood of refusals would itself fill policy.max_handshakes; and past
                # _MAX_LINGERING lingering refusals the answer is sent without lingering.
                self._handshakes -= 1
                in_handshake = False
                if self._lingering >= _MAX_LINGERING:
                    hs.linger_s = 0.0
                self._lingering += 1
                try:
                    await front.refuse_at_accept(hs, refusal)
                finally:
                    self._lingering -= 1
            else:
                handed_over = await self._pipeline(front, hs)
        except asyncio.CancelledError:
            hs.count_error("cancelled")
        except Exception as exc:  # noqa: BLE001 - never let one client take the proxy down
            hs.count_error("internal")
            log.error(
                "handshake failed unexpectedly: %r",
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
                extra={"fields": {"protocol": protocol, "client": format_endpoint(*client)}},
            )
        finally:
            if in_handshake:
                self._handshakes -= 1
            if admitted is not None:
                self.limits.handshake_done(admitted)
            self.metrics.handshaking.dec()
            try:
                if not handed_over:
                    try:
                        self._finish_unrelayed(hs, time.monotonic() - started)
                    finally:
                        sock.close()
            finally:
                if not self._tasks_pending():
                    self._idle_handshakes.set()

    async def _pipeline(self, front: Front[Any], hs: Handshake) -> bool:
        """The front's handshake, then where to, upstream and relay; True once the relay has the
        connection. Every refusal is the front's to answer, in its own protocol."""
        dest = await front.handshake(hs)
        if dest is None:
            return False
        cpe = hs.client[0]
        refusal = self.policy.acquire(cpe)
        if refusal is not None:
            await front.refuse_over_limit(hs, dest, refusal)
            return False
        hs.trace.end_handshake()
        # The slot is acquired: give it back on every way out but the relay, or a CPE loses one
        # slot per failure until it is locked out.
        try:
            upstream, early_sent = await self._connect_upstream(hs, dest)
        except UpstreamError as exc:
            self.policy.release(cpe)
            await front.refuse_upstream(hs, dest, exc)
            return False
        except BaseException:
            self.policy.release(cpe)
            raise
        try:
            await front.answer_connected(hs, dest, upstream)
        except BaseException as exc:
            self.policy.release(cpe)
            upstream.close()
            if isinstance(exc, OSError):
                hs.count_error("client_closed")
                return False
            raise
        # What of the client's SYN data the upstream SYN did not carry goes first in the relay,
        # then what the handshake read past its last message.
        rest = dest.early_data[early_sent:]
        self._start_relay(hs, upstream, rest + hs.pending if hs.pending else rest)
        return True

    async def _connect_upstream(self, hs: Handshake, dest: Destination) -> tuple[socket.socket, int]:
        """Connect to the destination's candidates in turn; the first that answers (and how many
        of `dest.early_data` its SYN carried), else the last attempt's UpstreamError."""
        last_error: UpstreamError | None = None
        source = None
        if hs.protocol == "transparent" and self.config.transparent.upstream_source == "client":
            source = hs.client[0]
        options = UpstreamOptions(
            mss=dest.tcp_mss, fastopen_data=dest.early_data, liveness=self.config.limits, source=source
        )
        for candidate in dest.candidates:
            host = address_str(candidate)
            try:
                upstream, sent = await self._connect_one(hs, host, dest.port, options)
            except UpstreamError as exc:
                last_error = exc
                continue
            hs.set_destination(host, dest.port, dest.requested)
            if dest.early_data:
                self.metrics.child(self.metrics.upstream_fastopen, "syn_data" if sent else "no_cookie").inc()
            return upstream, sent
        assert last_error is not None
        raise last_error

    async def _connect_one(
        self, hs: Handshake, host: str, port: int, options: UpstreamOptions
    ) -> tuple[socket.socket, int]:
        trace = hs.trace
        trace.begin_upstream(host, port)
        started = time.monotonic()
        try:
            if self.connector is not None:
                # A connector (the CPE converter's) opens its own way and sends no early data.
                upstream, sent = await self.connector(hs, host, port, options.source), 0
            else:
                upstream, sent = await connect_upstream(
                    host, port, self.config.upstream.protocol, self.config.upstream.connect_timeout_s, options,
                    loop=self._loop,
                )
        except UpstreamError as exc:
            self.metrics.child(self.metrics.upstream_errors, exc.reason).inc()
            trace.end_upstream(exc.reason)
            raise
        observe(self.metrics.upstream_latency, time.monotonic() - started, trace.trace_id)
        trace.end_upstream()
        return upstream, sent

    def _tasks_pending(self) -> bool:
        current = asyncio.current_task(self._loop)
        return any(task is not current and not task.done() for task in self._tasks)

    def _finish_unrelayed(self, hs: Handshake, duration_s: float) -> None:
        """End the span of a connection that never reached the relay."""
        if not hs.trace.recording:
            return
        sock = hs.sock
        info = get_mptcp_info(sock) if sock.fileno() >= 0 else None
        error = hs.error or "handshake_failed"
        fields = connection_fields(
            connection_id=0, mode=hs.protocol, client=hs.client, destination=hs.destination,
            requested=hs.requested, token=None if info is None else info.token_hex,
            mptcp=info is not None, subflows=1 if info is None else info.subflow_count,
            max_subflows=1 if info is None else info.subflow_count, bytes_up=0, bytes_down=0,
            close_reason="refused" if hs.answered else error, duration_s=duration_s, relay_mode=None,
        )
        hs.trace.finish(fields, error=error)

    # -- relaying ------------------------------------------------------------------------------
    def _start_relay(self, hs: Handshake, upstream: socket.socket, initial_up: bytes = b"") -> None:
        client_sock = hs.sock
        assert hs.destination is not None
        relay = Relay(
            client_sock,
            upstream,
            mode=self.relay_mode,
            idle_timeout_s=self.config.relay.idle_timeout_s,
            pools=self.pools,
            initial_up=initial_up,
            loop=self._loop,
        )
        conn = Connection(self.table.next_id(), cast(Mode, hs.protocol), hs.client, hs.destination, relay,
                          requested=hs.requested)
        token = get_mptcp_token(client_sock)
        conn.token = None if token is None else f"{token:08x}"
        conn.mptcp = token is not None
        conn.trace = hs.trace
        if not conn.mptcp:
            self.metrics.child(self.metrics.fallbacks, hs.protocol).inc()
        self.metrics.child(self.metrics.active_by_mode, hs.protocol, "mptcp" if conn.mptcp else "tcp").inc()
        observe(self.metrics.child(self.metrics.handshake_latency, hs.protocol),
                time.monotonic() - hs.started, conn.trace.trace_id)
        if token is not None:
            subflows = self.subflows
            # The initial subflow from the socket's addresses only when the kernel's events have
            # not told it yet (they usually have: two system calls fewer per connection).
            first = None if subflows.knows_initial(token) else initial_subflow(client_sock)
            subflows.attach(token, conn.trace, sock=client_sock, initial=[first] if first else [])
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
        self.access_paths.closed(conn.id, conn.client[0], conn.relay.bytes_up, conn.relay.bytes_down)
        if len(self.table) == 0:
            self._empty.set()
        state = self.subflows.detach(int(conn.token, 16)) if conn.token is not None else None
        # A TCP (or fallen-back) connection is one path: 1 subflow.
        subflows = state.count if state is not None else 1
        max_subflows = max(state.max_subflows, 1) if state is not None else 1
        self.metrics.subflows_per_connection.observe(max_subflows)
        if not (conn.trace.recording or log.isEnabledFor(logging.INFO)):
            # Neither a span nor a log line would carry the fields: do not build them.
            self._notify_closed(conn, str(reason))
            return
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
        self._notify_closed(conn, str(reason))

    def _notify_closed(self, conn: Connection, reason: str) -> None:
        for observer in self.observers:
            try:
                observer.closed(conn, reason)
            except Exception:  # noqa: BLE001
                log.exception("connection observer failed on close")


def _tri(value: bool | None) -> int:
    return -1 if value is None else int(value)


# -- crash leftovers ------------------------------------------------------------------------------
def cleanup_kernel(config: ProxyConfig) -> list[str]:
    """Remove what a proxy of `config` installs in its network namespace and cannot remove when
    it is killed (SIGKILL, OOM, a node's eviction past the grace period): implicit mode's nft
    table and policy routing, the join address's path-manager endpoint, the admission filter.
    A normal exit removes them itself, and a start replaces them (one `nft -f` transaction,
    stale ip rules deleted first), so this is for a node the proxy leaves for good:
    `mcpool proxy --cleanup-only`, which the operator's on-path node cleanup runs. Idempotent;
    returns what it removed; RuntimeError or OSError if `nft`/`ip` cannot run."""
    removed: list[str] = []
    cfg = config.transparent
    if config.listen.transparent and cfg.install_rules:
        if table_exists(cfg.nft_table):
            remove_table(cfg.nft_table)
            removed.append(f"nft table inet {cfg.nft_table}")
        remove_routing(cfg.fwmark, cfg.route_table, cfg.rule_priority)
        removed.append(f"ip rule fwmark {cfg.fwmark:#x} lookup {cfg.route_table} and its routes")
    if config.listen.transparent and cfg.join_address is not None:
        host, port = split_hostport(cfg.join_address)
        ports = {split_hostport(address)[1] for address in config.listen.transparent}
        endpoint = find_signal_endpoint(host, None if port in ports else port)
        if endpoint is not None:
            delete_endpoint(endpoint)
            removed.append(f"mptcp endpoint {endpoint} ({cfg.join_address})")
    if config.kernel.admission_filter:
        remove_admission(config.kernel.admission_table)
        removed.append(f"nft table inet {config.kernel.admission_table} (if it was the admission filter)")
    return removed


# -- main -----------------------------------------------------------------------------------------
async def run(config: ProxyConfig, *, ready: Callable[[], None] | None = None,
              listeners: dict[str, socket.socket] | None = None, admin_path: str | None = None) -> int:
    """Run a proxy until SIGTERM/SIGINT (or POST /drain); the process's exit status.
    `listeners` and `admin_path`: a worker process's (see `Proxy` and `workers.py`)."""
    loop = asyncio.get_running_loop()
    telemetry = Telemetry.from_environment(config)
    proxy = Proxy(config, telemetry=telemetry, listeners=listeners, admin_path=admin_path)
    try:
        await proxy.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await asyncio.to_thread(telemetry.shutdown, 0.1)
        return 1
    affinity = await start_affinity(proxy)
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
        await _first_of(drain_requested.wait(), immediate.wait(), affinity.died.wait())
        if affinity.died.is_set() and not (drain_requested.is_set() or immediate.is_set()):
            # Never a healthy-looking pod that no longer steers: unready, drain, exit non-zero
            # so the StatefulSet restarts it.
            proxy.fail(f"affinity: {affinity.failure}")
            log.critical("stopping: %s", proxy.failure)
            exit_status = 1
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


async def start_affinity(proxy: Proxy) -> PodAffinity:
    """Cluster affinity (docs/affinity.md) for a started proxy: register the pod, publish tokens
    (over the proxy's own mptcp_pm subscription), join address; it observes the proxy's
    connections from now on."""
    affinity = PodAffinity(proxy.config.affinity, [port for _, port in proxy.listen_addresses.values()],
                           metrics_registry=proxy.metrics.registry, mptcp_events=proxy.mptcp_events)
    proxy.observers.append(affinity)
    await affinity.start()
    return affinity


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
