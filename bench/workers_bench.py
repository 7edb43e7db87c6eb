"""Worker processes per pod (issue 12, point 3): connections/s and proxy CPU per connection of
`mcpool proxy` with `workers: 1` and `workers: 2`, same load, same lab.

`.venv/bin/python -m bench.workers_bench [--quick] [--no-docs]` (run by `make bench`); writes its
section of docs/benchmarks.md. On the data-plane bench's lab (its own prefix `mwk`) and load
generator (Convert through the proxy to a TCP server, 64 connections in flight, a 64-byte request
and a 256-byte reply each): a saturating run (connections/s) and a paced one (500/s, a load both
carry, for the CPU per connection), best of the repeats.

Cores. This figure wants one core per worker plus one for the load generator; the machine has
`os.cpu_count()` cores. One worker: the proxy on core 0, the generator on core 1 (as in the
data-plane bench). Two workers: worker 0 on core 0, worker 1 on core 1, which it shares with the
generator (the supervisor, idle under load, on core 0). So on 2 cores the second worker and the
generator compete: the 2-worker conn/s is a lower bound of what a pod with 2 free cores does, and
the proxy CPU per connection (the whole process tree's user + system time per connection, which
does not depend on who saturates) is the fair comparison: it should stay flat from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from bench.dataplane import LOADGEN_CORE, PORTS, PROXY_CORE, BenchSettings, DataPlaneBench
from bench.docs import replace_section
from bench.loadgen import raise_nofile
from bench.setup_cost import CONVERT_PORT, _measure

__all__ = ["main"]

BEGIN = "<!-- workers_bench:begin -->"
END = "<!-- workers_bench:end -->"
COMMAND = ".venv/bin/python -m bench.workers_bench"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except OSError:
        return []


def _pin(pid: int, core: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, capture_output=True)


def measure(bench: DataPlaneBench, workers: int, seconds: float, repeat: int) -> dict[str, Any]:
    srv, mcp = bench.lab.srv_ip, bench.lab.mcp_ip
    rate_to = f"{srv}:{PORTS['rate_tcp']}"
    with bench.mcpool("splice", extra={"workers": workers}) as proxy:
        pid = proxy.proc.pid  # pinned to PROXY_CORE by bench.mcpool
        placement = {"proxy": PROXY_CORE}
        if workers > 1:
            kids = _children(pid)
            if len(kids) != workers:
                raise RuntimeError(f"expected {workers} worker processes under {pid}, found {kids}")
            placement = {}
            for i, child in enumerate(kids):
                core = (PROXY_CORE, LOADGEN_CORE)[i % 2]
                _pin(child, core)
                placement[f"worker {i}"] = core
        runs: dict[str, list[dict[str, Any]]] = {"saturating": [], "500/s": []}
        for _ in range(repeat):
            runs["saturating"].append(_measure(bench, pid, f"{mcp}:{CONVERT_PORT}", rate_to, seconds, None))
            runs["500/s"].append(_measure(bench, pid, f"{mcp}:{CONVERT_PORT}", rate_to, seconds, 500.0))
        for load, items in runs.items():
            for item in items:
                if item["errors"]:
                    raise RuntimeError(f"workers={workers} {load}: {item['errors']} failed connections: {item}")
    best_rate = max(runs["saturating"], key=lambda m: m["per_s"])
    best_cpu = min(runs["500/s"], key=lambda m: m["cpu_us_per_conn"])
    return {"workers": workers, "placement": placement, "per_s": best_rate["per_s"],
            "saturating_cpu_us_per_conn": best_rate["cpu_us_per_conn"],
            "paced_cpu_us_per_conn": best_cpu["cpu_us_per_conn"],
            "p50_ms": best_rate["p50_ms"], "p99_ms": best_rate["p99_ms"]}


def render(results: list[dict[str, Any]], seconds: float, repeat: int, quick: bool) -> str:
    one = results[0]
    lines = [
        f"`{COMMAND}{' --quick' if quick else ''}` (also run by `make bench`). Convert through the proxy to a "
        f"TCP server, 64 connections in flight (saturating) and paced at 500/s, {seconds:g} s runs, best of "
        f"{repeat}; CPU is the proxy's whole process tree (supervisor and workers), user + system. "
        f"Taken on {os.cpu_count()} cores with the load generator on core {LOADGEN_CORE}: with 2 workers, "
        f"worker 1 shares core {LOADGEN_CORE} with the generator, so the 2-worker conn/s is a lower bound of a "
        "pod with two free cores; the CPU per connection is the fair comparison. On a machine shared with "
        "other work the rates are noisy, the CPU per connection much less so.",
        "",
        "| workers | cores (worker: core) | conn/s saturating | × 1 worker | proxy CPU µs/conn at 500/s "
        "| proxy CPU µs/conn saturating | projected conn/s, a free core per worker | p50 / p99 ms saturating |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        cores = ", ".join(f"{k}: {v}" for k, v in r["placement"].items())
        ratio = r["per_s"] / max(one["per_s"], 1)
        lines.append(f"| {r['workers']} | {cores} | {r['per_s']} | {ratio:.2f} | {r['paced_cpu_us_per_conn']:.0f} "
                     f"| {r['saturating_cpu_us_per_conn']:.0f} | {projected(r):.0f} | {r['p50_ms']} / {r['p99_ms']} |")
    lines += [
        "",
        "Projected: workers × 10⁶ / (CPU µs per connection, saturating), what the pod does when every worker "
        "saturates a core of its own (workers share nothing, so it scales with cores until the kernel or the "
        "upstream limits): a model from the measured CPU cost, not a measurement; the measured ratio above is "
        "below it here because the second worker shares its core with the load generator.",
    ]
    return "\n".join(lines) + "\n"


def projected(result: dict[str, Any]) -> float:
    return float(result["workers"] * 1e6 / max(result["saturating_cpu_us_per_conn"], 1e-9))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat (a smoke run)")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("workers_bench: needs root (network namespaces, taskset)", file=sys.stderr)
        return 1
    seconds, repeat = (2.0, 1) if args.quick else (5.0, 3)
    settings = BenchSettings.quick_settings(prefix="mwk", write_docs=False)
    bench = DataPlaneBench(settings)
    with_affinity = hasattr(os, "sched_setaffinity")
    if with_affinity:
        os.sched_setaffinity(0, {LOADGEN_CORE})
    raise_nofile()
    bench.lab.up()
    try:
        bench.prepare_namespaces()
        bench.start_server()
        results = []
        for workers in (1, 2):
            result = measure(bench, workers, seconds, repeat)
            print(result, flush=True)
            results.append(result)
    finally:
        bench.lab.down()
    body = render(results, seconds, repeat, args.quick)
    print(body)
    if not args.no_docs:
        replace_section("Worker processes per pod", BEGIN, END, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
