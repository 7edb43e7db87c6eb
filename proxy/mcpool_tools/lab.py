"""The network-namespace lab: a CPE with two access links, a router, MCP pod(s) and a server.

Part of the product (`mcpool lab up|down|status`), and the topology the demo, the integration
tests and the benchmark run on. It builds, on the real kernel:

```
  {p}-cpe  dsl 198.18.1.2 ----- dsl 198.18.1.1 \\                 / eth0 198.18.100.2  {p}-mcp
           lte 198.18.2.2 ----- lte 198.18.2.1  {p}-rtr  pod0 ...                     ({p}-mcp1 ... for pods 1..N-1)
                                                 \\ srv 198.18.200.1 --- eth0 198.18.200.2 {p}-srv
```

(plus 2001:db8:<subnet>::/64 IPv6 on every link). The CPE routes by source address (one policy
rule and one table per access link), so a subflow bound to the LTE address leaves on LTE; its
default route is DSL; every access address is an MPTCP `subflow` endpoint. Namespaces that
terminate MPTCP (cpe, pods, srv) get `net.mptcp.checksum_enabled=1` (README.md "Kernel facts": without it this
kernel occasionally corrupts two-subflow streams).

Everything is done with `ip`/`tc`/`sysctl` subprocesses rather than pyroute2: the commands are
the ones a person would type to reproduce or debug the lab, errors come back as iproute2's own
messages, and iproute2 6.1 already knows every MPTCP endpoint flag the lab needs.

The lab never touches namespaces it did not name: all of them are `{prefix}-{role}`, and `down()`
deletes only names matching that pattern (so concurrent labs with other prefixes are safe).

Code running in the test/demo process can open sockets inside a lab namespace with
`with lab.in_netns("cpe"): sock = ...`: network namespaces are per thread in Linux, and a socket
stays in the namespace it was created in after the thread switches back.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from mcpool_proxy.config import ProxyConfig, parse_config, split_hostport

__all__ = [
    "ImplicitLab",
    "Lab",
    "LabError",
    "LinkShaping",
    "Pod",
    "ProxyProcess",
    "Topology",
    "in_netns",
    "main",
]

CLONE_NEWNET = 0x40000000
REDIS_PORT = 6379  # in the director namespace (its own port space)
DIRECTOR_METRICS_PORT = 9091
READY_LINE = "mcpool-proxy ready"
# Roles whose namespaces a lab may own; `down()` deletes only `{prefix}-{role}` of these.
_ROLE_PATTERN = r"(cpe|rtr|srv|dir|mcp\d*|lap|phn)"


class LabError(RuntimeError):
    """A lab step failed; the message carries the command and its stderr."""


@dataclass(frozen=True)
class LinkShaping:
    """Egress shaping applied at both ends of an access link (tc netem), so each direction is
    limited the same way: a rate in Mbit/s and a one-way delay in milliseconds."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0
    # netem's default (1000 packets) is far above the BDP of these links; keep it explicit.
    limit_packets: int = 1000

    @classmethod
    def parse(cls, text: str) -> LinkShaping:
        """Parse '40mbit,10ms' / '20mbit' / '5ms'."""
        rate: float | None = None
        delay = 0.0
        for part in filter(None, (p.strip().lower() for p in text.split(","))):
            if part.endswith("mbit"):
                rate = float(part[:-4])
            elif part.endswith("ms"):
                delay = float(part[:-2])
            else:
                raise ValueError(f"{part!r}: expected e.g. '40mbit' or '10ms'")
        return cls(rate_mbit=rate, delay_ms=delay)


@dataclass(frozen=True)
class Topology:
    """What to build. `pods` MCP namespaces hang off the router (pod 0 is `{prefix}-mcp`, the
    others `{prefix}-mcp1`...), so a director and several pods (issue 4) reuse the same plan."""

    prefix: str = "mcl"
    access_links: tuple[str, ...] = ("dsl", "lte")
    pods: int = 1
    shaping: Mapping[str, LinkShaping] = field(default_factory=dict)
    cpe_fastopen: int = 3  # client cookies (0x1) + server bit, as the CPE may also be probed
    cpe_mptcp_subflows: int = 2
    pod_mptcp_subflows: int = 8
    # Issue 4: a `{prefix}-dir` namespace holding the pool's VIP, redis-server and the director,
    # with every pod ready to receive the director's VXLAN (VIP on lo, direct server return).
    director: bool = False
    # IPv4 or IPv6 (issue 13: e.g. VIP6 = "2001:db8:255::1"); the router routes it to the director.
    vip: str = "198.19.255.1"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 1-8 lowercase letters/digits, starting with a letter")
        if not 1 <= len(self.access_links) <= 8:
            raise ValueError("between 1 and 8 access links")
        if not 1 <= self.pods <= 50:
            raise ValueError("between 1 and 50 pods")
        for name in self.shaping:
            if name not in self.access_links:
                raise ValueError(f"shaping for unknown access link {name!r}")
        try:
            ipaddress.ip_address(self.vip)
        except ValueError:
            raise ValueError(f"vip {self.vip!r}: not an IPv4 or IPv6 address") from None

    @property
    def vip_is_ipv6(self) -> bool:
        return ipaddress.ip_address(self.vip).version == 6


@dataclass(frozen=True)
class AccessLink:
    """One CPE access link: `name` in both cpe and rtr; CPE side .2/::2, router side .1/::1."""

    name: str
    index: int
    cpe_ip: str
    cpe_ip6: str
    rtr_ip: str
    rtr_ip6: str
    table: int


@dataclass(frozen=True)
class Pod:
    """One MCP namespace: interface `eth0` towards the router's `pod{index}`."""

    index: int
    ns: str
    ip: str
    ip6: str
    rtr_ip: str
    rtr_ip6: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists only from Python 3.12.
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the *calling thread* in network namespace `name` (/run/netns/NAME).

    Sockets created inside stay in that namespace afterwards; other threads are unaffected.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)


