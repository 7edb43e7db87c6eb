"""Generate the MCPPool CustomResourceDefinition from the spec model (`spec.MCPPoolSpec`).

The CRD is generated once and committed at `manifests/crds/mcppools.mcp.mptcp.dev.yaml` (the Helm
chart copies it); `tests/operator/test_crd.py` fails when the committed file differs from what
this module generates. Regenerate with `python -m mcpool_operator.crd > manifests/crds/...`.

The conversion turns pydantic's JSON Schema into a Kubernetes *structural* schema: `$ref`s are
inlined, `Optional[X]` becomes `X` (absent means unset), exclusive bounds become OpenAPI 3.0
booleans, and every object and list gets a `default` so nested defaults and CEL rules always see
a complete object.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from .spec import (
    CATEGORY,
    GROUP,
    KIND,
    MAX_POOL_NAME_LENGTH,
    PLURAL,
    POOL_NAME_PATTERN,
    SHORT_NAME,
    SINGULAR,
    VERSION,
    MCPPoolSpec,
)

__all__ = ["CRD_PATH", "build_crd", "crd_yaml", "spec_schema", "status_schema"]

CRD_PATH = f"manifests/crds/{PLURAL}.{GROUP}.yaml"

_DROP = {"title", "$defs"}
_OPTIONAL = "x-mcpool-optional"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        # Keys next to the $ref (the field's description, default) win over the class's.
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {key: _resolve(value, defs) for key, value in node.items() if key not in _DROP}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one resolved JSON Schema node (and its children) as a structural OpenAPI schema."""
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("x-kubernetes-int-or-string"):
            return {**rest, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        if len(options) != 1:
            raise ValueError(f"cannot express {node!r} as a structural schema")
        inner = _structural(options[0])
        node = {**inner, **rest}
        if node.get("default", ...) is None:
            del node["default"]  # null defaults mean "absent"
        # Optional: absent means unset, so the parent must not default it to {}.
        node[_OPTIONAL] = True
        return node
    if "exclusiveMinimum" in node:
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("type") == "object":
        node.pop("additionalProperties", None) if "properties" in node else None
        if "properties" in node:
            props = {}
            for name, prop in node["properties"].items():
                prop = _structural(prop)
                optional = prop.pop(_OPTIONAL, False)
                # Complete objects after defaulting: nested defaults apply, CEL sees every key.
                if name not in node.get("required", []) and "default" not in prop and not optional:
                    if prop.get("type") == "object" and ("properties" in prop or "additionalProperties" in prop):
                        prop["default"] = {}
                    elif prop.get("type") == "array":
                        prop["default"] = []
                props[name] = prop
            node["properties"] = props
        elif isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = _structural(node["additionalProperties"])
            node["additionalProperties"].pop(_OPTIONAL, None)
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"])
        node["items"].pop(_OPTIONAL, None)
        if "maxItems" not in node and "maxLength" in node:
            node["maxItems"] = node.pop("maxLength")
    return node


def _order(node: Any) -> Any:
    """Stable, readable key order: description first, then type, then the rest."""
    if isinstance(node, list):
        return [_order(item) for item in node]
    if not isinstance(node, dict):
        return node
    first = [k for k in ("description", "type") if k in node]
    rest = sorted(k for k in node if k not in first)
    return {k: _order_properties(node[k]) if k == "properties" else _order(node[k]) for k in first + rest}


def _order_properties(props: dict[str, Any]) -> dict[str, Any]:
    return {name: _order(props[name]) for name in sorted(props)}


def spec_schema() -> dict[str, Any]:
    raw = MCPPoolSpec.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve(raw, raw.get("$defs", {}))
    schema = _structural(resolved)
    assert isinstance(schema, dict)
    return schema


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "One aspect of the pool's state (metav1.Condition).",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "description": "Ready, Progressing or Degraded.", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
            "reason": {"type": "string", "maxLength": 1024, "description": "CamelCase reason for the last transition."},
            "message": {"type": "string", "maxLength": 32768, "description": "What happened, for a human."},
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "When the status last changed (not when it was last checked).",
            },
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The metadata.generation this condition was computed from.",
            },
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What the operator observed; written only by the operator.",
        "properties": {
            "replicas": {"type": "integer", "format": "int32", "description": "MCP pods that exist (scale subresource)."},
            "readyReplicas": {"type": "integer", "format": "int32", "description": "MCP pods passing /readyz."},
            "selector": {
                "type": "string",
                "description": "Label selector of the pool's MCP pods (for the scale subresource and HPAs).",
            },
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "description": "The metadata.generation the operator last reconciled.",
            },
            "draining": {
                "type": "array",
                "description": "Deleted MCP pods (rolling update, scale-in) still draining: each "
                "keeps its live connections and their subflows until they end or drainTimeoutSeconds "
                "has passed. Read from each pod's /readyz; empty when no pod drains.",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["pod"],
                "items": {
                    "type": "object",
                    "required": ["pod", "since"],
                    "properties": {
                        "pod": {"type": "string", "description": "The pod's name."},
                        "connections": {
                            "type": "integer",
                            "format": "int32",
                            "minimum": 0,
                            "description": "Connections it still carries (absent when the pod did not answer).",
                        },
                        "since": {
                            "type": "string",
                            "format": "date-time",
                            "description": "When its drain began (its deletionTimestamp until the pod says).",
                        },
                        "message": {"type": "string", "description": "Why the count is missing."},
                    },
                },
            },
            "conditions": {
                "type": "array",
                "description": "Ready, Progressing, Degraded, ClusterRanges and Draining.",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": _condition_schema(),
            },
        },
    }


def build_crd() -> dict[str, Any]:
    spec = spec_schema()
    spec["description"] = (
        "Desired state of a pool of MPTCP concentrator proxy (MCP) pods; see docs/operator.md."
    )
    root = {
        "type": "object",
        "description": "MCPPool: a Kubernetes-managed pool of MPTCP concentrator proxies.",
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (mcp.mptcp.dev/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of this object (MCPPool)."},
            # The API server refuses any word about metadata beyond name/generateName, even a
            # description: it owns ObjectMeta's schema.
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_POOL_NAME_LENGTH} && "
                f"self.metadata.name.matches('{POOL_NAME_PATTERN}')",
                "message": f"metadata.name must be a DNS-1035 label of at most {MAX_POOL_NAME_LENGTH} "
                "characters (children such as '<name>-director' and '<name>-join-N' are named after it)",
            }
        ],
    }
    columns = [
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired MCP pods."},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Ready MCP pods."},
        {
            "name": "Status",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            "description": "The Ready condition.",
        },
        {
            "name": "Mechanism",
            "type": "string",
            "jsonPath": ".spec.affinity.mechanism",
            "description": "Subflow affinity mechanism.",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "mcpool", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _order(root)},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = (
        "# GENERATED by `python -m mcpool_operator.crd` from operator/mcpool_operator/spec.py.\n"
        "# Do not edit: change the model and regenerate (tests/operator/test_crd.py checks this).\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main() -> int:
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
