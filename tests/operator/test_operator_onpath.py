"""The on-path gateways of an MCPPool (`spec.onPath`, implicit mode): a host-network DaemonSet on
the selected nodes with NET_ADMIN only, and a configuration the proxy accepts once the pod's
node address is put in (`mcpool proxy --transparent-address $(NODE_IP)`)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from mcpool_operator import builders
from mcpool_operator.spec import Pool, SpecError, parse_spec
from mcpool_proxy.cli import with_transparent_address
from mcpool_proxy.config import parse_config


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
