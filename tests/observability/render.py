"""Renderings of the dashboards without Grafana: each panel's real query results (from the proof
tests' Prometheus) plotted with matplotlib, one PNG per dashboard. Opt-in: the proof tests call
it when MCPOOL_DASHBOARD_PNG_DIR is set (docs/img/ holds the committed renderings)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from promlab import PanelResult

_SCALE = {"bps": (1e-6, "Mbit/s"), "s": (1e3, "ms"), "percentunit": (100.0, "%")}


def _legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def render_dashboards(results: list[PanelResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in dict.fromkeys(r.dashboard for r in results):
        panels = [r for r in results if r.dashboard == dashboard]
        cols = 3
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows), squeeze=False)
        fig.suptitle(f"{dashboard} (lab run, real Prometheus query results)", fontsize=11)
        start = min((float(v[0]) for p in panels for _, _, ss in p.targets for s in ss for v in s["values"][:1]),
                    default=0.0)
        for ax, panel in zip(axes.flat, panels, strict=False):
            factor, unit = _SCALE.get(panel.unit, (1.0, panel.unit if panel.unit not in ("short", "") else ""))
            for _, legend, series in panel.targets:
                for s in series:
                    points: list[Any] = [(float(t) - start, float(v) * factor) for t, v in s["values"]
                                         if math.isfinite(float(v))]
                    if points:
                        xs, ys = zip(*points, strict=True)
                        ax.plot(xs, ys, linewidth=1.1, label=_legend(legend, s["metric"])[:28])
            ax.set_title(panel.title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("s", fontsize=7)
            if unit:
                ax.set_ylabel(unit, fontsize=7)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        name = re.sub(r"[^a-z0-9]+", "-", dashboard.lower()).strip("-") + ".png"
        path = out_dir / name
        fig.savefig(path, dpi=62)
        plt.close(fig)
        written.append(path)
    return written
