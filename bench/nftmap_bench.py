"""The director's decision in the kernel alone (issue 12, point 1): SYN decisions per second and CPU
per SYN on one core, for the director's real nftables ruleset and maps, without the tunnel.

`.venv/bin/python -m bench.nftmap_bench [--quick] [--no-docs] [--core N] [--only V,V]` (hooked
into `make bench` by bench/run.py). bench/director_bench.py measures the whole lab path of a SYN
(ruleset, VXLAN encapsulation, a veth, a pod's nft drop); this measures only what the director's
kernel does to decide one, the figure issue 12's target (>= 300k decisions/s on one core,
generator on the same core) is about.

The lab: two namespaces joined by a veth pair, `mnb-gen` (the generator) and `mnb-dir` (the
director's kernel), created afresh for every run of every variant and deleted at the end even on
failure. In `mnb-dir` the director's own `install_director` loads the real ruleset
(kernel/steering.py `director_ruleset`, `forward: vxlan`, as in production: VIP traffic is
`notrack`), with the xtables NFQUEUE rule (`--queue-bypass`), and the real writers fill its maps
through libnftables: 10,000 tokens (kernel/tokenmap.py TokenMap), 10,000 CPEs (CpeMap) and all
4,096 buckets (kernel/bucketmap.py BucketMap, owners by rendezvous over 4 pods, as the director
computes them). No slot is plumbed (no VXLAN device, no fwmark rule): instead a second table,
`mcpool_mnb_sink`, hooked at prerouting priority 0 (after the ruleset's `steer` -200, the queue
rule -150 and `remember` -140, before routing) counts and drops every packet to the VIP by what
its mark says: a pod's mark (`to_pod`), a queue mark (`to_queue`: the ruleset sent it to the
queue, nobody listened, `--queue-bypass` let it through) or none (`unmarked`).

The generator is bench/synflood.c (sendmmsg of prebuilt raw SYNs, batches of 64, packets from
bench/director_bench.py's `build_syn` through its `flood` command), pinned to one core; a veth
delivers in the sender's context (no RPS here), so the receiving softirq and the whole ruleset
run on that core too, as in the reference measurement. This orchestrator and every `nft` it runs
sit on the other core.

Variants, each a steady window read from the sink's counters. CPU per SYN two ways over the
window, divided by the packets counted in it: the core's user + system + irq + softirq time
(/proc/stat), and the run time of the generator and of that core's ksoftirqd (/proc/PID/schedstat;
the receive softirq runs in one or the other), which leaves out other processes the scheduler put
on the core. On a quiet core they agree; on a shared one the second is the figure to read, so the
best of the rounds and the reading use it.

- `notrack`: baseline, the sink plus the ruleset's `raw` chain only (the VIP `notrack`): the veth
  path and one nft chain, no decision. Lookup costs are given against it, because the real
  ruleset does not track the VIP either.
- `conntrack`: baseline comparable with the issue's reference (414k/s "conntrack alone"): the
  sink with a `ct state new` rule, so conntrack tracks every SYN (a new entry each, never
  confirmed since the packet is dropped in prerouting).
- `bucket`: initial SYNs (MP_CAPABLE) from 4,096 sources not in the CPE map: the token rule does
  not match, the CPE map misses, `jhash` picks a bucket and the bucket map a pod (`bucket_hit`),
  then `remember` writes the subflow into the flow map.
- `bucket+limits`: the same with the SYN admission rules in (per-source token buckets in a dynamic
  set and a total limit, as production runs them by default), their rates set too high to drop.
- `cpe`: initial SYNs from sources in the CPE map (`cpe_hit`), then `remember`.
- `join-hit`: MP_JOIN SYNs carrying the 10,000 tokens of the token map (`token_hit`), `remember`.
- `join-hit-noflow`: the same with the `remember` chain emptied after loading: by difference, what
  writing the subflow into the flow map costs (the only variant that is not the ruleset as-is).
- `midflow`: not a SYN but the packets after it: ACKs of 16,384 subflows the flow map holds (as
  `remember` leaves them after their SYNs), restored to their pod (`restored`), then refreshed by
  `remember`. This is what every data packet a CPE sends to the VIP costs the director.
- `join-miss`: MP_JOIN SYNs carrying 10,000 tokens not in the map: the lookup misses, the next
  rule marks the SYN for the queue (`queued_join`), the xtables NFQUEUE rule finds no listener
  and bypasses. What a real director does next (read the SYN in Python and hold it until its
  token appears) is not included: bench/director_bench.py measures that path.

Correctness, per variant: before the timed flood, a short verification flood runs with a sink
that looks every packet's key up in the expected answer (`ip saddr` or the token -> the pod the
writers' content says; the bucket's pod is computed in Python by cluster/hashing.py, so it also
checks that the kernel's `jhash` lands where userspace expects) and counts `right` and `wrong`.
Over the timed flood, every packet sent must be counted by the sink, the ruleset's own counter
for the variant (`bucket_hit`, `cpe_hit`, `token_hit`, `queued_join`) must count the same
number, and a hit variant must queue nothing. Any mismatch makes the run fail.

It rewrites the "Director decision in the kernel" section of docs/benchmarks.md between its
markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpool_proxy.cluster.hashing import BucketHash, bucket_owners
from mcpool_proxy.kernel.bucketmap import BucketMap
from mcpool_proxy.kernel.steering import (
    InitialHash,
    SynLimits,
    install_director,
    slot_mark,
)
from mcpool_proxy.kernel.tokenmap import CpeMap, SyncStats, TokenMap, open_nftables
from mcpool_tools.lab import in_netns

from bench.dataplane import foreign_cpu_s, process_ticks
from bench.director_bench import compile_synflood, flood_pool, flood_sources, write_pool
from bench.docs import DOCS, replace_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN_MARK = "<!-- BEGIN nftmap (generated by `make bench`: bench/nftmap_bench.py) -->"
END_MARK = "<!-- END nftmap -->"
HEADING = "Director decision in the kernel"

GEN_NS = "mnb-gen"
DIR_NS = "mnb-dir"
GEN_DEV, DIR_DEV = "mnb-g", "mnb-d"
GEN_ADDR, DIR_ADDR = "10.219.77.1", "10.219.77.2"
TABLE = "mcpool_mnb"
SINK = "mcpool_mnb_sink"
BASE = "mcpool_mnb_base"
VIP = "198.19.77.1"
PORT = 5124
MARK_BASE = 0x4D4E0000
QUEUE_NUM = 4377
PODS = tuple(f"pod-{i}" for i in range(4))  # slot i + 1 each
BUCKETS = 4096
SEED = 0x2A2A2A2A
SOURCES = 4096  # flood source addresses (the first of SRC_NET)
SRC_NET = "198.18.0.0/16"
CPE_NET = "100.64.0.0/16"  # the CPE map's other CPEs (not flooding)
TOKENS = 10_000
CPES = 10_000
POOL = 16_384  # distinct packets the generator cycles through
TARGET_PER_S = 300_000
HIGH = 10_000_000  # admission limits that never drop here
VARIANTS = ("notrack", "conntrack", "bucket", "bucket+limits", "cpe", "join-hit", "join-hit-noflow", "join-miss",
            "midflow")
HIT_COUNTER = {"bucket": "bucket_hit", "bucket+limits": "bucket_hit", "cpe": "cpe_hit",
               "join-hit": "token_hit", "join-hit-noflow": "token_hit", "join-miss": "queued_join",
               "midflow": "restored"}  # fmt: skip
CHECKED = ("bucket", "bucket+limits", "cpe", "join-hit", "join-hit-noflow", "midflow")  # each packet's pod verified
SINK_EXPECT = {"notrack": "unmarked", "conntrack": "unmarked", "join-miss": "to_queue"}  # else to_pod
LABELS = {
    "notrack": "baseline: veth + `notrack`, no decision",
    "conntrack": "baseline: veth + conntrack, no decision",
    "bucket": "initial SYN, bucket map (CPE map miss first)",
    "bucket+limits": "initial SYN, bucket map, admission limits on",
    "cpe": "initial SYN, CPE map",
    "join-hit": "MP_JOIN, token map hit",
    "join-hit-noflow": "MP_JOIN, token map hit, `remember` emptied (no flow map write)",
    "join-miss": "MP_JOIN, token map miss (queue bypassed)",
    "midflow": "mid-flow packet (ACK) of a known subflow, flow map",
}


@dataclass
class Settings:
    quick: bool = False
    write_docs: bool = True
    core: int = 1
    rounds: int = 3
    flood_s: float = 2.6
    warmup_s: float = 0.5
    verify_s: float = 0.3
    variants: tuple[str, ...] = VARIANTS

    @classmethod
    def quick_settings(cls, write_docs: bool, core: int = 1) -> Settings:
        return cls(quick=True, write_docs=write_docs, core=core, rounds=1, flood_s=1.0, warmup_s=0.25, verify_s=0.2)


@dataclass
class Run:
    variant: str
    sent: int  # generator, whole flood
    errors: int  # generator: packets the socket refused (ENOBUFS)
    sink: dict[str, int]  # sink counters, whole flood
    ruleset: dict[str, int]  # director table counters, whole flood
    window_s: float
    window_packets: int  # counted by the sink in the window
    busy_s: float  # the core, in the window
    softirq_s: float
    own_s: float  # the generator's and the core's ksoftirqd's run time (schedstat), in the window
    foreign_cores: float  # processes not ours, whole machine, in the window
    verify: dict[str, int] = field(default_factory=dict)  # verification flood's sink counters
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.window_packets / self.window_s

    @property
    def us_per_syn(self) -> float:
        """The core's busy time per SYN (/proc/stat): includes whatever else ran on that core."""
        return self.busy_s * 1e6 / max(1, self.window_packets)

    @property
    def own_us_per_syn(self) -> float:
        """The generator's and ksoftirqd's run time per SYN (the receive softirq runs in one or
        the other): leaves out other processes the scheduler put on the core (a shared machine)."""
        return self.own_s * 1e6 / max(1, self.window_packets)


