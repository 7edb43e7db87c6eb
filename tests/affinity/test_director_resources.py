"""Per-node resources of directors: two pools on one node never share a table, device, queue,
mark, VNI, route table or metrics port; and the pods' receive side matches their director."""

from __future__ import annotations

from typing import Any

import pytest
from mcpool_operator import builders
from mcpool_operator.spec import Pool
from mcpool_proxy.cluster.director import DirectorConfig
from mcpool_proxy.config import DEFAULT_POD_MAC, DEFAULT_VXLAN_PORT, AffinityConfig
from mcpool_proxy.kernel import steering


def director_pool(namespace: str, name: str) -> Pool:
    return Pool.from_body({
        "metadata": {"name": name, "namespace": namespace, "uid": "0b7f5b1e-0000-4000-8000-000000000001",
                     "generation": 1},
        "spec": {"affinity": {"mechanism": "director"}, "redis": {"url": "redis://redis:6379/0"},
                 "service": {"addresses": ["198.18.0.10"]}},
    })  # fmt: skip


def resources(config: DirectorConfig) -> dict[str, Any]:
    """Everything a director creates on its node, as sets that must not intersect."""
    slots = range(1, steering.MAX_SLOTS + 1)
    return {
        "table": {config.nft_table},
        "devices": {f"{config.device_prefix}{s}" for s in slots},
        "queue": {config.queue_num},
        "marks": {config.mark_base | m for m in (steering.MARK_INITIAL, steering.MARK_JOIN)}
        | {steering.slot_mark(config.mark_base, s) for s in slots},
        "mark_ranges": {config.mark_base >> 16},
        "vnis": {config.vxlan_vni_base + s for s in slots},
        "route_tables": {config.route_table_base + s for s in slots},
        "metrics": {config.metrics_listen},
    }


def test_two_pools_get_disjoint_node_resources() -> None:
    a = DirectorConfig.model_validate(builders.director_config(director_pool("tenant-a", "mcp")))
    b = DirectorConfig.model_validate(builders.director_config(director_pool("tenant-b", "mcp")))
    assert builders.director_index(director_pool("tenant-a", "mcp")) != builders.director_index(
        director_pool("tenant-b", "mcp")
    )
    ra, rb = resources(a), resources(b)
    for kind in ra:
        assert not ra[kind] & rb[kind], kind
    for name in ra["devices"] | rb["devices"]:
        assert len(name) <= 15, name  # IFNAMSIZ - 1


def test_derived_resources_are_stable_and_in_range_for_every_index() -> None:
    pool = director_pool("ns", "pool")
    assert builders.director_config(pool) == builders.director_config(director_pool("ns", "pool"))
    seen_marks: set[int] = set()
    for index in (0, 1, builders.DIRECTOR_SLOTS - 1):
        config = builders.director_config(pool)
        # Re-derive as if the pool hashed to `index`: every value must still validate.
        config.update({
            "nft_table": f"mcpool_{index:03x}", "device_prefix": f"mcp{index:03x}v",
            "queue_num": builders.DIRECTOR_QUEUE_BASE + index,
            "mark_base": (builders.DIRECTOR_MARK_BASE + index) << 16,
            "vxlan_vni_base": builders.DIRECTOR_VNI_BASE + index * 256,
            "route_table_base": builders.DIRECTOR_ROUTE_TABLE_BASE + index * 256,
        })  # fmt: skip
        validated = DirectorConfig.model_validate(config)
        assert validated.mark_base >> 16 not in seen_marks
        seen_marks.add(validated.mark_base >> 16)
        assert validated.vxlan_vni_base + steering.MAX_SLOTS <= 0xFFFFFF


def test_slot_devices_of_one_pool_are_not_parsed_as_another_pools() -> None:
    # remove_director deletes `prefix` + digits: a derived prefix ends in a letter, so one
    # pool's prefix followed by digits is never another pool's device.
    with pytest.raises(ValueError):
        DirectorConfig(vip="198.18.0.10", ports=[1], redis_url="redis://x", device_prefix="mcp01")
    with pytest.raises(ValueError):
        DirectorConfig(vip="198.18.0.10", ports=[1], redis_url="redis://x", device_prefix="a" * 13)


def test_pods_receive_side_matches_the_director() -> None:
    pool = director_pool("tenant-a", "mcp")
    director = DirectorConfig.model_validate(builders.director_config(pool))
    affinity = builders.build_proxy_config(pool).affinity
    assert affinity.vip == director.vip == "198.18.0.10"
    assert affinity.vxlan_port == director.vxlan_port == DEFAULT_VXLAN_PORT
    assert affinity.pod_mac == director.pod_mac == DEFAULT_POD_MAC
    assert director.snapshot_grace_s == affinity.heartbeat_ttl_s
    # Only director pools set up a receive side.
    none_pool = Pool.from_body({"metadata": {"name": "p", "namespace": "n", "uid": "u", "generation": 1}, "spec": {}})
    assert builders.build_proxy_config(none_pool).affinity.vip is None
    assert AffinityConfig().vip is None


def test_ruleset_uses_the_configured_table_and_owner() -> None:
    script = steering.director_ruleset("198.18.0.10", [5124], 0x40010000, "vxlan", 60, table="mcpool_001",
                                     owner="mcpool director pool=a vip=198.18.0.10")  # fmt: skip
    assert 'add table inet mcpool_001 { comment "mcpool director pool=a vip=198.18.0.10"; }' in script
    assert "mcpool_director" not in script
