"""Prometheus metrics of the operator: reconciles by result, their errors and duration, and the
pools by condition, in the operator's own `CollectorRegistry` (served by `mcpool operator
--metrics-listen`, default `0.0.0.0:8081`).

Pools by condition are what the last reconcile of each pool wrote (or found) in its status, so
the gauge needs no API call at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONDITION_TYPES", "OperatorMetrics"]

CONDITION_TYPES = ("Ready", "Degraded")


class _PoolsCollector(Collector):
    def __init__(self, conditions: Mapping[tuple[str, str], Mapping[str, str]]) -> None:
        self._conditions = conditions

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "mcpool_operator_pools",
            "MCPPools by condition type and status (True, False, Unknown), as their last reconcile "
            "left them.",
            labels=["condition", "status"],
        )
        counts = {(c, s): 0 for c in CONDITION_TYPES for s in ("True", "False", "Unknown")}
        for by_type in list(self._conditions.values()):
            for type_ in CONDITION_TYPES:
                key = (type_, by_type.get(type_, "Unknown"))
                counts[key] = counts.get(key, 0) + 1
        for (condition, status), value in sorted(counts.items()):
            family.add_metric([condition, status], value)
        yield family


class OperatorMetrics:
    """Counters of one operator run; `registry` is what the metrics endpoint serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "mcpool_operator_reconciles",
            "Reconciles of MCPPools by result (ok, invalid_spec, apply_error, exception).",
            ["result"],
            registry=r,
        )
        self.errors = Counter(
            "mcpool_operator_reconcile_errors",
            "Reconciles that did not bring the pool to its spec, by reason (invalid_spec: the spec "
            "is rejected; apply_error: the API refused a child object; exception: a bug or an API "
            "outage).",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "mcpool_operator_reconcile_duration_seconds",
            "Time one reconcile took (API round trips included).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        for result in ("ok", "invalid_spec", "apply_error", "exception"):
            self.reconciles.labels(result)
            if result != "ok":
                self.errors.labels(result)
        self.conditions: dict[tuple[str, str], dict[str, str]] = {}
        r.register(_PoolsCollector(self.conditions))

    def pool_conditions(self, key: tuple[str, str], conditions: Sequence[Mapping[str, Any]]) -> None:
        """Remember the conditions a reconcile left on pool `key` (namespace, name)."""
        self.conditions[key] = {str(c.get("type")): str(c.get("status")) for c in conditions}

    def forget(self, key: tuple[str, str]) -> None:
        self.conditions.pop(key, None)
