"""mcpool's Grafana dashboards as code (Pool overview, Director, Operator).

The panels are declared in `panels.py` (title, description, PromQL, unit); `build.py` turns them
into dashboard JSON with Grafana's own SDK (`grafana-foundation-sdk`); `python -m
mcpool_dashboards` writes `charts/mcpool/dashboards/*.json`, which the Helm chart ships as
ConfigMaps labelled `grafana_dashboard: "1"`. A test fails when the committed files differ from
what the code generates. Not needed at runtime: the SDK is in the `dashboards` extra.
"""

from __future__ import annotations

from .panels import DASHBOARDS, Dashboard, Panel, Query

__all__ = ["DASHBOARDS", "Dashboard", "Panel", "Query"]
