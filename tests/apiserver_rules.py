"""What a real kube-apiserver enforces on a CustomResourceDefinition, checked without one.

`kubernetes-validate` only checks that a CRD is a well-formed `apiextensions.k8s.io/v1` object;
the API server goes much further before it accepts one (apiextensions-apiserver's structural
schema, defaulting and CEL validation). Every check here is a rule that server applies, written
from its documented behaviour ("Specifying a structural schema", "Defaulting", "Validation
rules"), and each was either hit on a real server or is one step away from what we generate:

- structural schema: every node has a `type` (or `x-kubernetes-int-or-string` /
  `x-kubernetes-preserve-unknown-fields: true`); `properties` and `additionalProperties` are
  mutually exclusive; no `$ref`, `definitions`, `patternProperties`, `dependencies`,
  `additionalItems`, `uniqueItems: true`, `additionalProperties: false`, tuple `items`; inside
  `allOf`/`anyOf`/`oneOf`/`not` no `type`, `description`, `default`, `nullable` or
  `additionalProperties` (except the int-or-string pattern); the root `metadata` may say nothing
  beyond restrictions on `name` and `generateName` (not even a description);
- list types: `set` items are scalars, `map` items are objects whose keys are required or
  defaulted scalars;
- defaults: pruned (no field the schema does not declare), valid against their own schema, and
  no default inside the root `metadata`;
- CEL: the server evaluates every `x-kubernetes-validations` rule against each `default` as it
  is written (nested defaults are not applied to it first), so a rule reading a field that the
  default lacks fails with "no such key" and the CRD is refused.

`crd_problems(crd)` returns every problem as "path: message"; [] means a real server would take
the schemas as far as these rules go.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema

__all__ = ["apply_defaults", "cel_failures", "crd_problems", "schema_problems", "to_json_schema"]

FORBIDDEN_KEYWORDS = ("$ref", "definitions", "$schema", "id", "patternProperties", "dependencies", "additionalItems")
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
NOT_IN_JUNCTORS = ("type", "description", "default", "nullable", "additionalProperties")
# The formats apiextensions-apiserver knows (k8s.io/kube-openapi strfmt default registry).
KNOWN_FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3",
    "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor",
    "byte", "password", "date", "duration", "datetime", "date-time", "int32", "int64", "float",
    "double",
}
SCALAR_TYPES = {"string", "integer", "number", "boolean"}


def _children(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in (node.get("properties") or {}).items():
        yield f"{path}.properties[{name}]", prop
    if isinstance(node.get("additionalProperties"), dict):
        yield f"{path}.additionalProperties", node["additionalProperties"]
    if isinstance(node.get("items"), dict):
        yield f"{path}.items", node["items"]


def _int_or_string_junctor(node: dict[str, Any]) -> bool:
    """The one junctor shape allowed to carry `type`: anyOf [{type: integer}, {type: string}]."""
    any_of = node.get("anyOf")
    return bool(node.get("x-kubernetes-int-or-string")) and any_of == [{"type": "integer"}, {"type": "string"}]


def _junctor_problems(node: dict[str, Any], path: str, outside: dict[str, Any]) -> list[str]:
    problems = []
    for key in NOT_IN_JUNCTORS:
        if key in node:
            problems.append(f"{path}.{key}: Forbidden: must not be used inside {'/'.join(JUNCTORS)}")
    for name in node.get("properties") or {}:
        if name not in (outside.get("properties") or {}):
            problems.append(f"{path}.properties[{name}]: Required: must also be specified outside the junctor")
    for junctor in JUNCTORS:
        inner = node.get(junctor)
        for i, sub in enumerate(inner if isinstance(inner, list) else [inner] if inner else []):
            problems += _junctor_problems(sub, f"{path}.{junctor}[{i}]", outside)
    return problems


def schema_problems(node: dict[str, Any], path: str = "openAPIV3Schema", root: bool = True) -> list[str]:
    """The structural-schema rules, for `node` and everything under it."""
    problems: list[str] = []
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if preserve is not None and preserve is not True:
        problems.append(f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: must be true or undefined")
    if not node.get("type") and not int_or_string and preserve is not True:
        problems.append(f"{path}.type: Required: must not be empty for specified object fields")
    if int_or_string and "type" in node:
        problems.append(f"{path}.type: Forbidden: must be empty when x-kubernetes-int-or-string is true")
    if root and node.get("type") != "object":
        problems.append(f"{path}.type: Invalid value: must be object at the root")
    for key in FORBIDDEN_KEYWORDS:
        if key in node:
            problems.append(f"{path}.{key}: Forbidden: not allowed in a structural schema")
    if node.get("uniqueItems") is True:
        problems.append(f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true (use x-kubernetes-list-type: set)")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}.additionalProperties: Forbidden: must not be false (unknown fields are pruned)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive")
    if isinstance(node.get("items"), list):
        problems.append(f"{path}.items: Forbidden: items must be a schema object, not an array")
    if "format" in node and node["format"] not in KNOWN_FORMATS:
        problems.append(f"{path}.format: Unsupported value: {node['format']!r}")
    for junctor in JUNCTORS:
        if junctor in node and not (junctor == "anyOf" and _int_or_string_junctor(node)):
            inner = node[junctor]
            for i, sub in enumerate(inner if isinstance(inner, list) else [inner]):
                problems += _junctor_problems(sub, f"{path}.{junctor}[{i}]", node)
    problems += _list_type_problems(node, path)
    if root and "metadata" in (node.get("properties") or {}):
        problems += _metadata_problems(node["properties"]["metadata"], f"{path}.properties[metadata]")
    for child_path, child in _children(node, path):
        problems += schema_problems(child, child_path, root=False)
    return problems


def _metadata_problems(meta: dict[str, Any], path: str) -> list[str]:
    allowed_keys = {"type", "properties"}
    extra = sorted(set(meta) - allowed_keys)
    names = sorted(set(meta.get("properties") or {}) - {"name", "generateName"})
    if extra or names or (meta.get("type") not in (None, "object")):
        return [
            f"{path}: Forbidden: must not specify anything other than name and generateName, but "
            f"metadata is implicitly specified (found {extra + [f'properties.{n}' for n in names]})"
        ]
    problems = []
    for name, prop in (meta.get("properties") or {}).items():
        if prop.get("type") != "string" or "default" in prop:
            problems.append(f"{path}.properties[{name}]: Forbidden: only string restrictions are allowed")
    return problems


def _list_type_problems(node: dict[str, Any], path: str) -> list[str]:
    list_type = node.get("x-kubernetes-list-type")
    if list_type is None:
        return []
    if node.get("type") != "array":
        return [f"{path}.x-kubernetes-list-type: Invalid value: only for arrays"]
    items = node.get("items") or {}
    if list_type == "set" and items.get("type") not in SCALAR_TYPES:
        return [f"{path}.items.type: Invalid value: a set's items must be scalars"]
    if list_type == "map":
        keys = node.get("x-kubernetes-list-map-keys") or []
        if not keys or items.get("type") != "object":
            return [f"{path}: Invalid value: a map list needs object items and x-kubernetes-list-map-keys"]
        problems = []
        for key in keys:
            prop = (items.get("properties") or {}).get(key)
            if prop is None or prop.get("type") not in SCALAR_TYPES:
                problems.append(f"{path}.items.properties[{key}]: Required: map keys must be scalar fields")
            elif key not in (items.get("required") or []) and "default" not in prop:
                problems.append(f"{path}.items.properties[{key}]: Required: map keys must be required or defaulted")
        return problems
    if list_type not in ("atomic", "set", "map"):
        return [f"{path}.x-kubernetes-list-type: Unsupported value: {list_type!r}"]
    return []


# --- defaults --------------------------------------------------------------------------------


def to_json_schema(node: Any, *, reject_unknown: bool = True) -> Any:
    """Structural OpenAPI v3 -> JSON Schema. With `reject_unknown`, undeclared fields are errors
    (kubectl's --validate=strict, and the test for "default is pruned")."""
    if isinstance(node, list):
        return [to_json_schema(n, reject_unknown=reject_unknown) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: to_json_schema(v, reject_unknown=reject_unknown)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k != "default"
    }
    for bound in ("Minimum", "Maximum"):
        if node.get(f"exclusive{bound}") is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if reject_unknown and node.get("type") == "object" and "properties" in node:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True  # what the API server enforces for a set
    out.pop("format", None)  # formats are checked by the server's own registry, not here
    return out


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server applies it to stored objects (recursively)."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def cel_failures(schema: dict[str, Any], value: Any, env: celpy.Environment | None = None) -> list[str]:
    """Every rule under `schema` that `value` fails, as its message; an evaluation error (the
    server's "no such key") counts as a failure and says so."""
    env = env or celpy.Environment()
    failures = []
    for rule in schema.get("x-kubernetes-validations") or []:
        try:
            program = env.program(env.compile(rule["rule"]))
            result = program.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # celpy raises its own types for compile and eval errors
            failures.append(f"{rule.get('message', rule['rule'])} (error evaluating rule: {exc})")
            continue
        if isinstance(result, Exception):  # celpy returns, not raises, CELEvalError
            failures.append(f"{rule.get('message', rule['rule'])} (error evaluating rule: {result})")
        elif not result:
            failures.append(rule.get("message", rule["rule"]))
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                failures += cel_failures(prop, value[name], env)
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                failures += cel_failures(schema["additionalProperties"], item, env)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            failures += cel_failures(schema["items"], item, env)
    return failures


def _defaults(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if "default" in node:
        yield path, node
    for child_path, child in _children(node, path):
        yield from _defaults(child, child_path)


def default_problems(root: dict[str, Any], path: str = "openAPIV3Schema") -> list[str]:
    """Every default must be pruned, valid, and pass the CEL rules of its node as written."""
    problems = []
    metadata = (root.get("properties") or {}).get("metadata") or {}
    for meta_path, _ in _defaults(metadata, f"{path}.properties[metadata]"):
        problems.append(f"{meta_path}.default: Forbidden: no defaults in metadata")
    env = celpy.Environment()
    for node_path, node in _defaults(root, path):
        value = node["default"]
        pruned = jsonschema.Draft202012Validator(to_json_schema(node, reject_unknown=True))
        for err in pruned.iter_errors(value):
            where = ".".join(map(str, err.path))
            problems.append(f"{node_path}.default: Invalid value: {where or 'default'}: {err.message}")
        for failure in cel_failures(node, value, env):
            problems.append(f"{node_path}.default: Invalid value: {failure}")
        # Objects that omit the field get this default and then its nested defaults: that
        # shape must pass too.
        for failure in cel_failures(node, apply_defaults(node, value), env):
            problems.append(f"{node_path}.default (with nested defaults): Invalid value: {failure}")
    return problems


def crd_problems(crd: dict[str, Any]) -> list[str]:
    """All the above for every version of a CRD; also the empty object as defaulted must pass CEL."""
    problems = []
    for i, version in enumerate(crd["spec"]["versions"]):
        schema = version["schema"]["openAPIV3Schema"]
        path = f"spec.versions[{i}].schema.openAPIV3Schema"
        problems += schema_problems(schema, path)
        problems += default_problems(schema, path)
        spec = (schema.get("properties") or {}).get("spec")
        if spec is not None:
            for failure in cel_failures(spec, apply_defaults(spec, {}), env=None):
                problems.append(f"{path}.properties[spec]: the empty spec, defaulted, fails: {failure}")
    return problems
