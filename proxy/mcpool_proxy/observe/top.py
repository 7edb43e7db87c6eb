"""`mcpool top`: a terminal view of one proxy's live connections and their subflows, with rates.

For the engineer on the box (`kubectl exec POD -- mcpool top`): it reads the admin API's
`/connections` (loopback is trusted by default) twice, `--interval` apart, and shows per
connection its mode, client, destination, age and rates, and per subflow its addresses, RTT,
rates and the share of the connection's bytes it carries — the bonding, live. `--once` prints one
view and exits (scripts, tests); otherwise the view is redrawn every interval until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import split_hostport

__all__ = ["fetch", "main", "render"]

Snapshot = list[dict[str, Any]]


def fetch(admin: str, timeout_s: float = 5.0) -> tuple[Snapshot, dict[str, Any]]:
    """(/connections, /readyz) of the proxy at `admin` (HOST:PORT)."""
    host, port = split_hostport(admin)
    if host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    with urllib.request.urlopen(base + "/connections", timeout=timeout_s) as response:
        connections: Snapshot = json.loads(response.read())
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=timeout_s) as response:
            ready: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 while draining: the body still says why
        ready = json.loads(exc.read() or b"{}")
    return connections, ready


def _rate(now: int | None, before: int | None, seconds: float) -> float:
    if now is None or before is None or seconds <= 0:
        return 0.0
    return max(0, now - before) / seconds


def _bits(rate_bytes: float) -> str:
    value = rate_bytes * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if value < 1000 or unit == "Gbit/s":
            return f"{value:6.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    raise AssertionError("unreachable")


def render(before: Snapshot, after: Snapshot, seconds: float, ready: Mapping[str, Any] | None = None) -> str:
    """The view of `after`, with rates from the difference to `before` (`seconds` earlier)."""
    previous = {c["id"]: c for c in before}
    subflows_total = sum(len(c.get("subflows") or []) for c in after)
    state = ""
    if ready is not None:
        state = "draining" if ready.get("draining") else "ready" if ready.get("ready") else "not ready"
    lines = [f"mcpool top: {len(after)} connections, {subflows_total} subflows"
             + (f", {state}" if state else "") + f" (rates over {seconds:.1f} s)"]
    lines.append(f"{'ID':>6} {'MODE':<7} {'CLIENT':<28} {'DESTINATION':<28} {'AGE':>8} {'UP':>15} {'DOWN':>15}")
    for conn in sorted(after, key=lambda c: -(c.get("bytes_up", 0) + c.get("bytes_down", 0))):
        old = previous.get(conn["id"], {})
        up = _rate(conn.get("bytes_up"), old.get("bytes_up", conn.get("bytes_up")), seconds)
        down = _rate(conn.get("bytes_down"), old.get("bytes_down", conn.get("bytes_down")), seconds)
        transport = "mptcp" if conn.get("token") else "tcp"
        lines.append(f"{conn['id']:>6} {conn['mode']:<7} {conn['client']:<28} {conn['destination']:<28} "
                     f"{conn.get('age_s', 0):>7.1f}s {_bits(up):>15} {_bits(down):>15}  {transport}")
        old_subflows = {(s["local"], s["remote"]): s for s in old.get("subflows") or []}
        subflows = conn.get("subflows") or []
        total = sum((s.get("bytes_sent") or 0) + (s.get("bytes_received") or 0) for s in subflows) or 1
        for sf in subflows:
            was = old_subflows.get((sf["local"], sf["remote"]), {})
            rx = _rate(sf.get("bytes_received"), was.get("bytes_received", sf.get("bytes_received")), seconds)
            tx = _rate(sf.get("bytes_sent"), was.get("bytes_sent", sf.get("bytes_sent")), seconds)
            share = ((sf.get("bytes_sent") or 0) + (sf.get("bytes_received") or 0)) / total
            rtt = sf.get("rtt_us")
            rtt_text = f"{rtt / 1000:.1f} ms" if rtt is not None else "?"
            lines.append(f"{'':>6}   subflow {sf['remote']:<28} -> {sf['local']:<28} rtt {rtt_text:>9}  "
                         f"up {_bits(rx)}  down {_bits(tx)}  {share:5.0%} of "
                         f"{_bytes(total)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mcpool top", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--admin", default="127.0.0.1:9090", metavar="HOST:PORT",
                        help="the proxy's admin address (default 127.0.0.1:9090)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between samples")
    parser.add_argument("--once", action="store_true", help="print one view and exit")
    args = parser.parse_args(list(argv))
    if args.interval <= 0:
        parser.error("--interval must be positive")
    try:
        split_hostport(args.admin)
    except ValueError as exc:
        parser.error(f"--admin: {exc}")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        before, _ = fetch(args.admin)
        taken = time.monotonic()
        while True:
            time.sleep(args.interval)  # the sampling period itself, not a synchronisation
            after, ready = fetch(args.admin)
            now = time.monotonic()
            view = render(before, after, now - taken, ready)
            if args.once:
                print(view)
                return 0
            # Clear the screen and redraw at the top (ANSI), like top(1).
            sys.stdout.write("\x1b[H\x1b[2J" + view + "\n")
            sys.stdout.flush()
            before, taken = after, now
    except KeyboardInterrupt:
        return 0
    except urllib.error.HTTPError as exc:
        print(f"mcpool top: {args.admin}: HTTP {exc.code} (is this client in admin_trusted_clients?)",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mcpool top: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 1
