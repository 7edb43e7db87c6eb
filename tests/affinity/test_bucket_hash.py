"""Initial SYNs hashed into buckets: the pure function, and the kernel computing the same thing.

The director's nft rule hashes an initial SYN's source address with `jhash ... mod B seed S`
and looks the bucket up in the bucket map; userspace (`decide`) must pick the same bucket for a
SYN the kernel queued, so `hashing.jhash` reproduces the kernel's. The kernel tests load the real
ruleset in an anonymous network namespace (`unshare -n`), send SYNs over `lo` (a locally sent
packet to a local address passes prerouting, where the director's chains are) from many source
addresses, and read back which bucket the kernel put each one in (or, for a source in the CPE
map, that the CPE map decided it first).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from mcpool_proxy.cluster.director import DirectorConfig
from mcpool_proxy.cluster.hashing import (
    BucketHash,
    bucket_owners,
    initial_pick,
    jhash,
    pool_seed,
    rendezvous_pick,
)
from mcpool_proxy.cluster.mapsync import bucket_marks, cpe_marks
from mcpool_proxy.kernel import steering
from support import require_command, requires_netns

PODS = [f"pod-{i}" for i in range(5)]


def test_bucket_owner_is_the_buckets_rendezvous_winner() -> None:
    owners = bucket_owners(PODS, 512)
    assert owners == [rendezvous_pick(PODS, str(b)) for b in range(512)]
    assert owners == bucket_owners(list(reversed(PODS)), 512)  # order of the pods does not matter
    counts = Counter(owners)
    assert set(counts) == set(PODS) and all(abs(c - 512 / 5) < 40 for c in counts.values()), counts
    assert bucket_owners([], 8) == [None] * 8


def test_a_pod_leaving_moves_only_its_buckets() -> None:
    before = bucket_owners(PODS, 4096)
    after = bucket_owners(PODS[:2] + PODS[3:], 4096)  # pod-2 left (or started draining)
    moved = [b for b in range(4096) if before[b] != after[b]]
    assert moved and all(before[b] == "pod-2" for b in moved)
    assert len(moved) == before.count("pod-2")
    # And a pod joining takes buckets from the others, never shuffles them among the others.
    grown = bucket_owners([*PODS, "pod-5"], 4096)
    assert all(grown[b] in (before[b], "pod-5") for b in range(4096))


def test_the_decision_is_a_function_of_the_pool_pods_and_address() -> None:
    h = BucketHash(4096, pool_seed("mtf"))
    assert pool_seed("mtf") == pool_seed("mtf") != pool_seed("other")
    for i in range(200):
        addr = f"198.18.{i // 100}.{i % 100 + 1}"
        bucket = h.bucket(addr)
        assert bucket is not None and 0 <= bucket < 4096
        assert h.pick(PODS, addr) == bucket_owners(PODS, 4096)[bucket] == initial_pick(PODS, addr, "mtf")
    assert h.bucket("not-an-address") is None
    # The director's kernel rule and its decide() take the same parameters from its configuration.
    cfg = DirectorConfig(vip="198.19.255.1", ports=[5124], redis_url="redis://r:6379/0", pool="mtf", buckets=512)
    assert cfg.bucket_hash() == BucketHash(512, pool_seed("mtf"))
    assert cfg.initial_hash() == steering.InitialHash(512, pool_seed("mtf"))
    assert DirectorConfig(vip="198.19.255.1", ports=[5124], redis_url="redis://r:6379/0",
                          initial_in_kernel=False).initial_hash() is None  # fmt: skip
    with pytest.raises(ValueError, match="buckets"):
        BucketHash(0)


def test_jhash_is_pinned() -> None:
    # Directors of two versions behind one ECMP group must still agree: the function may not
    # drift. (The namespace test below checks it against the kernel on random addresses.)
    assert jhash(b"", 0) == 0xDEADBEEF
    assert BucketHash(4096, 0x1234ABCD).bucket("127.0.0.1") == 2365
    assert pool_seed("mtf") == 357608852
    assert [BucketHash(4096, pool_seed("mtf")).bucket(a) for a in ("198.18.1.2", "2001:db8::2")] == [2020, 2171]


def test_maps_leave_out_pods_without_a_slot_and_draining_owners() -> None:
    marks = {"pod-0": 0x100, "pod-1": 0x200}  # pod-2 is ready but has no tunnel yet
    wanted = bucket_marks(["pod-0", "pod-1", "pod-2"], marks, 256)
    owners = bucket_owners(["pod-0", "pod-1", "pod-2"], 256)
    assert wanted == {b: marks[o] for b, o in enumerate(owners) if o in marks} and len(wanted) < 256
    cpes = {"198.18.1.2": "pod-0", "198.18.1.3": "pod-3", "::ffff:198.18.1.4": "pod-1", "2001:db8::1": "pod-0",
            "junk": "pod-0"}  # fmt: skip
    # pod-3 is draining (not in the ready list): its CPEs go by bucket, as in decide().
    assert cpe_marks(cpes, ["pod-0", "pod-1"], marks, v6=False) == {"198.18.1.2": 0x100, "198.18.1.4": 0x200}
    assert cpe_marks(cpes, ["pod-0", "pod-1"], marks, v6=True) == {"2001:db8::1": 0x100}


VIP4, VIP6 = "198.19.255.1", "2001:db8:255::1"

_KERNEL = textwrap.dedent(
    """
    import json, random, socket, subprocess, sys, time
    from mcpool_proxy.cluster.hashing import BucketHash, pool_seed
    from mcpool_proxy.cluster.mapsync import bucket_marks
    from mcpool_proxy.kernel import steering
    from mcpool_proxy.kernel.bucketmap import BucketMap
    from mcpool_proxy.kernel.tokenmap import CpeMap

    VIP4, VIP6, PODS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    h = BucketHash(4096, pool_seed("t"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rng = random.Random(7)
    sources = {
        VIP4: [f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(48)],
        VIP6: [f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}" for _ in range(16)],
    }
    seen = {}
    for vip, table in ((VIP4, "t4"), (VIP6, "t6")):
        fam, typ, plen = ("ip", "ipv4_addr", 32) if ":" not in vip else ("ip6", "ipv6_addr", 128)
        script = steering.director_ruleset(vip, [5124], 0x4D430000, "vxlan", 60, table=table,
                                           initial=steering.InitialHash(h.buckets, h.seed),
                                           syn_limits=steering.SynLimits(per_source=0, total=0))
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
        # Each bucket's "pod mark" names the bucket itself; no pod mark of mark_base's.
        BucketMap(table).sync({b: 0x10000000 | b for b in range(h.buckets)})
        # The first source is a CPE with live connections: the CPE map decides it, first.
        CpeMap(table, 60).sync({sources[vip][0]: 0x20000000})
        # After steer (-200): what mark did the bucket rule give each source?
        subprocess.run(["nft", "-f", "-"], text=True, check=True, input=(
            f"add map inet {table} seen {{ type {typ} : mark; flags dynamic,timeout; timeout 60s; }}\\n"
            f"add chain inet {table} rec {{ type filter hook prerouting priority -100; policy accept; }}\\n"
            f"add rule inet {table} rec {fam} daddr {vip} update @seen {{ {fam} saddr : meta mark }}\\n"))
        subprocess.run(["ip", "addr", "add", f"{vip}/{plen}", "dev", "lo"], check=True)
        for src in sources[vip]:
            subprocess.run(["ip", "addr", "add", f"{src}/{plen}", "dev", "lo", *(["nodad"] if plen == 128 else [])],
                           check=True)
        for src in sources[vip]:
            s = socket.socket(socket.AF_INET6 if plen == 128 else socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((src, 0))
            s.connect_ex((vip, 5124))  # the SYN; the VIP's RST ends it
            s.close()
        deadline = time.monotonic() + 10
        while True:
            out = json.loads(subprocess.run(["nft", "-j", "list", "map", "inet", table, "seen"],
                                            capture_output=True, text=True, check=True).stdout)
            elems = {}
            for item in out["nftables"]:
                for key, mark in item.get("map", {}).get("elem", []):
                    elems[key["elem"]["val"] if isinstance(key, dict) else key] = mark
            if len(elems) >= len(sources[vip]) or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # the kernel map signals nothing
        counters = steering.nft_counters(table)
        seen[vip] = {"elems": elems, "bucket_hit": counters["bucket_hit"][0], "cpe": sources[vip][0],
                     "cpe_hit": counters["cpe_hit"][0], "queued_initial": counters["queued_initial"][0]}

    # Two directors with the same pods but other slots (marks) and another order of discovery.
    marks_a = {p: 0x4D430000 | (i + 1) << 8 for i, p in enumerate(PODS)}
    marks_b = {p: 0x4D430000 | (len(PODS) - i) << 8 for i, p in enumerate(PODS)}
    maps = {}
    for table, pods, marks in (("t4", PODS, marks_a), ("t6", list(reversed(PODS)), marks_b)):
        bm = BucketMap(table)
        bm.load()
        bm.sync(bucket_marks(pods, marks, h.buckets))
        by_mark = {m: p for p, m in marks.items()}
        maps[table] = {b: by_mark[m] for b, m in BucketMap(table).kernel_elements().items()}
    # A pod leaves: the second map is rewritten from the others.
    gone = PODS[1]
    bm = BucketMap("t6")
    bm.load()
    stats = bm.sync(bucket_marks([p for p in PODS if p != gone], marks_b, h.buckets))
    by_mark = {m: p for p, m in marks_b.items()}
    after = {b: by_mark[m] for b, m in BucketMap("t6").kernel_elements().items()}
    # The CPE map: an update deletes one entry, a new director adopts what is there.
    cpes = CpeMap("t4", 60)
    cpes.load()  # the SYN test's entry: the sync below removes it
    cpes.sync({"198.18.200.1": 0x4D430100, "198.18.200.2": 0x4D430200})
    cpes.update({}, ["198.18.200.2"])
    adopted = CpeMap("t4", 60)
    adopted.load()
    cpe_state = {k: m for k, (m, _) in adopted.kernel_elements().items()}
    print(json.dumps({"cpes": cpe_state, "cpes_adopted": adopted.installed, "seen": seen, "a": maps["t4"], "b": maps["t6"], "after": after, "gone": gone,
                      "written": stats.added, "batches": stats.batches}))
    """
)


@requires_netns
def test_the_kernel_hashes_like_userspace_and_directors_agree() -> None:
    require_command("nft", "nftables")
    require_command("unshare", "util-linux")
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", _KERNEL, VIP4, VIP6, json.dumps(PODS)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    h = BucketHash(4096, pool_seed("t"))
    for vip, want in ((VIP4, 48), (VIP6, 16)):
        seen = out["seen"][vip]
        assert len(seen["elems"]) == want, seen
        for src, mark in seen["elems"].items():
            if src == seen["cpe"]:
                assert mark == 0x20000000  # the CPE map before the bucket map
            else:
                assert mark == 0x10000000 | h.bucket(src)  # type: ignore[operator]
        # Every SYN was decided by the CPE or the bucket rule; none went on to the queue rule.
        assert seen["cpe_hit"] == 1 and seen["bucket_hit"] == want - 1 and seen["queued_initial"] == 0, seen
    # Two installs from the same pods (other order, other slot numbers) hold the same pods.
    a = {int(b): p for b, p in out["a"].items()}
    b = {int(k): p for k, p in out["b"].items()}
    assert a == b == dict(enumerate(bucket_owners(PODS, 4096)))
    # The pod that left: only its buckets changed, and only they were written.
    after = {int(k): p for k, p in out["after"].items()}
    moved = {k for k in b if after[k] != b[k]}
    assert moved == {k for k, p in b.items() if p == out["gone"]}
    assert out["gone"] not in after.values() and len(after) == 4096
    assert out["written"] == len(moved) and out["batches"] == 1
    # The CPE map's elements, as the kernel holds and a restarted director adopts them.
    assert out["cpes"] == out["cpes_adopted"] == {"198.18.200.1": 0x4D430100}
