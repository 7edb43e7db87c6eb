"""The `mcpool` command: one entry point that dispatches to each component's own `main(argv)`,
and `mcpool proxy` itself (`proxy_main`).

Each other subcommand lives in the module that owns it and parses its own arguments, so this file
only maps names to modules, imported lazily: `mcpool lab` does not import kopf, and the product
never imports the tools package (`mcpool_tools`: lab, demo) until one of its commands runs.

`mcpool proxy --config FILE` validates the configuration (one line per problem and exit status 2
if invalid), raises the open-files limit, then runs `server.run()`, which applies the kernel
settings of `config.kernel` in the proxy's network namespace, binds the listeners and the admin
server, and prints exactly `mcpool-proxy ready` on stdout. `--cleanup-only` instead removes what a
killed proxy of that configuration left in the network namespace (`server.cleanup_kernel`) and
exits; `--idle` then waits for SIGTERM (the operator's on-path node cleanup: a Ready pod means a
clean node).

With `workers` > 1 this process supervises that many worker processes instead (`workers.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import resource
import sys
from collections.abc import Callable
from typing import Any

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("mcpool_proxy.cli:proxy_main", "run the MPTCP concentrator proxy (--config FILE)"),
    "cpe": ("mcpool_proxy.cpe.converter", "run the CPE converter: the LAN's TCP as marked MPTCP (--config FILE)"),
    "convert-client": ("mcpool_proxy.cpe.convert_client", "open a connection through an RFC 8803 converter"),
    "lab": ("mcpool_tools.lab", "build or remove the network-namespace lab topology"),
    "demo": ("mcpool_tools.demo", "bond two links through the proxy and cut one mid-transfer"),
    "director": ("mcpool_proxy.cluster.director", "steer SYNs to the pod owning each connection (--config FILE)"),
    "operator": ("mcpool_operator.main", "run the kopf operator for MCPPool resources"),
    "admission": ("mcpool_proxy.admission_cli", "install or remove the kernel admission filter (pod init container)"),
    "check-config": ("mcpool_proxy.checkconfig", "validate a proxy configuration file"),
    "top": ("mcpool_proxy.observe.top", "live connections and per-subflow rates of a proxy (admin API)"),
}

# The proxy's logger: the open-files warning is one of the proxy's start-up lines.
log = logging.getLogger("mcpool.proxy")


def raise_open_files_limit(max_connections: int, max_pipes: int = 0) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it.

    Each relayed connection holds two sockets, and each splice pipe two more descriptors while
    bytes are in flight (at most `max_pipes` pipes: limits.pipe_budget_bytes / relay.buffer_bytes);
    the default soft limit of 1024 would cap a proxy at a few hundred connections, with the
    excess reset by the kernel instead of answered with Resource Exceeded.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    needed = 2 * max_connections + 2 * max_pipes + 256
    if soft < needed:
        log.warning(
            "open-files limit %d is below the %d that policy.max_connections=%d and %d splice pipes need; "
            "connections beyond it are refused by the kernel: raise the limit or lower max_connections",
            soft, needed, max_connections, max_pipes,
        )
    return soft


def with_transparent_address(config: Any, address: str) -> Any:
    """`config` with `address` as the host of its transparent listener of that family (the
    other family's is dropped) and of its join address; ConfigError if `address` is no IP."""
    import ipaddress

    from .config import ConfigError, parse_config, split_hostport

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"--transparent-address: {address!r} is not an IP address") from None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    data = config.model_dump(mode="json")
    ports = [split_hostport(a)[1] for a in config.listen.transparent]
    if not ports:
        raise ConfigError("--transparent-address: the configuration has no listen.transparent")
    data["listen"]["transparent"] = [f"{host}:{ports[0]}"]
    join = config.transparent.join_address
    if join is not None:
        data["transparent"]["join_address"] = f"{host}:{split_hostport(join)[1]}"
    return parse_config(data, "--transparent-address")


def proxy_main(argv: list[str]) -> int:
    """`mcpool proxy`: run the proxy until SIGTERM/SIGINT; the process's exit status."""
    from .config import ConfigError, load_config
    from .observe.logs import configure_logging
    from .server import READY_LINE, run

    parser = argparse.ArgumentParser(prog="mcpool proxy", description="Run the MPTCP concentrator proxy.")
    parser.add_argument("--config", required=True, help="YAML configuration file (see config.py)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")
    parser.add_argument("--transparent-address", metavar="IP",
                        help="implicit mode: the host of listen.transparent (its family's entry) and of "
                        "transparent.join_address, e.g. the node's address in an on-path DaemonSet")
    parser.add_argument("--cleanup-only", action="store_true",
                        help="remove the kernel objects a killed proxy of this configuration left "
                        "(implicit mode's nft table, ip rules and routes, join endpoint; the admission "
                        "filter) and exit")
    parser.add_argument("--idle", action="store_true",
                        help="do nothing until SIGTERM, after --cleanup-only if given (the operator's on-path "
                        "node cleanup DaemonSet runs --cleanup-only in an init container, then this: a Ready "
                        "pod means its node is clean)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.transparent_address:
            config = with_transparent_address(config, args.transparent_address)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(args.log_level or config.log_level)
    if args.cleanup_only or args.idle:
        return _cleanup_and_idle(config, cleanup=args.cleanup_only, idle=args.idle)
    raise_open_files_limit(
        config.policy.max_connections, config.limits.pipe_budget_bytes // config.relay.buffer_bytes
    )

    def announce() -> None:
        print(READY_LINE, flush=True)

    try:
        factory, loop_name = loop_factory(config.event_loop)
    except ImportError as exc:
        print(f"event_loop: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("mcpool.proxy").debug("event loop: %s", loop_name)
    if config.workers > 1:
        # N worker processes on one SO_REUSEPORT listener group, this process their supervisor.
        from .workers import run_supervisor

        with asyncio.Runner() as runner:
            return runner.run(run_supervisor(config, ready=announce))
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(config, ready=announce))


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop for the `event_loop` setting: (factory or None for asyncio's, its name).

    `auto` takes uvloop when it can be imported and asyncio's loop otherwise; `uvloop` insists
    (ImportError if the package is missing)."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ImportError("uvloop asked for, but the uvloop package is not installed (pip install uvloop)") from None
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def _cleanup_and_idle(config: Any, *, cleanup: bool, idle: bool) -> int:
    import signal

    from .server import cleanup_kernel

    if cleanup:
        try:
            removed = cleanup_kernel(config)
        except (RuntimeError, OSError) as exc:
            log.error("cleanup failed: %s", exc)
            return 1
        log.info("cleanup done", extra={"fields": {"removed": removed}})
    if idle:
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        log.info("idle until SIGTERM")
        signal.sigwait(stop)
    return 0


def _usage() -> str:
    lines = ["usage: mcpool COMMAND [ARGS...]", "", "commands:"]
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<15} {text}")
    lines.append("")
    lines.append("`mcpool COMMAND --help` for a command's options.")
    return "\n".join(lines)


def _entry(target: str) -> Callable[[list[str]], int]:
    """"module" (its `main`) or "module:function"."""
    module_name, _, function = target.partition(":")
    entry: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function or "main")
    return entry


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"mcpool: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _entry(SUBCOMMANDS[name][0])(rest)


if __name__ == "__main__":
    sys.exit(main())
