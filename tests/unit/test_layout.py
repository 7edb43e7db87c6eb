"""The package layout keeps its promises: the product never imports the tools around it, and the
kernel is reached only through `mcpool_proxy.kernel`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PRODUCT = Path(__file__).resolve().parents[2] / "proxy" / "mcpool_proxy"


def test_importing_every_product_module_leaves_the_tools_unimported() -> None:
    script = (
        "import importlib, pkgutil, sys, mcpool_proxy\n"
        "for module in pkgutil.walk_packages(mcpool_proxy.__path__, 'mcpool_proxy.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'mcpool_tools'))\n"
        "print(len([name for name in sys.modules if name.startswith('mcpool_proxy.')]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    tools, imported = result.stdout.split("\n")[:2]
    assert tools == "[]"
    assert int(imported) > 30  # every module was imported, not just the package


# What only kernel/ may spell: raw netlink sockets, /proc/sys, nftables/iptables/ip commands and
# socket options.
_KERNEL_ONLY = re.compile(r"AF_NETLINK|/proc/sys|\[\"(nft|iptables|ip|ss)\"|\.setsockopt\(")


def test_kernel_interfaces_are_spelled_only_in_the_kernel_package() -> None:
    offenders = [
        f"{path.relative_to(PRODUCT)}:{number}: {line.strip()}"
        for path in sorted(PRODUCT.rglob("*.py"))
        if path.parent.name != "kernel"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _KERNEL_ONLY.search(line)
    ]
    assert offenders == []