@dataclass
class Results:
    started: str
    kernel: str
    command: str
    load_before: tuple[float, float, float]
    core: int
    runs: list[Run] = field(default_factory=list)
    write_ms: dict[str, float] = field(default_factory=dict)  # map -> ms to fill it (first load)

    def best(self, variant: str) -> Run | None:
        """The round with the least CPU per SYN (generator + ksoftirqd): on a shared machine the
        other rounds measure the neighbours too (timeit's reasoning)."""
        runs = [r for r in self.runs if r.variant == variant]
        return min(runs, key=lambda r: r.own_us_per_syn) if runs else None

    @property
    def problems(self) -> list[str]:
        return [f"{r.variant}: {p}" for r in self.runs for p in r.problems]


# ---- what the maps hold (computed alike by the orchestrator and the loader) ---------------------


@dataclass(frozen=True)
class Content:
    sources: tuple[str, ...]
    tokens: dict[int, int]  # token -> mark (in the map)
    unknown: tuple[int, ...]  # tokens not in the map
    cpes: dict[str, int]  # CPE address -> mark (in the map)
    buckets: dict[int, int]  # bucket -> mark

    def expected_source_mark(self, variant: str, source: str) -> int:
        if variant == "cpe":
            return self.cpes[source]
        bucket = BucketHash(BUCKETS, SEED).bucket(source)
        assert bucket is not None
        return self.buckets[bucket]


