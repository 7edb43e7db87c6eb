"""What each dashboard shows: panels with their PromQL, unit and a description that says what a
bad value means and what to check next.

Queries filter on `namespace=~"$namespace"` (the dashboard's variable; "All" is `.*`) and use
Grafana's `$__rate_interval`. Histogram panels ask for exemplars: the proxy's latency
histograms carry the trace id of an observed connection (OpenMetrics exposition).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DASHBOARDS", "Dashboard", "Panel", "Query", "Row"]

NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat", "state-timeline"] = "timeseries"
    exemplars: bool = False
    stack: bool = False
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    filename: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("mcpool",))

    @property
    def panels(self) -> list[Panel]:
        return [p for row in self.rows for p in row.panels]


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    """p50/p95/p99 of a histogram, per `by` label if given."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{NS}}}[{RATE}])))",
            f"p{int(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    )


POOL = Dashboard(
    uid="mcpool-pool",
    title="mcpool / Pool overview",
    filename="mcpool-pool.json",
    description="Is bonding working, for how many, on which access path, and what broke: the MCP pods of a pool.",
    rows=(
        Row("Connections", (
            Panel(
                "Live connections by mode",
                "Connections relayed now, by mode (Convert, SOCKS5) and the client's transport. "
                "Bad: mptcp falling while tcp rises means CPEs stopped bonding (see MPTCP fallback "
                "rate); a drop to 0 with traffic expected means the pods are not reached (check the "
                "director and the Service).",
                (Query(f"sum by (mode, transport) (mcpool_connections_active_by_mode{{{NS}}})",
                       "{{mode}} {{transport}}"),),
                stack=True,
            ),
            Panel(
                "Connection setup rate",
                "Connections accepted and connections that reached the relay, per second. Bad: "
                "accepted well above relayed means handshakes fail (see Refusals by reason); both "
                "at 0 during busy hours means no client reaches the pool.",
                (Query(f"sum by (protocol) (rate(mcpool_connections_accepted_total{{{NS}}}[{RATE}]))",
                       "accepted {{protocol}}"),
                 Query(f"sum by (protocol) (rate(mcpool_handshake_duration_seconds_count{{{NS}}}[{RATE}]))",
                       "relayed {{protocol}}")),
                unit="cps",
            ),
            Panel(
                "Refusals by reason",
                "Connections refused by policy (reason) and handshakes that ended without a relay "
                "(protocol/error). Bad: client_not_allowed from a known CPE range means "
                "policy.allowed_cpes is wrong; cpe_limit, global_limit or max_handshakes means a "
                "CPE or a flood hits the limits; timeout or protocol_error means broken clients. "
                "Check the proxy's 'refused' log lines, which carry the trace id.",
                (Query(f"sum by (reason) (rate(mcpool_policy_refusals_total{{{NS}}}[{RATE}]))",
                       "policy {{reason}}"),
                 Query(f"sum by (protocol, error) (rate(mcpool_handshake_errors_total{{{NS}}}[{RATE}]))",
                       "{{protocol}} {{error}}")),
                unit="cps",
            ),
            Panel(
                "MPTCP fallback rate",
                "Share of relayed connections whose client came without MPTCP (plain TCP, or MPTCP "
                "that fell back during the handshake). Bad: a rise means CPEs lost bonding: a CPE "
                "firmware or a middlebox stripping MPTCP options on one access network; compare "
                "per pod and check MPTcpExt fallback counters (nstat) in a pod.",
                (Query(f"sum(rate(mcpool_mptcp_fallbacks_total{{{NS}}}[{RATE}])) / "
                       f"clamp_min(sum(rate(mcpool_relays_total{{{NS}}}[{RATE}])), 1e-9)", "fallback share"),),
                unit="percentunit",
            ),
        )),
        Row("Access paths", (
            Panel(
                "Bytes per access path",
                "Throughput per access path (the pool's access_paths mapping of CPE-side networks; "
                "'other' matches none) and address family. Bad: one path at 0 while the other carries "
                "everything means that access network is down or its subflows are refused (see "
                "Subflow joins); much traffic on 'other' means access_paths misses a range.",
                (Query(f"sum by (path, remote_family) (rate(mcpool_access_path_bytes_total{{{NS}}}[{RATE}])) * 8",
                       "{{path}} {{remote_family}}"),),
                unit="bps",
                stack=True,
            ),
            Panel(
                "Share per access path (bonding effect)",
                "Share of all bytes each access path carries. The share of the second link is the "
                "bonding effect. Bad: the second link near 0 % with MPTCP clients means subflows "
                "do not join (path manager limits, CPE endpoints) or that link is cut.",
                (Query(f"sum by (path) (rate(mcpool_access_path_bytes_total{{{NS}}}[{RATE}])) / ignoring(path) "
                       f"group_left clamp_min(sum(rate(mcpool_access_path_bytes_total{{{NS}}}[{RATE}])), 1e-9)",
                       "{{path}}"),),
                unit="percentunit",
                stack=True,
            ),
        )),
        Row("MPTCP subflows", (
            Panel(
                "Subflow joins and their outcomes",
                "MP_JOINs the kernel accepted on the proxy's client connections, and those it "
                "refused by reason. Bad: no_token means joins reach a pod that does not own the "
                "connection (director steering or affinity broken: see the Director dashboard); "
                "limit means the path manager limits (ip mptcp limits) are too low; hmac_failure "
                "means forged or corrupted joins.",
                (Query(f"sum(rate(mcpool_mptcp_joins_accepted_total{{{NS}}}[{RATE}]))", "accepted"),
                 Query(f"sum by (reason) (rate(mcpool_mptcp_joins_refused_total{{{NS}}}[{RATE}]))",
                       "refused {{reason}}")),
                unit="cps",
            ),
            Panel(
                "Failovers",
                "Subflows lost while their connection lived on: 'stale' is the kernel moving data "
                "off a subflow after repeated losses, 'closed' a subflow that ended while others "
                "carried on. A few are what bonding is for (a line lost sync). Bad: many, steadily, "
                "mean one access network is flapping: check Bytes per access path and the access "
                "network's own monitoring.",
                (Query(f"sum by (kind) (increase(mcpool_mptcp_failovers_total{{{NS}}}[{RATE}]))", "{{kind}}"),),
            ),
            Panel(
                "DSS checksum errors",
                "DSS checksum failures the kernel counted in the pods (MPTcpExtDataCsumErr). "
                "Bad: anything above 0 means a middlebox alters payload on some path; MPTCP falls back "
                "or resets those connections. Find the path from the CPEs involved (traces of "
                "reset connections) and the access network's NAT/ALG devices.",
                (Query(f"sum by (pod) (increase(mcpool_mptcp_dss_checksum_errors_total{{{NS}}}[{RATE}]))",
                       "{{pod}}"),),
            ),
            Panel(
                "Subflows per MPTCP connection",
                "Average subflows of live MPTCP connections. Bad: near 1 means clients are MPTCP but only "
                "one path joins (CPE endpoints, one link down, joins refused); the lab's CPEs "
                "with two links show 2.",
                (Query(f"sum(mcpool_mptcp_subflows{{{NS}}}) / "
                       f"clamp_min(sum(mcpool_connections_active_by_mode{{{NS}, transport=\"mptcp\"}}), 1)",
                       "subflows"),),
            ),
        )),
        Row("Latency", (
            Panel(
                "Handshake latency",
                "Accept to relay start (Convert/SOCKS5 handshake, policy, upstream connect), by "
                "protocol. Exemplars link a slow point to its connection's trace. Bad: p99 well "
                "above the upstream connect time means slow clients or an event loop busy (CPU "
                "limits); open an exemplar to see which span is slow.",
                _quantiles("mcpool_handshake_duration_seconds", "protocol"),
                unit="s",
                exemplars=True,
            ),
            Panel(
                "Upstream connect latency",
                "Time to connect to the destinations. Exemplars link to the trace. Bad: a rise for "
                "all pods means the egress path or the destinations are slow (check the node's "
                "egress, DNS for SOCKS5 names); a rise on one pod points at that node.",
                _quantiles("mcpool_upstream_connect_duration_seconds"),
                unit="s",
                exemplars=True,
            ),
        )),
        Row("Pods", (
            Panel(
                "Drain state per pod",
                "1 while a pod drains (SIGTERM or POST /drain): its listeners refuse new clients "
                "and live connections finish. Bad: a pod draining longer than its drain timeout "
                "(alert McpoolDrainOverran), or many pods draining at once (a rollout too wide: "
                "check the PodDisruptionBudget).",
                (Query(f"max by (pod) (mcpool_draining{{{NS}}})", "{{pod}}"),),
                kind="state-timeline",
                width=24,
                height=6,
            ),
        )),
    ),
)

