"""Dashboard JSON from the panel declarations, built with Grafana's foundation SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import statetimeline as gstate
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

from .panels import DASHBOARDS, Dashboard, Panel

__all__ = ["DEFAULT_OUT", "build", "render", "render_all"]

# charts/mcpool/dashboards of the repository this package sits in (proxy/mcpool_dashboards).
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "charts" / "mcpool" / "dashboards"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def _panel(panel: Panel) -> Any:
    builder: Any
    if panel.kind == "stat":
        builder = gstat.Panel()
    elif panel.kind == "state-timeline":
        builder = gstate.Panel()
    else:
        builder = gts.Panel().fill_opacity(10 if not panel.stack else 40).line_width(1)
        if panel.stack:
            builder = builder.stacking(StackingConfig().mode(StackingMode.NORMAL))
    builder = (
        builder.title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    for i, query in enumerate(panel.queries):
        target = gprom.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + i))
        if panel.exemplars:
            target = target.exemplar(True)
        builder = builder.with_target(target)
    return builder


def build(spec: Dashboard) -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    builder = (
        gdash.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            gdash.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(up, namespace)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    )
    for row in spec.rows:
        builder = builder.with_row(gdash.Row(row.title))
        for panel in row.panels:
            builder = builder.with_panel(_panel(panel))
    data: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    # Stable ids, in order: Grafana needs them unique; the SDK leaves them unset.
    for number, item in enumerate(data.get("panels", []), start=1):
        item["id"] = number
    return data


def render(spec: Dashboard) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {spec.filename: render(spec) for spec in DASHBOARDS}