def as_ack(syn: bytes) -> bytes:
    """The same segment with the flags of a mid-flow packet (ACK) instead of SYN. The checksum is
    left stale: nothing on this path verifies it (the VIP is not tracked, the sink drops before
    TCP)."""
    packet = bytearray(syn)
    packet[(packet[0] & 0x0F) * 4 + 13] = 0x10
    return bytes(packet)


def flows_script(c: Content) -> str:
    """Every subflow of the initial pool in the flow map, marked with its bucket's pod, as
    `remember` would have written them after their SYNs."""
    n = len(c.sources)
    elems = [f"{src} . {1024 + (i // n) % 64000} . {PORT} : {c.expected_source_mark('bucket', src):#010x}"
             for i, src in ((i, c.sources[i % n]) for i in range(POOL))]  # fmt: skip
    return "".join(f"add element inet {TABLE} flows {{ {', '.join(elems[i:i + 2000])} }}\n"
                   for i in range(0, len(elems), 2000))  # fmt: skip


def content(variant: str) -> Content:
    """The maps' elements for a variant: the same tokens and buckets always; the CPE map holds
    10,000 CPEs, the flood's sources among them only for `cpe`."""
    rng = random.Random(1212)
    all_tokens = rng.sample(range(1, 1 << 32), 2 * TOKENS)
    marks = [slot_mark(MARK_BASE, i + 1) for i in range(len(PODS))]
    mark_of = dict(zip(PODS, marks, strict=True))
    tokens = {t: marks[i % len(marks)] for i, t in enumerate(all_tokens[:TOKENS])}
    sources = tuple(flood_sources(SRC_NET, SOURCES))
    others = flood_sources(CPE_NET, CPES)
    cpe_keys = [*sources, *others[: CPES - len(sources)]] if variant == "cpe" else others
    cpes = {addr: marks[rng.randrange(len(marks))] for addr in cpe_keys}
    buckets = {b: mark_of[pod] for b, pod in enumerate(bucket_owners(PODS, BUCKETS)) if pod is not None}
    return Content(sources, tokens, tuple(all_tokens[TOKENS:]), cpes, buckets)


# ---- rulesets -------------------------------------------------------------------------------------


