"""The CRD as a real kube-apiserver judges it: structural schema, pruned and valid defaults, and
every CEL rule evaluated against each default as written and against the empty spec.

A real server refused an earlier CRD for three reasons that `kubernetes-validate` and the API
emulator let through (a description on `metadata`; rules on `service` and `listeners` that read
fields their `{}` defaults lack). The tests below prove the checks in `apiserver_rules` find each
of those on a copy of the CRD with the old text put back, and find nothing on today's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from apiserver_rules import (
    apply_defaults,
    cel_failures,
    crd_problems,
    default_problems,
    schema_problems,
)
from mcpool_operator.crd import CRD_PATH, build_crd

REPO = Path(__file__).resolve().parents[2]


def root_of(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def mutated(change: Any) -> dict[str, Any]:
    crd = copy.deepcopy(build_crd())
    change(root_of(crd))
    return crd


def test_generated_crd_passes_every_apiserver_rule() -> None:
    assert crd_problems(build_crd()) == []


def test_committed_crd_passes_every_apiserver_rule() -> None:
    assert crd_problems(yaml.safe_load((REPO / CRD_PATH).read_text())) == []


# --- the three refusals seen on a real server, put back one at a time --------------------------


def test_a_description_on_metadata_is_refused() -> None:
    crd = mutated(lambda root: root["properties"]["metadata"].update(description="Standard object metadata."))
    problems = crd_problems(crd)
    assert any("properties[metadata]" in p and "name and generateName" in p for p in problems), problems


def test_metadata_may_restrict_name_only() -> None:
    ok = mutated(lambda root: root["properties"]["metadata"].update(properties={"name": {"type": "string", "maxLength": 40}}))
    assert crd_problems(ok) == []
    bad = mutated(lambda root: root["properties"]["metadata"].update(properties={"labels": {"type": "object"}}))
    assert any("properties[metadata]" in p for p in crd_problems(bad))


def _put_back(node_path: list[str], rules: list[str]) -> Any:
    def change(root: dict[str, Any]) -> None:
        node = root
        for name in node_path:
            node = node["properties"][name]
        node["x-kubernetes-validations"] = [{"rule": rule, "message": f"old rule {i}"} for i, rule in enumerate(rules)]

    return change


def test_the_old_unguarded_service_rule_is_refused() -> None:
    crd = mutated(_put_back(["spec", "service"], ["self.type != 'LoadBalancer' || size(self.addresses) <= 1"]))
    problems = crd_problems(crd)
    assert any("properties[service].default" in p and "error evaluating rule" in p for p in problems), problems


def test_the_old_unguarded_listener_rules_are_refused() -> None:
    crd = mutated(
        _put_back(
            ["spec", "listeners"],
            [
                "self.convert.enabled || self.socks5.enabled",
                "!(self.convert.enabled && self.socks5.enabled) || self.convert.port != self.socks5.port",
            ],
        )
    )
    problems = [p for p in crd_problems(crd) if "properties[listeners].default:" in p]
    assert len(problems) == 2 and all("error evaluating rule" in p for p in problems), problems


def test_a_rule_that_the_empty_spec_fails_is_refused() -> None:
    crd = mutated(_put_back(["spec"], ["self.replicas > 5"]))
    assert any("empty spec" in p for p in crd_problems(crd))


# --- the rest of the structural rules, each on a copy with one defect -------------------------


def _spec(root: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = root["properties"]["spec"]
    return spec


STRUCTURAL_DEFECTS: dict[str, tuple[Any, str]] = {
    "node without type": (lambda r: _spec(r)["properties"]["replicas"].pop("type"), "type: Required"),
    "properties beside additionalProperties": (
        lambda r: _spec(r)["properties"]["policy"].update(additionalProperties={"type": "string"}),
        "mutual exclusive",
    ),
    "additionalProperties false": (lambda r: _spec(r).update(additionalProperties=False), "must not be false"),
    "uniqueItems": (lambda r: _spec(r)["properties"]["tolerations"].update(uniqueItems=True), "uniqueItems"),
    "$ref": (lambda r: _spec(r)["properties"]["replicas"].update({"$ref": "#/x"}), "$ref"),
    "type inside anyOf": (
        lambda r: _spec(r)["properties"]["replicas"].update(anyOf=[{"type": "integer"}]),
        "inside allOf/anyOf/oneOf/not",
    ),
    "junctor field not outside": (
        lambda r: _spec(r).update(anyOf=[{"properties": {"ghost": {}}}]),
        "outside the junctor",
    ),
    "unknown format": (lambda r: _spec(r)["properties"]["image"].update(format="docker-ref"), "format"),
    "set of objects": (
        lambda r: _spec(r)["properties"]["tolerations"].update({"x-kubernetes-list-type": "set"}),
        "scalars",
    ),
    "preserve-unknown-fields false": (
        lambda r: _spec(r).update({"x-kubernetes-preserve-unknown-fields": False}),
        "must be true",
    ),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL_DEFECTS))
def test_structural_defects_are_found(case: str) -> None:
    change, words = STRUCTURAL_DEFECTS[case]
    crd = mutated(change)
    problems = schema_problems(root_of(crd))
    assert any(words in p for p in problems), (case, problems)


def test_map_list_keys_must_be_required_or_defaulted() -> None:
    def change(root: dict[str, Any]) -> None:
        conditions = root["properties"]["status"]["properties"]["conditions"]
        conditions["items"]["required"].remove("type")

    assert any("map keys must be required or defaulted" in p for p in schema_problems(root_of(mutated(change))))


def test_unpruned_default_is_found() -> None:
    crd = mutated(lambda r: _spec(r)["properties"]["service"].update(default={"tpye": "ClusterIP"}))
    assert any("properties[service].default" in p and "tpye" in p for p in default_problems(root_of(crd)))


def test_invalid_default_is_found() -> None:
    crd = mutated(lambda r: _spec(r)["properties"]["replicas"].update(default=-1))
    assert any("properties[replicas].default" in p for p in default_problems(root_of(crd)))


# --- the guarded rules read absent fields as the model's defaults ------------------------------


def nodes_with_rules(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)] if node.get("x-kubernetes-validations") else []
    for name, prop in (node.get("properties") or {}).items():
        found += nodes_with_rules(prop, f"{path}.{name}")
    return found


SPEC = root_of(build_crd())["properties"]["spec"]

# Partial objects as a client may send them, before the server's defaulting: each rule must give
# the same verdict on the bare object as on the defaulted one, or a `has()` fallback names a
# default that is not the model's.
PARTIAL_SPECS: list[dict[str, Any]] = [
    {},
    {"listeners": {}},
    {"listeners": {"convert": {}}},
    {"listeners": {"convert": {"enabled": False}}},
    {"listeners": {"socks5": {"enabled": True}}},
    {"listeners": {"socks5": {"enabled": True, "port": 5124}}},
    {"listeners": {"convert": {"port": 1080}, "socks5": {"enabled": True}}},
    {"service": {}},
    {"service": {"addresses": ["198.18.0.1", "198.18.0.2"]}},
    {"service": {"type": "ClusterIP", "addresses": ["198.18.0.1", "198.18.0.2"]}},
    {"affinity": {"mechanism": "join-address"}},
    {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1"]}},
    {"replicas": 2, "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1"]}},
    {"affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1"]}, "listeners": {"convert": {"enabled": False}, "socks5": {"enabled": True}}},
    {"affinity": {"mechanism": "director"}},
    {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}},
    {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}, "director": {"vip": "198.18.0.1"}},
    {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}, "service": {"addresses": ["198.18.0.1"]}},
]


@pytest.mark.parametrize("index", range(len(PARTIAL_SPECS)))
def test_rules_agree_before_and_after_defaulting(index: int) -> None:
    spec = PARTIAL_SPECS[index]
    env = celpy.Environment()
    bare = [f for f in cel_failures(SPEC, spec, env)]
    defaulted = cel_failures(SPEC, apply_defaults(SPEC, spec), env)
    assert not any("error evaluating rule" in f for f in bare + defaulted), bare + defaulted
    assert bare == defaulted
