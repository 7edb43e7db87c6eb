"""The CRD: generated from the spec model and committed unchanged, documented on every field,
valid as a CustomResourceDefinition, and its schema and CEL rules accept the samples and refuse
bad specs the same way the operator's own model does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from apiserver_rules import apply_defaults, cel_failures, to_json_schema
from kubernetes_validate.utils import latest_version
from mcpool_operator.crd import CRD_PATH, build_crd, crd_yaml
from mcpool_operator.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "manifests" / "samples"
CRD = build_crd()
VERSION = CRD["spec"]["versions"][0]
ROOT_SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = ROOT_SCHEMA["properties"]["spec"]


def test_committed_crd_matches_the_generator() -> None:
    committed = (REPO / CRD_PATH).read_text()
    assert committed == crd_yaml(), (
        f"{CRD_PATH} is stale: run `.venv/bin/python -m mcpool_operator.crd > {CRD_PATH}`"
    )


@pytest.mark.parametrize("version", ["1.29", latest_version()])
def test_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load((REPO / CRD_PATH).read_text()), version, strict=True)


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, prop in (schema.get("properties") or {}).items():
        found += walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found


def test_every_field_is_described_and_typed() -> None:
    for path, node in walk(SPEC_SCHEMA, "spec") + walk(ROOT_SCHEMA["properties"]["status"], "status"):
        if path.endswith("[]") or path.endswith("{}"):
            continue  # list items and map values are described by their field
        assert node.get("description"), f"{path} has no description (kubectl explain shows nothing)"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type (not structural)"


def test_crd_shape() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "mcppools.mcp.mptcp.dev"
    assert spec["names"]["shortNames"] == ["mcpp"] and spec["names"]["categories"] == ["mcp"]
    assert spec["scope"] == "Namespaced" and VERSION["name"] == "v1alpha1"
    assert VERSION["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns == {
        "Replicas": ".spec.replicas",
        "Ready": ".status.readyReplicas",
        "Status": '.status.conditions[?(@.type=="Ready")].status',
        "Mechanism": ".spec.affinity.mechanism",
        "Age": ".metadata.creationTimestamp",
    }
    mechanism = SPEC_SCHEMA["properties"]["affinity"]["properties"]["mechanism"]
    assert mechanism["enum"] == ["none", "director", "join-address"] and mechanism["default"] == "none"
    replicas = SPEC_SCHEMA["properties"]["replicas"]
    assert (replicas["minimum"], replicas["maximum"], replicas["default"]) == (0, 1000, 1)


# --- the schema as the API server applies it ---------------------------------------------------


def admit(spec: dict[str, Any], name: str = "pool") -> list[str]:
    """What the API server would say about an MCPPool with this spec: [] means admitted."""
    body = {"apiVersion": "mcp.mptcp.dev/v1alpha1", "kind": "MCPPool", "metadata": {"name": name}, "spec": spec}
    validator = jsonschema.Draft202012Validator(to_json_schema(ROOT_SCHEMA))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(body)]
    if errors:
        return errors
    return cel_failures(ROOT_SCHEMA, apply_defaults(ROOT_SCHEMA, body), celpy.Environment())


def sample_specs() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "MCPPool":
                found[path.stem] = doc
    return found


@pytest.mark.parametrize("sample", sorted(sample_specs()))
def test_schema_and_cel_accept_the_samples(sample: str) -> None:
    doc = sample_specs()[sample]
    assert admit(doc["spec"], doc["metadata"]["name"]) == []
    parse_spec(doc["spec"])


def test_defaults_match_the_model() -> None:
    defaulted = apply_defaults(SPEC_SCHEMA, {})
    assert parse_spec(defaulted).model_dump() == parse_spec({}).model_dump()
    assert defaulted["listeners"]["convert"] == {"enabled": True, "port": 5124}
    assert "redis" not in defaulted  # optional objects stay absent


SCHEMA_REJECTS: dict[str, dict[str, Any]] = {
    "wrong type": {"replicas": "three"},
    "unknown field": {"replicass": 2},
    "unknown nested field": {"policy": {"allowedCPEs": ["198.18.0.0/15"]}},
    "negative replicas": {"replicas": -1},
    "too many replicas": {"replicas": 1001},
    "port zero": {"listeners": {"convert": {"port": 0}}},
    "port too high": {"listeners": {"socks5": {"enabled": True, "port": 70000}}},
    "bad enum": {"affinity": {"mechanism": "random"}},
    "bad service type": {"service": {"type": "ExternalName"}},
    "zero timeout": {"policy": {"handshakeTimeoutSeconds": 0}},
    "tiny buffer": {"relay": {"bufferBytes": 1}},
    "redis bad scheme": {"redis": {"url": "http://redis:6379"}},
    "redis sentinel without master name": {"redis": {"sentinel": {"addresses": ["s:26379"]}}},
    "redis sentinel without addresses": {"redis": {"sentinel": {"addresses": [], "masterName": "m"}}},
    "redis cluster address without port": {"redis": {"cluster": {"addresses": ["redis-0.redis"]}}},
    "list for map": {"nodeSelector": ["a"]},
    "bad access path name": {"accessPaths": [{"name": "DSL", "networks": ["198.18.1.0/24"]}]},
    "access path without networks": {"accessPaths": [{"name": "dsl", "networks": []}]},
    "duplicate join addresses": {
        "replicas": 2,
        "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1", "198.18.1.1"]},
    },
}

CEL_REJECTS: dict[str, dict[str, Any]] = {
    "join-address short of addresses": {
        "replicas": 3,
        "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1", "198.18.1.2"]},
    },
    "join-address without port": {
        "listeners": {"convert": {"enabled": False}, "socks5": {"enabled": True}},
        "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1"]},
    },
    "director without redis": {"affinity": {"mechanism": "director"}, "service": {"addresses": ["198.18.0.1"]}},
    "director without vip": {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}},
    # One forwarding slot per pod in each director (issue 10): 256 pods would leave one unsteered.
    "director with more replicas than slots": {
        "replicas": 256, "affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"},
        "director": {"vip": "198.18.0.1"},
    },
    "no listener": {"listeners": {"convert": {"enabled": False}}},
    "same ports": {"listeners": {"socks5": {"enabled": True, "port": 5124}}},
    "two LB addresses": {"service": {"addresses": ["198.18.0.1", "198.18.0.2"]}},
    "redis url with password": {"redis": {"url": "redis://:s3cret@redis:6379/0"}},
    "redis without a mode": {"redis": {}},
    "redis url and sentinel": {"redis": {"url": "redis://r:6379", "sentinel": {"addresses": ["s:26379"], "masterName": "m"}}},
    "redis sentinel and cluster": {"redis": {"sentinel": {"addresses": ["s:26379"], "masterName": "m"},
                                             "cluster": {"addresses": ["c:6379"]}}},
    "redis url with user and password": {"redis": {"url": "rediss://mcp:s3cret@redis:6380"}},
    "access path named other": {"accessPaths": [{"name": "other", "networks": ["198.18.1.0/24"]}]},
    "onPath join port equal to its port": {"onPath": {"enabled": True, "port": 6000, "joinPort": 6000}},
    "onPath join port equal to the default port": {"onPath": {"joinPort": 5125}},
}

ACCEPTS: dict[str, dict[str, Any]] = {
    "empty": {},
    "join-address exact": {"replicas": 2, "affinity": {"mechanism": "join-address", "joinAddresses": ["198.18.1.1", "198.18.1.2"]}},
    "director with vip": {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"}, "director": {"vip": "198.18.0.1"}},
    "director with as many replicas as slots": {
        "replicas": 255, "affinity": {"mechanism": "director"}, "redis": {"url": "redis://r:6379"},
        "director": {"vip": "198.18.0.1"},
    },
    "1000 replicas without a director": {"replicas": 1000},
    "director on sentinel": {
        "affinity": {"mechanism": "director"}, "director": {"vip": "198.18.0.1"},
        "redis": {"sentinel": {"addresses": ["redis-sentinel.redis:26379", "[2001:db8::5]:26379"], "masterName": "mcpool",
                               "passwordSecretRef": {"name": "sentinel"}}, "passwordSecretRef": {"name": "redis"}},
    },
    "director on a redis cluster": {
        "affinity": {"mechanism": "director"}, "director": {"vip": "198.18.0.1"},
        "redis": {"cluster": {"addresses": ["redis-0.redis:6379", "10.0.0.7:6379"], "tls": True}},
    },
    "cluster ranges": {"cluster": {"podCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"], "serviceCIDRs": ["10.96.0.0/12"]}},
    "allowed destinations": {"policy": {"allowedDestinations": ["10.20.0.0/16"]}},
    "socks only": {"listeners": {"convert": {"enabled": False}, "socks5": {"enabled": True}}},
    "ClusterIP two addresses": {"service": {"type": "ClusterIP", "addresses": ["198.18.0.1", "2001:db8::1"]}},
    "quantities": {"resources": {"requests": {"cpu": 1, "memory": "1Gi"}}},
    "access paths": {"accessPaths": [{"name": "dsl", "networks": ["198.18.1.0/24", "2001:db8:1::/48"]},
                                     {"name": "lte", "networks": ["198.18.2.0/24"]}]},
    "onPath gateways": {"onPath": {"enabled": True, "nodeSelector": {"gw": "yes"}, "cpeInterfaces": ["eth1"]}},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REJECTS))
def test_schema_rejects(case: str) -> None:
    assert admit(SCHEMA_REJECTS[case]), f"{case} was admitted"


@pytest.mark.parametrize("case", sorted(CEL_REJECTS))
def test_cel_rejects_and_the_model_agrees(case: str) -> None:
    spec = CEL_REJECTS[case]
    failures = admit(spec)
    assert failures, f"{case} was admitted"
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    # The operator's message for the same spec names the same rule.
    assert any(f.split(" (")[0] in str(info.value) for f in failures), (failures, str(info.value))


@pytest.mark.parametrize("case", sorted(ACCEPTS))
def test_accepted_by_both(case: str) -> None:
    assert admit(ACCEPTS[case]) == []
    parse_spec(ACCEPTS[case])


@pytest.mark.parametrize(("name", "ok"), [("edge", True), ("a" * 40, True), ("a" * 41, False), ("1pool", False), ("Pool", False)])
def test_name_rule(name: str, ok: bool) -> None:
    assert (admit({}, name) == []) is ok


def test_every_cel_rule_compiles() -> None:
    env = celpy.Environment()
    rules = [r["rule"] for _, node in walk(ROOT_SCHEMA) for r in node.get("x-kubernetes-validations") or []]
    assert len(rules) == 13  # 10 + accessPaths' names + onPath: port != joinPort + redis: one mode
    for rule in rules:
        env.compile(rule)


def test_join_addresses_are_a_set() -> None:
    join = SPEC_SCHEMA["properties"]["affinity"]["properties"]["joinAddresses"]
    assert join["x-kubernetes-list-type"] == "set"
    # The model refuses the same duplicates, also when they differ only in spelling.
    for addresses in (["198.18.1.1", "198.18.1.1"], ["2001:db8::1", "2001:DB8:0::1"]):
        with pytest.raises(SpecError, match="must not repeat an address"):
            parse_spec({"replicas": 2, "affinity": {"mechanism": "join-address", "joinAddresses": addresses}})


def test_redis_url_with_credentials_points_at_the_secret() -> None:
    failures = admit({"redis": {"url": "redis://:s3cret@redis:6379/0"}})
    assert len(failures) == 1 and "passwordSecretRef" in failures[0] and "plain text" in failures[0]
    with pytest.raises(SpecError, match="passwordSecretRef"):
        parse_spec({"redis": {"url": "redis://:s3cret@redis:6379/0"}})
    assert admit({"redis": {"url": "redis://redis:6379/0", "passwordSecretRef": {"name": "redis"}}}) == []