def sink_script(variant: str, checking: bool) -> str:
    """The sink table: counts and drops every packet to the VIP after the decision. `checking`:
    first look the packet's key up in the expected answer (per-pod chains count right/wrong)."""
    match = f"ip daddr {VIP} tcp dport {PORT}"
    lines = [f"add table inet {SINK}", f"delete table inet {SINK}", f"table inet {SINK} {{"]
    lines += [f"  counter {name} {{ }}" for name in ("to_pod", "to_queue", "unmarked", "right", "wrong")]
    lines.append("  map expect_src { type ipv4_addr : verdict; }")
    lines.append("  map expect_tok { typeof tcp option @30,32,32 : verdict; }")
    for slot in range(1, len(PODS) + 1):
        lines.append(f"  chain pod{slot} {{ meta mark {slot_mark(MARK_BASE, slot):#010x} counter name right drop; "
                     "counter name wrong drop; }")  # fmt: skip
    lines += ["  chain sink {", "    type filter hook prerouting priority 0; policy accept;"]
    if variant == "conntrack":
        lines.append(f"    {match} ct state new counter")  # conntrack tracks only when a rule asks for it
    if checking and variant in ("bucket", "bucket+limits", "cpe", "midflow"):
        lines.append(f"    {match} ip saddr vmap @expect_src")
    elif checking and variant.startswith("join-hit"):
        lines.append(f"    {match} tcp option @30,32,32 vmap @expect_tok")
    lines += [
        f"    {match} meta mark & 0xffff0000 == {MARK_BASE:#010x} meta mark & 0x0000ff00 != 0 counter name to_pod drop",
        f"    {match} meta mark & 0xffff0000 == {MARK_BASE:#010x} counter name to_queue drop",
        f"    {match} counter name unmarked drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def expect_script(variant: str, c: Content) -> str:
    """The checking sink's expected answers: key -> jump to the chain of the pod it must reach."""
    slot_of = {slot_mark(MARK_BASE, i + 1): i + 1 for i in range(len(PODS))}
    if variant.startswith("join-hit"):
        elems = [f"{t:#010x} : jump pod{slot_of[m]}" for t, m in c.tokens.items()]
        name = "expect_tok"
    elif variant in ("bucket", "bucket+limits", "cpe", "midflow"):
        elems = [f"{s} : jump pod{slot_of[c.expected_source_mark(variant, s)]}" for s in c.sources]
        name = "expect_src"
    else:
        return ""
    return "".join(f"add element inet {SINK} {name} {{ {', '.join(elems[i:i + 2000])} }}\n"
                   for i in range(0, len(elems), 2000))  # fmt: skip


def baseline_script(variant: str) -> str:
    if variant != "notrack":
        return ""
    return (f"table inet {BASE} {{\n  chain raw {{\n    type filter hook prerouting priority -300; policy accept;\n"
            f"    ip daddr {VIP} tcp dport {{ {PORT} }} notrack\n  }}\n}}\n")


def nft(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nft -f failed: {proc.stderr.strip()}\n{script[:2000]}")


def load(variant: str, check: bool = True) -> dict[str, float]:
    """In the director's namespace (`in_netns`): the variant's ruleset, its maps filled by the
    real writers, the sink; returns {map: ms its writer took}. `check`: read the maps back."""
    timings: dict[str, float] = {}
    if variant in ("notrack", "conntrack"):
        if variant == "notrack":
            nft(baseline_script(variant))
    else:
        limits = (SynLimits(per_source=HIGH, per_source_burst=HIGH, total=HIGH, total_burst=HIGH)
                  if variant == "bucket+limits" else SynLimits(per_source=0, total=0))
        install_director(VIP, [PORT], MARK_BASE, QUEUE_NUM, "vxlan", 3600, table=TABLE, owner="mnb nftmap bench",
                         syn_limits=limits, initial=InitialHash(BUCKETS, SEED))  # fmt: skip
        if variant == "join-hit-noflow":  # what the flow map write costs, by difference with join-hit
            nft(f"flush chain inet {TABLE} remember\n")
        c = content(variant)
        if variant == "midflow":
            nft(flows_script(c))
        handle = open_nftables()
        writers: list[tuple[str, Callable[[], SyncStats]]] = [
            ("tokens", lambda: TokenMap(TABLE, nft=handle).sync(c.tokens)),
            ("cpes", lambda: CpeMap(TABLE, nft=handle).sync(c.cpes)),
            ("buckets", lambda: BucketMap(TABLE, nft=handle).sync(c.buckets)),
        ]
        for name, write in writers:
            t0 = time.perf_counter()
            stats = write()
            timings[name] = (time.perf_counter() - t0) * 1000
            if stats.fallbacks:
                raise RuntimeError(f"map {name}: the writer's batch was refused")
        # The writers' view must be the kernel's: every element in place.
        if check and len(TokenMap(TABLE, nft=handle).kernel_elements()) != len(c.tokens):
            raise RuntimeError("token map: not every token reached the kernel")
        if check and len(BucketMap(TABLE, nft=handle).kernel_elements()) != len(c.buckets):
            raise RuntimeError("bucket map: not every bucket reached the kernel")
    nft(sink_script(variant, checking=False))
    return timings


# ---- the lab ----------------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_dir(*cmd: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", DIR_NS, *cmd], input=stdin, capture_output=True, text=True,
                          check=False, cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"in {DIR_NS}: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def teardown() -> None:
    for ns in (GEN_NS, DIR_NS):
        sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def lab() -> Iterator[None]:
    """The two namespaces and the veth (fresh: no flow, conntrack entry or map of a previous run)."""
    teardown()
    try:
        sh("ip", "netns", "add", GEN_NS)
        sh("ip", "netns", "add", DIR_NS)
        sh("ip", "link", "add", GEN_DEV, "netns", GEN_NS, "type", "veth", "peer", "name", DIR_DEV, "netns", DIR_NS)
        for ns, dev, addr in ((GEN_NS, GEN_DEV, GEN_ADDR), (DIR_NS, DIR_DEV, DIR_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", GEN_NS, "route", "add", f"{VIP}/32", "via", DIR_ADDR)
        # A permanent neighbour: no SYN waits for ARP, and no ARP runs on the measured core.
        mac = json.loads(sh("ip", "-n", DIR_NS, "-j", "link", "show", DIR_DEV))[0]["address"]
        sh("ip", "-n", GEN_NS, "neigh", "replace", DIR_ADDR, "lladdr", mac, "dev", GEN_DEV, "nud", "permanent")
        yield
    finally:
        teardown()


def counters(table: str) -> dict[str, int]:
    """Named counters of an nft table in the director's namespace: name -> packets.

    `-t list table`, not `list counters`: nft 1.0.6 fetches every set's elements for the latter
    (0.2-1 s with the director's maps and flows filled), while a table without elements lists in
    ~10 ms; the sink (no elements while timed) is read inside the window, the director's table
    only around the flood.
    """
    out = json.loads(in_dir("nft", "-t", "-j", "list", "table", "inet", table))
    return {item["counter"]["name"]: int(item["counter"]["packets"])
            for item in out.get("nftables", []) if "counter" in item}  # fmt: skip


def ruleset_counters(variant: str) -> dict[str, int]:
    return {} if variant in ("notrack", "conntrack") else counters(TABLE)


def core_jiffies(core: int) -> tuple[int, int]:
    """(busy, softirq) jiffies of one core from /proc/stat: user + nice + system + irq + softirq."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:8]]
            return v[0] + v[1] + v[2] + v[5] + v[6], v[6]
    raise RuntimeError(f"cpu{core} not in /proc/stat")


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def run_ns(pids: Sequence[int]) -> int:
    """Nanoseconds the tasks have run (/proc/PID/schedstat), softirqs run in their context included."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids)


def ksoftirqd(core: int) -> int:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == f"ksoftirqd/{core}":
                return int(entry.name)
    raise RuntimeError(f"no ksoftirqd/{core}")


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="mnb-"))
        self.synflood = compile_synflood(self.tmp)
        self.hz = os.sysconf("SC_CLK_TCK")
        self.results = Results(
            started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            kernel=platform.release(),
            command="`.venv/bin/python -m bench.nftmap_bench" + (" --quick`" if settings.quick else "`"),
            load_before=os.getloadavg(), core=settings.core)
        self.pools: dict[str, str] = {}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def generator(self, variant: str, seconds: float) -> subprocess.Popen[str]:
        """bench/synflood.c in the generator's namespace on the measured core (`ip netns exec` and
        `taskset` exec it, so the process is the sender itself)."""
        argv = ["ip", "netns", "exec", GEN_NS, "taskset", "-c", str(self.s.core), self.synflood,
                self.pool(variant), VIP, f"{seconds:.3f}"]
        gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert gen.stdout is not None
        line = gen.stdout.readline().strip()
        if line != "flood started":
            _, err = gen.communicate(timeout=30)
            raise RuntimeError(f"flood generator failed ({line!r}): {err.strip()[-1000:]}")
        return gen

    @staticmethod
    def finish(gen: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
        out, err = gen.communicate(timeout=seconds + 30)
        if gen.returncode != 0:
            raise RuntimeError(f"flood generator exited {gen.returncode}: {err.strip()[-1000:]}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    def pool(self, variant: str) -> str:
        """The variant's packets (director_bench's `flood` pool, built once per kind): initial SYNs
        from the sources, or MP_JOINs carrying the map's tokens or tokens it does not have."""
        kind = ("join-hit" if variant.startswith("join-hit") else variant if variant.startswith("join") or
                variant == "midflow" else "initial")
        if kind not in self.pools:
            c = content(variant)
            tokens = list(c.tokens) if kind == "join-hit" else list(c.unknown) if kind == "join-miss" else []
            path = self.tmp / f"{kind}.pool"
            packets = flood_pool(VIP, PORT, c.sources, tokens, POOL)
            write_pool(path, [as_ack(p) for p in packets] if kind == "midflow" else packets)
            self.pools[kind] = str(path)
        return self.pools[kind]

    def verify(self, variant: str, run_problems: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """A short flood through the checking sink: every packet must reach its expected pod.
        Returns (the checking sink's counters, the ruleset's counters after it)."""
        in_dir("nft", "-f", "-", stdin=sink_script(variant, checking=True) + expect_script(variant, content(variant)))
        gen = self.generator(variant, self.s.verify_s)
        report = self.finish(gen, self.s.verify_s)
        got = counters(SINK)
        hits = ruleset_counters(variant)  # fresh namespaces: the counters started at 0
        in_dir("nft", "-f", "-", stdin=sink_script(variant, checking=False))  # a new sink: counters at 0
        checked = variant in CHECKED
        if checked and (got["wrong"] or got["right"] != report["sent"]):
            run_problems.append(f"verification: {got['right']:,} right, {got['wrong']:,} wrong of "
                                f"{report['sent']:,} sent")  # fmt: skip
        if checked and sum(got[k] for k in ("to_pod", "to_queue", "unmarked")) > 0:
            run_problems.append(f"verification: {got['to_pod'] + got['to_queue'] + got['unmarked']:,} packets "
                                "with a key the expected answer does not know")  # fmt: skip
        if variant in HIT_COUNTER and hits.get(HIT_COUNTER[variant], 0) != report["sent"]:
            run_problems.append(f"verification: {HIT_COUNTER[variant]} counted {hits.get(HIT_COUNTER[variant], 0):,} "
                                f"of {report['sent']:,} sent")  # fmt: skip
        return got, hits

    def one(self, variant: str, first: bool) -> Run:
        with lab():
            with in_netns(DIR_NS):
                timings = load(variant, check=first)
            if first and timings:
                for name, ms in timings.items():
                    self.results.write_ms.setdefault(name, ms)
            problems: list[str] = []
            verified, rules0 = self.verify(variant, problems) if first else ({}, {})
            sink0: dict[str, int] = {}  # a new sink table: its counters start at 0
            gen = self.generator(variant, self.s.flood_s)
            try:
                own = (gen.pid, ksoftirqd(self.s.core))  # `ip netns exec` and `taskset` exec: the pid is the sender's
                time.sleep(self.s.warmup_s)  # the generator's first batches and the maps' caches warm up
                window = max(0.3, self.s.flood_s - self.s.warmup_s - 0.3)
                a_t0 = time.monotonic()
                a_sink = counters(SINK)
                a_t1 = time.monotonic()
                a_cpu, a_ticks, a_own = core_jiffies(self.s.core), process_ticks(), run_ns(own)
                time.sleep(window)
                b_t0 = time.monotonic()
                b_sink = counters(SINK)
                b_t1 = time.monotonic()
                b_cpu, b_ticks, b_own = core_jiffies(self.s.core), process_ticks(), run_ns(own)
                report = self.finish(gen, self.s.flood_s)
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
            sink, rules = diff(counters(SINK), sink0), diff(ruleset_counters(variant), rules0)
        if b_t1 > float(report["end"]) or a_t0 < float(report["start"]):
            # The generator's clock is CLOCK_MONOTONIC, as time.monotonic() here.
            problems.append("the measurement window was not inside the flood (a very busy machine): rerun")
        span = (b_t0 + b_t1) / 2 - (a_t0 + a_t1) / 2
        expect = SINK_EXPECT.get(variant, "to_pod")
        window_packets = sum(b_sink[k] - a_sink[k] for k in ("to_pod", "to_queue", "unmarked"))
        run = Run(variant=variant, sent=int(report["sent"]), errors=int(report["errors"]), sink=sink, ruleset=rules,
                  window_s=span, window_packets=window_packets, busy_s=(b_cpu[0] - a_cpu[0]) / self.hz,
                  softirq_s=(b_cpu[1] - a_cpu[1]) / self.hz, own_s=(b_own - a_own) / 1e9, foreign_cores=foreign_cpu_s(a_ticks, b_ticks) / span,
                  verify=verified, problems=problems)  # fmt: skip
        self.check(run, expect)
        return run

    @staticmethod
    def check(run: Run, expect: str) -> None:
        counted = sum(run.sink[k] for k in ("to_pod", "to_queue", "unmarked"))
        if counted != run.sent:
            run.problems.append(f"the sink counted {counted:,} of {run.sent:,} sent")
        if run.sink[expect] != counted:
            others = {k: run.sink[k] for k in ("to_pod", "to_queue", "unmarked") if k != expect and run.sink[k]}
            run.problems.append(f"expected every packet {expect}, also got {others}")
        name = HIT_COUNTER.get(run.variant)
        if name and run.ruleset.get(name, 0) != counted:
            run.problems.append(f"{name} counted {run.ruleset.get(name, 0):,}, the sink {counted:,}")
        if name and name != "queued_join":
            queued = run.ruleset.get("queued_initial", 0) + run.ruleset.get("queued_join", 0)
            if queued:
                run.problems.append(f"{queued:,} hits marked for the queue")
        dropped = run.ruleset.get("syn_over_source", 0) + run.ruleset.get("syn_over_total", 0)
        if dropped:
            run.problems.append(f"{dropped:,} SYNs dropped by the admission limits")

    def run(self) -> Results:
        for round_ in range(self.s.rounds):
            for variant in self.s.variants:
                result = self.one(variant, first=round_ == 0)
                self.results.runs.append(result)
                print(f"  {variant:14s} round {round_ + 1}: {result.rate:10,.0f} /s  {result.us_per_syn:5.2f} µs/SYN ({result.own_us_per_syn:5.2f} own) "
                      f"(core busy {result.busy_s / result.window_s:4.0%}, softirq "
                      f"{result.softirq_s / result.window_s:4.0%}; others {result.foreign_cores:.2f} cores)"
                      + (f"  PROBLEMS: {result.problems}" if result.problems else ""), flush=True)  # fmt: skip
        return self.results


# ---- the report -------------------------------------------------------------------------------------


def _delta(run: Run, base: Run | None) -> str:
    """The variant's CPU per SYN minus a baseline's, by both measures (core / generator + ksoftirqd)."""
    if base is None or base is run:
        return "—"
    return f"{run.us_per_syn - base.us_per_syn:+.2f} / {run.own_us_per_syn - base.own_us_per_syn:+.2f}"


def render(r: Results, s: Settings) -> str:
    notrack, conntrack = r.best("notrack"), r.best("conntrack")
    rounds = f"best of {s.rounds} rounds (least generator + ksoftirqd time per SYN)" if s.rounds > 1 else "one round"
    lines = [
        f"Measured {r.started} on Linux {r.kernel}, {os.cpu_count()} cores, load average "
        f"{r.load_before[0]:.2f} / {r.load_before[1]:.2f} / {r.load_before[2]:.2f} (1/5/15 min) before the run. "
        f"Command: {r.command}. Two namespaces and a veth; in `{DIR_NS}` the director's real ruleset "
        f"(`install_director`, `forward: vxlan`) and its maps filled by the director's own writers: "
        f"{TOKENS:,} tokens, {CPES:,} CPEs, {BUCKETS:,} buckets over {len(PODS)} pods. Raw SYNs from "
        f"{SOURCES:,} source addresses ({POOL:,} distinct packets) by bench/synflood.c, pinned to core {r.core}, "
        f"which also runs the veth's receive softirq and the whole ruleset; after the decision a sink table "
        f"(prerouting priority 0, before routing and any tunnel) counts and drops every packet by its mark. "
        f"Each variant runs in fresh namespaces; {rounds}, each a {s.flood_s - s.warmup_s - 0.3:.1f} s window "
        f"of a {s.flood_s:.1f} s flood. CPU per SYN: core {r.core}'s user + system + irq + softirq time in the "
        f"window (/proc/stat) over the packets the sink counted in it; the column \"generator + ksoftirqd only\" "
        f"counts instead the run time of the generator and of core {r.core}'s ksoftirqd (/proc/PID/schedstat; "
        f"the receive softirq runs in one or the other), leaving out other work the scheduler put on that core.",
        "",
        "| variant | decisions/s (baselines: packets/s) | µs CPU per SYN: core | µs per SYN: generator + ksoftirqd "
        "| minus notrack baseline (core / gen + ksoftirqd) | minus conntrack baseline (core / gen + ksoftirqd) "
        "| core busy (softirq) | packets sent = counted | decided as expected |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for variant in s.variants:
        run = r.best(variant)
        if run is None:
            continue
        counted = sum(run.sink[k] for k in ("to_pod", "to_queue", "unmarked"))
        name = HIT_COUNTER.get(run.variant)
        if run.variant in ("notrack", "conntrack"):
            decided = f"{run.sink['unmarked']:,} unmarked"
        elif run.variant == "join-miss":
            decided = (f"`queued_join` {run.ruleset.get('queued_join', 0):,}, `token_hit` "
                       f"{run.ruleset.get('token_hit', 0):,}")  # fmt: skip
        else:
            queued = run.ruleset.get("queued_initial", 0) + run.ruleset.get("queued_join", 0)
            decided = f"`{name}` {run.ruleset.get(str(name), 0):,}, queued {queued:,}"
        first = next((x for x in r.runs if x.variant == variant and x.verify), None)
        if first is not None and first.variant in CHECKED:
            decided += f"; pod checked: {first.verify['right']:,} right, {first.verify['wrong']:,} wrong"
        ok = "yes" if counted == run.sent else "NO"
        lines.append(
            f"| {LABELS[variant]} | {run.rate:,.0f} | {run.us_per_syn:.2f} | {run.own_us_per_syn:.2f} | "
            f"{_delta(run, notrack)} | {_delta(run, conntrack)} | "
            f"{run.busy_s / run.window_s:.0%} ({run.softirq_s / run.window_s:.0%}) | "
            f"{ok}: {run.sent:,} / {counted:,} | {decided} |")
    spread = []
    for variant in s.variants:
        rates = [x.rate for x in r.runs if x.variant == variant]
        if len(rates) > 1:
            spread.append(f"{variant} {min(rates):,.0f}–{max(rates):,.0f}")
    if spread:
        lines += ["", f"Rates over all rounds (min–max/s): {'; '.join(spread)}."]
    if r.write_ms:
        lines += ["", "Filling the maps through libnftables (the writers' `sync`, one transaction each, first "
                      "load): " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in r.write_ms.items()) + "."]
    foreign = statistics.fmean(x.foreign_cores for x in r.runs) if r.runs else 0.0
    lines += ["", f"Processes that are not this bench's used {foreign:.2f} cores of the machine on average "
                  "during the windows (a shared machine inflates CPU per SYN, more so the rate)."]
    lines += ["", reading(r, s)]
    if r.problems:
        lines += ["", "**Problems (the run failed):** " + "; ".join(r.problems)]
    return "\n".join(lines) + "\n"


def reading(r: Results, s: Settings) -> str:
    """The paragraph under the table, from the generator + ksoftirqd figures (`cost`): on a quiet
    core they equal the /proc/stat ones, on a shared one they leave the neighbours out."""
    hits = [x for x in (r.best(v) for v in ("bucket", "cpe", "join-hit")) if x is not None]
    notrack, conntrack = r.best("notrack"), r.best("conntrack")

    def cost(run: Run) -> float:
        return run.own_us_per_syn

    parts = ["Reading (CPU per SYN from the generator + ksoftirqd column):"]
    if hits:
        worst = max(hits, key=cost)
        ceiling = 1e6 / cost(worst)
        verdict = "meets" if ceiling >= TARGET_PER_S else "misses"
        parts.append(
            f"the slowest hit path ({LABELS[worst.variant]}) costs {cost(worst):.2f} µs of one core per SYN, "
            f"generator and receive path included, i.e. {ceiling:,.0f} decisions/s for a core doing nothing else "
            f"({worst.rate:,.0f}/s measured): that {verdict} the target of {TARGET_PER_S:,}/s on one core.")
        if notrack:
            scale = (f"For scale, the same path with no decision at all (the notrack baseline) holds "
                     f"{1e6 / cost(notrack):,.0f}/s on this core")
            if conntrack:
                scale += (f", and conntrack alone {1e6 / cost(conntrack):,.0f}/s, where the issue's reference "
                          "machine did 414k/s: the target was set against that machine")
            parts.append(scale + ".")
    if notrack and hits:
        costs = ", ".join(f"{LABELS[x.variant]} +{cost(x) - cost(notrack):.2f} µs" for x in hits)
        parts.append(
            f"What deciding adds to a SYN that crosses the veth and one nft chain ({cost(notrack):.2f} µs, the "
            f"notrack baseline): {costs}; this includes the ruleset's other rules on the way (the MP_JOIN test, "
            "the CPE lookup before the bucket hash) and `remember` writing the subflow into the flow map.")
    noflow, join_hit = r.best("join-hit-noflow"), r.best("join-hit")
    if noflow and join_hit and notrack:
        parts.append(
            f"Without `remember` a join hit costs +{cost(noflow) - cost(notrack):.2f} µs: the token lookup and the "
            f"rules before it; writing the subflow into the flow map is the other "
            f"{cost(join_hit) - cost(noflow):.2f} µs.")
    if conntrack and notrack:
        parts.append(
            f"Conntrack alone costs {cost(conntrack) - cost(notrack):.2f} µs per SYN more than notrack; the "
            "director's ruleset does not track the VIP (direct server return), so the lookup costs are taken "
            "against the notrack baseline.")
    limits, bucket = r.best("bucket+limits"), r.best("bucket")
    if limits and bucket:
        parts.append(
            f"The SYN admission rules (per-source token buckets in a dynamic set plus a total limit, on by default) "
            f"add {cost(limits) - cost(bucket):.2f} µs per SYN to the bucket path.")
    midflow = r.best("midflow")
    if midflow and notrack:
        parts.append(
            f"A packet after the SYN (the flow map restores its pod, `remember` refreshes it) costs "
            f"{cost(midflow):.2f} µs, +{cost(midflow) - cost(notrack):.2f} µs over the notrack baseline: "
            f"{1e6 / cost(midflow):,.0f} packets/s for a core doing nothing else.")
    miss = r.best("join-miss")
    if miss:
        parts.append(
            f"A join miss costs the kernel {cost(miss):.2f} µs, but that excludes the userspace part: with a "
            "director listening, the SYN goes through NFQUEUE to Python and waits for its token "
            "(the Director section's queue path).")
    if any(abs(x.us_per_syn - x.own_us_per_syn) > 0.1 * x.own_us_per_syn for x in r.runs):
        parts.append(f"Where the two CPU columns differ, other processes ran on core {r.core} during the window "
                     "(the scheduler is free to put them there).")
    foreign = statistics.fmean(x.foreign_cores for x in r.runs) if r.runs else 0.0
    if foreign > 0.1:
        parts.append(f"Other work used {foreign:.2f} cores of the machine during the windows: the rates are lower "
                     "bounds, and even the run-time figures include some slowdown from sharing caches.")
    if s.quick:
        parts.append("(A `--quick` smoke run: one short round; not a figure to quote.)")
    return " ".join(parts)


def update_docs(body: str, path: Path = DOCS) -> None:
    replace_section(HEADING, BEGIN_MARK, END_MARK, body, path)


def run(settings: Settings) -> Results:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (network namespaces, nftables)")
    if not 0 <= settings.core < (os.cpu_count() or 1):
        raise ValueError(f"--core {settings.core}: this machine has cores 0..{(os.cpu_count() or 1) - 1}")
    others = set(range(os.cpu_count() or 1)) - {settings.core}
    before = os.sched_getaffinity(0)
    if others:  # the orchestrator and its nft calls off the measured core
        os.sched_setaffinity(0, others)
    bench = Bench(settings)
    try:
        return bench.run()
    finally:
        bench.close()
        teardown()
        os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nftmap_bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one short round per variant (a smoke run)")
    p.add_argument("--no-docs", action="store_true", help="print the figures, do not rewrite docs/benchmarks.md")
    p.add_argument("--core", type=int, default=1, help="the core the generator and the receive path share (default 1)")
    p.add_argument("--only", default="", help=f"comma-separated variants, of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    settings = (Settings.quick_settings(not args.no_docs, args.core) if args.quick
                else Settings(write_docs=not args.no_docs, core=args.core))
    if args.only:
        chosen = tuple(v.strip() for v in args.only.split(",") if v.strip())
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            p.error(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        settings.variants = chosen
        settings.write_docs = False  # a partial run does not replace the section
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (delete the namespaces) on `timeout`
    t0 = time.monotonic()
    results = run(settings)
    body = render(results, settings)
    print(body)
    print(f"nftmap bench: {time.monotonic() - t0:.0f} s", flush=True)
    if settings.write_docs:
        update_docs(body)
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
