"""The alert rules (charts/mcpool/rules/*.yaml): `promtool check rules` accepts them, `promtool
test rules` passes, every alert has a unit test that fires it and one where it stays silent, and
every alert has a summary, a description and a runbook section in docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from promlab import REPO, RULES_DIR

TESTS_DIR = Path(__file__).parent / "rules"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run scripts/install-deps.sh (Debian package prometheus)")
    return path


def _alerts() -> dict[str, dict[str, object]]:
    alerts: dict[str, dict[str, object]] = {}
    for path in sorted(RULES_DIR.glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    return alerts


def test_promtool_check_rules() -> None:
    files = sorted(RULES_DIR.glob("*.yaml"))
    assert files
    result = subprocess.run([_promtool(), "check", "rules", *map(str, files)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    files = sorted(TESTS_DIR.glob("*.test.yaml"))
    assert files
    result = subprocess.run([_promtool(), "test", "rules", *(f.name for f in files)], cwd=TESTS_DIR,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in TESTS_DIR.glob("*.test.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts == {
        "McpoolPoolNotReady", "McpoolRefusalsHigh", "McpoolMptcpFallbackHigh", "McpoolDirectorRedisDown",
        "McpoolDssChecksumErrors", "McpoolDrainOverran", "McpoolTokenCollisions", "McpoolOperatorReconcileErrors",
    }
    assert firing == alerts, f"no firing case: {sorted(alerts - firing)}"
    assert silent == alerts, f"no silent case: {sorted(alerts - silent)}"


def test_every_alert_has_summary_description_and_runbook() -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in operations.splitlines() if line.startswith("#")}
    for name, rule in _alerts().items():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations.get("summary") and annotations.get("description"), name
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/operations.md has no section '### {name}'"
        assert rule["labels"]["severity"] in ("warning", "critical"), name  # type: ignore[index]
