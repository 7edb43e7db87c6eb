"""Run by test_pod_kernel.py inside a network namespace whose /proc/sys is mounted read-only (as
in a non-privileged container): exercises the sysctl-touching parts of affinity and prints one
JSON object with what happened. argv[1]: the scenario ("ok" or "strict-rp-filter")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from mcpool_proxy.cluster.join_address import JoinAddress
from mcpool_proxy.cluster.podside import PodAffinity
from mcpool_proxy.config import AffinityConfig
from mcpool_proxy.kernel import steering, sysctl
from prometheus_client import CollectorRegistry

VIP = "198.19.255.7"


def lo_has_vip() -> bool:
    return VIP in subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout


async def pod_affinity() -> dict[str, Any]:
    metrics = CollectorRegistry()
    config = AffinityConfig(mechanism="director", backend="redis", redis_url="redis://127.0.0.1:9/0",
                            pod_name="p", advertise="198.18.77.1", vip=VIP)  # fmt: skip
    affinity = PodAffinity(config, [5124], metrics_registry=metrics)
    await affinity.start()  # must not raise whatever happens
    out = {"ready_gauge": metrics.get_sample_value("mcpool_affinity_pod_receive_ready"),
           "errors": affinity.errors, "vip_on_lo": lo_has_vip()}  # fmt: skip
    await affinity.stop()
    out["vip_on_lo_after_stop"] = lo_has_vip()
    out["ready_gauge_after_stop"] = metrics.get_sample_value("mcpool_affinity_pod_receive_ready")
    return out


def main() -> None:
    scenario = sys.argv[1]
    result: dict[str, Any] = {"scenario": scenario}
    if scenario == "ok":
        result["already_set"] = sysctl.write_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM, 1)
        result["change_refused"] = not sysctl.write_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM, 0)
        result["checksum_now"] = sysctl.read_sysctl(sysctl.SYSCTL_MPTCP_CHECKSUM)
        join = JoinAddress("198.18.77.1:5124", [5124])
        result["join_started"] = join.start()
        result["endpoints"] = subprocess.run(["ip", "mptcp", "endpoint", "show"], capture_output=True,
                                             text=True).stdout  # fmt: skip
        join.stop()
        try:
            steering.install_director(VIP, [5124], 0x4D7B0000, 4399, "vxlan", 60, table="mtk_ro", owner="mtk ro")
            result["director_installed"] = steering.table_owner("mtk_ro") == "mtk ro"
        except RuntimeError as exc:
            result["director_installed"] = str(exc)
        finally:
            steering.remove_director(VIP, 0x4D7B0000, 4399, 4300, table="mtk_ro", owner="mtk ro")
    result["pod"] = asyncio.run(pod_affinity())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
