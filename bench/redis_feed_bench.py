"""Redis load of the affinity table at 1k, 10k and 100k live connections, and a director's catch-up.

`.venv/bin/python -m bench.redis_feed_bench [--quick] [--points 1000,10000,100000]`. One
redis-server of its own (loopback, free port, no persistence). For each point, P simulated pods
are the real `RedisRegistry` (each registers its share of the live connections with the same Lua
script a pod runs at ESTABLISHED, then runs its real heartbeat), and D directors are the real
`Director` feed (`Director._feed`: subscribe, full read, pub/sub, periodic full read) without its
kernel side. Over a steady window, `INFO commandstats` (commands called inside Lua scripts
included) and the server's own CPU give commands/s and Redis CPU per second; a director's
catch-up is the time of one full read of the table (what it does after every reconnect).

Everything is real except the connections themselves: tokens are random 32-bit values and CPE
addresses unique per connection, written through the pods' own code paths. The machine may be
shared: Redis CPU per second is the figure to compare, commands/s the one to model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.cluster.registry import RedisRegistry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def info(client: Any) -> tuple[dict[str, int], float]:
    stats = await client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    cpu = await client.info("cpu")
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def point(url: str, live: int, pods: int, directors: int, window_s: float, ttl_s: float) -> dict[str, Any]:
    client = aioredis.from_url(url, decode_responses=True)
    await client.flushall()
    rng = random.Random(live)
    registries = [RedisRegistry(url, "bench", f"pod-{i}", f"198.18.{10 + i}.2", heartbeat_ttl_s=ttl_s,
                                op_timeout_s=5.0) for i in range(pods)]  # fmt: skip
    for reg in registries:
        await reg.start()
        await reg.register_pod("ready")
    tokens = rng.sample(range(1, 1 << 32), live)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(256)

    async def one(i: int, token: int) -> None:
        async with sem:
            cpe = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            await registries[i % pods].register_connection(token, cpe)

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    register_s = time.monotonic() - t0
    print(f"# {live} registered in {register_s:.1f}s", file=sys.stderr, flush=True)
    config = DirectorConfig(vip="198.19.255.1", ports=[5124], redis_url=url, pool="bench",
                            metrics_listen=None, redis_timeout_s=5.0)  # fmt: skip
    dirs = [Director(config) for _ in range(directors)]
    feeds = [asyncio.create_task(d._feed()) for d in dirs]
    deadline = time.monotonic() + 120
    while any(len(d.table.tokens) < live for d in dirs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"directors never loaded the table: {[len(d.table.tokens) for d in dirs]}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(ttl_s / 3)  # one heartbeat round in, so the window is steady state
    print(f"# {live}: directors loaded the table", file=sys.stderr, flush=True)
    calls0, cpu0 = await info(client)
    w0 = time.monotonic()
    await asyncio.sleep(window_s)
    calls1, cpu1 = await info(client)
    span = time.monotonic() - w0
    per_s = {k: (v - calls0.get(k, 0)) / span for k, v in calls1.items() if v - calls0.get(k, 0) > 0}
    # A director's catch-up after a reconnect: one full read of the table.
    probe = Director(config)
    redis = aioredis.from_url(url, decode_responses=True)
    print(f"# {live}: window done", file=sys.stderr, flush=True)
    c0 = time.monotonic()
    await probe._resync(redis)
    catch_up_s = time.monotonic() - c0
    assert len(probe.table.tokens) == live
    await redis.aclose()
    mem = (await client.info("memory"))["used_memory"]
    for task in feeds:
        task.cancel()
    for task in feeds:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    print(f"# {live}: catch-up {catch_up_s:.2f}s", file=sys.stderr, flush=True)
    for reg in registries:
        await reg.stop()
    await client.aclose()
    return {
        "live": live, "pods": pods, "directors": directors, "heartbeat_ttl_s": ttl_s,
        "register_s": register_s, "window_s": span,
        "commands_per_s": sum(per_s.values()), "by_command": dict(sorted(per_s.items(), key=lambda kv: -kv[1])),
        "redis_cpu_per_s": (cpu1 - cpu0) / span, "catch_up_s": catch_up_s, "used_memory": int(mem),
    }  # fmt: skip


async def run(url: str, points: list[int], pods: int, directors: int, window_s: float,
              ttl_s: float) -> list[dict[str, Any]]:  # fmt: skip
    client = aioredis.from_url(url)
    for _ in range(200):
        with contextlib.suppress(Exception):
            if await client.ping():
                break
        await asyncio.sleep(0.02)  # redis-server starting: nothing to await but its answer
    await client.aclose()
    results = []
    for live in points:
        result = await point(url, live, pods, directors, window_s, ttl_s)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redis_feed_bench", description=__doc__.splitlines()[0])
    p.add_argument("--points", default="1000,10000,100000")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--directors", type=int, default=2)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--ttl", type=float, default=10.0, help="the pods' heartbeat_ttl_s (default as configured)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp, "--protected-mode", "no"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            results = asyncio.run(run(f"redis://127.0.0.1:{port}/0", [int(x) for x in args.points.split(",")],
                                      args.pods, args.directors, args.window, args.ttl))  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=10)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
