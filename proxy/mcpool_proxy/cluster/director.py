"""The director (`mcpool director --config FILE`): steers every subflow of a connection to its pod.

It owns the pool's virtual IP in its network namespace (it is the VIP's next hop), and decides
only SYNs: an initial SYN goes to a ready pod by hashing the CPE address into a bucket and the
bucket onto a pod by rendezvous (a CPE the table already maps keeps its pod); an MP_JOIN SYN goes
to the pod that registered its token. Most SYNs are decided by nftables alone, from kernel maps
this process writes (mapsync.py): the CPE map and the bucket map for initial SYNs, the token map
for joins. What they miss is handed to NFQUEUE and decided here by the same rules; the verdict
carries the pod's mark, nftables remembers the flow, and every later packet is forwarded in the
kernel (see kernel/steering.py for the packet path).

The decision reads a local copy of the affinity table (`table.AffinityTable`) kept current by
following the pool's change stream in Redis (`_feed`: XREAD from a cursor) after one full read
on every (re)connect and on a gap; in steady state Redis work is proportional to the changes,
not to the live connections. Pods are dropped when their heartbeat entries stop (liveness is per
pod). Redis unreachable: the last table stays in force, SYNs keep being decided, and the feed
reconnects with backoff. This module must never crash on Redis or on a malformed packet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    DEFAULT_POD_MAC,
    DEFAULT_VXLAN_PORT,
    FEED_RETAIN_HELP,
    FEED_RETAIN_MAX_S,
    FEED_RETAIN_MIN_S,
    FEED_RETAIN_S,
    ConfigError,
    HostPort,
    RedisClusterConfig,
    RedisSentinelConfig,
    RedisTarget,
    redis_target,
    split_hostport,
)
from ..kernel import steering
from ..kernel.bucketmap import BucketMap
from ..kernel.tokenmap import CpeMap, TokenMap
from ..observe.metrics import NftCounters, observe
from ..observe.telemetry import Telemetry
from .hashing import MAX_BUCKETS, BucketHash, pool_seed
from .keys import KeySchema
from .mapsync import InitialMapSync, MapFeeds, TokenMapSync
from .packet import MAX_IPV6_EXT_BYTES, Syn, parse_syn
from .redisconn import REDIS_ERRORS, Backoff, connect, describe_target, open_redis, redis_error_text
from .table import AffinityTable, Decision, PodEntry, decide

__all__ = ["Director", "DirectorConfig", "DirectorMetrics", "DirectorTaskDied", "load_director_config", "main"]

log = logging.getLogger("mcpool.director")

# Bytes of each queued packet copied to userspace: IPv6 header (40), extension headers (packet.py
# walks up to MAX_IPV6_EXT_BYTES of them) and the largest TCP header (60). Only SYNs are queued.
QUEUE_COPY_BYTES = 40 + MAX_IPV6_EXT_BYTES + 60


def _same_family(addr: str, vip: str) -> bool:
    try:
        return ipaddress.ip_address(addr).version == ipaddress.ip_address(vip).version
    except ValueError:
        return False


class DirectorConfig(BaseModel):
    """Configuration of one director (YAML, `mcpool director --config FILE`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vip: str = Field(description="The pool's virtual IP (IPv4 or IPv6) whose SYNs this director steers.")
    ports: list[int] = Field(min_length=1, description="TCP ports of the VIP to steer (the proxy's listeners).")
    redis_url: str | None = Field(
        default=None,
        description="redis://[:password@]host:port/db of the pool's affinity table (a single Redis); "
        "exclusive with redis_sentinel and redis_cluster.",
    )
    redis_sentinel: RedisSentinelConfig | None = Field(
        default=None, description="The table's Redis behind Sentinel (the pods' affinity.redis_sentinel)."
    )
    redis_cluster: RedisClusterConfig | None = Field(
        default=None, description="The table's Redis Cluster (the pods' affinity.redis_cluster)."
    )
    pool: str = Field(default="default", min_length=1, max_length=63, description="Pool name (key prefix).")
    queue_num: int = Field(
        default=4242, ge=0, le=65535, description="NFQUEUE number the SYNs go to (unique per pool on a node)."
    )
    queue_max_len: int = Field(default=4096, ge=16, description="SYNs the kernel holds for us at most.")
    mark_base: int = Field(
        default=0x4D430000,
        description="Packet marks used: mark_base|1 and |2 queue SYNs, mark_base|slot<<8 names a pod. "
        "Low 16 bits must be 0; pick a value no other component of the node uses (and unique per pool).",
    )
    nft_table: str = Field(
        default=steering.NFT_TABLE,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="Name of this director's nftables table (inet family; unique per pool on a node).",
    )
    device_prefix: str = Field(
        default=steering.SLOT_DEVICE_PREFIX,
        pattern=r"^[a-z][a-z0-9_-]{0,10}[a-z_-]$",
        description="Prefix of the per-pod tunnel devices (prefix + slot number, at most 15 characters, "
        "so at most 12; must not end in a digit; unique per pool on a node).",
    )
    join_wait_ms: int = Field(
        default=50,
        ge=0,
        le=2000,
        description="How long an MP_JOIN whose token is unknown is held waiting for its owner to "
        "register it, before it is dropped (the client retransmits the SYN about 1 s later).",
    )
    forward: Literal["vxlan", "dnat"] = Field(
        default="vxlan",
        description="'vxlan': encapsulate to the pod, VIP on the pod's lo, direct server return "
        "(production). 'dnat': NAT to the pod address; correct only when replies pass the director.",
    )
    vxlan_port: int = Field(
        default=DEFAULT_VXLAN_PORT, ge=1, le=65535, description="UDP port of the VXLAN tunnels (the pods' vxlan_port)."
    )
    vxlan_vni_base: int = Field(
        default=7700,
        ge=1,
        le=0xFFFF00,
        description="VNI = base + pod slot. Two tunnel devices with one VNI and port cannot coexist in a "
        "namespace: unique per pool on a node.",
    )
    tunnel_mtu: int = Field(
        default=1450,
        ge=1280,
        le=9000,
        description="MTU of the tunnel to each pod; the underlay must carry tunnel_mtu + 50 bytes.",
    )
    pod_mac: str = Field(
        default=DEFAULT_POD_MAC,
        description="MAC address of every pod's VXLAN receive device (steering.setup_pod_receive).",
    )
    route_table_base: int = Field(
        default=4300, ge=256, le=2**31 - 300, description="Table = base + slot (unique range per pool on a node)."
    )
    flow_idle_timeout_s: int = Field(
        default=3600, ge=10, description="A subflow idle this long is forgotten by the kernel flow map."
    )
    token_map_timeout_s: int = Field(
        default=3600,
        ge=0,
        description="Kernel timeout of each entry of the MP_JOIN token map (joins to a token in it "
        "are steered without userspace; entries are also deleted when their connection closes, "
        "and re-added before they expire). 0: no token map, every join is queued to userspace.",
    )
    initial_in_kernel: bool = Field(
        default=True,
        description="Decide initial SYNs in nftables: a CPE with live connections to a ready pod by the "
        "kernel CPE map, any other by the kernel bucket map (counters cpe_hit, bucket_hit). Only a "
        "miss (no ready pod, a bucket not written yet) is queued to userspace. false: every initial "
        "SYN is queued.",
    )
    buckets: int = Field(
        default=4096,
        ge=1,
        le=MAX_BUCKETS,
        description="Buckets a CPE address is hashed into (jhash of the address, seeded by the pool "
        "name); each bucket belongs to one ready pod by rendezvous hashing. Every director of a "
        "pool must use the same value (they then send a CPE to the same pod).",
    )
    cpe_map_timeout_s: int = Field(
        default=3600,
        ge=2,
        description="Kernel timeout of each entry of the CPE map (entries also leave when the CPE's "
        "last connection closes, and are re-added before they expire).",
    )
    # --- the SYN queue's admission in the kernel (issue 10) ---
    syn_rate_per_source: int = Field(
        default=200,
        ge=0,
        description="SYNs per second one source address (IPv6: one /64) may send to the VIP before "
        "nftables drops them (counter syn_over_source); 0: no per-source limit. Raise it for "
        "sources that are big NATs.",
    )
    syn_burst_per_source: int = Field(default=400, ge=1, description="Burst allowed above syn_rate_per_source.")
    syn_rate_total: int = Field(
        default=20_000,
        ge=0,
        description="SYNs per second to the VIP that may reach the queue in total (counter "
        "syn_over_total); 0: no limit.",
    )
    syn_burst_total: int = Field(default=4096, ge=1, description="Burst allowed above syn_rate_total.")
    resync_interval_s: float = Field(
        default=600.0,
        gt=0,
        description="A safety full read of the table this often, besides the ones on every (re)connect and "
        "on a gap in the change stream (the table follows the stream in between).",
    )
    feed_batch_ms: float = Field(
        default=2.0,
        ge=0,
        le=100,
        description="After a read of the change stream that returned fewer entries than a full batch, wait "
        "this long before the next read: a busy stream is then read in batches (fewer XREAD calls into "
        "Redis) at the cost of learning a change at most this much later. 0: read again at once.",
    )
    feed_retain_s: float = Field(
        default=FEED_RETAIN_S,
        ge=FEED_RETAIN_MIN_S,
        le=FEED_RETAIN_MAX_S,
        description=FEED_RETAIN_HELP + " Here: the pods' affinity.feed_retain_s, against which the director "
        "checks how long its full reads take (a warning when one takes more than half of it).",
    )
    snapshot_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="For this long after (re)connecting to Redis, pods, tokens and CPEs missing from a full "
        "read are kept (a restarted Redis is empty until the pods re-register): set it to the pods' "
        "heartbeat_ttl_s.",
    )
    redis_timeout_s: float = Field(default=0.5, gt=0, description="Timeout of one Redis operation.")
    pod_grace_s: float = Field(
        default=300.0,
        ge=0,
        description="Keep forwarding to a pod that left the table for this long (its live flows).",
    )
    metrics_listen: HostPort | None = Field(
        default="127.0.0.1:9091", description="Prometheus /metrics address; null disables it."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("vip")
    @classmethod
    def _vip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))

    @model_validator(mode="after")
    def _marks(self) -> DirectorConfig:
        if self.mark_base & 0xFFFF or not self.mark_base:
            raise ValueError("mark_base must be non-zero with its low 16 bits clear, e.g. 0x4d430000")
        if redis_target("", self.redis_url, self.redis_sentinel, self.redis_cluster) is None:
            raise ValueError("set one of redis_url, redis_sentinel or redis_cluster (the pool's table)")
        return self

    @property
    def redis(self) -> RedisTarget:
        """The Redis of the pool's table, whichever way it is given."""
        target = redis_target("", self.redis_url, self.redis_sentinel, self.redis_cluster)
        assert target is not None  # validated above
        return target

    def syn_limits(self) -> steering.SynLimits:
        return steering.SynLimits(
            per_source=self.syn_rate_per_source, per_source_burst=self.syn_burst_per_source,
            total=self.syn_rate_total, total_burst=self.syn_burst_total,
        )  # fmt: skip

    def bucket_hash(self) -> BucketHash:
        """How a CPE address is hashed into a bucket, in the kernel and in `decide` alike."""
        return BucketHash(self.buckets, pool_seed(self.pool))

    def initial_hash(self) -> steering.InitialHash | None:
        """The nft rule's parameters for initial SYNs; None when they are all queued."""
        if not self.initial_in_kernel:
            return None
        hashing = self.bucket_hash()
        return steering.InitialHash(hashing.buckets, hashing.seed)

    @property
    def owner(self) -> str:
        """Who owns this director's node resources (the nft table's comment)."""
        return f"mcpool director pool={self.pool} vip={self.vip}"


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that was lost on the way: Python 3.11's
    wait_for returns the result when the awaited call completes as the cancel arrives, and a
    timeout racing a cancel can surface as TimeoutError. The feed loops for ever, so a lost cancel
    would leave a director that never stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class DirectorTaskDied(RuntimeError):
    """A task the director needs (the Redis feed, the plumbing) ended: the process must exit."""


