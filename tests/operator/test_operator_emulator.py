"""The emulator answers like kube-apiserver where the operator depends on it: here, integer
query parameters (a float `timeoutSeconds` is a 400 with the real server's words)."""

from __future__ import annotations

import pytest
from conftest import NAMESPACE, Cluster
from operator_emulator import POOLS, integer_param_error


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("300", None),
        ("+5", None),
        ("-1", None),
        ("300.0", 'strconv.ParseInt: parsing "300.0": invalid syntax'),
        ("", 'strconv.ParseInt: parsing "": invalid syntax'),
        ("1e3", 'strconv.ParseInt: parsing "1e3": invalid syntax'),
        ("9223372036854775808", 'strconv.ParseInt: parsing "9223372036854775808": value out of range'),
    ],
)
def test_integer_params_parse_like_go(value: str, error: str | None) -> None:
    assert integer_param_error({"timeoutSeconds": value}) == error
    assert integer_param_error({"limit": value}) == error


@pytest.mark.parametrize("query", ["?watch=true&timeoutSeconds=300.0", "?limit=10.5"])
async def test_float_query_parameters_are_refused(cluster: Cluster, query: str) -> None:
    path = f"/apis/{POOLS.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/mcppools{query}"
    async with cluster.session.get(cluster.url + path) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["kind"] == "Status" and body["reason"] == "BadRequest" and body["code"] == 400
    assert body["message"].startswith('strconv.ParseInt: parsing "') and body["message"].endswith('": invalid syntax')


async def test_integer_query_parameters_are_served(cluster: Cluster) -> None:
    path = f"/apis/{POOLS.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/mcppools?limit=10"
    async with cluster.session.get(cluster.url + path) as resp:
        assert resp.status == 200
