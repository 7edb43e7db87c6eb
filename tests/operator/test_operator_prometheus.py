"""The Operator dashboard against a real Prometheus: the real operator (`run()`, with
`--metrics-listen`) reconciles pools on the API emulator — one that becomes Ready, one with an
invalid spec — while Debian's Prometheus scrapes its metrics endpoint every second; then every
panel query of the Operator dashboard is evaluated through Prometheus's HTTP API and must return
data. Loopback only: no namespaces, no root."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import Cluster, OperatorRunner, condition_of, eventually
from mcpool_operator.handlers import OperatorOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "observability"))

from promlab import DASHBOARD_DIR, Prometheus, evaluate_dashboard, free_port, target  # noqa: E402

METRICS_PORT = free_port()


@pytest.fixture()
def operator_options(operator_options: OperatorOptions) -> OperatorOptions:
    return dataclasses.replace(operator_options, metrics_listen=f"127.0.0.1:{METRICS_PORT}")


async def test_every_panel_of_the_operator_dashboard_has_data(
    cluster: Cluster, operator_runner: OperatorRunner, tmp_path: Path
) -> None:
    prom = Prometheus(tmp_path / "prometheus",
                      {"mcpool-operator": [target(f"127.0.0.1:{METRICS_PORT}", namespace="mcp-test",
                                                  pod="mcpool-operator-0")]},
                      port=free_port())
    await asyncio.to_thread(prom.start)
    try:
        started = time.time()
        await asyncio.to_thread(prom.wait_targets_up, 1)
        await cluster.create_pool("edge", {"replicas": 2, "policy": {"allowedCpes": ["198.18.0.0/15"]}})
        await eventually(lambda: cluster.child("apps/v1/statefulsets", "edge"), what="StatefulSet edge")
        await cluster.set_statefulset_ready("edge", 2)
        await eventually(lambda: (condition_of(cluster.pool("edge"), "Ready") or {}).get("status") == "True",
                         what="edge Ready")
        await cluster.create_pool("broken", {"policy": {"allowedCpes": ["198.18.0.0/33"]}})
        await eventually(lambda: (condition_of(cluster.pool("broken"), "Degraded") or {}).get("status") == "True",
                         what="broken Degraded")

        def scraped(expr: str, want: float) -> bool:
            return prom.value(expr) == want

        await asyncio.to_thread(prom.wait, lambda: scraped('sum(mcpool_operator_pools{condition="Ready", status="True"})', 1),
                                20, "one Ready pool scraped")
        await asyncio.to_thread(prom.wait, lambda: scraped('sum(mcpool_operator_pools{condition="Ready", status="False"})', 1),
                                20, "one not-Ready pool scraped")
        await asyncio.to_thread(
            prom.wait, lambda: (prom.value('sum(mcpool_operator_reconcile_errors_total{reason="invalid_spec"})') or 0) >= 1,
            20, "the invalid spec counted")
        assert (prom.value('sum(mcpool_operator_reconciles_total{result="ok"})') or 0) >= 2
        await asyncio.to_thread(prom.wait_scrapes, 3)
        results = await asyncio.to_thread(evaluate_dashboard, prom, DASHBOARD_DIR / "mcpool-operator.json",
                                          started, time.time())
        problems = [p for r in results for p in r.problems()]
        assert not problems, "\n".join(problems)
        out = os.environ.get("MCPOOL_DASHBOARD_PNG_DIR")
        if out:
            from render import render_dashboards

            render_dashboards(results, Path(out))
    finally:
        prom.stop()
