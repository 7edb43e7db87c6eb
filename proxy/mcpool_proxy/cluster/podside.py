"""The pod side of cluster affinity: what one MCP pod does so its connections' subflows find it.

`PodAffinity` is built by the proxy from `ProxyConfig.affinity` and the proxy's listener ports,
started after the listeners are bound and stopped last. By mechanism:

- `director`: registers the pod (`ready`, heartbeat TTL) in the registry (`make_registry`), and
  publishes each MPTCP connection's token from the kernel's `mptcp_pm` netlink events (a
  subscription of the process's `MptcpEventHub`, which the subflow watcher shares) as soon as
  the kernel creates it (before `accept()`, so a join rarely waits at the director), filtered to
  the proxy's listener ports. The proxy's connection observer hooks (`opened`/`closed`) register
  a connection whose netlink event was lost and unregister it at close.
- `join-address`: sets the C flag and announces this pod's join address (`join_address.py`);
  with a Redis backend it also registers the pod, so a director can hash initial SYNs to it, but
  publishes no tokens (joins never pass a director).
- `none`: nothing.

With `affinity.vip` set (the operator renders it for `director` pools), the pod also sets up the
receive side of the director's tunnel at start (`steering.setup_pod_receive`: the VIP on lo and a
VXLAN device that decapsulates; needs CAP_NET_ADMIN) and removes it at stop. Without it no
subflow forwarded by a director can reach this pod. A failure is logged as an error, counted, and
shown by the gauge `mcpool_affinity_pod_receive_ready` (0); the proxy keeps serving.

Tokens can outlive their connection when the kernel's CLOSED event is lost (ENOBUFS) for a
connection the proxy never relayed (refused, or reset before accept): nothing else unregisters
it, and the heartbeat would re-claim it forever. Once per heartbeat TTL the pod lists the
kernel's MPTCP connections (`ss -M`, iproute2) and unregisters a token absent from two listings
in a row (counted in `mcpool_affinity_stale_tokens_dropped`).

On drain the pod re-registers as `draining` (directors send it no new initial subflows but keep
steering joins of its live connections to it); at stop it deregisters everything it owns.

What this module must never do: raise into the proxy. Registry failures are already absorbed by
the registry (deferred + reconnect); everything else here is caught, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import AffinityConfig
from ..kernel import steering
from ..kernel.mptcp_events import MptcpEvent, MptcpEventHub, MptcpSubscription
from ..kernel.path_manager import kernel_tokens
from .join_address import JoinAddress
from .registry import (
    AffinityRegistry,
    PodState,
    RedisRegistry,
    RegistrationResult,
    make_registry,
    resolve_pod_name,
)

if TYPE_CHECKING:
    from ..connections import Connection

__all__ = ["MINE_PRUNE_EVERY", "PodAffinity", "REGISTER_DELAY_ENV", "publish_tokens", "resolve_advertise"]

log = logging.getLogger("mcpool.affinity.pod")

# Test hook only: delay every token registration by this many milliseconds, to provoke the
# join-before-registration race (and to let a test claim a token first: a forced collision).
REGISTER_DELAY_ENV = "MCPOOL_TEST_AFFINITY_REGISTER_DELAY_MS"


# The token publisher restarts after a failure; this many failures in a row, each within the
# window of the previous one, and it is declared dead (`PodAffinity.died`).
PUBLISHER_RESTART_S = 1.0
PUBLISHER_MAX_FAILURES = 5
PUBLISHER_FAILURE_WINDOW_S = 10.0

# publish_tokens prunes its set of own tokens once per this many new connections (amortised O(1)).
MINE_PRUNE_EVERY = 4096


async def publish_tokens(
    registry: AffinityRegistry,
    events: AsyncIterable[MptcpEvent],
    local_ports: Collection[int] | None = None,
) -> None:
    """Run forever: register each server-side MPTCP connection as the kernel creates it, and
    unregister it when the kernel closes it. `events` is a subscription of the process's
    `MptcpEventHub` (or, in tests, a lone `MptcpEventListener`).

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
        async for event in events:
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


def resolve_advertise(config: AffinityConfig) -> str:
    """Where the director forwards this pod's flows: `affinity.advertise`, else $POD_IP."""
    return config.advertise or os.environ.get("POD_IP", "")