class ProxyProcess:
    """A running `mcpool proxy` in a lab namespace, with its admin API reachable from here."""

    def __init__(self, lab: Lab, ns: str, proc: subprocess.Popen[str], config: ProxyConfig,
                 config_path: Path, stderr_path: Path) -> None:
        self.lab = lab
        self.ns = ns
        self.proc = proc
        self.config = config
        self.config_path = config_path
        self.stderr_path = stderr_path
        self.stdout_lines: collections.deque[str] = collections.deque(maxlen=1000)
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        # Keep draining after "ready" so a chatty proxy never blocks on a full pipe.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if READY_LINE in line:
                self._ready.set()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(1)
                raise LabError(
                    f"mcpool proxy exited with {self.proc.returncode} before '{READY_LINE}':\n"
                    f"stdout: {list(self.stdout_lines)}\nstderr:\n{self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"mcpool proxy not ready after {timeout_s}s:\nstdout: {list(self.stdout_lines)}\n"
                    f"stderr:\n{self.stderr_text()}"
                )

    def admin_get(self, path: str, timeout_s: float = 5.0) -> Any:
        """GET an admin path from inside the proxy's namespace; JSON bodies are decoded."""
        status, body = self.admin_request("GET", path, timeout_s=timeout_s)
        if status != 200:
            raise LabError(f"admin GET {path}: HTTP {status}: {body[:200]!r}")
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def admin_request(self, method: str, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        if self.config.admin is None:
            raise LabError("this proxy's configuration disables the admin server")
        host, port = split_hostport(self.config.admin)
        if host in ("::", "0.0.0.0"):
            host = "127.0.0.1"
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        with in_netns(self.ns):
            conn.connect()
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def connections(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.admin_get("/connections")
        return result

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        return self.proc.returncode


class Lab:
    """Builds and tears down one topology. Use as a context manager: teardown always runs."""

    def __init__(self, topology: Topology | None = None, **kwargs: Any) -> None:
        self.topology = topology if topology is not None else Topology(**kwargs)
        t = self.topology
        self.prefix = t.prefix
        self.links: dict[str, AccessLink] = {}
        for i, name in enumerate(t.access_links):
            net = i + 1
            self.links[name] = AccessLink(
                name=name, index=i,
                cpe_ip=f"198.18.{net}.2", cpe_ip6=f"2001:db8:{net}::2",
                rtr_ip=f"198.18.{net}.1", rtr_ip6=f"2001:db8:{net}::1",
                table=100 + i,
            )
        self.pods: list[Pod] = [
            Pod(index=j, ns=self.ns("mcp" if j == 0 else f"mcp{j}"),
                ip=f"198.18.{100 + j}.2", ip6=f"2001:db8:{100 + j}::2",
                rtr_ip=f"198.18.{100 + j}.1", rtr_ip6=f"2001:db8:{100 + j}::1")
            for j in range(t.pods)
        ]
        self.srv_ip = "198.18.200.2"
        self.srv_ip6 = "2001:db8:200::2"
        # Routed by nobody: the router answers ICMP net-unreachable for it.
        self.unreachable_ip = "198.18.250.1"
        self.dir_ip = "198.18.99.2"
        self.dir_ip6 = "2001:db8:99::2"
        self.redis: subprocess.Popen[Any] | None = None
        self.director: subprocess.Popen[str] | None = None
        self.workdir: Path | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._proxies: list[ProxyProcess] = []
        self._built = False
        self.warnings: list[str] = []

    # ---- names and addresses -------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Full namespace name of a role ('cpe', 'rtr', 'srv', 'mcp', 'mcp1'...); full names pass."""
        return role if role.startswith(self.prefix + "-") else f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        extra = [self.ns("dir")] if self.topology.director else []
        return [self.ns("cpe"), self.ns("rtr"), self.ns("srv"), *(p.ns for p in self.pods), *extra]

    @property
    def cpe_dsl_ip(self) -> str:
        return self.links["dsl"].cpe_ip

    @property
    def cpe_lte_ip(self) -> str:
        return self.links["lte"].cpe_ip

    @property
    def cpe_dsl_ip6(self) -> str:
        return self.links["dsl"].cpe_ip6

    @property
    def cpe_lte_ip6(self) -> str:
        return self.links["lte"].cpe_ip6

    @property
    def cpe_prefixes(self) -> list[str]:
        """CIDRs of every CPE access address (IPv4 and IPv6): what `policy.allowed_cpes` needs."""
        nets: list[str] = []
        for link in self.links.values():
            nets.append(link.cpe_ip.rsplit(".", 1)[0] + ".0/24")
            nets.append(link.cpe_ip6.rsplit("::", 1)[0] + "::/64")
        return nets

    @property
    def mcp_ip(self) -> str:
        return self.pods[0].ip

    @property
    def mcp_ip6(self) -> str:
        return self.pods[0].ip6

    # ---- running things --------------------------------------------------------------------

    def _run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def exec(self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
             **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in a lab namespace; text output captured."""
        kwargs.setdefault("capture_output", True)
        proc = subprocess.run(["ip", "netns", "exec", self.ns(ns), *argv], text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise LabError(f"[{self.ns(ns)}] `{' '.join(argv)}` failed ({proc.returncode}): "
                           f"{(proc.stderr or '').strip()}")
        return proc

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in a lab namespace; `down()` kills it if it is still running."""
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
        env.setdefault("PYTHONUNBUFFERED", "1")
        kwargs["env"] = env
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def python_argv(self, module: str, *args: str) -> list[str]:
        """argv running `python -m module args` with this interpreter (the project's venv)."""
        return [sys.executable, "-m", module, *args]

    def in_netns(self, role: str) -> contextlib.AbstractContextManager[None]:
        """Switch the calling thread into a lab namespace (see the module docstring)."""
        return in_netns(self.ns(role))

    def sysctl(self, ns: str, settings: Mapping[str, str | int]) -> None:
        argv = ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
        self.exec(ns, argv)

    # ---- building ----------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the topology (after removing leftovers of the same prefix)."""
        self.down()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mcpool-{self.prefix}-"))
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._built = True
        return self

    def _ip(self, ns: str, *args: str) -> None:
        self._run(["ip", "-n", self.ns(ns), *args])

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        # Created directly inside the namespaces: no transient names in the root namespace that
        # could collide with another engineer's lab.
        self._ip(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b,
                 "netns", self.ns(ns_b))

    def _addr(self, ns: str, dev: str, ip4: str, ip6: str) -> None:
        self._ip(ns, "addr", "add", f"{ip4}/24", "dev", dev)
        self._ip(ns, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
        self._ip(ns, "link", "set", dev, "up")

    def _build(self) -> None:
        t = self.topology
        for ns in self.namespaces:
            self._run(["ip", "netns", "add", ns])
            self._ip(ns, "link", "set", "lo", "up")
            base: dict[str, str | int] = {
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv6.conf.all.accept_dad": 0,
                "net.ipv6.conf.default.accept_dad": 0,
                # cut_link() sets a device down; IPv6 addresses must survive that.
                "net.ipv6.conf.all.keep_addr_on_down": 1,
                "net.ipv6.conf.default.keep_addr_on_down": 1,
            }
            if ns != self.ns("rtr"):
                base.update({"net.mptcp.enabled": 1, "net.mptcp.checksum_enabled": 1})
            self.sysctl(ns, base)
        self.sysctl("rtr", {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        self.sysctl("cpe", {"net.ipv4.tcp_fastopen": t.cpe_fastopen})

        for link in self.links.values():
            self._veth("cpe", link.name, "rtr", link.name)
            self._addr("cpe", link.name, link.cpe_ip, link.cpe_ip6)
            self._addr("rtr", link.name, link.rtr_ip, link.rtr_ip6)
            # Source routing: traffic from this link's address leaves on this link.
            for fam, src, gw in (("-4", link.cpe_ip, link.rtr_ip), ("-6", link.cpe_ip6, link.rtr_ip6)):
                self._ip("cpe", fam, "rule", "add", "from", src, "table", str(link.table),
                         "pref", str(1000 + link.index))
                self._ip("cpe", fam, "route", "add", "default", "via", gw, "dev", link.name,
                         "table", str(link.table))
        first = next(iter(self.links.values()))
        self._ip("cpe", "route", "add", "default", "via", first.rtr_ip, "dev", first.name)
        self._ip("cpe", "-6", "route", "add", "default", "via", first.rtr_ip6, "dev", first.name)
        self._ip("cpe", "mptcp", "limits", "set", "subflows", str(t.cpe_mptcp_subflows),
                 "add_addr_accepted", str(t.cpe_mptcp_subflows))
        # Every access address is a subflow endpoint; the kernel skips the one the initial
        # subflow already uses, so a connection started on either link joins the other.
        for link in self.links.values():
            for addr in (link.cpe_ip, link.cpe_ip6):
                self._ip("cpe", "mptcp", "endpoint", "add", addr, "dev", link.name, "subflow")

        for pod in self.pods:
            rtr_dev = f"pod{pod.index}"
            self._veth(pod.ns, "eth0", "rtr", rtr_dev)
            self._addr(pod.ns, "eth0", pod.ip, pod.ip6)
            self._addr("rtr", rtr_dev, pod.rtr_ip, pod.rtr_ip6)
            self._ip(pod.ns, "route", "add", "default", "via", pod.rtr_ip)
            self._ip(pod.ns, "-6", "route", "add", "default", "via", pod.rtr_ip6)
            self._ip(pod.ns, "mptcp", "limits", "set", "subflows", str(t.pod_mptcp_subflows),
                     "add_addr_accepted", str(t.pod_mptcp_subflows))

        self._veth("srv", "eth0", "rtr", "srv")
        self._addr("srv", "eth0", self.srv_ip, self.srv_ip6)
        self._addr("rtr", "srv", "198.18.200.1", "2001:db8:200::1")
        self._ip("srv", "route", "add", "default", "via", "198.18.200.1")
        self._ip("srv", "-6", "route", "add", "default", "via", "2001:db8:200::1")
        self._ip("srv", "mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
        if t.director:
            self._build_director()

        for name, shaping in t.shaping.items():
            self.shape(name, shaping)
        self._wait_carrier(self.namespaces)

    # ---- the cluster: director namespace, Redis, director process (issue 4) ---------------

    def _build_director(self) -> None:
        """`{prefix}-dir` hangs off the router, which routes the VIP to it. The director
        encapsulates each steered packet (VXLAN) to a pod's address; the pod holds the VIP on
        lo and answers the CPE directly through the router (direct server return), so nothing
        returns through `dir`. Links carrying the tunnel get MTU 1600: a full 1500-byte packet
        from the CPE plus 50 bytes of VXLAN must fit without fragmentation."""
        from mcpool_proxy.kernel.steering import VXLAN_OVERHEAD

        mtu = str(1500 + VXLAN_OVERHEAD + 50)
        self._veth("dir", "eth0", "rtr", "dir")
        self._addr("dir", "eth0", self.dir_ip, self.dir_ip6)
        self._addr("rtr", "dir", "198.18.99.1", "2001:db8:99::1")
        for ns, dev in (("dir", "eth0"), ("rtr", "dir")):
            self._ip(ns, "link", "set", dev, "mtu", mtu)
        self._ip("dir", "route", "add", "default", "via", "198.18.99.1")
        # An IPv6 VIP's tunnels may run over IPv6 too (pods advertising their IPv6 address).
        self._ip("dir", "-6", "route", "add", "default", "via", "2001:db8:99::1")
        if self.topology.vip_is_ipv6:
            self._ip("rtr", "-6", "route", "add", f"{self.vip}/128", "via", self.dir_ip6)
        else:
            self._ip("rtr", "route", "add", f"{self.vip}/32", "via", self.dir_ip)
        for pod in self.pods:
            for ns, dev in ((pod.ns, "eth0"), ("rtr", f"pod{pod.index}")):
                self._ip(ns, "link", "set", dev, "mtu", mtu)
            # The same function a pod's init container runs (kernel.steering), in the pod's netns.
            self.exec(pod.ns, [sys.executable, "-c",
                               "import sys; from mcpool_proxy.kernel import steering; "
                               "from mcpool_proxy.cluster.director import DirectorConfig as C; "
                               "steering.setup_pod_receive(sys.argv[1], C.model_fields['vxlan_port'].default, "
                               "C.model_fields['pod_mac'].default)",
                               self.vip])

    @property
    def vip(self) -> str:
        return self.topology.vip

    @property
    def cpe_addrs(self) -> tuple[str, str]:
        """The CPE's (DSL, LTE) addresses of the VIP's family: where its subflows to the VIP come from."""
        if self.topology.vip_is_ipv6:
            return self.cpe_dsl_ip6, self.cpe_lte_ip6
        return self.cpe_dsl_ip, self.cpe_lte_ip

    @property
    def srv_addr(self) -> str:
        """The server's address of the VIP's family."""
        return self.srv_ip6 if self.topology.vip_is_ipv6 else self.srv_ip

    def pod_addr(self, pod: int) -> str:
        """Pod `pod`'s address of the VIP's family (what it advertises to the director by default)."""
        return self.pods[pod].ip6 if self.topology.vip_is_ipv6 else self.pods[pod].ip

    def route_replies_via_director(self, enabled: bool = True) -> None:
        """Route the pods' packets to the CPE's access prefixes through `dir` (a policy rule per
        pod link in the router), or stop doing so. `forward: dnat` needs it: the director's
        conntrack must see the replies to turn the pod's address back into the VIP."""
        table = "250"
        nets = [(("-6" if ":" in net else "-4"), net) for net in self.cpe_prefixes]
        for fam, net in nets:
            for pod in self.pods:
                argv = ["ip", "-n", self.ns("rtr"), fam, "rule", "del", "iif", f"pod{pod.index}", "to", net,
                        "lookup", table, "pref", "900"]
                while self._run(argv, check=False).returncode == 0:
                    pass  # also removes duplicates left by a crashed run
        for fam in ("-4", "-6"):
            self._run(["ip", "-n", self.ns("rtr"), fam, "route", "flush", "table", table], check=False)
        if not enabled:
            return
        self._ip("rtr", "route", "replace", "default", "via", self.dir_ip, "table", table)
        self._ip("rtr", "-6", "route", "replace", "default", "via", self.dir_ip6, "table", table)
        for fam, net in nets:
            for pod in self.pods:
                self._ip("rtr", fam, "rule", "add", "iif", f"pod{pod.index}", "to", net, "lookup", table,
                         "pref", "900")

    @property
    def redis_url(self) -> str:
        """The pool's Redis as the pods (and the director) reach it."""
        return f"redis://{self.dir_ip}:{REDIS_PORT}/0"

    def start_redis(self, ready_timeout_s: float = 10.0) -> subprocess.Popen[Any]:
        """redis-server in `dir` (persistence off); a test may kill it and start it again."""
        if self.workdir is None:
            raise LabError("lab is not up")
        if self.redis is not None and self.redis.poll() is None:
            return self.redis
        self.redis = self.popen("dir", ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0",
                                        "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                                        "--protected-mode", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + ready_timeout_s
        while self.redis_cli("ping", check=False).strip() != "PONG":
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise LabError("redis-server in the director namespace did not answer PING")
            time.sleep(0.02)  # no readiness event from redis-server: poll its PING
        return self.redis

    def kill_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(10)
        self.redis = None

    def redis_cli(self, *args: str, check: bool = True) -> str:
        return self.exec("dir", ["redis-cli", "-p", str(REDIS_PORT), *args], check=check).stdout

    def director_config(self, **overrides: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "vip": self.vip, "ports": [5124, 1080], "redis_url": f"redis://127.0.0.1:{REDIS_PORT}/0",
            "pool": "lab", "join_wait_ms": 1000, "tunnel_mtu": 1500, "resync_interval_s": 1.0,
            "metrics_listen": f"127.0.0.1:{DIRECTOR_METRICS_PORT}",
        }  # fmt: skip
        config.update(overrides)
        return config

    def start_director(self, ready_timeout_s: float = 20.0, **overrides: Any) -> subprocess.Popen[str]:
        """`mcpool director` in `dir` (config: `director_config(**overrides)`); waits for ready."""
        if self.workdir is None:
            raise LabError("lab is not up")
        path = self.workdir / "director.yaml"
        path.write_text(yaml.safe_dump(self.director_config(**overrides)))
        stderr = open(self.workdir / "director.stderr", "w")  # noqa: SIM115 - the child owns it
        proc = self.popen("dir", self.python_argv("mcpool_proxy.cli", "director", "--config", str(path),
                                                  "--cleanup"),
                          stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        stderr.close()
        self.director = proc
        return _wait_for_line(proc, "director ready", ready_timeout_s)

    def director_metrics(self) -> dict[str, float]:
        """The director's Prometheus samples: 'name{labels}' -> value."""
        with self.in_netns("dir"):
            conn = http.client.HTTPConnection("127.0.0.1", DIRECTOR_METRICS_PORT, timeout=5)
            conn.connect()
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = float(value)
        return samples

    def director_counters(self) -> dict[str, tuple[int, int]]:
        """The director's nft counters (name -> packets, bytes): only SYNs are queued."""
        out = self.exec("dir", ["nft", "list", "counters", "table", "inet", "mcpool_director"]).stdout
        return {name: (int(p), int(b))
                for name, p, b in re.findall(r"counter (\w+) \{\s*packets (\d+) bytes (\d+)", out)}

    def affinity_config(self, pod: int, name: str, mechanism: str = "director", **overrides: Any) -> dict[str, Any]:
        """`affinity` section for the proxy in pod `pod`, registered as `name`."""
        config: dict[str, Any] = {
            "mechanism": mechanism, "backend": "redis", "redis_url": self.redis_url, "pool": "lab",
            "pod_name": name, "advertise": self.pod_addr(pod), "heartbeat_ttl_s": 3.0,
        }  # fmt: skip
        if mechanism == "join-address":
            config["join_address"] = f"{self.pods[pod].ip}:5124"
        config.update(overrides)
        return config

    def cluster_pod_names(self) -> tuple[str, ...]:
        """Registry names for the pods such that the CPE's DSL and LTE addresses (of the VIP's
        family) hash to different pods: a join could then reach its connection's pod only by token
        steering (or the join address), never by luck, and connections started on each link use both."""
        from mcpool_proxy.cluster.hashing import initial_pick

        dsl, lte = self.cpe_addrs
        for i in range(1000):
            names = tuple(f"pod{j}-{i}" for j in range(len(self.pods)))
            if initial_pick(names, dsl, "lab") != initial_pick(names, lte, "lab"):
                return names
        raise LabError("no pod names split the CPE's two addresses")

    def cluster_proxy_config(self, pod: int, name: str, mechanism: str = "director",
                             **affinity: Any) -> dict[str, Any]:
        """A whole proxy configuration for pod `pod` behind the director."""
        return {
            "listen": {"convert": "[::]:5124", "socks5": "[::]:1080"},
            "admin": "127.0.0.1:9090",
            "policy": {"allowed_cpes": self.cpe_prefixes},
            "affinity": self.affinity_config(pod, name, mechanism, **affinity),
            # Teardown should not wait long for a drain.
            "drain_timeout_s": 1.0,
        }

    def set_cpe_endpoints(self, flags: Sequence[str]) -> None:
        """Replace the CPE's MPTCP endpoints: every access address with `flags` (e.g.
        ["subflow"], or ["subflow", "fullmesh"] which the join-address mechanism needs)."""
        self._ip("cpe", "mptcp", "endpoint", "flush")
        for link in self.links.values():
            for addr in (link.cpe_ip, link.cpe_ip6):
                self._ip("cpe", "mptcp", "endpoint", "add", addr, "dev", link.name, *flags)

    def _wait_carrier(self, namespaces: Sequence[str], timeout_s: float = 5.0) -> None:
        # A fresh veth reports NO-CARRIER until the kernel's linkwatch runs (up to ~1 s later);
        # wait so that the first packets of a test are not dropped or delayed.
        deadline = time.monotonic() + timeout_s
        pending = list(namespaces)
        while pending:
            pending = [ns for ns in pending
                       if "NO-CARRIER" in self._run(["ip", "-n", self.ns(ns), "-o", "link", "show", "up"]).stdout]
            if pending and time.monotonic() > deadline:
                raise LabError(f"links without carrier after {timeout_s}s in {pending}")
            if pending:
                time.sleep(0.05)

    def shape(self, link: str, shaping: LinkShaping | None) -> None:
        """Apply (or with None remove) shaping on both ends of an access link.

        netem gives rate and delay; kernels built without sch_netem (like the 6.18 one measured
        here) get a TBF rate limit only, and the delay is reported in `self.warnings`.
        """
        for ns in ("cpe", "rtr"):
            self._run(["tc", "-n", self.ns(ns), "qdisc", "del", "dev", link, "root"], check=False)
            if shaping is None or (shaping.rate_mbit is None and not shaping.delay_ms):
                continue
            tc = ["tc", "-n", self.ns(ns), "qdisc", "add", "dev", link, "root"]
            netem = [*tc, "netem", "limit", str(shaping.limit_packets)]
            if shaping.delay_ms:
                netem += ["delay", f"{shaping.delay_ms}ms"]
            if shaping.rate_mbit is not None:
                netem += ["rate", f"{shaping.rate_mbit}mbit"]
            if self._run(netem, check=False).returncode == 0:
                continue
            if shaping.delay_ms:
                self._warn(f"{link}: no sch_netem in this kernel, {shaping.delay_ms} ms delay not applied")
            if shaping.rate_mbit is not None:
                # A 64 KiB bucket lets veth's GSO packets through whole; 50 ms of queue.
                self._run([*tc, "tbf", "rate", f"{shaping.rate_mbit}mbit", "burst", "64kb",
                           "latency", "50ms"])

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            print(f"mcpool lab: warning: {text}", file=sys.stderr)

    def cut_link(self, name: str) -> None:
        """Cut an access link at the router end, like a line losing sync upstream: the CPE's
        side keeps its addresses and routes (now `linkdown`), packets are dropped, and MPTCP
        has to notice by itself and move the data to the other subflows."""
        if name not in self.links:
            raise LabError(f"no access link {name!r}")
        self._ip("rtr", "link", "set", name, "down")

    def restore_link(self, name: str) -> None:
        if name not in self.links:
            raise LabError(f"no access link {name!r}")
        self._ip("rtr", "link", "set", name, "up")
        self._wait_carrier(["cpe", "rtr"])

    # ---- processes -------------------------------------------------------------------------

    def start_proxy(self, config: ProxyConfig | Mapping[str, Any], *, pod: int = 0,
                    ready_timeout_s: float = 20.0, name: str | None = None) -> ProxyProcess:
        """Write `config` as YAML, run `mcpool proxy --config` in pod `pod`'s namespace, and wait
        for its ready line (a LabError carries its stderr if it exits or times out)."""
        if self.workdir is None:
            raise LabError("lab is not up")
        cfg = config if isinstance(config, ProxyConfig) else parse_config(dict(config), "start_proxy")
        label = name or f"proxy{len(self._proxies)}"
        config_path = self.workdir / f"{label}.yaml"
        config_path.write_text(cfg.to_yaml())
        stderr_path = self.workdir / f"{label}.stderr"
        with open(stderr_path, "w") as stderr_file:
            proc = self.popen(self.pods[pod].ns,
                              self.python_argv("mcpool_proxy.cli", "proxy", "--config", str(config_path)),
                              stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        handle = ProxyProcess(self, self.pods[pod].ns, proc, cfg, config_path, stderr_path)
        self._proxies.append(handle)
        try:
            handle.wait_ready(ready_timeout_s)
        except BaseException:
            handle.stop(2)
            raise
        return handle

    def start_testserver(self, listen: str, *, ns: str = "srv", mptcp: bool = False,
                         ready_timeout_s: float = 10.0) -> subprocess.Popen[str]:
        """Run `python -m mcpool_tools.testserver` in `ns` and wait for `testserver ready`."""
        argv = self.python_argv("mcpool_tools.testserver", "--listen", listen)
        if mptcp:
            argv.append("--mptcp")
        proc = self.popen(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return _wait_for_line(proc, "testserver ready", ready_timeout_s)

    def _kill_namespace_pids(self, ns: str) -> None:
        out = self._run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid_text in out:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_text), signal.SIGKILL)

    def down(self) -> None:
        """Remove this prefix's namespaces (killing what still runs in them). Idempotent."""
        for handle in self._proxies:
            with contextlib.suppress(Exception):
                handle.stop(3)
        self._proxies.clear()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._procs.clear()
        self.redis = self.director = None
        for ns in existing_namespaces(self.prefix):
            self._kill_namespace_pids(ns)
            self._run(["ip", "netns", "del", ns], check=False)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._built = False

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- inspection ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "cpe": {name: {"ip": link.cpe_ip, "ip6": link.cpe_ip6, "router": link.rtr_ip}
                    for name, link in self.links.items()},
            "pods": [{"ns": p.ns, "ip": p.ip, "ip6": p.ip6} for p in self.pods],
            "srv": {"ip": self.srv_ip, "ip6": self.srv_ip6},
            "cpe_prefixes": self.cpe_prefixes,
        }


class ImplicitLab(Lab):
    r"""Implicit mode's topology (issue 9): a LAN behind the CPE, the MCP on the CPE's DSL path.

    ```
    {p}-lap eth0 198.18.10.2 -- lan0 \                                       / srv 198.18.200.1 -- {p}-srv 198.18.200.2
    {p}-phn wlan 198.18.11.2 -- lan1  {p}-cpe dsl 198.18.1.2 -- dsl 198.18.1.1 {p}-mcp wan 198.18.100.2 -- mcp {p}-rtr
            cell 198.18.3.2 ----------------- lte 198.18.2.2 ------------------------- lte 198.18.2.1 /
                     \_______________________________________________________ cell 198.18.3.1 /
    ```

    (plus 2001:db8:<subnet>::/64 IPv6 on every link). The CPE (forwarding) routes by default over
    DSL, i.e. through the MCP, and traffic from its LTE address over LTE; its LTE address is an
    MPTCP `subflow` endpoint, `add_addr_accepted 0`. The MCP forwards everything else (it is the
    CPE's DSL gateway) and the router routes the subscriber prefixes (LAN and DSL) back through
    the MCP: a symmetric path, which an MCP that connects upstream from its clients' own
    addresses needs. The phone routes by default over the CPE's Wi-Fi and from its cellular
    address over its own link to the router, which never passes the CPE nor the MCP; its
    cellular address is a `subflow` endpoint, so its own MPTCP has two subflows. The server is
    MPTCP-capable. The CPE's and the MCP's processes are started by the caller.
    """

    def __init__(self, prefix: str = "mti") -> None:
        super().__init__(Topology(prefix=prefix, access_links=("dsl", "lte")))
        self.lan = {"lap": ("lan0", "198.18.10.1", "198.18.10.2", "2001:db8:10::1", "2001:db8:10::2"),
                    "phn": ("lan1", "198.18.11.1", "198.18.11.2", "2001:db8:11::1", "2001:db8:11::2")}
        self.laptop_ip, self.laptop_ip6 = "198.18.10.2", "2001:db8:10::2"
        self.phone_ip, self.phone_ip6 = "198.18.11.2", "2001:db8:11::2"
        self.phone_cell_ip, self.phone_cell_ip6 = "198.18.3.2", "2001:db8:3::2"
        # The MCP's side of the CPE's DSL link (the CPE's gateway).
        self.mcp_dsl_ip, self.mcp_dsl_ip6 = "198.18.1.1", "2001:db8:1::1"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ("lap", "phn", "cpe", "mcp", "rtr", "srv")]

    @property
    def subscriber_prefixes(self) -> list[str]:
        """The CPE's LAN and access prefixes: what the MCP's `policy.allowed_cpes` needs."""
        return ["198.18.10.0/24", "198.18.11.0/24", "198.18.1.0/24", "198.18.2.0/24",
                "2001:db8:10::/64", "2001:db8:11::/64", "2001:db8:1::/64", "2001:db8:2::/64"]

    def _route(self, ns: str, dest: str, via: str) -> None:
        self._ip(ns, *(["-6"] if ":" in dest else []), "route", "add", dest, "via", via)

    def _build(self) -> None:
        for ns in self.namespaces:
            self._run(["ip", "netns", "add", ns])
            self._ip(ns, "link", "set", "lo", "up")
            base: dict[str, str | int] = {
                "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                "net.ipv6.conf.all.keep_addr_on_down": 1, "net.ipv6.conf.default.keep_addr_on_down": 1,
                "net.mptcp.enabled": 1, "net.mptcp.checksum_enabled": 1,
            }
            if ns in (self.ns("cpe"), self.ns("mcp"), self.ns("rtr")):
                base.update({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
            self.sysctl(ns, base)
        # LAN: one link per host (no bridge: bridge netfilter would lose TPROXY's socket).
        for host, (dev, gw4, ip4, gw6, ip6) in self.lan.items():
            hostdev = "eth0" if host == "lap" else "wlan"
            self._veth("cpe", dev, host, hostdev)
            self._addr("cpe", dev, gw4, gw6)
            self._addr(host, hostdev, ip4, ip6)
            self._ip(host, "route", "add", "default", "via", gw4, "dev", hostdev)
            self._ip(host, "-6", "route", "add", "default", "via", gw6, "dev", hostdev)
        dsl, lte = self.links["dsl"], self.links["lte"]
        # DSL: CPE <-> MCP (on the path); MCP <-> router.
        self._veth("cpe", "dsl", "mcp", "dsl")
        self._addr("cpe", "dsl", dsl.cpe_ip, dsl.cpe_ip6)
        self._addr("mcp", "dsl", self.mcp_dsl_ip, self.mcp_dsl_ip6)
        pod = self.pods[0]
        self._veth("mcp", "wan", "rtr", "mcp")
        self._addr("mcp", "wan", pod.ip, pod.ip6)
        self._addr("rtr", "mcp", pod.rtr_ip, pod.rtr_ip6)
        # LTE: CPE <-> router; the phone's cellular link: phone <-> router.
        self._veth("cpe", "lte", "rtr", "lte")
        self._addr("cpe", "lte", lte.cpe_ip, lte.cpe_ip6)
        self._addr("rtr", "lte", lte.rtr_ip, lte.rtr_ip6)
        self._veth("phn", "cell", "rtr", "cell")
        self._addr("phn", "cell", self.phone_cell_ip, self.phone_cell_ip6)
        self._addr("rtr", "cell", "198.18.3.1", "2001:db8:3::1")
        self._veth("srv", "eth0", "rtr", "srv")
        self._addr("srv", "eth0", self.srv_ip, self.srv_ip6)
        self._addr("rtr", "srv", "198.18.200.1", "2001:db8:200::1")
        # Routes.
        self._ip("cpe", "route", "add", "default", "via", self.mcp_dsl_ip, "dev", "dsl")
        self._ip("cpe", "-6", "route", "add", "default", "via", self.mcp_dsl_ip6, "dev", "dsl")
        for fam, src, gw in (("-4", lte.cpe_ip, lte.rtr_ip), ("-6", lte.cpe_ip6, lte.rtr_ip6)):
            self._ip("cpe", fam, "rule", "add", "from", src, "table", str(lte.table), "pref", "1001")
            self._ip("cpe", fam, "route", "add", "default", "via", gw, "dev", "lte", "table", str(lte.table))
        self._ip("mcp", "route", "add", "default", "via", pod.rtr_ip)
        self._ip("mcp", "-6", "route", "add", "default", "via", pod.rtr_ip6)
        for net in ("198.18.10.0/24", "198.18.11.0/24"):
            self._route("mcp", net, dsl.cpe_ip)
            self._route("rtr", net, pod.ip)
        for net in ("2001:db8:10::/64", "2001:db8:11::/64"):
            self._route("mcp", net, dsl.cpe_ip6)
            self._route("rtr", net, pod.ip6)
        self._route("rtr", "198.18.1.0/24", pod.ip)
        self._route("rtr", "2001:db8:1::/64", pod.ip6)
        for fam, src, gw in (("-4", self.phone_cell_ip, "198.18.3.1"), ("-6", self.phone_cell_ip6, "2001:db8:3::1")):
            self._ip("phn", fam, "rule", "add", "from", src, "table", "101", "pref", "1001")
            self._ip("phn", fam, "route", "add", "default", "via", gw, "dev", "cell", "table", "101")
        self._ip("srv", "route", "add", "default", "via", "198.18.200.1")
        self._ip("srv", "-6", "route", "add", "default", "via", "2001:db8:200::1")
        # MPTCP: the CPE's and the phone's second links are subflow endpoints.
        self._ip("cpe", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "0")
        for addr in (lte.cpe_ip, lte.cpe_ip6):
            self._ip("cpe", "mptcp", "endpoint", "add", addr, "dev", "lte", "subflow")
        self._ip("phn", "mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "0")
        for addr in (self.phone_cell_ip, self.phone_cell_ip6):
            self._ip("phn", "mptcp", "endpoint", "add", addr, "dev", "cell", "subflow")
        self._ip("mcp", "mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "0")
        self._ip("srv", "mptcp", "limits", "set", "subflows", "8", "add_addr_accepted", "8")
        self._wait_carrier(self.namespaces)

    def cut_link(self, name: str) -> None:
        """Cut the DSL (at the MCP's end) or LTE (at the router's end), as the line losing sync:
        the CPE's side keeps its addresses and routes, and MPTCP must notice by itself."""
        self._ip("mcp" if name == "dsl" else "rtr", "link", "set", name, "down")

    def restore_link(self, name: str) -> None:
        self._ip("mcp" if name == "dsl" else "rtr", "link", "set", name, "up")
        self._wait_carrier(["cpe", "mcp", "rtr"])
        if name == "dsl":
            # The kernel dropped the routes through the CPE when the device went down.
            dsl = self.links["dsl"]
            for net in ("198.18.10.0/24", "198.18.11.0/24"):
                self._ip("mcp", "route", "replace", net, "via", dsl.cpe_ip)
            for net in ("2001:db8:10::/64", "2001:db8:11::/64"):
                self._ip("mcp", "-6", "route", "replace", net, "via", dsl.cpe_ip6)

    def mcp_config(self, transparent_port: int = 5125, join_port: int = 5126) -> dict[str, Any]:
        """The on-path MCP's configuration: transparent listeners on its own addresses, the
        subscriber prefixes allowed, the IPv4 join address announced (IPv6 connections join it
        too: an IPv6 ADD_ADDR with a port does not fit beside TCP timestamps)."""
        return {
            "listen": {"convert": None, "transparent": [f"{self.mcp_ip}:{transparent_port}",
                                                        f"[{self.mcp_ip6}]:{transparent_port}"]},
            "admin": "127.0.0.1:9090",
            "policy": {"allowed_cpes": self.subscriber_prefixes},
            "transparent": {"join_address": f"{self.mcp_ip}:{join_port}", "cpe_interfaces": ["dsl"]},
            "log_level": "debug",
        }

    def cpe_config(self, **overrides: Any) -> dict[str, Any]:
        """The lab CPE converter's configuration (`mcpool cpe`): both LAN links, implicit mode."""
        config: dict[str, Any] = {
            "listen": ["198.18.10.1:5200", "[2001:db8:10::1]:5200"],
            "lan_interfaces": ["lan0", "lan1"],
            "lan_prefixes": ["198.18.10.0/24", "198.18.11.0/24", "2001:db8:10::/64", "2001:db8:11::/64"],
            "admin": "127.0.0.1:9091",
            "log_level": "debug",
        }
        config.update(overrides)
        return config

    def start_cpe(self, config: Mapping[str, Any], *, ready_timeout_s: float = 20.0,
                  name: str = "cpe") -> ProxyProcess:
        """Run `mcpool cpe --config` in the CPE namespace and wait for its ready line."""
        from mcpool_proxy.cpe.config import parse_cpe_config

        if self.workdir is None:
            raise LabError("lab is not up")
        cfg = parse_cpe_config(dict(config), "start_cpe")
        config_path = self.workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        stderr_path = self.workdir / f"{name}.stderr"
        with open(stderr_path, "w") as stderr_file:
            proc = self.popen("cpe", self.python_argv("mcpool_proxy.cli", "cpe", "--config", str(config_path)),
                              stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        handle = ProxyProcess(self, self.ns("cpe"), proc, cfg.to_proxy_config(), config_path, stderr_path)
        self._proxies.append(handle)
        try:
            handle.wait_ready(ready_timeout_s)
        except BaseException:
            handle.stop(2)
            raise
        return handle

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "namespaces": self.namespaces, "laptop": self.laptop_ip,
                "phone": {"wlan": self.phone_ip, "cell": self.phone_cell_ip}, "cpe": {
                    n: link.cpe_ip for n, link in self.links.items()}, "mcp": self.mcp_ip, "srv": self.srv_ip}


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> subprocess.Popen[str]:
    """Wait until `proc` prints `needle` on stdout; keep draining stdout afterwards."""
    assert proc.stdout is not None
    found = threading.Event()
    seen: list[str] = []

    def reader(stream: IO[str]) -> None:
        for line in stream:
            if len(seen) < 200:
                seen.append(line.rstrip("\n"))
            if needle in line:
                found.set()

    threading.Thread(target=reader, args=(proc.stdout,), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise LabError(f"{proc.args!r} did not print {needle!r} (exit {proc.poll()}): "
                           f"stdout {seen!r} stderr {err!r}")
    if proc.stderr is not None:
        # Nobody reads stderr any more: drain it so the process never blocks on it.
        threading.Thread(target=lambda s: s.read(), args=(proc.stderr,), daemon=True).start()
    return proc


def existing_namespaces(prefix: str) -> list[str]:
    """Namespaces that exist now and belong to a lab with this prefix."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    pattern = re.compile(rf"{re.escape(prefix)}-{_ROLE_PATTERN}")
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if pattern.fullmatch(n)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcpool lab", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--prefix", default="mcl", help="namespace name prefix (default mcl)")
    parser.add_argument("--pods", type=int, default=1, help="number of MCP pod namespaces")
    parser.add_argument("--director", action="store_true",
                        help="add the director namespace (VIP, redis-server, `mcpool director`) in front of the pods")
    parser.add_argument("--vip", default=Topology.vip,
                        help=f"the pool's VIP with --director, IPv4 or IPv6 (default {Topology.vip}; "
                             "e.g. 2001:db8:255::1: the director then steers IPv6 CPEs)")
    parser.add_argument("--shape", action="append", default=[], metavar="LINK=SPEC",
                        help="shape an access link, e.g. dsl=40mbit,10ms (repeatable)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("mcpool lab: needs root (network namespaces)", file=sys.stderr)
        return 1
    shaping: dict[str, LinkShaping] = {}
    for item in args.shape:
        link, _, spec = item.partition("=")
        shaping[link] = LinkShaping.parse(spec)
    try:
        topology = Topology(prefix=args.prefix, pods=args.pods, shaping=shaping, director=args.director,
                            vip=args.vip)
    except ValueError as exc:
        print(f"mcpool lab: {exc}", file=sys.stderr)
        return 2
    lab = Lab(topology)
    if args.action == "down":
        lab.down()
        print(f"lab {args.prefix}: down")
        return 0
    if args.action == "up":
        lab.up()
        if args.director:
            # Detached (own sessions): they outlive this command; `lab down` kills them.
            lab.start_redis()
            lab.start_director()
            print(f"director on VIP {lab.vip} in {lab.ns('dir')}, redis at {lab.redis_url}; start pods with "
                  f"affinity {{mechanism: director, backend: redis, redis_url: {lab.redis_url}, pool: lab}}")
        # The lab outlives this command: forget the work dir instead of removing it.
        print(yaml.safe_dump(lab.describe(), sort_keys=False), end="")
        print(f"lab {args.prefix}: up (e.g. `ip netns exec {lab.ns('cpe')} ping {lab.srv_ip}`; "
              f"`mcpool lab down --prefix {args.prefix}` removes it)")
        return 0
    present = existing_namespaces(args.prefix)
    if not present:
        print(f"lab {args.prefix}: not running")
        return 1
    for ns in present:
        print(f"== {ns}")
        for cmd in (["ip", "-br", "addr"], ["ip", "mptcp", "endpoint"], ["ip", "mptcp", "limits"]):
            out = subprocess.run(["ip", "-n", ns, *cmd[1:]], capture_output=True, text=True).stdout
            for line in out.splitlines():
                print(f"   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