DIRECTOR = Dashboard(
    uid="mcpool-director",
    title="mcpool / Director",
    filename="mcpool-director.json",
    description="The director steering every subflow of a connection to its pod: decisions, joins, table, Redis.",
    rows=(
        Row("Decisions", (
            Panel(
                "Decisions by outcome",
                "Steering decisions made in userspace per second, for the SYNs the kernel's maps "
                "could not decide (see the next panel). hashed/cpe_hit: initial SYNs; "
                "token_hit(_after_wait): joins sent to their pod. Bad: token_miss_after_wait means "
                "joins arrive for tokens never registered (pods cannot reach Redis, or joins for "
                "connections of another pool); no_ready_pod means no pod is ready; collision means "
                "two pods claimed one token (see alerts).",
                (Query(f"sum by (outcome) (rate(mcpool_director_decisions_total{{{NS}}}[{RATE}]))",
                       "{{outcome}}"),),
                unit="cps",
                stack=True,
            ),
            Panel(
                "SYNs decided in the kernel",
                "SYNs per second the director's nftables maps decided without userspace: bucket_hit "
                "(a new CPE, by the bucket map), cpe_hit (a CPE with live connections, to their pod), "
                "token_hit (a join, by its token), against those queued to userspace. Bad: "
                "queued_initial near the total means the bucket map is empty (no ready pod, or the "
                "director cannot write its maps: check its log); queued_join high means joins arrive "
                "before their token (normal for each connection's first join in a LAN).",
                (Query(f"sum by (counter) (rate(mcpool_director_kernel_packets_total{{{NS},"
                       f"counter=~\"bucket_hit|cpe_hit|token_hit|queued_initial|queued_join\"}}[{RATE}]))",
                       "{{counter}}"),),
                unit="pps",
                stack=True,
            ),
            Panel(
                "Decision latency",
                "Time from reading a SYN from the queue to its verdict (joins include their wait); "
                "exemplars link to the decision's span when the director traces. "
                "Bad: p99 near join_wait_ms means joins wait for their tokens routinely: the pods "
                "register too late (Redis latency).",
                _quantiles("mcpool_director_decision_seconds"),
                unit="s",
                exemplars=True,
            ),
            Panel(
                "Joins held for their token",
                "MP_JOIN SYNs held now until their token is registered, and how many per second "
                "were held. Bad: held joins growing means the registry lags (pods' Redis "
                "connection, Redis CPU).",
                (Query(f"sum(mcpool_director_joins_waiting{{{NS}}})", "held now"),
                 Query(f"sum(rate(mcpool_director_join_wait_seconds_count{{{NS}}}[{RATE}]))", "held per second")),
            ),
            Panel(
                "Join hold time",
                "How long held joins waited for their token. Bad: values at join_wait_ms mean the "
                "token never came and the join was decided without it (likely dropped).",
                _quantiles("mcpool_director_join_wait_seconds"),
                unit="s",
            ),
            Panel(
                "Packets that reached userspace",
                "Packets the kernel queued to the director, by kind. Only SYNs should. Bad: anything "
                "growing with traffic volume (not connection rate) means the nftables flow "
                "offload is not in place (check `nft list table inet mcpool_director`).",
                (Query(f"sum by (kind) (rate(mcpool_director_queued_packets_total{{{NS}}}[{RATE}]))", "{{kind}}"),),
                unit="pps",
            ),
        )),
        Row("Affinity table", (
            Panel(
                "Table sizes",
                "Entries of the director's local affinity table. Bad: tokens far above the pool's "
                "live connections means unregistrations are lost; ready_pods below pods means pods "
                "are not ready.",
                (Query(f"max by (kind) (mcpool_director_table_entries{{{NS}}})", "{{kind}}"),),
            ),
            Panel(
                "Redis up",
                "1 while the director's feed (and each pod's registry) reaches Redis. Bad: 0 means "
                "decisions use a frozen table and new connections' joins go unsteered: check the "
                "Redis pod and the network policy (alert McpoolDirectorRedisDown).",
                (Query(f"min by (pod) (mcpool_director_redis_up{{{NS}}})", "director {{pod}}"),
                 Query(f"min by (pod) (mcpool_affinity_redis_up{{{NS}}})", "pod {{pod}}")),
                kind="state-timeline",
            ),
            Panel(
                "Resyncs and re-registrations",
                "Full reads of the table by the director, and pods re-registering their state "
                "after Redis came back. Bursts follow Redis restarts. Bad: steady re-registrations "
                "mean Redis keeps dropping connections.",
                (Query(f"sum(increase(mcpool_director_resyncs_total{{{NS}}}[{RATE}]))", "director resyncs"),
                 Query(f"sum(increase(mcpool_affinity_reregistrations_total{{{NS}}}[{RATE}]))",
                       "pod re-registrations")),
            ),
            Panel(
                "Change-stream gaps and full reads",
                "Per second: gaps in the pool's change stream a director found (entries trimmed past "
                "its cursor, the stream deleted, Redis restarted empty), each answered by one full "
                "read of the table, and all its full reads (also one per (re)connect and every "
                "resync_interval_s). Bad: a steady rate of gaps means a director cannot keep up with "
                "the stream (its Redis connection, its CPU) or its full reads outlast the stream's "
                "affinity.feed_retain_s (the director logs a warning then): raise feed_retain_s on "
                "pods and directors together.",
                (Query(f"sum by (pod) (rate(mcpool_director_feed_gaps_total{{{NS}}}[{RATE}]))", "gaps {{pod}}"),
                 Query(f"sum by (pod) (rate(mcpool_director_resyncs_total{{{NS}}}[{RATE}]))",
                       "full reads {{pod}}")),
                unit="cps",
            ),
            Panel(
                "Token collisions",
                "Tokens a pod accepted that another live pod already owned. Rare by design (32-bit "
                "tokens). Bad: a steady rate means stale registrations (heartbeat_ttl_s too long) or "
                "clock or Redis trouble (alert McpoolTokenCollisions).",
                (Query(f"sum by (pod) (increase(mcpool_affinity_token_collisions_total{{{NS}}}[{RATE}]))",
                       "{{pod}}"),),
            ),
        )),
    ),
)

