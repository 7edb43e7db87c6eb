"""`python -m mcpool_dashboards [--out DIR] [--check]`: write (or check) the dashboard JSON files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import DEFAULT_OUT, render_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcpool_dashboards", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("out of date (run python -m mcpool_dashboards): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
