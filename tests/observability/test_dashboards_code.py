"""The dashboards as code: the committed JSON is exactly what `python -m mcpool_dashboards`
generates (a missing file fails too), every panel says what a bad value means, and every
dashboard file has a proof against Prometheus (test_dashboards_lab.py, test_operator_prometheus.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from mcpool_dashboards import DASHBOARDS
from mcpool_dashboards.build import DEFAULT_OUT, render_all
from promlab import DASHBOARD_DIR, dashboard_files, grafana_expr, panels_of

# Which test evaluates each dashboard's queries on a real Prometheus.
PROVEN_BY = {
    "mcpool-pool.json": "tests/observability/test_dashboards_lab.py",
    "mcpool-director.json": "tests/observability/test_dashboards_lab.py",
    "mcpool-operator.json": "tests/operator/test_operator_prometheus.py",
}


def test_committed_dashboards_match_the_code() -> None:
    assert DEFAULT_OUT == DASHBOARD_DIR
    generated = render_all()
    committed = {p.name: p.read_text() for p in dashboard_files()}
    assert set(committed) == set(generated), "run: .venv/bin/python -m mcpool_dashboards"
    for name, text in generated.items():
        assert committed[name] == text, f"{name} is out of date: run .venv/bin/python -m mcpool_dashboards"


def test_check_mode_reports_a_stale_file(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    ok = subprocess.run([sys.executable, "-m", "mcpool_dashboards", "--out", str(out), "--check"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 1 and "out of date" in ok.stderr  # nothing written yet
    subprocess.run([sys.executable, "-m", "mcpool_dashboards", "--out", str(out)], check=True, capture_output=True)
    again = subprocess.run([sys.executable, "-m", "mcpool_dashboards", "--out", str(out), "--check"],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr


def test_every_dashboard_is_proven_against_prometheus() -> None:
    assert {p.name for p in dashboard_files()} == set(PROVEN_BY)


def test_every_panel_has_a_description_and_queries() -> None:
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"].startswith("mcpool-") and "mcpool" in dashboard["tags"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        for panel in panels_of(path):
            where = f"{path.name} / {panel['title']}"
            # What a bad value means, and what to check next.
            assert "Bad:" in panel["description"], where
            assert len(panel["description"]) > 80, where
            assert panel["targets"], where
            for t in panel["targets"]:
                grafana_expr(t["expr"])  # every variable is one the proof substitutes
                assert 'namespace=~"$namespace"' in t["expr"], where


def test_latency_panels_ask_for_exemplars() -> None:
    pool = next(d for d in DASHBOARDS if d.uid == "mcpool-pool")
    exemplar_panels = {p.title for p in pool.panels if p.exemplars}
    assert exemplar_panels == {"Handshake latency", "Upstream connect latency"}
    data = json.loads((DASHBOARD_DIR / "mcpool-pool.json").read_text())
    for panel in data["panels"]:
        if panel.get("title") in exemplar_panels:
            assert all(t.get("exemplar") is True for t in panel["targets"])