class _DelayedRegistry:
    """Wraps a registry so each token registration happens `delay_s` late (the test hook)."""

    def __init__(self, inner: AffinityRegistry, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.pod_name = inner.pod_name
        self._waiting: dict[int, str] = {}

    async def register_connection(self, token: int, cpe: str) -> RegistrationResult:
        self._waiting[token] = cpe
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self._waiting.pop(token, None)
        return await self.inner.register_connection(token, cpe)

    def live_connections(self) -> Mapping[int, str]:
        # Counted as live while delayed, so the proxy's opened() hook does not register twice.
        return {**self._waiting, **self.inner.live_connections()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class PodAffinity:
    """One pod's affinity component; also a `ConnectionObserver` for the proxy."""

    def __init__(
        self,
        config: AffinityConfig,
        listen_ports: Collection[int],
        *,
        metrics_registry: CollectorRegistry | None = None,
        registry: AffinityRegistry | None = None,
        mptcp_events: MptcpEventHub | None = None,
    ) -> None:
        self.config = config
        # The process's one mptcp_pm subscription (the proxy's, shared with its subflow watcher).
        self.mptcp_events = mptcp_events if mptcp_events is not None else MptcpEventHub()
        self.listen_ports = frozenset(listen_ports)
        self.pod_name = resolve_pod_name(config)
        self.enabled = config.mechanism != "none"
        self.registry: AffinityRegistry | None = None
        if registry is not None:
            self.registry = registry
        elif self.enabled and (config.mechanism == "director" or config.backend == "redis"):
            # make_registry reads the advertise address from the config; fill in $POD_IP.
            cfg = config.model_copy(update={"advertise": resolve_advertise(config)})
            self.registry = make_registry(cfg, self.pod_name, metrics_registry)
        self.publish = config.mechanism == "director"
        self.join: JoinAddress | None = None
        if config.mechanism == "join-address" and config.join_address is not None:
            self.join = JoinAddress(config.join_address, self.listen_ports)
        delay_ms = float(os.environ.get(REGISTER_DELAY_ENV, "0") or 0)
        self._tokens: AffinityRegistry | None = self.registry
        if self.registry is not None and delay_ms > 0:
            log.warning("test hook %s=%s: token registrations are delayed", REGISTER_DELAY_ENV, delay_ms)
            self._tokens = _DelayedRegistry(self.registry, delay_ms / 1000)
        self.subscription: MptcpSubscription | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0
        self.state: PodState | None = None
        self.receive_vip = config.vip if self.enabled else None
        self.receive_ready = False
        self._receive_set_up = False
        self._reconciler: asyncio.Task[None] | None = None
        self._absent_once: set[int] = set()  # tokens missing from the last kernel listing
        # Set when a background task died for good (the registry's heartbeat, the token publisher
        # failing over and over): the proxy then stops being ready and drains, so the
        # StatefulSet restarts a pod that no longer keeps its connections steerable.
        self.died = asyncio.Event()
        self.failure: str | None = None
        if isinstance(self.registry, RedisRegistry):
            self.registry.on_task_failure = self._task_died
        metrics = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self.receive_gauge = Gauge(
            "mcpool_affinity_pod_receive_ready",
            "1 when this pod holds the VIP and decapsulates the director's tunnel; 0 when that "
            "failed or is not set up (affinity.vip unset).",
            registry=metrics,
        )
        self.stale_tokens = Counter(
            "mcpool_affinity_stale_tokens_dropped",
            "Registered tokens unregistered because the kernel no longer had their connection.",
            registry=metrics,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Announce the join address / register the pod / start publishing tokens."""
        if not self.enabled:
            return
        if self.receive_vip is not None:
            await self._setup_receive(self.receive_vip)
        try:
            if self.join is not None:
                await asyncio.to_thread(self.join.start)
            if self.registry is not None:
                await self.registry.start()
                await self.registry.register_pod("ready")
                self.state = "ready"
            if self.publish and self._tokens is not None:
                subscription = self.mptcp_events.subscribe()
                self.subscription = subscription
                self._publisher = asyncio.get_running_loop().create_task(self._publish(subscription, self._tokens))
                self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_loop())
                self._watch(self._publisher, "token publisher")
                self._watch(self._reconciler, "token reconciler")
        except Exception:  # noqa: BLE001 - never into the proxy
            self.errors += 1
            log.exception("affinity: start failed; the pod serves, but its joins may not be steered")
        log.info(
            "affinity started",
            extra={"fields": {"mechanism": self.config.mechanism, "pod": self.pod_name,
                              "backend": self.config.backend, "publishing_tokens": self._publisher is not None,
                              "join_address": self.join.active if self.join else None,
                              "vip_receive": self.receive_ready if self.receive_vip else None}},
        )  # fmt: skip

    async def _setup_receive(self, vip: str) -> None:
        cfg = self.config
        try:
            self._receive_set_up = True  # whatever part succeeded is undone at stop
            await asyncio.to_thread(steering.setup_pod_receive, vip, cfg.vxlan_port, cfg.pod_mac)
        except Exception as exc:  # noqa: BLE001 - never into the proxy
            self.errors += 1
            self.receive_ready = False
            log.error(
                "affinity: cannot receive the director's tunnel for VIP %s (%s): no subflow the "
                "director forwards will reach this pod. Needs CAP_NET_ADMIN and rp_filter 0/2.",
                vip, exc,
            )  # fmt: skip
        else:
            self.receive_ready = True
        self.receive_gauge.set(1 if self.receive_ready else 0)

    async def _reconcile_loop(self) -> None:
        interval_s = self.config.heartbeat_ttl_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await self.reconcile_tokens():
                    return  # no way to list the kernel's connections: nothing to compare with
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("affinity: reconciling tokens with the kernel failed")

    async def reconcile_tokens(self) -> bool:
        """Unregister tokens that the kernel has not had in two listings in a row; False if the
        kernel's connections cannot be listed."""
        registry = self.registry
        if registry is None or self.state is None:
            return True
        # Snapshot the registry first: a token registered after `ss` ran must not look stale.
        live = dict(registry.live_connections())
        in_kernel = await asyncio.to_thread(kernel_tokens)
        if in_kernel is None:
            return False
        absent = {t for t in live if t not in in_kernel}
        for token in absent & self._absent_once:
            self.stale_tokens.inc()
            log.warning("affinity: token %08x is gone from the kernel (lost CLOSED event): unregistering", token)
            await registry.unregister_connection(token, live[token])
        self._absent_once = absent - self._absent_once
        return True

    def _task_died(self, name: str, exc: BaseException) -> None:
        """A background task is gone for good: say so and tell the proxy (`died`)."""
        self.errors += 1
        if self.failure is None:
            self.failure = f"{name} died: {type(exc).__name__}: {exc}"
            log.critical("affinity: %s; this pod can no longer be steered and stops being ready", self.failure)
        self.died.set()

    def _watch(self, task: asyncio.Task[None], name: str) -> None:
        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                self._task_died(name, exc)

        task.add_done_callback(done)

    async def _publish(self, events: MptcpSubscription, registry: AffinityRegistry) -> None:
        # publish_tokens runs forever; if it dies on an unexpected error, restart it after a pause
        # (one bad event must not cost the pod its steering); failing PUBLISHER_MAX_FAILURES times
        # in a row, each within PUBLISHER_FAILURE_WINDOW_S of the last, it is dead for good.
        failures = 0
        last_failure = float("-inf")
        loop = asyncio.get_running_loop()
        while True:
            try:
                await publish_tokens(registry, events, local_ports=self.listen_ports)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.errors += 1
                now = loop.time()
                failures = failures + 1 if now - last_failure < PUBLISHER_FAILURE_WINDOW_S else 1
                last_failure = now
                if failures >= PUBLISHER_MAX_FAILURES:
                    raise RuntimeError(f"token publisher failed {failures} times in a row: {exc}") from exc
                log.exception("affinity: token publisher failed; restarting in 1 s")
                await asyncio.sleep(PUBLISHER_RESTART_S)

    async def drain(self) -> None:
        """Tell directors this pod takes no new initial subflows (its joins still arrive)."""
        if self.registry is None or self.state == "draining":
            return
        self.state = "draining"
        try:
            await self.registry.register_pod("draining")
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("affinity: registering as draining failed")

    async def stop(self) -> None:
        """Deregister the pod and its connections; remove the join address. Idempotent."""
        for task in (self._publisher, self._reconciler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._publisher = self._reconciler = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
        if self.registry is not None and self.state is not None:
            self.state = None
            try:
                await self.registry.stop()
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("affinity: deregistering failed (entries expire with the heartbeat TTL)")
        if self.join is not None:
            try:
                await asyncio.to_thread(self.join.stop)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("affinity: removing the join address failed")
        if self._receive_set_up and self.receive_vip is not None:
            self._receive_set_up = False
            self.receive_ready = False
            self.receive_gauge.set(0)
            try:
                await asyncio.to_thread(steering.teardown_pod_receive, self.receive_vip)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("affinity: removing the VIP receive side failed")

    # -- ConnectionObserver ---------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        # Normally the netlink event registered the token long before; this covers lost events
        # (ENOBUFS) at the cost of nothing when it is already live (no Redis round trip).
        registry = self._tokens
        if not self.publish or registry is None or conn.token is None or self.state is None:
            return
        token = int(conn.token, 16)
        if token in registry.live_connections():
            return
        self._spawn(registry.register_connection(token, conn.client[0]))

    def closed(self, conn: Connection, reason: str) -> None:
        registry = self.registry
        if not self.publish or registry is None or conn.token is None or self.state is None:
            return
        token = int(conn.token, 16)
        if token in registry.live_connections():
            self._spawn(registry.unregister_connection(token, conn.client[0]))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("affinity: registry call failed")
