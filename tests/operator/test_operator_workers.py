"""The proxy's `workers` as the operator renders it: from the pod's CPU, or spec.workers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from mcpool_operator import builders
from mcpool_operator.spec import MAX_RENDERED_WORKERS, Pool, SpecError, parse_spec
from mcpool_proxy.config import parse_config


def _pool(spec: dict[str, Any]) -> Pool:
    return Pool("p", "ns", parse_spec(spec))


def _rendered(spec: dict[str, Any]) -> int:
    """`workers` as the pod reads it: from the ConfigMap's YAML, through the proxy's own parser."""
    configmap = builders.build_configmap(_pool(spec))
    (text,) = configmap["data"].values()
    return parse_config(yaml.safe_load(text)).workers


@pytest.mark.parametrize(("resources", "workers"), [
    ({}, 1),
    ({"requests": {"cpu": "500m"}}, 1),
    ({"requests": {"cpu": "1"}}, 1),
    ({"requests": {"cpu": "2500m"}}, 2),
    ({"requests": {"cpu": 3}}, 3),
    ({"requests": {"cpu": "3.9"}}, 3),
    ({"requests": {"cpu": "1"}, "limits": {"cpu": "4"}}, 4),  # limits first
    ({"requests": {"cpu": "8"}, "limits": {"cpu": "2"}}, 2),
    ({"limits": {"memory": "1Gi"}, "requests": {"cpu": "2"}}, 2),  # limits without cpu: requests
    ({"limits": {"cpu": "100"}}, MAX_RENDERED_WORKERS),
    ({"limits": {"cpu": "0.1k"}}, MAX_RENDERED_WORKERS),
    ({"limits": {"cpu": "100m"}}, 1),
])
def test_workers_from_the_pods_cpu(resources: dict[str, Any], workers: int) -> None:
    assert _rendered({"resources": resources}) == workers


def test_explicit_workers_win_over_cpu() -> None:
    assert _rendered({"workers": 3, "resources": {"limits": {"cpu": "8"}}}) == 3
    assert _rendered({"workers": 32}) == 32


@pytest.mark.parametrize("value", [0, 65, "two"])
def test_workers_bounds(value: object) -> None:
    with pytest.raises(SpecError, match=r"spec\.workers"):
        parse_spec({"workers": value})


def test_on_path_pods_run_one_process() -> None:
    pool = _pool({"resources": {"limits": {"cpu": "4"}}})
    assert builders.build_onpath_config(pool).workers == 1
    assert builders.build_proxy_config(pool).workers == 4


@pytest.mark.parametrize("text", ["", "m", "-1", "abc", "1e999"])
def test_cpu_quantity_errors(text: str) -> None:
    with pytest.raises(ValueError, match="not a CPU quantity"):
        builders.cpu_cores(text)


def test_cpu_quantities() -> None:
    assert builders.cpu_cores("1500m") == 1.5
    assert builders.cpu_cores(2) == 2
    assert builders.cpu_cores("0.5") == 0.5