def load_director_config(path: str | Path) -> DirectorConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return DirectorConfig.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid director configuration in {path}: {exc}") from None


class DirectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "mcpool_director_decisions",
            "Steering decisions by outcome (hashed, cpe_hit, token_hit, token_hit_after_wait, "
            "token_miss_after_wait, collision, no_ready_pod, pod_not_plumbed, unparsable, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.table_size = Gauge(
            "mcpool_director_table_entries",
            "Entries of the local affinity table by kind (pods, ready_pods, tokens, cpes).",
            ["kind"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "mcpool_director_redis_errors", "Failed Redis operations.", registry=self.registry
        )
        self.redis_up = Gauge("mcpool_director_redis_up", "1 while the feed reaches Redis.", registry=self.registry)
        self.decision_seconds = Histogram(
            "mcpool_director_decision_seconds",
            "Time from reading a SYN from the queue to its verdict (includes join waits); exemplars "
            "carry the decision span's trace id when tracing is on.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.resyncs = Counter(
            "mcpool_director_resyncs", "Full reads of the table from Redis.", registry=self.registry
        )
        self.feed_entries = Counter(
            "mcpool_director_feed_entries", "Entries of the pool's change stream read.", registry=self.registry
        )
        self.feed_gaps = Counter(
            "mcpool_director_feed_gaps",
            "Entries missed in the change stream (trimmed past this director, stream deleted, Redis "
            "restarted empty), each answered by one full read.",
            registry=self.registry,
        )
        self.pods_expired = Counter(
            "mcpool_director_pods_expired",
            "Pods dropped (with their tokens and CPEs) because their heartbeat stopped.",
            registry=self.registry,
        )
        # --- drops made visible (issue 10) ---
        self.dropped = Counter(
            "mcpool_director_dropped_syns",
            "SYNs the director dropped because no pod could take them, by outcome (no_ready_pod, "
            "pod_not_plumbed, token_miss_after_wait, unparsable, error); a warning is logged at "
            "most every DROP_WARNING_INTERVAL_S while they go on.",
            ["outcome"],
            registry=self.registry,
        )
        self.packets = Counter(
            "mcpool_director_queued_packets",
            "Packets that reached the director in userspace (NFQUEUE), by kind (initial, join, "
            "unparsable); everything else is forwarded by the kernel.",
            ["kind"],
            registry=self.registry,
        )
        self.joins_waiting = Gauge(
            "mcpool_director_joins_waiting",
            "MP_JOIN SYNs held now until their token is registered (up to join_wait_ms).",
            registry=self.registry,
        )
        self.join_wait_seconds = Histogram(
            "mcpool_director_join_wait_seconds",
            "How long MP_JOIN SYNs were held for their token before their verdict.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.malformed = Counter(
            "mcpool_director_malformed_entries",
            "Table events (source=event) or Redis keys (source=key) that could not be parsed and were skipped.",
            ["source"],
            registry=self.registry,
        )


