"""Operator benchmark: MCPPool creation to all children present, and reconcile CPU per pool.

Runs the real operator (`mcpool_operator.main.run`, in its own thread and event loop, as in the
flow tests) against the Kubernetes API emulator of tests/operator/ on loopback. Measures:

- sequential: one pool at a time, time from the POST of the MCPPool until its last child exists;
- burst: N pools created at once (N = 25 and 100), per-pool latency (p50/p95/max), the time
  until all are done, and the operator thread's CPU time divided by N (reconcile CPU per pool,
  kopf's own work included). Per-pool CPU that stays flat from 25 to 100 pools means no growth.

Run: `.venv/bin/python -m bench.operator_bench` (writes the "Operator" section of
docs/benchmarks.md; `--no-write` only prints).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

import kmock  # noqa: E402
from mcpool_operator.handlers import OperatorOptions  # noqa: E402
from mcpool_operator.kube import Connection  # noqa: E402
from mcpool_operator.main import run  # noqa: E402
from operator_emulator import ClusterEmulator  # noqa: E402

NAMESPACE = "bench"
SPEC = {"replicas": 3, "policy": {"allowedCpes": ["198.18.0.0/15"]}, "service": {"addresses": ["198.18.0.10"]}}
# What build_children makes for SPEC (PodDisruptionBudget is created last).
CHILDREN = (
    ("v1/serviceaccounts", "{}-mcp"),
    ("v1/configmaps", "{}-config"),
    ("v1/services", "{}-pods"),
    ("v1/services", "{}"),
    ("apps/v1/statefulsets", "{}"),
    ("policy/v1/poddisruptionbudgets", "{}"),
)


class OperatorThread:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        options = OperatorOptions(
            namespaces=(NAMESPACE,), liveness_endpoint=None, resync_interval_s=3600.0, worker_idle_timeout_s=1.0
        )
        self.loop.run_until_complete(
            run(options, connection=Connection(server=self.url), stop_flag=self.stop_flag, ready_flag=self.ready)
        )
        self.loop.close()

    async def cpu_seconds(self) -> float:
        """CPU time consumed by the operator's thread so far."""

        async def read() -> float:
            return time.thread_time()

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=10)

    async def start(self) -> None:
        self.thread.start()
        if not await asyncio.to_thread(self.ready.wait, 30):
            raise RuntimeError("operator did not start")

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 60)


def children_present(emulator: ClusterEmulator, name: str) -> bool:
    return all(emulator.get(res, NAMESPACE, pattern.format(name)) is not None for res, pattern in CHILDREN)


async def create_pool(session: aiohttp.ClientSession, url: str, name: str) -> None:
    body = {
        "apiVersion": "mcp.mptcp.dev/v1alpha1",
        "kind": "MCPPool",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": SPEC,
    }
    async with session.post(f"{url}/apis/mcp.mptcp.dev/v1alpha1/namespaces/{NAMESPACE}/mcppools", json=body) as resp:
        resp.raise_for_status()


async def wait_all(emulator: ClusterEmulator, started: dict[str, float], limit_s: float) -> dict[str, float]:
    done: dict[str, float] = {}
    deadline = time.monotonic() + limit_s
    while len(done) < len(started):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)} of {len(started)} pools complete after {limit_s}s")
        now = time.monotonic()
        for name in started:
            if name not in done and children_present(emulator, name):
                done[name] = now - started[name]
        await asyncio.sleep(0.005)
    return done


async def scenario(pools: int, sequential_pools: int) -> dict[str, Any]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "e", "cluster": {"server": url}}],
                        "users": [{"name": "u", "user": {"token": "bench"}}],
                        "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}],
                        "current-context": "e",
                    }
                )
            )
            os.environ["KUBECONFIG"] = str(kubeconfig)
            operator = OperatorThread(url)
            await operator.start()
            try:
                async with aiohttp.ClientSession() as session:
                    sequential: list[float] = []
                    for i in range(sequential_pools):
                        name = f"seq-{i}"
                        started = {name: time.monotonic()}
                        await create_pool(session, url, name)
                        sequential += (await wait_all(emulator, started, 30)).values()
                    await asyncio.sleep(0.5)  # let the status writes of the sequential pools settle
                    cpu0 = await operator.cpu_seconds()
                    wall0 = time.monotonic()
                    started = {}
                    for i in range(pools):
                        started[f"burst-{i}"] = time.monotonic()
                        await create_pool(session, url, f"burst-{i}")
                    done = await wait_all(emulator, started, 300)
                    wall = time.monotonic() - wall0
                    await asyncio.sleep(1.0)  # status writes that follow the last child
                    cpu = await operator.cpu_seconds() - cpu0
            finally:
                await operator.stop()
    latencies = sorted(done.values())
    return {
        "pools": pools,
        "sequential_median_s": statistics.median(sequential) if sequential else None,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, int(len(latencies) * 0.95) - 1)],
        "max_s": latencies[-1],
        "all_done_s": wall,
        "cpu_per_pool_ms": cpu / pools * 1000,
    }


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "## Operator",
        "",
        "`.venv/bin/python -m bench.operator_bench`: the real kopf operator against the API emulator",
        "(tests/operator/operator_emulator.py) over loopback HTTP, 2 cores. Each pool has 3 replicas and",
        "6 children (ServiceAccount, ConfigMap, 2 Services, StatefulSet, PodDisruptionBudget). Latency:",
        "from the MCPPool POST until its last child exists. CPU: the operator thread's CPU time during the",
        "burst divided by the number of pools (kopf's watch handling, the reconciles, status writes).",
        "",
        f"Sequential (one pool at a time, unloaded): median {results[0]['sequential_median_s'] * 1000:.0f} ms per pool.",
        "",
        "| pools created at once | p50 latency | p95 latency | max latency | all done | operator CPU per pool |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['pools']} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['max_s']:.2f} s | "
            f"{r['all_done_s']:.2f} s | {r['cpu_per_pool_ms']:.1f} ms |"
        )
    lines += [
        "",
        "Target (issue 5): < 2 s per pool end to end, no growth in per-pool cost with the number of pools.",
        f"Reading: a pool on its own is ready in {results[0]['sequential_median_s']:.2f} s and costs about "
        f"{results[-1]['cpu_per_pool_ms']:.0f} ms of operator CPU at every size (no growth); a burst is worked off at "
        f"{results[-1]['pools'] / results[-1]['all_done_s']:.1f} pools/s "
        f"({results[-1]['all_done_s'] / results[-1]['pools']:.2f} s per pool amortised), so the latency of the "
        "last pools of a burst is queueing. The operator and the emulator share one Python process "
        "(one GIL) on 2 cores here, so these are upper bounds for the operator alone.",
        "",
    ]
    return "\n".join(lines)


def write_section(section: str, path: Path) -> None:
    """Replace (or append) the '## Operator' section, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Operator"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    for n in args.pools:
        result = asyncio.run(scenario(n, sequential_pools=10 if not results else 0))
        print(result, flush=True)
        results.append(result)
    section = render(results)
    print(section)
    if not args.no_write:
        write_section(section, REPO / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
