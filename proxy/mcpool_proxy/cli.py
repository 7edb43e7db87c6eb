"""The `mcpool` command: one entry point that dispatches to each component's own `main(argv)`.

Each subcommand lives in the module that owns it and parses its own arguments, so this file
only maps names to modules (imported lazily, so `mcpool lab` does not import kopf).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("mcpool_proxy.server", "run the MPTCP concentrator proxy (--config FILE)"),
    "convert-client": ("mcpool_proxy.client", "open a connection through an RFC 8803 converter"),
    "lab": ("mcpool_proxy.lab", "build or remove the network-namespace lab topology"),
    "demo": ("mcpool_proxy.demo", "bond two links through the proxy and cut one mid-transfer"),
    "director": ("mcpool_proxy.affinity.director", "steer SYNs to the pod owning each connection (--config FILE)"),
    "operator": ("mcpool_operator.main", "run the kopf operator for MCPPool resources"),
    "check-config": ("mcpool_proxy.checkconfig", "validate a proxy configuration file"),
    "top": ("mcpool_proxy.top", "live connections and per-subflow rates of a proxy (admin API)"),
}


def _usage() -> str:
    lines = ["usage: mcpool COMMAND [ARGS...]", "", "commands:"]
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    lines.append("")
    lines.append("`mcpool COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"mcpool: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