def kernel_decisions(table: str) -> NftCounters:
    """`mcpool_director_kernel_packets_total{counter}`: the director's nft counters. Most SYNs are
    decided in the kernel and never reach `mcpool_director_decisions_total`: token_hit (a join by
    the token map), cpe_hit and bucket_hit (an initial SYN by the CPE or the bucket map),
    queued_initial/queued_join (sent to userspace), restored (packets of known flows),
    unknown_flow (dropped: not a SYN and no flow), syn_over_source/syn_over_total (SYNs over the
    rate limits, dropped)."""
    return NftCounters(
        "mcpool_director_kernel_packets",
        "Packets counted by the director's nftables rules, by counter (token_hit, cpe_hit, bucket_hit: "
        "SYNs decided in the kernel; queued_initial, queued_join: SYNs sent to userspace; restored: "
        "packets of known flows; unknown_flow, syn_over_source, syn_over_total: dropped).",
        "counter", lambda: {name: packets for name, (packets, _) in steering.nft_counters(table).items()},
    )  # fmt: skip


def _parse_token(text: str) -> int | None:
    """A token key's suffix (8 hex digits) as an int; None if it is not one."""
    if len(text) != 8:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


# At most one "dropping SYNs" warning per this many seconds (a pool without ready pods drops every
# SYN: one line per SYN would drown the log, none would leave the operator guessing).
DROP_WARNING_INTERVAL_S = 10.0

