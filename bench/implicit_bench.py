"""Implicit mode against explicit Convert on the same topology (issue 9): the laptop behind the
CPE converter downloads through the MCP on the DSL path, once with the CPE in implicit mode
(marked MPTCP to the destination, TPROXY at the MCP) and once in Convert mode (RFC 8803 to the
MCP's Convert listener, TFO). Unshaped links, so the figures are the converters' cost: bulk
throughput, the time from the laptop's connect to the first byte of a small reply, and the CPU
time of the MCP and CPE processes per connection and per gigabyte (/proc/PID/stat: steadier than
throughput on a busy machine; the kernel's share of forwarding and splicing is not in it).

`.venv/bin/python -m bench.implicit_bench [--quick] [--no-docs]` (run by `make bench`); writes
its section of docs/benchmarks.md. Every byte is checked against the server's pattern stream.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any

from mcpool_tools.lab import ImplicitLab, ProxyProcess
from mcpool_tools.testserver import pattern_sha256, recv_all_sha256

from bench.dataplane import proc_cpu_s
from bench.docs import replace_section

PORT = 8001
BEGIN = "<!-- implicit_bench:begin -->"
END = "<!-- implicit_bench:end -->"
COMMAND = ".venv/bin/python -m bench.implicit_bench"


def _download(lab: ImplicitLab, size: int, seed: int) -> float:
    with lab.in_netns("lap"):
        sock = socket.create_connection((lab.srv_ip, PORT), timeout=20)
    with sock:
        sock.settimeout(60)
        started = time.monotonic()
        sock.sendall(f"SEND {size} {seed}\n".encode())
        digest, count = recv_all_sha256(sock)
        elapsed = time.monotonic() - started
    if count != size or digest != pattern_sha256(seed, size):
        raise RuntimeError("downloaded content differs from the server's stream")
    return size * 8 / elapsed / 1e6


def _first_byte_ms(lab: ImplicitLab, seed: int) -> float:
    started = time.monotonic()
    with lab.in_netns("lap"):
        sock = socket.create_connection((lab.srv_ip, PORT), timeout=20)
    with sock:
        sock.settimeout(20)
        sock.sendall(f"SEND 1000 {seed}\n".encode())
        if not sock.recv(1):
            raise RuntimeError("no reply")
        return (time.monotonic() - started) * 1000


def measure(lab: ImplicitLab, mcp: ProxyProcess, mode: str, size: int, rounds: int, setups: int) -> dict[str, Any]:
    config = lab.cpe_config() if mode == "implicit" else lab.cpe_config(mode="convert", converter=f"{lab.mcp_ip}:5124")
    cpe = lab.start_cpe(config, name=f"cpe-{mode}")
    pids = {"mcp": mcp.proc.pid, "cpe": cpe.proc.pid}
    try:
        _download(lab, 1_000_000, 1)  # warm-up (and, in Convert mode, the TFO cookie)
        before = {k: proc_cpu_s(pid) for k, pid in pids.items()}
        mbit = [_download(lab, size, 2 + i) for i in range(rounds)]
        bulk = {k: proc_cpu_s(pid) - before[k] for k, pid in pids.items()}
        before = {k: proc_cpu_s(pid) for k, pid in pids.items()}
        setup = [_first_byte_ms(lab, 100 + i) for i in range(setups)]
        per_conn = {k: proc_cpu_s(pid) - before[k] for k, pid in pids.items()}
    finally:
        cpe.stop()
    gigabytes = size * rounds / 1e9
    return {"mode": mode, "mbit": max(mbit), "setup_ms": statistics.median(setup),
            **{f"{k}_s_per_gb": v / gigabytes for k, v in bulk.items()},
            **{f"{k}_us_per_conn": v / setups * 1e6 for k, v in per_conn.items()}}


def render(results: list[dict[str, Any]], size: int, rounds: int, setups: int, quick: bool) -> str:
    lines = [
        f"`{COMMAND}{' --quick' if quick else ''}` (also run by `make bench`; `--quick` for a smoke run). "
        f"Laptop -> CPE converter -> MCP on the DSL path -> server, unshaped veth links, best of {rounds} "
        f"downloads of {size / 1e6:.0f} MB (sha256 checked) and the median of {setups} connect-to-first-byte "
        "times; the MCP connects upstream over TCP. CPU: the MCP's and the CPE converter's processes "
        f"(user + system) over the downloads, per GB, and over the {setups} short connections, per "
        f"connection (resolution: one {1000 // os.sysconf('SC_CLK_TCK')} ms clock tick per phase). Taken on {os.cpu_count()} cores; on a machine shared with other work the "
        "throughput and latency figures are noisy, the CPU per unit of work much less so.",
        "",
        "| CPE mode | MCP path | download (Mbit/s) | connect to first byte (ms) | MCP CPU per connection (µs) "
        "| CPE CPU per connection (µs) | MCP CPU per GB (s) | CPE CPU per GB (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        path = "TPROXY, transparent front" if r["mode"] == "implicit" else "Convert listener (TFO)"
        lines.append(f"| {r['mode']} | {path} | {r['mbit']:.0f} | {r['setup_ms']:.2f} | {r['mcp_us_per_conn']:.0f} "
                     f"| {r['cpe_us_per_conn']:.0f} | {r['mcp_s_per_gb']:.2f} | {r['cpe_s_per_gb']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.implicit_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller downloads, fewer rounds")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("implicit_bench: needs root", file=sys.stderr)
        return 1
    size, rounds, setups = (50_000_000, 1, 10) if args.quick else (300_000_000, 3, 50)
    lab = ImplicitLab("mtb")
    with lab:
        lab.start_testserver(f"[::]:{PORT}", mptcp=True)
        mcp_config = lab.mcp_config()
        mcp_config["listen"]["convert"] = "[::]:5124"
        mcp = lab.start_proxy(mcp_config, name="mcp")
        try:
            results = [measure(lab, mcp, mode, size, rounds, setups) for mode in ("implicit", "convert")]
        finally:
            mcp.stop()
    body = render(results, size, rounds, setups, args.quick)
    print(body)
    if not args.no_docs:
        replace_section("Implicit mode against Convert", BEGIN, END, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
