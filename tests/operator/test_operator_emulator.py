"""The emulator answers like kube-apiserver where the operator depends on it: here, integer
query parameters (a float `timeoutSeconds` is a 400 with the real server's words), a missing
object (a 404 `NotFound` in the real server's words) and a create (201)."""

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


@pytest.mark.parametrize("verb", ["GET", "DELETE", "PATCH"])
async def test_a_missing_object_is_not_found_in_the_servers_words(cluster: Cluster, verb: str) -> None:
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/nothing"
    headers = {"Content-Type": "application/merge-patch+json"} if verb == "PATCH" else {}
    body = {"spec": {"replicas": 1}} if verb == "PATCH" else None
    async with cluster.session.request(verb, cluster.url + path, json=body, headers=headers) as resp:
        assert resp.status == 404
        status = await resp.json()
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'statefulsets.apps "nothing" not found',
        "reason": "NotFound",
        "details": {"name": "nothing", "group": "apps", "kind": "statefulsets"},
        "code": 404,
    }


async def test_a_create_is_201_and_the_object_is_then_found(cluster: Cluster) -> None:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "made"}, "data": {"a": "b"}}
    async with cluster.session.post(f"{cluster.url}/api/v1/namespaces/{NAMESPACE}/configmaps", json=body) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with cluster.session.get(f"{cluster.url}/api/v1/namespaces/{NAMESPACE}/configmaps/made") as resp:
        assert resp.status == 200
        assert await resp.json() == created