# XREAD BLOCK of the feed: the longest the director waits for a change in one call (its own
# connection, whose timeout is this plus redis_timeout_s), and the most entries taken per call.
FEED_BLOCK_S = 1.0
# While a pod of an older mcpool (one that heartbeats by key TTL, not on the stream: its pod key
# lacks the field `feed`) is in the table, as during an upgrade, the table is read whole this
# often, as older directors did: its liveness and its tokens reach the table only that way.
LEGACY_RESYNC_S = 2.0
FEED_COUNT = 1000

# Read-only: the feed's last entry id and the number of the last entry (`seq`, incremented in the
# same script as each XADD, so the two agree). Read before a full read: following from this id
# afterwards, nothing can fall between the snapshot and the stream.
_CURSOR_LUA = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = redis.call('GET', KEYS[2]) or '0'
if #last == 0 then return {'0-0', seq} end
return {last[1][1], seq}
"""

# How long a stopping director waits for its own tasks (Redis feed, plumbing) to finish.
_STOP_TIMEOUT_S = 3.0


class Director:
    """Runs the queue consumer, the Redis feed and the kernel plumbing in one asyncio loop."""

    def __init__(
        self,
        config: DirectorConfig,
        metrics: DirectorMetrics | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else DirectorMetrics()
        self.metrics.registry.register(kernel_decisions(config.nft_table))
        # A span per steering decision when OTEL_* asks for tracing (sampled by
        # OTEL_TRACES_SAMPLER); None otherwise, so the hot path pays one attribute test.
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._tracer = self.telemetry.tracer("mcpool.director")
        self.table = AffinityTable(config.bucket_hash())
        self.keys = KeySchema(config.pool)
        self.slots: dict[str, tuple[int, str]] = {}  # pod -> (slot, address) with plumbing in place
        self._departed: dict[str, float] = {}  # pod -> monotonic time it left the table
        self._plumbed_version = -1
        self._plumbing_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: Any = None
        self._redis_up = True  # optimistic, so the first failure is logged
        self._redis_error: str | None = None  # the reason logged for the current outage
        self._connected_at = float("-inf")  # loop time of the last (re)connection to Redis
        self._cursor = "0-0"  # id of the last feed entry applied
        self._seq = 0  # its number: the next entry must carry _seq + 1, or entries were missed
        self._pod_deadline: dict[str, float] = {}  # pod -> loop time its heartbeat runs out
        self._now: Callable[[], float] = time.monotonic  # the drop warning's clock (tests replace it)
        self._drops_unreported: dict[str, int] = {}
        self._drop_warned_at = float("-inf")
        self._legacy_pods: set[str] = set()  # pods whose key lacks `feed` (LEGACY_RESYNC_S)
        self.mapsync: MapFeeds | None = None  # the kernel maps' feeds (run() makes them)

    # -- decisions (the hot path: one call per SYN) --------------------------------------------

    def _on_packet(self, packet: Any) -> None:
        started = time.perf_counter()
        try:
            syn = parse_syn(packet.get_payload())
            self.metrics.packets.labels("unparsable" if syn is None else "join" if syn.is_join else "initial").inc()
            if syn is None:
                self._verdict(packet, Decision("no_ready_pod", None), started, "unparsable")
                return
            decision = decide(syn, self.table)
            if decision.final:
                self._verdict(packet, decision, started, syn=syn)
                return
            packet.retain()
            self._spawn(self._wait_and_verdict(packet, syn, started))
        except Exception:  # a bug here must cost one SYN, never the director
            log.exception("steering a SYN failed; dropping it")
            self._verdict(packet, Decision("no_ready_pod", None), started, "error")

    async def _wait_and_verdict(self, packet: Any, syn: Syn, started: float) -> None:
        assert syn.join_token is not None
        held = time.perf_counter()
        self.metrics.joins_waiting.inc()
        try:
            await self.table.wait_for_token(syn.join_token, self.config.join_wait_ms / 1000)
        finally:
            self.metrics.joins_waiting.dec()
            self.metrics.join_wait_seconds.observe(time.perf_counter() - held)
        self._verdict(packet, decide(syn, self.table, waited=True), started, syn=syn)

    def _verdict(
        self,
        packet: Any,
        decision: Decision,
        started: float,
        label: str | None = None,
        syn: Syn | None = None,
    ) -> None:
        outcome = label or decision.outcome
        slot = self.slots.get(decision.pod) if decision.pod is not None else None
        try:
            if slot is not None:
                packet.set_mark(steering.slot_mark(self.config.mark_base, slot[0]))
                packet.accept()
            else:
                if decision.pod is not None:
                    outcome = "pod_not_plumbed"  # in the table, tunnel not built yet: retry
                packet.drop()
                self._dropped(outcome)
        except (RuntimeError, OSError) as exc:  # queue gone (shutting down)
            log.debug("verdict failed: %r", exc)
        elapsed_s = time.perf_counter() - started
        self.metrics.decisions.labels(outcome).inc()
        trace_id = None
        if self._tracer is not None:
            trace_id = self._trace_decision(outcome, decision, syn, elapsed_s)
        observe(self.metrics.decision_seconds, elapsed_s, trace_id)

    def _dropped(self, outcome: str) -> None:
        """Count a dropped SYN; warn at once, then at most every DROP_WARNING_INTERVAL_S."""
        self.metrics.dropped.labels(outcome).inc()
        self._drops_unreported[outcome] = self._drops_unreported.get(outcome, 0) + 1
        now = self._now()
        if now - self._drop_warned_at < DROP_WARNING_INTERVAL_S:
            return
        since = "" if self._drop_warned_at == float("-inf") else f" in the last {now - self._drop_warned_at:.0f}s"
        self._drop_warned_at = now
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self._drops_unreported.items()))
        self._drops_unreported = {}
        log.warning(
            "dropping SYNs to %s%s (%s): the table has %d pods, %d ready, %d with forwarding; redis %s",
            self.config.vip, since, counts, len(self.table.pods), len(self.table.ready_pods()),
            len(self.slots), "reachable" if self._redis_up else f"unreachable ({self._redis_error})",
        )  # fmt: skip

    def _trace_decision(self, outcome: str, decision: Decision, syn: Syn | None, elapsed_s: float) -> str | None:
        """Record the decision's span; its trace id (None if sampled out), for the exemplar."""
        end_ns = time.time_ns()
        assert self._tracer is not None
        span = self._tracer.start_span(
            "director.steer", start_time=end_ns - int(elapsed_s * 1e9)
        )
        span.set_attribute("mcpool.director.outcome", outcome)
        span.set_attribute("mcpool.director.decision_s", elapsed_s)
        if decision.pod is not None:
            span.set_attribute("mcpool.director.pod", decision.pod)
        if syn is not None:
            span.set_attribute("client.address", syn.src)
            span.set_attribute("client.port", syn.sport)
            span.set_attribute("server.address", syn.dst)
            span.set_attribute("server.port", syn.dport)
            span.set_attribute("mcpool.director.syn", "mp_join" if syn.is_join else "initial")
            if syn.join_token is not None:
                span.set_attribute("mcpool.mptcp.token", f"{syn.join_token:08x}")
        span.end(end_time=end_ns)
        context = span.get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid and context.trace_flags.sampled else None

    # -- the table feed -------------------------------------------------------------------------

    async def _feed(self) -> None:
        cfg = self.config
        redis = open_redis(cfg.redis, cfg.redis_timeout_s)
        # XREAD BLOCK holds its connection up to FEED_BLOCK_S: a client of its own, with a socket
        # timeout past that, so the blocking read is not mistaken for a dead Redis.
        stream = open_redis(cfg.redis, cfg.redis_timeout_s + FEED_BLOCK_S)
        cursor_script = redis.register_script(_CURSOR_LUA)
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await connect(redis, cfg.redis_timeout_s)
                    await connect(stream, cfg.redis_timeout_s)
                    self._connected_at = loop.time()
                    await self._resync(redis, cursor_script)
                    self._redis_up = True
                    self._redis_error = None
                    self.metrics.redis_up.set(1)
                    backoff.reset()
                    next_resync = loop.time() + self._resync_every_s()
                    while True:
                        now = loop.time()
                        wake = min(next_resync, min(self._pod_deadline.values(), default=now + FEED_BLOCK_S))
                        block_ms = max(1, min(int(FEED_BLOCK_S * 1000), int((wake - now) * 1000) + 1))
                        # No wait_for here: the stream client's socket timeout bounds the read, and
                        # Python 3.11's wait_for can swallow a cancellation that meets a reply (the
                        # director would then never stop).
                        reply = await stream.xread({self.keys.feed: self._cursor}, count=FEED_COUNT, block=block_ms)
                        _raise_if_cancelled()
                        gap, read = self._apply_entries(reply)
                        self._expire_pods(loop.time())
                        if 0 < read < FEED_COUNT and cfg.feed_batch_ms and not gap:
                            # Let the next changes gather: one XREAD for many of them.
                            await asyncio.sleep(cfg.feed_batch_ms / 1000)
                        if gap:
                            self.metrics.feed_gaps.inc()
                            log.warning("the table feed missed entries (trimmed, deleted or Redis restarted): "
                                        "reading the whole table again")  # fmt: skip
                        if gap or loop.time() >= next_resync:
                            await self._resync(redis, cursor_script)
                            next_resync = loop.time() + self._resync_every_s()
                            _raise_if_cancelled()
                except REDIS_ERRORS as exc:
                    _raise_if_cancelled()  # a cancellation turned into a timeout on the way
                    text = redis_error_text(exc)
                    if self._redis_up or text != self._redis_error:  # once per outage and reason
                        # The server's own words: "server:ResponseError" (repr) hides a
                        # protected-mode or password refusal.
                        log.warning("redis %s unreachable: %s; keeping the last table, retrying",
                                    describe_target(cfg.redis), text)  # fmt: skip
                    self._redis_error = text
                    self._redis_up = False
                    self.metrics.redis_up.set(0)
                    self.metrics.redis_errors.inc()
                    await asyncio.sleep(backoff.next_delay_s())
        finally:
            for client in (stream, redis):
                with contextlib.suppress(*REDIS_ERRORS, TimeoutError):
                    await asyncio.wait_for(client.aclose(), cfg.redis_timeout_s)

    def _resync_every_s(self) -> float:
        if self._legacy_pods:
            return min(self.config.resync_interval_s, LEGACY_RESYNC_S)
        return self.config.resync_interval_s

    def _apply_entries(self, reply: Any) -> tuple[bool, int]:
        """Apply the entries of one XREAD reply in order. Returns whether one shows entries were
        missed (the rest of the reply is then left to the full read that follows), and how many
        entries were read."""
        read = 0
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                read += 1
                self.metrics.feed_entries.inc()
                try:
                    number = int(fields["n"])
                except (KeyError, TypeError, ValueError):
                    # Not written by a pod's script (no sequence number): skip it alone.
                    self.metrics.malformed.labels("event").inc()
                    log.warning("skipping a feed entry without a sequence number: %.200r", fields)
                    self._cursor = entry_id
                    continue
                if number != self._seq + 1:
                    return True, read
                self._cursor, self._seq = entry_id, number
                self._apply(fields.get("e", ""))
        return False, read

    def _apply(self, data: str) -> None:
        # One bad event (a bug, a foreign writer, a hand-typed XADD) costs itself only: the feed,
        # and with it the table, must keep following.
        try:
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
            version = self.table.version
            self.table.apply_event(event)
            if event.get("t") == "pod" and event.get("op") == "add":
                ttl_ms = event.get("ttl")
                # Heartbeat: the pod lives until ttl from now unless another entry says so again.
                self._pod_deadline[str(event["pod"])] = (
                    asyncio.get_running_loop().time() + float(ttl_ms) / 1000 if ttl_ms else float("inf")
                )
            elif event.get("t") == "pod" and event.get("op") == "del":
                self._pod_deadline.pop(str(event.get("pod", "")), None)
            # A heartbeat that changes nothing must not cost the token map a full rewrite.
            if self.mapsync is not None and (event.get("t") != "pod" or self.table.version != version):
                self.mapsync.event_applied(event)
        except (ValueError, TypeError, KeyError) as exc:
            self.metrics.malformed.labels("event").inc()
            log.warning("skipping a malformed table event %.200r: %s", data, exc)
            return
        self._table_changed()

    def _expire_pods(self, now: float) -> None:
        """Drop the pods whose heartbeat ran out, with their tokens and CPEs (only while the feed
        is connected: with Redis away, the last table stays in force)."""
        for pod in [p for p, deadline in self._pod_deadline.items() if deadline <= now]:
            del self._pod_deadline[pod]
            if pod not in self.table.pods:
                continue
            log.info("pod %s: no heartbeat for its TTL, dropped from the table", pod)
            self.metrics.pods_expired.inc()
            event = {"t": "pod", "op": "del", "pod": pod}
            self.table.apply_event(event)
            if self.mapsync is not None:
                self.mapsync.event_applied(event)
            self._table_changed()

    async def _resync(self, redis: Any, cursor_script: Any = None) -> None:
        """One full read of the table; the feed's cursor is read first (when `cursor_script` is
        given), so following the stream from it afterwards misses nothing."""
        started = asyncio.get_running_loop().time()
        timeout = self.config.redis_timeout_s * 8
        if cursor_script is not None:
            cursor, seq = await asyncio.wait_for(cursor_script(keys=[self.keys.feed, self.keys.seq]), timeout)
            self._cursor, self._seq = str(cursor), int(seq)
        pods: dict[str, PodEntry] = {}
        ttls: dict[str, int] = {}
        legacy: set[str] = set()
        pod_keys = [k async for k in redis.scan_iter(match=self.keys.pod_pattern, count=1000)]
        if pod_keys:
            async with redis.pipeline(transaction=False) as pipe:
                for key in pod_keys:
                    pipe.hgetall(key)
                    pipe.pttl(key)
                replies = await asyncio.wait_for(pipe.execute(), timeout)
            for key, fields, ttl in zip(pod_keys, replies[::2], replies[1::2], strict=True):
                if fields:
                    name = self.keys.suffix(key, "pod")
                    pods[name] = PodEntry(name, fields.get("addr", ""), fields.get("state", "ready"))
                    ttls[name] = int(ttl)
                    if "feed" not in fields:
                        legacy.add(name)
        tokens: dict[int, str] = {}
        for key, owner in (await self._read_all(redis, self.keys.token_pattern, timeout)).items():
            token = _parse_token(self.keys.suffix(key, "token"))
            if token is None:
                self.metrics.malformed.labels("key").inc()
                log.warning("skipping malformed token key %r", key)
                continue
            tokens[token] = owner
        cpes = {self.keys.suffix(k, "cpe"): v for k, v in (await self._read_all(redis, self.keys.cpe_pattern, timeout)).items()}
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Right after (re)connecting, Redis may have restarted empty: keep what the snapshot lacks
        # until the pods have re-registered (one heartbeat TTL), rather than drop every SYN.
        recent = now - self._connected_at < self.config.snapshot_grace_s
        self.table.replace(pods, tokens, cpes, now=now,
                           keep_missing_s=self.config.snapshot_grace_s if recent else 0.0)  # fmt: skip
        # Tokens and CPEs left by a pod that died (not reaped yet) steer nothing: leave them out.
        self.table.drop_orphans()
        deadlines: dict[str, float] = {}
        if legacy != self._legacy_pods:
            if legacy:
                log.warning("pods %s heartbeat without the change stream (an older mcpool, e.g. during an upgrade): "
                            "reading the whole table every %.0f s while they remain; their new connections' joins "
                            "may miss their pod until a read", ", ".join(sorted(legacy)), LEGACY_RESYNC_S)  # fmt: skip
            else:
                log.info("every pod heartbeats on the change stream: full reads every %.0f s again",
                         self.config.resync_interval_s)  # fmt: skip
        self._legacy_pods = legacy
        for name in self.table.pods:
            if name in legacy:
                # No `pod add` entries will come: a full read without its key removes it.
                deadlines[name] = float("inf")
            elif name in ttls:
                deadlines[name] = now + ttls[name] / 1000 if ttls[name] > 0 else float("inf")
            else:  # kept by the grace period: it has until then to heartbeat again
                deadlines[name] = max(self._pod_deadline.get(name, now), self._connected_at + self.config.snapshot_grace_s)
        self._pod_deadline = deadlines
        self.metrics.resyncs.inc()
        took = loop.time() - started
        if cursor_script is not None and took > self.config.feed_retain_s / 2:
            # The pods trim the stream past entries older than feed_retain_s: a full read that
            # outlasts it finds its cursor gone, ends in a gap and is repeated, again and again.
            log.warning("a full read of the table took %.1f s, more than half of feed_retain_s (%g s): raise the "
                        "pods' affinity.feed_retain_s and the directors' feed_retain_s, or the stream will have "
                        "been trimmed past the cursor before a full read ends", took, self.config.feed_retain_s)  # fmt: skip
        if self.mapsync is not None:
            self.mapsync.snapshot_loaded()
        self._table_changed()

    @staticmethod
    async def _read_all(redis: Any, pattern: str, op_timeout_s: float) -> dict[str, str]:
        keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        out: dict[str, str] = {}
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            values = await asyncio.wait_for(redis.mget(chunk), op_timeout_s)
            out.update({k: v for k, v in zip(chunk, values, strict=True) if v is not None})
        return out

    def _table_changed(self) -> None:
        t = self.table
        self.metrics.table_size.labels("pods").set(len(t.pods))
        self.metrics.table_size.labels("ready_pods").set(len(t.ready_pods()))
        self.metrics.table_size.labels("tokens").set(len(t.tokens))
        self.metrics.table_size.labels("cpes").set(len(t.cpes))
        if t.version != self._plumbed_version:
            self._plumbing_changed.set()

    # -- kernel plumbing that follows the pod set -----------------------------------------------

    async def _plumbing(self) -> None:
        while True:
            await self._plumbing_changed.wait()
            self._plumbing_changed.clear()
            version = self.table.version
            wanted = {name: entry.addr for name, entry in self.table.pods.items() if entry.addr}
            try:
                # Commands take milliseconds: run them off the loop so SYNs keep being decided.
                departed = await asyncio.to_thread(self._reconcile_slots, wanted)
            except (RuntimeError, OSError) as exc:
                log.error("cannot update forwarding to pods: %s", exc)
                await asyncio.sleep(1.0)
                self._plumbing_changed.set()
                continue
            self._plumbed_version = version
            if self.mapsync is not None:
                self.mapsync.pods_changed()
            if departed:
                # Come back when a departed pod's grace period has ended.
                self._spawn(self._wake_later(self.config.pod_grace_s))

    def _reconcile_slots(self, wanted: dict[str, str]) -> bool:
        """Give each pod in `wanted` (name -> address) a slot with forwarding; return whether
        departed pods are still within their grace period."""
        cfg = self.config
        now = time.monotonic()
        for name in list(self.slots):
            if name in wanted:
                self._departed.pop(name, None)
                continue
            left = self._departed.setdefault(name, now)
            if now - left >= cfg.pod_grace_s:
                slot, _ = self.slots.pop(name)
                del self._departed[name]
                steering.remove_slot(slot, vip=cfg.vip, mark_base=cfg.mark_base, forward=cfg.forward,
                                   route_table_base=cfg.route_table_base, table=cfg.nft_table,
                                   device_prefix=cfg.device_prefix)  # fmt: skip
                log.info("pod %s gone for %.0fs: released slot %d", name, cfg.pod_grace_s, slot)
        used = {slot for slot, _ in self.slots.values()}
        for name, addr in wanted.items():
            current = self.slots.get(name)
            if current is not None and current[1] == addr:
                continue
            slot = current[0] if current is not None else next(
                (s for s in range(1, steering.MAX_SLOTS + 1) if s not in used), 0
            )
            if not slot:
                log.error("more than %d pods: %s gets no slot", steering.MAX_SLOTS, name)
                continue
            if cfg.forward == "dnat" and not _same_family(addr, cfg.vip):
                # NAT cannot change the family; the other pods must still get their slots.
                log.error("forward dnat: pod %s address %s is not of the VIP's family (%s): it gets no slot; "
                          "advertise its address of that family, or use forward vxlan", name, addr, cfg.vip)
                continue
            steering.add_slot(
                slot, addr, vip=cfg.vip, mark_base=cfg.mark_base, forward=cfg.forward,
                route_table_base=cfg.route_table_base, vxlan_port=cfg.vxlan_port,
                vxlan_vni_base=cfg.vxlan_vni_base, tunnel_mtu=cfg.tunnel_mtu, pod_mac=cfg.pod_mac,
                table=cfg.nft_table, device_prefix=cfg.device_prefix,
                flow_idle_timeout_s=cfg.flow_idle_timeout_s,
            )  # fmt: skip
            used.add(slot)
            self.slots[name] = (slot, addr)
            log.info("pod %s (%s) on slot %d", name, addr, slot)
        return bool(self._departed)

    def _token_owner_marks(self) -> dict[str, int]:
        """pod -> mark of every pod in the table whose forwarding is in place (what the token map
        may steer to; the same pods `decide` + `_verdict` steer joins to)."""
        base = self.config.mark_base
        return {pod: steering.slot_mark(base, slot) for pod, (slot, _) in dict(self.slots).items()
                if pod in self.table.pods}  # fmt: skip

    def _make_mapsync(self) -> MapFeeds | None:
        feeds = MapFeeds(self._make_tokenmap_sync(), self._make_initial_sync())
        return feeds if feeds else None

    def _make_tokenmap_sync(self) -> TokenMapSync | None:
        if not self.config.token_map_timeout_s:
            return None
        try:
            tokenmap = TokenMap(self.config.nft_table, self.config.token_map_timeout_s)
        except RuntimeError as exc:  # python3-nftables missing: steer every join in userspace
            log.error("no kernel token map, every MP_JOIN goes to userspace: %s", exc)
            return None
        return TokenMapSync(tokenmap, self._token_owner_marks, lambda: self.table.tokens,
                            registry=self.metrics.registry)  # fmt: skip

    def _make_initial_sync(self) -> InitialMapSync | None:
        cfg = self.config
        if not cfg.initial_in_kernel:
            return None
        try:
            buckets = BucketMap(cfg.nft_table)
            cpemap = CpeMap(cfg.nft_table, cfg.cpe_map_timeout_s)
        except RuntimeError as exc:  # python3-nftables missing: the maps stay empty, all is queued
            log.error("no kernel CPE and bucket maps, every initial SYN goes to userspace: %s", exc)
            return None
        return InitialMapSync(
            buckets, cpemap, self.table.hashing, self.table.ready_pods, self._token_owner_marks,
            lambda: self.table.cpes, v6=ipaddress.ip_address(cfg.vip).version == 6,
            registry=self.metrics.registry,
        )  # fmt: skip

    async def _wake_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._plumbing_changed.set()

    # -- lifecycle --------------------------------------------------------------------------------

    def install(self) -> None:
        cfg = self.config
        steering.install_director(cfg.vip, cfg.ports, cfg.mark_base, cfg.queue_num, cfg.forward,
                                cfg.flow_idle_timeout_s, table=cfg.nft_table, owner=cfg.owner,
                                syn_limits=cfg.syn_limits(), initial=cfg.initial_hash())  # fmt: skip

    def cleanup(self) -> None:
        cfg = self.config
        steering.remove_director(cfg.vip, cfg.mark_base, cfg.queue_num, cfg.route_table_base,
                               table=cfg.nft_table, device_prefix=cfg.device_prefix, owner=cfg.owner)  # fmt: skip

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Install the kernel side, consume the queue and follow the table until cancelled."""
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.install)
        family = 10 if ipaddress.ip_address(self.config.vip).version == 6 else 2
        queue = NetfilterQueue(af=family)
        queue.bind(self.config.queue_num, self._on_packet, max_len=self.config.queue_max_len,
                   mode=COPY_PACKET, range=QUEUE_COPY_BYTES)  # fmt: skip
        self._queue = queue
        fd = queue.get_fd()
        self._loop.add_reader(fd, self._drain_queue)
        self._died: asyncio.Future[None] = self._loop.create_future()
        self.mapsync = self._make_mapsync()
        if self.mapsync is not None:
            for name, runner in self.mapsync.runners():
                self._spawn_critical(runner, name)
        self._spawn_critical(self._feed(), "redis feed")
        self._spawn_critical(self._plumbing(), "plumbing")
        log.info(
            "director for %s ports %s: queue %d, forward %s, redis %s pool %s",
            self.config.vip, self.config.ports, self.config.queue_num, self.config.forward,
            describe_target(self.config.redis), self.config.pool,
        )  # fmt: skip
        if ready is not None:
            ready()
        try:
            await self._died  # until cancelled, or until a task it cannot steer without dies
        finally:
            self._loop.remove_reader(fd)
            for task in list(self._tasks):
                task.cancel()
            # Bounded: a stop must never hang on a half-dead Redis connection (the pod's
            # terminationGracePeriod, or the next director waiting for this queue number).
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=_STOP_TIMEOUT_S)
            queue.unbind()

    def _drain_queue(self) -> None:
        try:
            self._queue.run(block=False)
        except OSError as exc:
            log.warning("reading the queue failed: %r", exc)

    def _spawn_critical(self, coro: Any, name: str) -> None:
        """A task the director cannot steer without: if it ends (it never should), `run` raises
        DirectorTaskDied and the process exits non-zero, so the DaemonSet restarts it, rather
        than keep a healthy-looking process whose table or tunnels no longer follow the pods."""
        task = self._spawn(coro)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self._died.done():
                return
            exc = t.exception()
            log.critical("director task %s ended: %s", name, "returned" if exc is None else repr(exc),
                         exc_info=exc)  # fmt: skip
            self._died.set_exception(DirectorTaskDied(f"{name}: {exc!r}"))

        task.add_done_callback(done)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool director", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="director configuration (YAML)")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="remove the director's nftables table, queue rule and tunnels at exit "
        "(by default they stay, so a restart keeps live subflows flowing)",
    )
    parser.add_argument(
        "--cleanup-only",
        action="store_true",
        help="do not steer: remove what a director with this configuration leaves on the node (nft "
        "table with its VIP drop rule, NFQUEUE rule, fwmark ip rules and route tables, tunnel "
        "devices) and exit; for a pool that was deleted or left mechanism 'director'",
    )
    parser.add_argument(
        "--idle",
        action="store_true",
        help="do nothing until SIGTERM (the operator's cleanup DaemonSet runs this after "
        "--cleanup-only in an init container, so a Ready pod means its node is clean)",
    )
    args = parser.parse_args(argv)
    if args.idle:
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        return 0
    try:
        config = load_director_config(args.config)
    except ConfigError as exc:
        print(exc)
        return 2
    if args.cleanup_only:
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            Director(config).cleanup()
        except (RuntimeError, OSError) as exc:
            log.error("cleanup failed: %s", exc)
            return 1
        log.info("removed the kernel objects of %s (table %s, devices %s*)", config.owner, config.nft_table,
                 config.device_prefix)  # fmt: skip
        return 0
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry = Telemetry.from_environment(service_name="mcpool-director", pool=config.pool)
    director = Director(config, telemetry=telemetry)
    if config.metrics_listen is not None:
        host, port = split_hostport(config.metrics_listen)
        start_http_server(port, addr=host, registry=director.metrics.registry)

    async def _run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await director.run(ready=lambda: print("director ready", flush=True))

    status = 0
    try:
        asyncio.run(_run())
    except DirectorTaskDied as exc:
        log.critical("director stopping: %s", exc)
        status = 1
    finally:
        if args.cleanup:
            director.cleanup()
        telemetry.shutdown(2.0)
    return status
