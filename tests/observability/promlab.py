"""A real Prometheus (Debian's `prometheus`, installed by scripts/install-deps.sh) for the tests:
its own config, data directory and port, optionally inside a lab network namespace, scraping
every second with exemplar storage on; and the dashboards' panel queries evaluated through its
HTTP API exactly as Grafana would send them.

Nothing here sleeps to synchronise: `wait()` polls the HTTP API until a condition holds, with a
deadline (Prometheus offers no event to wait on).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "charts" / "mcpool" / "dashboards"
RULES_DIR = REPO / "charts" / "mcpool" / "rules"
# What Grafana puts for the dashboards' variables: "All" namespaces, and $__rate_interval for a
# 1 s scrape interval (4 x scrape interval, rounded up).
SUBSTITUTIONS = {"$__rate_interval": "5s", "$namespace": ".*"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise AssertionError("prometheus is not installed: run scripts/install-deps.sh (Debian package prometheus)")
    return path


def target(address: str, **labels: str) -> dict[str, Any]:
    """One static target with the labels Kubernetes service discovery would give it."""
    return {"targets": [address], "labels": labels}


class Prometheus:
    """`prometheus` on `port`, started by `popen` (a lab namespace's, or the host's)."""

    def __init__(self, workdir: Path, jobs: dict[str, list[dict[str, Any]]], *, port: int,
                 host: str = "127.0.0.1", rule_files: Sequence[Path] = (),
                 connect_context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> None:
        self.workdir = workdir
        self.port = port
        self.host = host
        self._connect_context = connect_context
        self.proc: subprocess.Popen[Any] | None = None
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": targets} for job, targets in jobs.items()
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"

    def argv(self) -> list[str]:
        return [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--enable-feature=exemplar-storage",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]

    def start(self, popen: Callable[..., subprocess.Popen[Any]] | None = None, timeout_s: float = 20.0) -> None:
        log = open(self.log_path, "w")  # noqa: SIM115 - the child owns it
        starter = popen or subprocess.Popen
        self.proc = starter(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait(lambda: self._ready(), timeout_s, "Prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            status, _ = self._get("/-/ready")
        except OSError:
            return False
        return status == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # -- HTTP API ------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        with self._connect_context():
            conn.connect()
        try:
            conn.request("GET", url)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def api(self, path: str, **params: Any) -> Any:
        status, body = self._get(f"/api/v1/{path}", params)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"/api/v1/{path} {params}: HTTP {status}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None: no series)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query_range", query=expr, start=start, end=end, step=step)["result"]
        return result

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query_exemplars", query=expr, start=start, end=end)
        return result

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            last = condition()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last {last!r})")
            time.sleep(0.1)

    def wait_value(self, expr: str, predicate: Callable[[float], bool], timeout_s: float, what: str) -> float:
        def check() -> list[float | None]:
            value = self.value(expr)
            # A one-element list: truthy even when the value that satisfies `predicate` is 0.
            return [value] if value is not None and predicate(value) else []

        result: list[float] = self.wait(check, timeout_s, what)
        return result[0]

    def wait_scrapes(self, count: int, timeout_s: float = 20.0) -> None:
        """Wait until every target has been scraped `count` more times: a rate over the last
        seconds then covers what the test did last."""

        def scrapes() -> dict[str, float]:
            return {r["metric"]["instance"]: float(r["value"][1]) for r in self.query("count_over_time(up[1h])")}

        before = scrapes()
        self.wait(lambda: all(v >= before.get(k, 0) + count for k, v in scrapes().items()), timeout_s,
                  f"{count} more scrapes of every target")

    def wait_targets_up(self, count: int, timeout_s: float = 20.0) -> None:
        def check() -> bool:
            targets = self.api("targets")["activeTargets"]
            return len(targets) == count and all(t["health"] == "up" for t in targets)

        try:
            self.wait(check, timeout_s, f"{count} targets up")
        except AssertionError:
            raise AssertionError(f"targets: {json.dumps(self.api('targets')['activeTargets'], indent=1)}") from None


# -- the dashboards' panels --------------------------------------------------------------------------
@dataclass
class PanelResult:
    dashboard: str
    title: str
    unit: str
    targets: list[tuple[str, str, list[dict[str, Any]]]] = field(default_factory=list)  # expr, legend, series

    def problems(self) -> list[str]:
        found = []
        for expr, _, series in self.targets:
            if not series:
                found.append(f"{self.dashboard} / {self.title}: no series for {expr}")
        if not any(_finite(s) for _, _, series in self.targets for s in series):
            found.append(f"{self.dashboard} / {self.title}: no finite value in any series")
        return found


def _finite(series: dict[str, Any]) -> bool:
    return any(math.isfinite(float(v)) for _, v in series.get("values", []))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def panels_of(path: Path) -> Iterator[dict[str, Any]]:
    for panel in json.loads(path.read_text())["panels"]:
        if panel.get("type") != "row":
            yield panel


def grafana_expr(expr: str) -> str:
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def evaluate_dashboard(prom: Prometheus, path: Path, start: float, end: float) -> list[PanelResult]:
    """Every panel query of the dashboard file, as a range query over [start, end]."""
    title = json.loads(path.read_text())["title"]
    results = []
    for panel in panels_of(path):
        result = PanelResult(title, panel["title"], panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""))
        for t in panel["targets"]:
            result.targets.append((t["expr"], t.get("legendFormat", ""), prom.query_range(grafana_expr(t["expr"]), start, end)))
        results.append(result)
    return results


def exemplar_trace_ids(prom: Prometheus, metric: str, start: float, end: float) -> set[str]:
    ids: set[str] = set()
    for series in prom.exemplars(metric, start, end):
        for exemplar in series.get("exemplars", []):
            trace_id = exemplar.get("labels", {}).get("trace_id")
            if trace_id:
                ids.add(trace_id)
    return ids
