"""`mcpool admission install|remove --config FILE`: the kernel admission filter
(`kernel/admission.py`) installed or removed for a proxy configuration, outside the proxy.

In a pod, `install` runs as an init container: the one container given CAP_NET_ADMIN (all other
capabilities dropped), so that the long-running proxy keeps no more privilege than its pool's
mechanism needs (none for `mechanism: none`) and still has strangers' SYNs dropped in the kernel.
The table is created in the pod's network namespace, shared by every container of the pod and
freed by the kernel with the pod, so no `remove` is needed there. `install` then writes
`kernel.admission_status_file`, by which the proxy knows the filter is in place (it cannot list
nftables itself without CAP_NET_ADMIN) and that it must not remove it.

The proxy reads its configuration once, at start: a changed ConfigMap reaches a pod only when the
pod is replaced (the operator puts the ConfigMap's digest on the pod template, so any change
rolls the pods), and the new pod's init container installs the filter for the new configuration.

Exit status: 0 done, 1 nft refused (the reason on stderr), 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .kernel.admission import (
    config_ports,
    install_script,
    remove_admission,
    ruleset_for,
    write_status,
)

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool admission", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "remove"])
    parser.add_argument("--config", required=True, help="the proxy's YAML configuration file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="mcpool admission: %(message)s", stream=sys.stderr)
    kernel = config.kernel
    if not kernel.admission_filter:
        print("mcpool admission: kernel.admission_filter is false: nothing to do", file=sys.stderr)
        return 0
    if args.action == "remove":
        remove_admission(kernel.admission_table)
        return 0
    ports = config_ports(config)
    if not ports:
        print("mcpool admission: no explicit listener (listen.convert, listen.socks5): nothing to filter", file=sys.stderr)
        return 0
    if 0 in ports:
        print("mcpool admission: listen: port 0 is chosen by the kernel when the proxy binds; the filter "
              "needs the ports in the configuration", file=sys.stderr)  # fmt: skip
        return 2
    script = ruleset_for(config, ports)
    if not install_script(script):
        return 1
    if kernel.admission_status_file is not None:
        write_status(kernel.admission_status_file, kernel.admission_table, script)
    print(f"mcpool admission: table inet {kernel.admission_table} installed for ports "
          f"{', '.join(map(str, ports))}", file=sys.stderr)  # fmt: skip
    return 0
