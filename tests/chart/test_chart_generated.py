"""Generated files do not drift from their sources (scripts/gen_manifests.py regenerates all):
the chart's CRD template from operator/mcpool_operator/crd.py, manifests/rbac.yaml and
manifests/operator.yaml from the chart, the README's values table from values.yaml; and every
values key is documented and declared in the strict schema."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_support import CHART, REPO, gen_manifests, run_helm
from kubernetes_validate.utils import latest_version
from mcpool_operator.crd import CRD_PATH, build_crd

FIX = "run `.venv/bin/python scripts/gen_manifests.py`"


def test_chart_crd_template_is_generated_from_build_crd() -> None:
    gen = gen_manifests()
    path: Path = gen.CRD_TEMPLATE
    # A missing file must fail, not pass for want of something to compare.
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: {FIX}"
    assert path.read_text() == gen.crd_template(), f"{path.relative_to(REPO)} is stale: {FIX}"


def test_crd_template_is_the_committed_crd() -> None:
    # Both copies come from build_crd(); the committed one is checked against it by
    # tests/operator/test_operator_crd.py, this one by the test above: check the pair directly too.
    committed = yaml.safe_load((REPO / CRD_PATH).read_text())
    assert committed == build_crd()


@pytest.mark.parametrize("helm", ["helm4", "helm3"])
def test_manifests_are_generated_from_the_chart(helm: str) -> None:
    gen = gen_manifests()
    expected = gen.manifests(REPO / ".tools" / helm / "helm")
    assert sorted(p.name for p in expected) == ["operator.yaml", "rbac.yaml"]
    for path, text in expected.items():
        assert path.is_file(), f"{path.relative_to(REPO)} is missing: {FIX}"
        assert path.read_text() == text, f"{path.relative_to(REPO)} differs from the chart's rendering: {FIX}"


def test_manifests_carry_no_helm_labels_and_no_hooks() -> None:
    for name in ("rbac.yaml", "operator.yaml"):
        for doc in yaml.safe_load_all((REPO / "manifests" / name).read_text()):
            text = json.dumps(doc)
            assert "helm.sh/" not in text and '"Helm"' not in text, f"{name}: {doc['kind']}"
    # Applied in this order (crds/, rbac.yaml, operator.yaml): the namespace comes first.
    rbac = [d["kind"] for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text())]
    operator = [d["kind"] for d in yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text())]
    assert rbac == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert operator == ["Service", "Deployment"]


def test_readme_values_table_is_generated() -> None:
    gen = gen_manifests()
    current = gen.README.read_text()
    assert gen.TABLE_BEGIN in current and gen.TABLE_END in current
    assert current == gen.readme(current), f"charts/mcpool/README.md values table is stale: {FIX}"


def test_generator_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = gen_manifests()
    stale = tmp_path / "mcppools.yaml"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "CRD_TEMPLATE", stale)
    assert gen.main(["--check"]) == 1 and stale.read_text() == "old\n"
    assert gen.main([]) == 0 and stale.read_text() == gen.crd_template()
    assert gen.main(["--check"]) == 0


# --- values.yaml and values.schema.json -------------------------------------------------------


def values_text() -> str:
    return (CHART / "values.yaml").read_text()


def test_every_values_key_has_a_comment() -> None:
    docs = gen_manifests().values_docs(values_text())
    assert len(docs) > 50
    undocumented = [key for key, comment in docs if not comment]
    assert undocumented == []


def test_values_docs_parser_sees_a_missing_comment() -> None:
    docs = dict(gen_manifests().values_docs("# a\na:\n  # b\n  b: 1\n  c: 2\n"))
    assert docs == {"a": "a", "a.b": "b", "a.c": ""}


def schema_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, sub in (node.get("properties") or {}).items():
        keys.add(prefix + name)
        keys |= schema_keys(sub, f"{prefix}{name}.")
    return keys


def test_schema_is_strict_and_declares_exactly_the_values_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented = {key for key, _ in gen_manifests().values_docs(values_text())}
    declared = schema_keys(schema)
    # Free-form maps (resources, nodeSelector...) hold their own keys: compare the chart's settings.
    free = {k for k in documented if k.rsplit(".", 1)[0] in {"operator.resources.requests", "operator.resources.limits",
                                                              "redis.bundled.resources.requests", "redis.bundled.resources.limits"}}
    assert documented - free == declared

    def strict(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'root'} allows unknown keys"
            for name, sub in node["properties"].items():
                strict(sub, f"{path}.{name}".lstrip("."))

    strict(schema, "")


def merged(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merged(base.get(k), v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def test_defaults_and_scenarios_satisfy_the_schema() -> None:
    # Helm checks the merged values too; this names the offending scenario directly.
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load(values_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        jsonschema.Draft7Validator(schema).validate(merged(defaults, yaml.safe_load(path.read_text()) or {}))


def helm_commands(path: Path, verb: str) -> list[list[str]]:
    """Every `helm <verb> ...` command line of a document (continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    return [shlex.split(line.strip(), comments=True) for line in text.splitlines() if line.strip().startswith(f"helm {verb} ")]


@pytest.mark.parametrize(("doc", "count"), [("charts/mcpool/README.md", 3), ("docs/install.md", 4), ("README.md", 1)])
def test_documented_install_commands_render(doc: str, count: int) -> None:
    # The chart's README and the install guide show real commands: each must render as written.
    commands = helm_commands(REPO / doc, "install") + helm_commands(REPO / doc, "upgrade")
    assert len(commands) >= count, commands
    for argv in commands:
        assert argv[2:4] == ["mcpool", "charts/mcpool"], argv
        args = [a for a in argv[4:] if a not in ("--create-namespace", "--reuse-values")]
        result = run_helm("helm4", "template", "mcpool", "CHART", *args)
        assert result.returncode == 0, f"{doc}: {' '.join(argv)}: {result.stderr}"


def test_readme_states_the_validated_kubernetes_range() -> None:
    newest = ".".join(latest_version().split(".")[:2])
    assert f"validated against 1.29 and {newest}" in (CHART / "README.md").read_text()
