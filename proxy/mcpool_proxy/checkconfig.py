"""`mcpool check-config FILE`: validate a proxy configuration and print it with defaults filled in."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool check-config", description=__doc__)
    parser.add_argument("config", help="YAML configuration file")
    parser.add_argument("--quiet", action="store_true", help="print nothing when valid")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not args.quiet:
        print(config.to_yaml(), end="")
    return 0
