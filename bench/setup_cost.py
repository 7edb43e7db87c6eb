"""What one proxied connection costs the proxy: CPU µs per connection, for one or more source trees.

`python -m bench.setup_cost [--tree LABEL=PATH ...] [--haproxy] [--profile] [--workers N ...]`:
on a lab of its own (prefix `msc`) with the data-plane bench's load generator and pinning (proxy
on core 0, generator on core 1), each tree's proxy (run with PYTHONPATH=PATH/proxy, so another
checkout's code runs against the same generator in the same run) gets a paced run (500
connections/s: a load every path carries, so the CPU figure does not depend on who saturates)
and a saturating run (64 in flight). With `--haproxy`, HAProxy (tuned: splice both ways, 256 KiB
buffers) is measured the same way for reference; with `--profile`, py-spy samples the proxy
during a saturating run. One JSON line per measurement and a table at the end.

This is the profiling harness behind the connection-setup work (issue 12, point 3); `make bench`
(bench/dataplane.py) reports the same per-connection figure for every path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from mcpool_proxy.config import ProxyConfig

from bench.dataplane import (
    PORTS,
    BenchSettings,
    DataPlaneBench,
    proc_cpu_split,
    summarize_profile,
    tree_cpu_s,
)
from bench.loadgen import raise_nofile

__all__ = ["main"]

CONVERT_PORT = 5124


@contextlib.contextmanager
def _pythonpath(path: str | None) -> Iterator[None]:
    old = os.environ.get("PYTHONPATH")
    if path is not None:
        os.environ["PYTHONPATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _measure(bench: DataPlaneBench, pid: int, connect: str, convert_to: str | None, seconds: float,
             per_s: float | None) -> dict[str, Any]:
    args = ["rate", "--connect", connect, "--seconds", str(seconds), "--concurrency", os.environ.get("SC_CONC", "64")]
    if per_s is not None:
        args += ["--per-s", str(per_s)]
    if convert_to:
        args += ["--convert-to", convert_to]
    before = tree_cpu_s(pid)
    u0, _ = proc_cpu_split(pid)
    out = bench.loadgen("cpe", *args)
    after = tree_cpu_s(pid)
    u1, _ = proc_cpu_split(pid)
    conns = int(out["connections"])
    return {"connections": conns, "errors": out["errors"], "per_s": round(out["per_s"]),
            "cpu_us_per_conn": round((after - before) / max(conns, 1) * 1e6, 1),
            "user_share": round((u1 - u0) / max(after - before, 1e-9), 2),
            "p50_ms": out.get("latency_ms_p50"), "p99_ms": out.get("latency_ms_p99")}


def _only_set_keys(self: ProxyConfig) -> str:
    # Another checkout may not know this one's newer settings: write only what the bench sets.
    return str(yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_unset=True), sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_cost", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="a checkout whose proxy/ to run (default: this one)")
    parser.add_argument("--haproxy", action="store_true", help="also measure HAProxy, tuned")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy during a saturating run")
    parser.add_argument("--strace", action="store_true", help="count the proxy's syscalls per connection (strace -c)")
    parser.add_argument("--workers", action="append", type=int, default=[], help="proxy worker processes (repeatable)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mode", default="splice")
    parser.add_argument("--prefix", default="msc",
                        help="namespace/link name prefix (another run of this bench may use the default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a top-level proxy setting for every tree, e.g. event_loop=\"asyncio\"")
    args = parser.parse_args(argv)
    trees: list[tuple[str, str | None]] = [(t.split("=", 1)[0], str(Path(t.split("=", 1)[1]) / "proxy"))
                                           for t in args.tree] or [("this", None)]
    setattr(ProxyConfig, "to_yaml", _only_set_keys)  # noqa: B010 - patched for this run only
    bench = DataPlaneBench(BenchSettings.quick_settings(prefix=args.prefix, write_docs=False))
    rows: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})
    raise_nofile()  # HAProxy's maxconn is sized from this process's open-files limit
    bench.lab.up()
    try:
        bench.prepare_namespaces()
        bench.start_server()
        srv, mcp = bench.lab.srv_ip, bench.lab.mcp_ip
        rate_to = f"{srv}:{PORTS['rate_tcp']}"
        for label, path in trees:
            for workers in args.workers or [0]:
                extra: dict[str, Any] = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
                if workers:
                    extra["workers"] = workers
                with _pythonpath(path), bench.mcpool(args.mode, extra=extra) as proxy:
                    pid = proxy.proc.pid
                    name = label + (f" workers={workers}" if workers else "")
                    for i in range(args.repeat):
                        for per_s in (500.0, None):
                            m = _measure(bench, pid, f"{mcp}:{CONVERT_PORT}", rate_to, args.seconds, per_s)
                            row = {"path": name, "load": "500/s" if per_s else "saturating", "run": i, **m}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                    if args.profile:
                        _profile(bench, name, pid, f"{mcp}:{CONVERT_PORT}", rate_to)
                    if args.strace:
                        _strace(bench, name, pid, f"{mcp}:{CONVERT_PORT}", rate_to)
        if args.haproxy:
            for tuned in (True, False):
                with bench.haproxy(tuned=tuned) as pid:
                    for i in range(args.repeat):
                        for per_s in (500.0, None):
                            m = _measure(bench, pid, f"{mcp}:{bench.haproxy_rate_port}", None, args.seconds, per_s)
                            row = {"path": "haproxy " + ("tuned" if tuned else "untuned"),
                                   "load": "500/s" if per_s else "saturating", "run": i, **m}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    finally:
        bench.lab.down()
    print("\n| path | load | conn/s | proxy CPU µs/conn (best of runs) |\n|---|---|---|---|")
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["path"], row["load"])
        if key not in seen or row["cpu_us_per_conn"] < seen[key]["cpu_us_per_conn"]:
            seen[key] = row
    for (path_name, load), row in seen.items():
        print(f"| {path_name} | {load} | {row['per_s']} | {row['cpu_us_per_conn']} |")
    return 0


def _strace(bench: DataPlaneBench, label: str, pid: int, connect: str, convert_to: str | None) -> None:
    """Syscalls of the proxy per connection during a paced run of 1,000 connections."""
    assert bench.lab.workdir is not None
    out = bench.lab.workdir / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches asynchronously and says nothing when it has
    args = ["rate", "--connect", connect, "--seconds", "4", "--per-s", "250", "--concurrency", "16"]
    if convert_to:
        args += ["--convert-to", convert_to]
    result = bench.loadgen("cpe", *args)
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(10)
    conns = max(int(result["connections"]), 1)
    print(f"syscalls of {label} per connection ({conns} connections):", flush=True)
    total = 0.0
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            total += calls / conns
            if calls / conns >= 0.2:
                print(f"   {parts[-1]:<16} {calls / conns:6.2f}", flush=True)
    print(f"   {'total':<16} {total:6.2f}", flush=True)


def _profile(bench: DataPlaneBench, label: str, pid: int, connect: str, convert_to: str) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy not installed: no profile", flush=True)
        return
    assert bench.lab.workdir is not None
    raw = bench.lab.workdir / "profile.pyspy"
    rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", "4", "--rate", "500", "--format", "raw",
                            "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bench.loadgen("cpe", "rate", "--connect", connect, "--convert-to", convert_to, "--seconds", "3.5")
    rec.communicate(timeout=30)
    if raw.exists():
        print(f"profile of {label}:", flush=True)
        for line in summarize_profile(raw.read_text(), top=25):
            print("   " + line, flush=True)
        shutil.copy(raw, f"/tmp/setup-{label.replace(' ', '_')}.pyspy")


if __name__ == "__main__":
    sys.exit(main())
