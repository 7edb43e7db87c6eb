"""The on-path gateways of an MCPPool (`spec.onPath`, implicit mode): a host-network DaemonSet on
the selected nodes with NET_ADMIN only, and a configuration the proxy accepts once the pod's
node address is put in (`mcpool proxy --transparent-address $(NODE_IP)`); its node cleanup
DaemonSet (`--cleanup-only` on the same nodes)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from mcpool_operator import builders
from mcpool_operator.spec import Pool, SpecError, parse_spec
from mcpool_proxy.cli import with_transparent_address
from mcpool_proxy.config import parse_config

K8S_OLDEST = "1.29"


def _pool(on_path: dict[str, Any]) -> Pool:
    spec = {"policy": {"allowedCpes": ["198.18.10.0/24"]}, "onPath": on_path}
    return Pool.from_body({"metadata": {"name": "edge", "namespace": "mcp"}, "spec": spec})


def test_disabled_by_default_and_then_no_daemonset() -> None:
    kinds = [(o["kind"], o["metadata"]["name"]) for o in builders.build_children(_pool({}))]
    assert ("DaemonSet", "edge-onpath") not in kinds


def test_the_daemonset_runs_host_network_on_the_selected_nodes_with_net_admin_only() -> None:
    pool = _pool({"enabled": True, "nodeSelector": {"gw": "yes"}, "cpeInterfaces": ["eth1"]})
    children = {(o["kind"], o["metadata"]["name"]): o for o in builders.build_children(pool)}
    ds = children[("DaemonSet", "edge-onpath")]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["nodeSelector"] == {"gw": "yes"}
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert container["args"][-2:] == ["--transparent-address", "$(NODE_IP)"]
    assert container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    configmap = children[("ConfigMap", "edge-onpath")]
    config = parse_config(yaml.safe_load(configmap["data"]["onpath.yaml"]))
    assert config.transparent.cpe_interfaces == ["eth1"] and config.transparent.install_rules
    node = with_transparent_address(config, "203.0.113.4")
    assert node.listen.transparent == ["203.0.113.4:5125"]
    assert node.transparent.join_address == "203.0.113.4:5126"
    assert node.policy.allowed_cpes == ["198.18.10.0/24"]


def test_bad_on_path_settings_are_refused_with_the_field_named() -> None:
    with pytest.raises(SpecError, match="onPath.port and onPath.joinPort must differ"):
        parse_spec({"onPath": {"enabled": True, "port": 6000, "joinPort": 6000}})
    with pytest.raises(SpecError, match="marker"):
        parse_spec({"onPath": {"marker": {"dscp": None}}})


@pytest.mark.parametrize("version", [K8S_OLDEST, latest_version()])
def test_the_node_cleanup_daemonset_runs_cleanup_only_where_the_on_path_mcps_ran(version: str) -> None:
    pool = _pool({"enabled": True, "nodeSelector": {"gw": "yes"},
                  "tolerations": [{"key": "gw", "operator": "Exists", "effect": "NoSchedule"}]})
    children = {(o["kind"], o["metadata"]["name"]): o for o in builders.build_children(pool)}
    onpath = children[("DaemonSet", "edge-onpath")]["spec"]["template"]["spec"]
    cleanup = builders.build_onpath_cleanup_daemonset(pool)
    kubernetes_validate.validate(cleanup, version, strict=True)
    assert cleanup["metadata"]["name"] == "edge-onpath-cleanup"
    pod = cleanup["spec"]["template"]["spec"]
    # The same nodes, the same host network namespace, the same configuration and node address.
    for key in ("hostNetwork", "nodeSelector", "tolerations", "volumes"):
        assert pod[key] == onpath[key], key
    (init,) = pod["initContainers"]
    assert init["args"] == [*onpath["containers"][0]["args"], "--cleanup-only"]
    assert init["env"] == onpath["containers"][0]["env"]
    assert init["securityContext"] == onpath["containers"][0]["securityContext"]
    (idle,) = pod["containers"]
    assert idle["args"][-1] == "--idle" and "add" not in idle["securityContext"]["capabilities"]
    # Its own selector: never adopting the on-path MCPs' pods.
    assert cleanup["spec"]["selector"] != children[("DaemonSet", "edge-onpath")]["spec"]["selector"]
