"""The director's SYN queue is guarded in the kernel: nftables drops SYNs to the VIP above a rate
per source (IPv6: per /64) and in total, before they reach NFQUEUE (issue 10).

The kernel test installs the real ruleset in an anonymous network namespace (`unshare -n`: no
fixed name shared with other tests), sends SYNs to the VIP through `lo` with a raw socket
(locally sent packets pass prerouting on their way in) and reads the table's counters.
"""

from __future__ import annotations

import textwrap

from conftest import run_unshared
from mcpool_proxy.cluster.director import DirectorConfig
from mcpool_proxy.kernel import steering
from support import require_command, requires_netns

VIP = "198.19.255.1"


def test_ruleset_limits_syns_before_they_are_queued() -> None:
    script = steering.director_ruleset(VIP, [5124], 0x4D430000, "vxlan", 60,
                                       syn_limits=steering.SynLimits(per_source=7, per_source_burst=9, total=70, total_burst=90),
                                       initial=steering.InitialHash(4096, 0x1234ABCD))  # fmt: skip
    steer = script.split("chain steer {", 1)[1].split("}\n", 1)[0]
    lines = [line.strip() for line in steer.splitlines() if "tcp flags" in line]
    # The limits come first: a SYN over a limit never gets a queue mark.
    assert "add @syn_sources { ip saddr limit rate over 7/second burst 9 packets }" in lines[0]
    assert lines[0].endswith("counter name syn_over_source drop")
    assert "limit rate over 70/second burst 90 packets counter name syn_over_total drop" in lines[1]
    assert "map @tokens counter name token_hit" in lines[2]  # the kernel's token map, then the queue
    assert "queued_join" in lines[3]
    # Initial SYNs: the CPE map, then the bucket map, then the queue.
    assert "meta mark set ip saddr map @cpes counter name cpe_hit accept" in lines[4]
    assert ("meta mark set jhash ip saddr mod 4096 seed 0x1234abcd meta mark set meta mark map @buckets "
            "counter name bucket_hit accept") in lines[5]  # fmt: skip
    assert "queued_initial" in lines[6]
    queued_only = steering.director_ruleset(VIP, [5124], 0x4D430000, "vxlan", 60)
    assert "@buckets counter" not in queued_only and "@cpes counter" not in queued_only
    six = steering.director_ruleset("2001:db8::1", [5124], 0x4D430000, "vxlan", 60)
    assert "typeof @nh,64,64" in six and "add @syn_sources { @nh,64,64 limit rate over 200/second" in six
    off = steering.director_ruleset(VIP, [5124], 0x4D430000, "vxlan", 60, syn_limits=steering.SynLimits(per_source=0, total=0))
    assert "syn_over_source drop" not in off and "syn_over_total drop" not in off


def test_director_config_carries_the_limits() -> None:
    cfg = DirectorConfig(vip=VIP, ports=[5124], redis_url="redis://r:6379/0", syn_rate_per_source=5, syn_rate_total=0)
    assert cfg.syn_limits().per_source == 5 and cfg.syn_limits().total == 0
    assert DirectorConfig(vip=VIP, ports=[5124], redis_url="redis://r:6379/0").syn_limits() == steering.SynLimits()


_PROBE = textwrap.dedent(
    f"""
    import ipaddress, socket, struct, subprocess, sys
    from mcpool_proxy.kernel import steering

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "{VIP}/32", "dev", "lo"], check=True)
    limits = steering.SynLimits(per_source=10, per_source_burst=10, total=100, total_burst=100)
    script = steering.director_ruleset("{VIP}", [5124], 0x4D430000, "vxlan", 60, table="mcpool_t", syn_limits=limits)
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)

    def syn(src, sport):
        tcp = struct.pack("!HHIIBBHHH", sport, 5124, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address("{VIP}").packed)
        return ip + tcp

    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    def counters():
        return {{k: v[0] for k, v in steering.nft_counters("mcpool_t").items()}}
    # One source: 200 SYNs within milliseconds, 10/s with a burst of 10 allowed.
    for i in range(200):
        raw.sendto(syn("198.18.1.1", 20000 + i), ("{VIP}", 0))
    one = counters()
    # 300 sources, one SYN each: under the per-source limit, over the total (100/s, burst 100).
    for i in range(300):
        raw.sendto(syn(f"198.18.{{2 + i // 250}}.{{1 + i % 250}}", 30000), ("{VIP}", 0))
    many = counters()
    print(one["syn_over_source"], one["syn_over_total"], one["queued_initial"],
          many["syn_over_source"], many["syn_over_total"], many["queued_initial"])
    """
)


@requires_netns
def test_a_syn_flood_is_dropped_in_the_kernel_per_source_and_in_total() -> None:
    require_command("nft", "nftables")
    proc = run_unshared("-c", _PROBE)
    src1, total1, queued1, src2, total2, queued2 = (int(x) for x in proc.stdout.split())
    # The flooding source got its burst (about 10) through; the rest died in the kernel.
    assert 180 <= src1 <= 190 and total1 == 0 and 10 <= queued1 <= 20, proc.stdout
    # Many sources: none over its own limit, the total caps what reaches the queue.
    assert src2 == src1, proc.stdout
    assert total2 >= 150 and queued2 - queued1 <= 120, proc.stdout
