"""The `workers` setting and the supervisor's merge of its workers' metrics (no kernel needed)."""

from __future__ import annotations

import pytest
from mcpool_proxy.config import MAX_WORKERS, ConfigError, parse_config
from mcpool_proxy.workers import merge_metrics, worker_share
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics


def test_workers_default_is_one_process() -> None:
    assert parse_config({}).workers == 1


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, "two"])
def test_workers_out_of_range_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  workers: "):
        parse_config({"workers": value})


def test_workers_refused_with_transparent_mode() -> None:
    with pytest.raises(ConfigError, match=r"workers > 1 is not supported with listen.transparent"):
        parse_config({"workers": 2, "listen": {"transparent": ["198.18.100.2:5200"]}})
    assert parse_config({"workers": 1, "listen": {"transparent": ["198.18.100.2:5200"]}}).workers == 1


def test_each_worker_enforces_its_share_of_the_pod_limits() -> None:
    pod = parse_config({"workers": 3,
                        "policy": {"max_connections": 1000, "max_connections_per_cpe": 10, "max_handshakes": 64},
                        "limits": {"max_handshakes_per_cpe": 1, "new_connections_per_cpe_per_s": 30.0,
                                   "new_connections_burst_per_cpe": 60, "pipe_budget_bytes": 3 << 20}})  # fmt: skip
    one = worker_share(pod)
    # Three workers together never admit more than the pod's figure (rounded up per worker, at least 1).
    assert (one.policy.max_connections, one.policy.max_connections_per_cpe, one.policy.max_handshakes) == (334, 4, 22)
    assert one.limits.max_handshakes_per_cpe == 1
    assert one.limits.new_connections_per_cpe_per_s == 10.0
    assert one.limits.new_connections_burst_per_cpe == 20
    assert one.limits.pipe_budget_bytes == 1 << 20
    assert worker_share(parse_config({})) == parse_config({})  # one process: the limits as configured


def _worker(accepted: int, active: float, joins: int, checksum: float, latency: list[float]) -> str:
    r = CollectorRegistry()
    Counter("mcpool_connections_accepted", "a", ["protocol"], registry=r).labels("convert").inc(accepted)
    Gauge("mcpool_connections_active", "b", registry=r).set(active)
    Counter("mcpool_mptcp_joins_accepted", "c", registry=r).inc(joins)  # namespace-wide view
    Gauge("mcpool_mptcp_checksum_enabled", "d", registry=r).set(checksum)
    Gauge("mcpool_admission_filter_active", "e", registry=r).set(0)
    h = Histogram("mcpool_handshake_duration_seconds", "f", buckets=(0.01, 0.1), registry=r)
    for value in latency:
        h.observe(value, exemplar={"trace_id": "ab"})
    text: bytes = generate_openmetrics(r)  # type: ignore[no-untyped-call]
    return text.decode()


def test_merge_sums_own_counts_and_takes_namespace_views_once() -> None:
    merged = {m.name: m for m in merge_metrics(
        [_worker(3, 2, 5, 1, [0.005, 0.05]), _worker(4, 1, 5, 1, [0.5])],
        replaced=["mcpool_admission_filter_active"],
    )}
    values = {(s.name, tuple(sorted(s.labels.items()))): s for m in merged.values() for s in m.samples}
    assert values[("mcpool_connections_accepted_total", (("protocol", "convert"),))].value == 7
    assert values[("mcpool_connections_active", ())].value == 3
    assert values[("mcpool_mptcp_joins_accepted_total", ())].value == 5
    assert values[("mcpool_mptcp_checksum_enabled", ())].value == 1
    assert values[("mcpool_handshake_duration_seconds_count", ())].value == 3
    assert values[("mcpool_handshake_duration_seconds_bucket", (("le", "0.01"),))].value == 1
    assert values[("mcpool_handshake_duration_seconds_bucket", (("le", "+Inf"),))].value == 3
    bucket = values[("mcpool_handshake_duration_seconds_bucket", (("le", "0.1"),))]
    assert bucket.value == 2 and bucket.exemplar is not None and bucket.exemplar.labels == {"trace_id": "ab"}
    assert "mcpool_admission_filter_active" not in merged
