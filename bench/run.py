"""`make bench`: the data-plane benchmark, then every other `bench/*_bench.py` that exists.

`.venv/bin/python -m bench.run [--quick] [--no-docs]`. The data plane comes first (bench/dataplane.py);
the other benchmarks (e.g. `bench/operator_bench.py`, owned by the operator's authors) are run as
`python -m bench.NAME` subprocesses, with `--quick` passed on only if their `--help` offers it.
Each writes its own section of docs/benchmarks.md. The exit status is non-zero if any part failed
or reported untrustworthy figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.dataplane import BenchSettings
from bench.dataplane import run as run_dataplane

BENCH_DIR = Path(__file__).resolve().parent


def other_benches() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*_bench.py"))


def run_module(name: str, quick: bool) -> int:
    argv = [sys.executable, "-m", f"bench.{name}"]
    if quick:
        helptext = subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=BENCH_DIR.parent).stdout
        if "--quick" in helptext:
            argv.append("--quick")
    print(f"\n== bench.{name}: {' '.join(argv[1:])}", flush=True)
    return subprocess.run(argv, cwd=BENCH_DIR.parent).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs and 1,000 idle connections (a smoke run)")
    parser.add_argument("--no-docs", action="store_true", help="print the figures, do not rewrite docs/benchmarks.md")
    parser.add_argument("--only", choices=["dataplane", *other_benches()], help="run just this part")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make bench: needs root (network namespaces, taskset of other processes)", file=sys.stderr)
        return 1
    # SIGTERM (e.g. `timeout`) must unwind like Ctrl-C, so the lab's namespaces and processes go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    status = 0
    if args.only in (None, "dataplane"):
        settings = (BenchSettings.quick_settings(write_docs=not args.no_docs) if args.quick
                    else BenchSettings(write_docs=not args.no_docs))
        status |= run_dataplane(settings)
    for name in other_benches():
        if args.only in (None, name):
            rc = run_module(name, args.quick)
            if rc != 0:
                print(f"bench.{name} exited with {rc}", file=sys.stderr)
                status |= 1
    return status


if __name__ == "__main__":
    sys.exit(main())