OPERATOR = Dashboard(
    uid="mcpool-operator",
    title="mcpool / Operator",
    filename="mcpool-operator.json",
    description="The operator reconciling MCPPool resources.",
    rows=(
        Row("Reconciles", (
            Panel(
                "Reconciles by result",
                "Reconciles per second by result. Bad: anything but ok; a steady high rate means "
                "something keeps changing the children (another controller fighting the operator).",
                (Query(f"sum by (result) (rate(mcpool_operator_reconciles_total{{{NS}}}[{RATE}]))", "{{result}}"),),
                unit="ops",
                stack=True,
            ),
            Panel(
                "Reconcile errors",
                "Reconciles that did not bring a pool to its spec, by reason. Bad: any. invalid_spec: read "
                "the pool's Degraded condition and Events; apply_error: the API refused a child "
                "(RBAC, admission webhooks): see the operator's log; exception: the API server is "
                "unreachable or a bug (alert McpoolOperatorReconcileErrors).",
                (Query(f"sum by (reason) (increase(mcpool_operator_reconcile_errors_total{{{NS}}}[{RATE}]))",
                       "{{reason}}"),),
            ),
            Panel(
                "Reconcile latency",
                "Time per reconcile, API round trips included. Bad: seconds mean a slow or "
                "throttled API server (client-side rate limits, priority and fairness).",
                _quantiles("mcpool_operator_reconcile_duration_seconds"),
                unit="s",
            ),
            Panel(
                "Pools by condition",
                "MCPPools by condition and status as the last reconcile left them. Bad: Ready=False "
                "or Degraded=True for more than a rollout's time (alert McpoolPoolNotReady): "
                "`kubectl describe mcppool` shows the reason.",
                (Query(f"sum by (condition, status) (mcpool_operator_pools{{{NS}}})", "{{condition}}={{status}}"),),
            ),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (POOL, DIRECTOR, OPERATOR)
